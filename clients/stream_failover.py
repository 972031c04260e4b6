"""Keep a ``StreamFeatures`` loop going when the replica its stream is pinned to dies.

A stream lives on one connection, so one replica; when that replica goes away the stream ends
``UNAVAILABLE``. The clients then open a new stream on the same (balanced) channel, which lands on
a live replica, and go on with the caller's next frame. Frames the dead replica had received and not
answered come back as ``StreamResult``s with an ``UNAVAILABLE`` error — never re-sent (a frame of a
control loop is stale by then) and never silently lost; frames not yet sent go on the new stream.

``FrameFeed`` (threads, the sync client) and ``AsyncFrameFeed`` (``grpc.aio``) hand the caller's
frames to one stream at a time and remember which were sent and not answered.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any, AsyncIterable, AsyncIterator, Callable, Iterable, Iterator

import grpc

from clients.messages import Frame, StreamResult, VitServeError

RECONNECT_ATTEMPTS = 6  # consecutive streams that ended UNAVAILABLE before a response: then give up
RECONNECT_INITIAL_BACKOFF_S = 0.1
RECONNECT_MAX_BACKOFF_S = 2.0

_END = object()


def lost_frame(frame_id: int, cause: str) -> StreamResult:
    """The result of a frame whose replica died before answering it."""
    return StreamResult(frame_id, False, None, VitServeError(
        grpc.StatusCode.UNAVAILABLE, f"the stream's replica went away before answering frame {frame_id} "
        f"({cause}); the stream goes on on another replica, this frame was not sent again"))


def backoff_s(failures: int) -> float:
    """Seconds before re-opening a stream after ``failures`` (>= 1) consecutive failed ones."""
    return min(RECONNECT_MAX_BACKOFF_S, RECONNECT_INITIAL_BACKOFF_S * 2 ** (failures - 1))


class FrameFeed:
    """The caller's frames, fed to one stream (one ``generation``) at a time.

    gRPC reads a stream's requests on its own thread, which may still be waiting for the caller's
    next frame when the stream dies; the frame it then gets belongs to no stream and is kept for the
    next one (``carry``). ``_next_lock`` keeps two streams from pulling at once.
    """

    def __init__(self, frames: Iterable[Frame], make_request: Callable[[Frame], Any]) -> None:
        self._frames = iter(frames)
        self._make_request = make_request
        self._next_lock = threading.Lock()
        self._lock = threading.Lock()
        self._carry: collections.deque[Frame] = collections.deque()
        self._pending: collections.deque[int] = collections.deque()  # sent, not answered (frame ids)
        self.generation = 0

    def _pull(self) -> Frame | object:
        with self._next_lock:
            if self._carry:
                return self._carry.popleft()
            return next(self._frames, _END)

    def requests(self, generation: int) -> Iterator[Any]:
        """The requests of the stream of ``generation``; ends when the frames do or that stream is over."""
        while True:
            frame = self._pull()
            if frame is _END:
                return
            with self._lock:
                if generation != self.generation:  # this stream is dead: the next one sends the frame
                    self._carry.appendleft(frame)  # type: ignore[arg-type]
                    return
                self._pending.append(int(frame[0]))  # type: ignore[index]
            yield self._make_request(frame)  # type: ignore[arg-type]

    def answered(self, frame_id: int) -> None:
        with self._lock:
            while self._pending:
                if self._pending.popleft() == frame_id:  # answers come in frame order
                    break

    def fail_over(self) -> list[int]:
        """End the current stream's share of the frames; the frame ids it sent and did not answer."""
        with self._lock:
            self.generation += 1
            lost = list(self._pending)
            self._pending.clear()
        return lost


class AsyncFrameFeed:
    """``FrameFeed`` for ``grpc.aio``: a pump task reads the caller's (async) frames into a queue of
    one, so that the end of a stream (which cancels its request iterator) never cancels the caller's
    own generator."""

    def __init__(self, frames: Iterable[Frame] | AsyncIterable[Frame], make_request: Callable[[Frame], Any]) -> None:
        self._frames = frames
        self._make_request = make_request
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=1)
        self._carry: collections.deque[object] = collections.deque()
        self._pending: collections.deque[int] = collections.deque()
        self._pump: asyncio.Task[None] | None = None
        self.generation = 0

    async def _read(self) -> None:
        try:
            if isinstance(self._frames, AsyncIterable):
                async for f in self._frames:
                    await self._queue.put(f)
            else:
                for f in self._frames:
                    await self._queue.put(f)
        finally:
            await self._queue.put(_END)

    async def requests(self, generation: int) -> AsyncIterator[Any]:
        if self._pump is None:
            self._pump = asyncio.create_task(self._read())
        while True:
            frame = self._carry.popleft() if self._carry else await self._queue.get()
            if frame is _END:
                self._carry.appendleft(_END)  # every later stream ends too
                return
            if generation != self.generation:
                self._carry.appendleft(frame)
                return
            self._pending.append(int(frame[0]))  # type: ignore[index]
            yield self._make_request(frame)  # type: ignore[arg-type]

    def answered(self, frame_id: int) -> None:
        while self._pending:
            if self._pending.popleft() == frame_id:
                break

    def fail_over(self) -> list[int]:
        self.generation += 1
        lost = list(self._pending)
        self._pending.clear()
        return lost

    async def close(self) -> None:
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
            try:
                await self._pump
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the caller's generator's own end
                pass
