"""The gateway's gRPC health status, kept in step with Triton's readiness (NOT_SERVING while it is down)."""

from __future__ import annotations

import asyncio
import logging
import time

from grpc_health.v1 import health, health_pb2

from serving.interceptors import SERVICE_NAME
from serving.service import EncoderService
from serving.triton_events import DOWN_EVENTS, EVENT_RESTARTED, TritonEvents

log = logging.getLogger(__name__)

BACK_CONFIRM_S = 5.0  # after the supervisor's "restarted": how long the gateway's channel may take to reconnect


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool = True) -> None:
    """Health of the whole server ("") and of the vitserve service: SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, status)


async def _ready_soon(service: EncoderService, within: float) -> bool:
    """Whether Triton answers ready within ``within`` seconds. The supervisor has seen it ready on its
    own connection; the gateway's channel may still be in its reconnect backoff (up to 1 s) and fail
    fast meanwhile, so look again every 50 ms rather than wait for the next poll."""
    deadline = time.monotonic() + within
    while not await service.backend.is_ready():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def watch_triton(service: EncoderService, health_servicer: health.aio.HealthServicer,
                       interval: float = 2.0, events: TritonEvents | None = None) -> None:
    """Keep the health status in step with Triton's readiness (NOT_SERVING while it is down).

    Readiness is polled every ``interval`` seconds; with ``events`` (an embedded, supervised Triton)
    the supervisor's ``down`` turns health NOT_SERVING at once and its ``restarted`` SERVING at
    once. Between the two, polling cannot turn it SERVING: a restarting server may answer ready
    before its models are. When Triton is back, the model list is re-read before the status turns
    SERVING again.
    """
    serving = True
    restarting = False  # the supervisor said down and has not said restarted yet
    queue = events.attach() if events is not None else None
    try:
        while True:
            event = None
            if queue is None:
                await asyncio.sleep(interval)
            else:
                try:
                    event = await asyncio.wait_for(queue.get(), interval)
                except asyncio.TimeoutError:
                    pass
            if event in DOWN_EVENTS:
                restarting = True
                ready = False
            elif event == EVENT_RESTARTED:
                restarting = False
                ready = await _ready_soon(service, BACK_CONFIRM_S)
            elif event is not None:  # e.g. restart_failed: still down, nothing changes
                continue
            else:
                ready = await service.backend.is_ready() and not restarting
            if ready and not serving:
                try:
                    await service.registry.refresh()
                except Exception as e:  # noqa: BLE001 - not ready after all; look again next round
                    log.warning("triton is up but its models could not be listed: %s", e)
                    continue
            if ready != serving:
                serving = ready
                how = f"supervisor: {event}" if event is not None else "polled"
                log.warning("triton at %s is %s (%s)", service.triton_url,
                            "ready again" if ready else "not ready", how)
                await set_serving(health_servicer, ready)
    finally:
        if events is not None:
            events.detach()
