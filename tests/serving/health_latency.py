"""Measure how fast health follows an embedded Triton's death and return: the supervisor's push
against the 2 s readiness poll (a figure for docs/SERVING.md, not a test).

    python -m tests.serving.health_latency

Exports the tiny test encoder, then for each mode starts Triton under the supervisor and a gateway,
``kill -9``s tritonserver and reads the transitions off a health ``Watch`` stream.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.gateway import BackgroundGateway
from serving.grpc_server import ServerOptions
from serving.triton_events import TritonEvents
from serving.triton_launcher import TritonLauncher
from tests.serving.conftest import build_model_repository

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def measure(repository: Path, push: bool) -> str:
    launcher = TritonLauncher(repository, stop_grace=5)
    launcher.start(timeout=120)
    feed, back = TritonEvents(), []

    def on_event(event: str) -> None:
        if event == "restarted":
            back.append(time.monotonic())
        feed(event)

    try:
        launcher.supervise(max_restarts=3, backoff_initial=1.0, ready_timeout=120, on_event=on_event)
        options = ServerOptions(health_interval=2.0, triton_events=feed if push else None)
        with BackgroundGateway(launcher.grpc_url, options=options) as gw, grpc.insecure_channel(gw.target) as ch:
            seen: list[tuple[float, int]] = []
            call = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service="vitserve.v1.VisionEncoder"))

            def read() -> None:
                try:
                    seen.extend((time.monotonic(), r.status) for r in call)
                except grpc.RpcError:
                    pass  # cancelled below

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            time.sleep(1.0)
            killed = time.monotonic()
            os.kill(launcher.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
            while not back:
                time.sleep(0.01)
            time.sleep(4.0)  # > the poll interval: the poll, too, has seen it back
            call.cancel()
            reader.join(5)
        down = next(t for t, s in seen if s == NOT_SERVING and t > killed)
        up = next(t for t, s in seen if s == SERVING and t > down)
        return (f"{'push' if push else 'poll every 2 s'}: kill -9 -> NOT_SERVING {1e3 * (down - killed):.0f} ms; "
                f"supervisor sees models ready -> SERVING {1e3 * (up - back[0]):+.0f} ms; "
                f"kill -9 -> SERVING {up - killed:.2f} s")
    finally:
        launcher.stop()


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    repository = Path(tempfile.mkdtemp(prefix="vitserve-health-")) / "repository"
    build_model_repository(repository)
    for push in (True, False):
        print(measure(repository, push), flush=True)


if __name__ == "__main__":
    main()
