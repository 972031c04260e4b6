"""The launcher's supervisor brings back an embedded Triton that was killed (``kill -9``).

A real tritonserver under a real gateway: while it is down calls end UNAVAILABLE (none hangs) and
health is NOT_SERVING; it comes back on the same ports with correct answers, the restart is counted
in the metrics; a second death past ``max_restarts`` is given up on and left down. Health follows the
supervisor's events (the readiness poll is set to an hour, so only the push can change it).
"""

import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import VitServeClient, VitServeError
from serving.gateway import BackgroundGateway
from serving.grpc_server import ServerOptions
from serving.metrics import GatewayMetrics
from serving.triton_events import TritonEvents
from serving.triton_launcher import TritonLaunchError, TritonLauncher

SERVICE = "vitserve.v1.VisionEncoder"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout: float, what: str, last=lambda: None) -> None:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what} did not happen within {timeout}s; last seen: {last()}")
        time.sleep(0.05)


def health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status


class HealthWatch:
    """The statuses a health ``Watch`` stream reports, in order, from a thread."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.statuses: list[int] = []
        self.ended: grpc.RpcError | None = None
        self._call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for response in self._call:
                self.statuses.append(response.status)
        except grpc.RpcError as e:
            self.ended = e  # cancelled at the end (anything else shows in a failure)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._call.cancel()
        self._thread.join(10)


class CallLoop:
    """Embed calls back to back from a thread, recording each outcome's status code."""

    def __init__(self, target: str, images: np.ndarray) -> None:
        self.codes: list[grpc.StatusCode] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(target, images), daemon=True)

    def _run(self, target: str, images: np.ndarray) -> None:
        # A generous deadline: a call that hung on the dead server would end DEADLINE_EXCEEDED.
        with VitServeClient(target, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    client.embed(images)
                    self.codes.append(grpc.StatusCode.OK)
                except VitServeError as e:
                    self.codes.append(e.code)
                time.sleep(0.01)

    def __enter__(self) -> "CallLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)


def test_killed_triton_is_restarted_on_same_ports(exported, torch_reference):
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    want_cls, _ = torch_reference(images)
    events: list[str] = []
    metrics = GatewayMetrics()
    feed = TritonEvents()

    def on_event(event: str) -> None:
        events.append(event)
        metrics.observe_triton_event(event)
        feed(event)

    launcher = TritonLauncher(exported.repository, stop_grace=5)
    try:
        launcher.start(timeout=120)
        with pytest.raises(TritonLaunchError, match="already running"):
            launcher.start()
        ports = (launcher.grpc_port, launcher.http_port, launcher.metrics_port)
        launcher.supervise(max_restarts=1, backoff_initial=1.0, ready_timeout=120, on_event=on_event)
        # No readiness polling within the test: every health change below is the supervisor's push.
        options = ServerOptions(health_interval=3600, metrics=metrics, triton_events=feed)
        with BackgroundGateway(launcher.grpc_url, options=options) as gw, \
                grpc.insecure_channel(gw.target) as channel, VitServeClient(gw.target, timeout=30) as client, \
                HealthWatch(channel) as watch:
            wait_for(lambda: health(channel) == SERVING, 60, "SERVING at start")
            first_pid = launcher.process.pid

            with CallLoop(gw.target, images) as loop:
                wait_for(lambda: grpc.StatusCode.OK in loop.codes, 60, "a call before the kill")
                os.kill(first_pid, signal.SIGKILL)
                wait_for(lambda: health(channel) == NOT_SERVING, 60, "NOT_SERVING after kill -9")
                wait_for(lambda: launcher.restarts == 1, 120, "the restart")
                wait_for(lambda: health(channel) == SERVING, 60, "SERVING after the restart")
                # The Watch stream's thread may record that change a moment after the unary check sees it.
                wait_for(lambda: watch.statuses[-1:] == [SERVING], 60, "the Watch stream's SERVING",
                         lambda: (watch.statuses, watch.ended))
                assert watch.statuses[-3:] == [SERVING, NOT_SERVING, SERVING], watch.statuses
                n = len(loop.codes)
                wait_for(lambda: len(loop.codes) > n and loop.codes[-1] == grpc.StatusCode.OK, 60,
                         "a call answered after the restart")
            assert set(loop.codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, loop.codes
            assert grpc.StatusCode.UNAVAILABLE in loop.codes  # calls while it was down failed fast

            assert launcher.process.pid != first_pid
            assert (launcher.grpc_port, launcher.http_port, launcher.metrics_port) == ports
            with pytest.raises(ProcessLookupError):  # the dead server's backend stubs are gone too
                os.killpg(first_pid, 0)
            cls = client.embed(images)
            np.testing.assert_allclose(cls, want_cls, rtol=1e-4, atol=1e-4)
            assert events == ["down", "restarted"]
            assert metrics.triton_restarts._value.get() == 1
            assert metrics.triton_up._value.get() == 1

            # Past max_restarts within the window: given up on, left down, reported.
            os.kill(launcher.process.pid, signal.SIGKILL)
            wait_for(lambda: launcher.gave_up, 60, "giving up")
            assert events == ["down", "restarted", "down", "gave_up"]
            assert launcher.poll() is not None and metrics.triton_up._value.get() == 0
            wait_for(lambda: health(channel) == NOT_SERVING, 60, "NOT_SERVING after giving up")
            # As above: the Watch thread may record the change a moment after the unary check sees it.
            wait_for(lambda: watch.statuses[-1:] == [NOT_SERVING], 60, "the Watch stream's NOT_SERVING",
                     lambda: (watch.statuses, watch.ended))
            assert watch.statuses[-4:] == [SERVING, NOT_SERVING, SERVING, NOT_SERVING], watch.statuses
            with pytest.raises(VitServeError) as e:
                client.embed(images)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        launcher.stop()
    assert not launcher.supervised


def test_supervise_needs_a_running_server(tmp_path):
    launcher = TritonLauncher(tmp_path)
    with pytest.raises(TritonLaunchError, match="call start\\(\\) first"):
        launcher.supervise()


def test_restart_reloads_only_the_models_that_were_loaded(exported, torch_reference, tmp_path):
    """Explicit model control: a model unloaded through admin stays unloaded after Triton is killed and
    restarted by the supervisor (wired as ``vitserve serve --enable-admin`` wires it); the others serve."""
    import shutil

    from serving.embedded import supervise_embedded

    repo = tmp_path / "repository"
    for name in ("keep", "drop"):
        shutil.copytree(exported.repository / exported.name, repo / name)
        config = repo / name / "config.pbtxt"
        config.write_text(config.read_text().replace(f'name: "{exported.name}"', f'name: "{name}"'))
    images = np.random.default_rng(1).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    want_cls, _ = torch_reference(images)
    launcher = TritonLauncher(repo, stop_grace=5, explicit_model_control=True)
    try:
        assert launcher.start(timeout=120) == ["drop", "keep"]
        assert launcher.loaded_models == ["drop", "keep"]
        # A model exported after the start is not loaded by a restart either (it was not loaded).
        shutil.copytree(repo / "keep", repo / "later")
        config = repo / "later" / "config.pbtxt"
        config.write_text(config.read_text().replace('name: "keep"', 'name: "later"'))
        options = ServerOptions(enable_admin=True, health_interval=3600)
        options = supervise_embedded(launcher, options, max_restarts=2, backoff=0.5, ready_timeout=120)
        with BackgroundGateway(launcher.grpc_url, options=options) as gw, \
                grpc.insecure_channel(gw.target) as channel, VitServeClient(gw.target, timeout=60) as client:
            assert client.unload_model("drop").state == "UNAVAILABLE"
            assert launcher.loaded_models == ["keep"]
            first_pid = launcher.process.pid
            os.kill(first_pid, signal.SIGKILL)
            wait_for(lambda: launcher.restarts == 1, 120, "the restart")
            wait_for(lambda: health(channel) == SERVING, 60, "SERVING after the restart")
            assert launcher.process.pid != first_pid and launcher.models == ["keep"]
            states = {m["name"]: m["state"] for m in client.list_repository()}
            assert states["keep"] == "READY" and states["drop"] != "READY" and states["later"] != "READY", states
            assert [m.name for m in client.list_models()] == ["keep"]
            with pytest.raises(VitServeError) as e:
                client.embed(images, model="drop")
            assert e.value.code == grpc.StatusCode.NOT_FOUND
            np.testing.assert_allclose(client.embed(images, model="keep"), want_cls, rtol=1e-4, atol=1e-4)

            # Loaded again through admin: the next restart brings it back too.
            assert client.load_model("drop").state == "READY"
            assert launcher.loaded_models == ["drop", "keep"]
            os.kill(launcher.process.pid, signal.SIGKILL)
            wait_for(lambda: launcher.restarts == 2, 120, "the second restart")
            wait_for(lambda: health(channel) == SERVING, 60, "SERVING after the second restart")
            assert sorted(m.name for m in client.list_models()) == ["drop", "keep"]
            np.testing.assert_allclose(client.embed(images, model="drop"), want_cls, rtol=1e-4, atol=1e-4)
    finally:
        launcher.stop()
