"""``StreamFeatures``: patch features for a robot control loop over one bidirectional stream.

Frames are read as they arrive (a reader task) and run one at a time, in order. A frame sent with
``latest_only`` that is still waiting when the model becomes free while a newer frame has already
arrived is answered ``skipped`` (no inference): a control loop wants the freshest observation, not
a queue of old ones. Every frame gets exactly one response, in the order sent; a frame that fails
gets its status code and message in the response and the stream goes on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

import grpc

from protos import vitserve_pb2
from serving.errors import Remaining, RequestError, UndecodableRequest

log = logging.getLogger(__name__)

# (request, time left, arrival time on time.perf_counter's clock) -> the frame's features
RunFrame = Callable[[vitserve_pb2.FeaturesRequest, Remaining, float], Awaitable[vitserve_pb2.FeaturesResponse]]
OnOutcome = Callable[[vitserve_pb2.StreamFeaturesRequest, str], None]  # (frame, "ran"|"skipped"|"error")


def is_stale(frame: vitserve_pb2.StreamFeaturesRequest, waiting_after_it: int) -> bool:
    """Latest frame wins: a ``latest_only`` frame is stale once any newer frame is waiting."""
    return frame.latest_only and waiting_after_it > 0


async def stream_features(
        run: RunFrame, request_iterator: AsyncIterator[vitserve_pb2.StreamFeaturesRequest],
        context: grpc.aio.ServicerContext,
        on_outcome: OnOutcome | None = None) -> AsyncIterator[vitserve_pb2.StreamFeaturesResponse]:
    """One response per request frame, in order; ``run`` computes a frame's features."""

    def outcome(frame: vitserve_pb2.StreamFeaturesRequest, what: str) -> None:
        if on_outcome is not None:
            on_outcome(frame, what)

    pending: collections.deque[vitserve_pb2.StreamFeaturesRequest] = collections.deque()
    arrivals: collections.deque[float] = collections.deque()  # perf_counter() when each frame arrived
    arrived = asyncio.Event()
    finished = False
    undecodable: UndecodableRequest | None = None

    async def read() -> None:
        nonlocal finished, undecodable
        try:
            async for frame in request_iterator:
                arrivals.append(time.perf_counter())
                pending.append(frame)
                arrived.set()
        except UndecodableRequest as e:  # the frames before it are answered, then the stream ends
            undecodable = e
        except Exception as e:  # the client went away mid-stream; the stream ends with it
            log.debug("stream reader stopped: %s", e)
        finally:
            finished = True
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            if not pending:
                if finished:
                    if undecodable is not None:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(undecodable))
                    return
                arrived.clear()  # no await since the check above: no frame can slip in between
                await arrived.wait()
                continue
            frame, arrived_at = pending.popleft(), arrivals.popleft()
            if is_stale(frame, len(pending)):
                outcome(frame, "skipped")
                yield vitserve_pb2.StreamFeaturesResponse(frame_id=frame.frame_id, skipped=True)
                continue
            try:
                features = await run(frame.request, context.time_remaining, arrived_at)
            except RequestError as e:
                outcome(frame, "error")
                yield vitserve_pb2.StreamFeaturesResponse(
                    frame_id=frame.frame_id, error_code=e.code.value[0], error_message=e.message)
                continue
            outcome(frame, "ran")
            yield vitserve_pb2.StreamFeaturesResponse(frame_id=frame.frame_id, features=features)
    finally:
        reader.cancel()
