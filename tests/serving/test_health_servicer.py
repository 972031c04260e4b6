"""The gateway's health service keeps every ``Watch`` stream of a service informed after another
watcher of that service goes away (grpcio-health-checking's own aio servicer does not)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serving.health_servicer import HealthServicer

SERVICE = "vitserve.v1.VisionEncoder"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _first_watcher_gone(servicer: health.aio.HealthServicer) -> bool:
    """Whether the server has run the cancelled stream's clean-up (each servicer shows it its own way)."""
    if isinstance(servicer, HealthServicer):
        return servicer._watchers.get(SERVICE) == 1
    return SERVICE not in servicer._server_watchers


async def _second_watcher_after_first_leaves(servicer: health.aio.HealthServicer, wait_s: float) -> list[int]:
    """Statuses the second of two Watch streams sees once the first was cancelled and the status changed."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set(SERVICE, SERVING)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            first = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            second = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            seen = [(await first.read()).status, (await second.read()).status]
            assert seen == [SERVING, SERVING]
            first.cancel()
            for _ in range(200):  # bounded: the cancellation reaches the server well within 10 s
                if _first_watcher_gone(servicer):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the server never ended the cancelled Watch stream")
            await servicer.set(SERVICE, NOT_SERVING)
            try:
                return [(await asyncio.wait_for(second.read(), wait_s)).status]
            except asyncio.TimeoutError:
                return []
            finally:
                second.cancel()
    finally:
        await server.stop(0)


def test_a_watch_stream_hears_changes_after_another_watcher_left():
    assert asyncio.run(_second_watcher_after_first_leaves(HealthServicer(), 60.0)) == [NOT_SERVING]


def test_control_grpcs_own_servicer_loses_the_second_watcher():
    """The fault this module exists for, on grpcio-health-checking's servicer; if it is fixed upstream
    this control fails, and serving/health_servicer.py can go."""
    upstream = health.aio.HealthServicer()
    seen = asyncio.run(_second_watcher_after_first_leaves(upstream, 2.0))  # a late answer would only hide it
    if seen == [NOT_SERVING]:
        pytest.fail("grpc's aio HealthServicer now informs the remaining watchers: drop serving/health_servicer.py")
    assert seen == []
