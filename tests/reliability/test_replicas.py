"""Three replicas behind one client target: kill one under load, rejoin, stream failover, rolling
restart, admin fan-out, the health port under TLS + token.

One fleet per module: ``vitserve serve --replicas 3`` (each replica its own gateway and embedded
Triton on 127.0.0.1), shared by the tests in file order; a test that kills a replica leaves it for
the next to start again. Clients use the multi-address target (gRPC round_robin with health checking,
UNAVAILABLE retried). Counts a server keeps are read from its /metrics with bounded polls.

With ``VITSERVE_REPLICA_FIGURES=FILE`` the figures (calls sent / failed, rejoin time, ...) are
written to FILE as JSON (docs/RELIABILITY.md quotes them).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import AsyncVitServeClient, VitServeClient, VitServeError, channel_credentials
from tests.reliability.conftest import ATOL

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
N = 3
DRAIN_S = 1.0
START_TIMEOUT_S = 180.0
REJOIN_BOUND_S = 30.0  # the client reconnects within 2 s (clients.targets.MAX_RECONNECT_BACKOFF_MS)
FIGURES: dict[str, object] = {}
_READY = re.compile(r"^vitserve ready: gateway (127\.0\.0\.1:\d+), health (127\.0\.0\.1:\d+), "
                    r"triton grpc (127\.0\.0\.1:\d+), models: (.+)$")
_REPLICA = re.compile(r"^replica (\d+): pid (\d+): (vitserve ready: .*)$")


def _consecutive_free_ports(n: int) -> int:
    """A port P with P..P+n-1 free now, below the kernel's ephemeral range: no ``bind(0)`` (the
    replicas' Tritons pick their ports that way) and no outgoing connection is ever given one of
    these, so nothing else in the run can take them between this check and the replicas' binds."""
    import random

    low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, max(10001, low - n))
        socks = []
        try:
            for p in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no run of free ports")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (its embedded tritonserver), read from /proc."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    found += [int(child), *descendants(int(child))]
    except OSError:
        pass
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and what it started (a replica's Triton would outlive it; issue 23 fixes that)."""
    below = descendants(pid)
    for p in [pid, *below]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Replica:
    index: int
    port: int
    metrics_port: int
    health_port: int
    pid: int
    proc: subprocess.Popen | None = None  # a replica started again by a test (else a child of the fleet)
    triton: str = ""
    alive: bool = True

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Fleet:
    repository: Path
    parent: subprocess.Popen
    replicas: list[Replica]
    log: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return ",".join(r.target for r in self.replicas)

    def metric(self, r: Replica, name: str, labels: str = "") -> float:
        """Sum of the samples of ``name`` whose labels contain ``labels`` (0 when none)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and labels in line and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def served(self, r: Replica) -> float:
        return self.metric(r, "vitserve_requests_total", 'code="OK"')

    def kill(self, r: Replica) -> None:
        _kill_tree(r.pid)
        if r.proc is not None:
            r.proc.wait(10)
        r.alive = False

    def start(self, r: Replica) -> float:
        """Start replica ``r`` again on its old ports; the monotonic time it printed its ready line."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving.server", "--model-repository", str(self.repository),
             "--port", str(r.port), "--metrics-port", str(r.metrics_port), "--health-port", str(r.health_port),
             "--drain-seconds", str(DRAIN_S), "--enable-admin"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert _READY.match(line.strip()), f"replica {r.index} did not start: {line!r}\n{''.join(lines)[-3000:]}"
        r.proc, r.pid, r.alive = proc, proc.pid, True
        r.triton = _READY.match(line.strip()).group(3)  # type: ignore[union-attr]
        return time.monotonic()

    def child_exit_code(self, r: Replica) -> int:
        """The exit code of a replica the fleet's parent started, as the parent reports it."""
        deadline = time.monotonic() + 10
        pattern = re.compile(rf"replica {r.index} \(.*\) exited with code (-?\d+)")
        while time.monotonic() < deadline:
            m = pattern.search("".join(self.log))
            if m:
                return int(m.group(1))
            time.sleep(0.05)
        raise AssertionError(f"the fleet did not report replica {r.index}'s exit:\n{''.join(self.log)[-2000:]}")


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def wait_until(what: str, check, timeout: float = 30.0, interval: float = 0.05):  # noqa: ANN001, ANN201
    """Poll ``check()`` until it returns a true value; fail with the last value seen."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last seen: {last!r})")


@pytest.fixture(scope="module")
def fleet(rel_exported) -> Iterator[Fleet]:  # noqa: ANN001
    port = _consecutive_free_ports(3 * N)  # one run: the three blocks cannot overlap
    metrics, health = port + N, port + 2 * N
    parent = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--model-repository", str(rel_exported.repository),
         "--replicas", str(N), "--port", str(port), "--metrics-port", str(metrics), "--health-port", str(health),
         "--drain-seconds", str(DRAIN_S), "--enable-admin"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(parent.stderr), daemon=True).start()  # type: ignore[arg-type]
    fleet: Fleet | None = None
    try:
        line = parent.stdout.readline().strip()  # type: ignore[union-attr]
        assert line == f"vitserve ready: replicas {','.join(f'127.0.0.1:{port + i}' for i in range(N))}", \
            f"unexpected first line {line!r}; stderr:\n{''.join(log)[-4000:]}"
        replicas = []
        for entry in wait_until("a replica line per replica",
                                lambda: [m for m in map(_REPLICA.match, log) if m] if
                                len([m for m in map(_REPLICA.match, log) if m]) == N else None):
            i, pid, ready = int(entry.group(1)), int(entry.group(2)), _READY.match(entry.group(3))
            assert ready, entry.group(3)
            replicas.append(Replica(i, port + i, metrics + i, health + i, pid, triton=ready.group(3)))
        fleet = Fleet(rel_exported.repository, parent, sorted(replicas, key=lambda r: r.index), log)
        yield fleet
    finally:
        if parent.poll() is None:
            parent.send_signal(signal.SIGTERM)
            try:
                parent.wait(60)
            except subprocess.TimeoutExpired:
                parent.kill()
        for r in (fleet.replicas if fleet else []):
            if r.alive:
                _kill_tree(r.pid)
            if r.proc is not None:
                r.proc.wait(10)
        if os.environ.get("VITSERVE_REPLICA_FIGURES"):
            Path(os.environ["VITSERVE_REPLICA_FIGURES"]).write_text(json.dumps(FIGURES, indent=2) + "\n")


@pytest.fixture(scope="module")
def images(sample_images: np.ndarray) -> np.ndarray:
    return sample_images[:4]


class Load:
    """Client threads sending Embed (sync and aio) and Features calls back to back, checking each answer."""

    def __init__(self, target: str, images: np.ndarray, cls_ref: np.ndarray, tokens_ref: np.ndarray,
                 retries: bool = True, embed: int = 2, features: int = 1, aio: int = 1) -> None:
        self.target, self.images, self.retries = target, images, retries
        self.cls_ref, self.tokens_ref = cls_ref, tokens_ref
        self.sent = 0
        self.failures: list[str] = []
        self.wrong: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = ([threading.Thread(target=self._sync, args=("embed",), daemon=True) for _ in range(embed)]
                        + [threading.Thread(target=self._sync, args=("features",), daemon=True)
                           for _ in range(features)]
                        + [threading.Thread(target=self._aio, daemon=True) for _ in range(aio)])

    def _check(self, kind: str, array: np.ndarray) -> None:
        ref = self.cls_ref if kind == "embed" else self.tokens_ref
        if array.shape != ref.shape or not np.allclose(array, ref, atol=ATOL):
            self.wrong.append(f"{kind}: {array.shape} differs from the reference")

    def _record(self, error: VitServeError | None = None) -> None:
        with self._lock:
            self.sent += 1
            if error is not None:
                self.failures.append(f"{error.code.name}: {error.details[:200]}")

    def _sync(self, kind: str) -> None:
        with VitServeClient(self.target, timeout=30, retries=self.retries) as client:
            while not self._stop.is_set():
                try:
                    if kind == "embed":
                        self._check(kind, client.embed(self.images))
                    else:
                        self._check(kind, client.features(self.images, layout="tokens").features)
                    self._record()
                except VitServeError as e:
                    self._record(e)

    def _aio(self) -> None:
        async def main() -> None:
            async with AsyncVitServeClient(self.target, timeout=30, retries=self.retries) as client:
                while not self._stop.is_set():
                    try:
                        self._check("embed", await client.embed(self.images))
                        self._record()
                    except VitServeError as e:
                        self._record(e)
        asyncio.run(main())

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(60)
            assert not t.is_alive(), "a client thread hung"

    def figures(self) -> dict[str, object]:
        return {"sent": self.sent, "failed": len(self.failures), "wrong": len(self.wrong)}


def _wait_serving(fleet: Fleet, r: Replica, load: Load) -> float:
    """Seconds until replica ``r`` answers calls of ``load`` again (its OK count grows)."""
    t0 = time.monotonic()
    before = fleet.served(r)
    wait_until(f"replica {r.index} serving again", lambda: fleet.served(r) > before, timeout=REJOIN_BOUND_S)
    return time.monotonic() - t0


def _references(reference, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    cls, tokens = reference(images)
    return cls, tokens


@pytest.fixture(scope="module")
def side_gateways(fleet: Fleet, tmp_path_factory) -> Iterator[dict[str, object]]:  # noqa: ANN001
    """Two in-process gateways in front of replica 0's Triton (which the kill test kills): ``stale``
    polls Triton's health once an hour (so after the kill it is a replica that answers every call
    UNAVAILABLE while still looking healthy: the controls' failing replica), and ``secure`` has TLS,
    a token and a plaintext health port, polled every 0.2 s."""
    from serving.gateway import BackgroundGateway
    from serving.grpc_server import ServerOptions
    from tests.serving.tls_certs import make_certificates

    certs = make_certificates(tmp_path_factory.mktemp("replica_tls"))
    token_file = tmp_path_factory.mktemp("replica_token") / "token"
    token_file.write_text("s3cret\n")
    triton = fleet.replicas[0].triton
    stale = BackgroundGateway(triton, options=ServerOptions(health_interval=3600.0, metrics_port=0)).start(120)
    secure = BackgroundGateway(triton, options=ServerOptions.from_files(
        auth_token_file=token_file, tls_cert_file=certs.server_cert, tls_key_file=certs.server_key,
        health_port=0, health_interval=0.2, max_connection_age_s=0.3)).start(120)
    try:
        yield {"stale": stale, "secure": secure, "certs": certs}
    finally:
        stale.stop()
        secure.stop()


def _health(target: str, service: str = "vitserve.v1.VisionEncoder") -> str:
    with grpc.insecure_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def test_health_port_is_plaintext_beside_tls_and_token(side_gateways):  # noqa: ANN001
    secure = side_gateways["secure"]
    health_target = f"127.0.0.1:{secure.health_port}"
    assert _health(health_target) == "SERVING"
    assert _health(health_target, "") == "SERVING"
    # The health port serves health only: no API behind it, so no way around the token.
    with grpc.insecure_channel(health_target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/vitserve.v1.VisionEncoder/ListModels")(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The API port itself still needs TLS and the token.
    tls = channel_credentials(side_gateways["certs"].ca)
    with VitServeClient(f"localhost:{secure.port}", tls=tls, timeout=10) as client:
        with pytest.raises(VitServeError) as refused:
            client.list_models()
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    with VitServeClient(f"localhost:{secure.port}", tls=tls, token="s3cret", timeout=10) as client:
        assert client.list_models()
        # --max-connection-age 0.3 s: the server closes the connection (GOAWAY) again and again
        # while calls go on; the client reconnects and no call fails.
        t0, calls = time.monotonic(), 0
        while time.monotonic() - t0 < 1.5:
            assert client.list_models()
            calls += 1
        assert calls > 10


def test_kill_one_of_three_under_load(fleet, side_gateways, images, reference):  # noqa: ANN001
    victim, survivors = fleet.replicas[0], fleet.replicas[1:]
    cls_ref, tokens_ref = _references(reference, images)
    with Load(fleet.target, images, cls_ref, tokens_ref) as load, \
            Load(fleet.target, images, cls_ref, tokens_ref, retries=False, embed=1, features=0, aio=0) as twin:
        wait_until("every replica serving the load", lambda: all(fleet.served(r) > 0 for r in fleet.replicas))
        wait_until("a second of load", lambda: load.sent > 100, timeout=60)
        in_flight = wait_until("calls in flight on the victim",
                               lambda: fleet.metric(victim, "vitserve_requests_in_flight") or None, interval=0.005)
        sent_at_kill = load.sent
        survivors_before = [fleet.served(r) for r in survivors]
        fleet.kill(victim)
        wait_until("both survivors serving after the kill",
                   lambda: all(fleet.served(r) > b for r, b in zip(survivors, survivors_before)))
        wait_until("calls after the kill", lambda: load.sent > sent_at_kill + 150, timeout=60)
    assert not load.failures, load.failures[:5]
    assert not load.wrong, load.wrong[:5]
    FIGURES["kill_one_of_three"] = {"retries_on": load.figures(), "sent_after_kill": load.sent - sent_at_kill,
                                    "in_flight_on_victim_just_before_kill": in_flight,
                                    "twin_retries_off": twin.figures(), "twin_failures": twin.failures[:3]}
    # The secure side gateway's Triton died with the victim: its health port says so.
    wait_until("NOT_SERVING on the health port once Triton is gone",
               lambda: _health(f"127.0.0.1:{side_gateways['secure'].health_port}") == "NOT_SERVING")


def _stale_refusals(stale) -> float:  # noqa: ANN001
    with urllib.request.urlopen(f"http://127.0.0.1:{stale.options.metrics.port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vitserve_requests_total") and 'code="UNAVAILABLE"' in line)


def _until_refused(stale, client: VitServeClient, batch: np.ndarray, max_calls: int = 200) -> list[str]:  # noqa: ANN001
    """Calls until one fails (the stale replica is in the channel's rotation once it connected)."""
    codes: list[str] = []
    while len(codes) < max_calls:
        try:
            client.embed(batch)
            codes.append("OK")
        except VitServeError as e:
            codes.append(e.code.name)
            return codes
        time.sleep(0.02)
    return codes


def _retried(stale, client: VitServeClient, batch: np.ndarray, calls: int = 6) -> tuple[list[str], float]:  # noqa: ANN001
    """``calls`` calls once the stale replica is in rotation (seen refusing one of this client's
    calls); their outcomes and how many of them the stale replica refused (so were retried)."""
    codes: list[str] = []
    seen = _stale_refusals(stale)
    deadline = time.monotonic() + 30
    while _stale_refusals(stale) == seen:  # at most a few calls (each costs retry tokens when refused)
        assert time.monotonic() < deadline, "the stale replica never got a call"
        try:
            client.embed(batch)
            codes.append("OK")
        except VitServeError as e:
            codes.append(e.code.name)
        time.sleep(0.1)
    before = _stale_refusals(stale)
    for _ in range(calls):
        try:
            client.embed(batch)
            codes.append("OK")
        except VitServeError as e:
            codes.append(e.code.name)
    refused = wait_until("the stale replica's refusals counted", lambda: _stale_refusals(stale) - before, timeout=10)
    return codes, refused


def test_retries_are_what_hides_a_failing_replica(fleet, side_gateways, images):  # noqa: ANN001
    """A replica that answers UNAVAILABLE while it looks healthy (the stale side gateway, whose Triton
    is dead) beside a live one: with retries every call succeeds, without them some fail; a request
    over gRPC's default 256 KiB retry buffer is retried only with the client's own buffer size."""
    stale, live = side_gateways["stale"], fleet.replicas[1]
    target = f"ipv4:127.0.0.1:{stale.port},{live.target}"
    with VitServeClient(stale.target, retries=False, timeout=10) as direct:
        with pytest.raises(VitServeError) as dead:
            direct.embed(images)
    assert dead.value.code == grpc.StatusCode.UNAVAILABLE  # the failing replica fails, as it should

    # one raw 600x600 grey frame (360,000 bytes > 256 KiB), resized to the model's input by the gateway
    big = np.random.default_rng(1).integers(0, 256, (1, 600, 600, 1), dtype=np.uint8)
    assert big.nbytes > 256 * 1024
    with VitServeClient(target, retries=False, timeout=10) as off:
        retries_off = _until_refused(stale, off, images)
    with VitServeClient(target, timeout=10, retry_buffer_bytes=256 * 1024) as small_buffer:
        big_grpc_buffer = _until_refused(stale, small_buffer, big)
    with VitServeClient(target, timeout=10) as on:
        retries_on, on_retried = _retried(stale, on, images)
    with VitServeClient(target, timeout=10) as on_big:
        big_our_buffer, big_retried = _retried(stale, on_big, big)
    FIGURES["controls"] = {"retries_off": retries_off, "big_with_grpc_default_buffer": big_grpc_buffer,
                           "retries_on": retries_on, "retries_on_refused_then_retried": on_retried,
                           "big_with_our_buffer": big_our_buffer, "big_refused_then_retried": big_retried}
    assert retries_off[-1] == "UNAVAILABLE", retries_off
    assert big_grpc_buffer[-1] == "UNAVAILABLE", big_grpc_buffer
    assert set(retries_on) == {"OK"} and on_retried >= 1, FIGURES["controls"]
    assert set(big_our_buffer) == {"OK"} and big_retried >= 1, FIGURES["controls"]


def test_a_restarted_replica_rejoins(fleet, images, reference):  # noqa: ANN001
    victim = fleet.replicas[0]
    assert not victim.alive
    cls_ref, tokens_ref = _references(reference, images)
    with Load(fleet.target, images, cls_ref, tokens_ref, embed=2, features=0, aio=0) as load:
        wait_until("calls flowing", lambda: load.sent > 20)
        ready_at = fleet.start(victim)
        before = 0.0  # a fresh process: its counters start at 0
        wait_until("the restarted replica serving calls", lambda: fleet.served(victim) > before,
                   timeout=REJOIN_BOUND_S, interval=0.02)
        rejoin_s = time.monotonic() - ready_at
    assert not load.failures, load.failures[:5]
    FIGURES["rejoin_s"] = round(rejoin_s, 3)
    assert rejoin_s < REJOIN_BOUND_S


class StreamLoop(threading.Thread):
    """A control loop on ``stream_features`` (sync or aio): one frame out, at most two unanswered, and
    ``after`` more frames once ``killed`` is set; records every result."""

    def __init__(self, target: str, images: np.ndarray, aio: bool, killed: threading.Event, after: int = 30) -> None:
        super().__init__(daemon=True)
        self.target, self.images, self.aio, self.killed, self.after = target, images, aio, killed, after
        self.sent: list[int] = []
        self.answered: list = []
        self.last_before_kill = 0
        self.error: BaseException | None = None

    def _next(self, frame_id: int) -> bool:
        if self.killed.is_set():
            self.last_before_kill = self.last_before_kill or frame_id - 1
            if frame_id > self.last_before_kill + self.after:
                return False
        self.sent.append(frame_id)
        return True

    def frames(self) -> Iterator[tuple[int, np.ndarray]]:
        for frame_id in range(1, 100_000):
            while len(self.answered) < frame_id - 2:
                time.sleep(0.002)
            if not self._next(frame_id):
                return
            yield frame_id, self.images

    async def aframes(self):  # noqa: ANN201
        for frame_id in range(1, 100_000):
            while len(self.answered) < frame_id - 2:
                await asyncio.sleep(0.002)
            if not self._next(frame_id):
                return
            yield frame_id, self.images

    def run(self) -> None:
        try:
            if self.aio:
                async def main() -> None:
                    async with AsyncVitServeClient(self.target, timeout=30) as client:
                        async for result in client.stream_features(self.aframes(), layout="tokens"):
                            self.answered.append(result)
                asyncio.run(main())
            else:
                with VitServeClient(self.target, timeout=30) as client:
                    for result in client.stream_features(self.frames(), layout="tokens"):
                        self.answered.append(result)
        except BaseException as e:  # reported by the test
            self.error = e


def test_stream_goes_on_on_another_replica_when_its_replica_dies(fleet, images, reference):  # noqa: ANN001
    """A sync and an aio stream; every replica serving one of them is killed (one or two); both
    loops go on on a survivor, each frame answered once, in order: features equal to the
    reference, or UNAVAILABLE for the frames the dead replica had not answered."""
    _, tokens_ref = _references(reference, images)
    killed = threading.Event()
    loops = [StreamLoop(fleet.target, images, aio, killed) for aio in (False, True)]
    for loop in loops:
        loop.start()
    wait_until("both streams answering", lambda: all(len(loop.answered) >= 20 for loop in loops), timeout=60)
    streaming = [r for r in fleet.replicas if r.alive and fleet.metric(r, "vitserve_stream_frames_total") > 0]
    assert 1 <= len(streaming) <= 2 < N + 1
    for r in streaming:
        fleet.kill(r)
    killed.set()
    figures = {}
    for loop in loops:
        loop.join(60)
        assert not loop.is_alive() and loop.error is None, loop.error
        ids = [r.frame_id for r in loop.answered]
        assert ids == loop.sent, "one result per frame sent, in order"
        errors = [r for r in loop.answered if r.error is not None]
        assert all(r.error.code == grpc.StatusCode.UNAVAILABLE for r in errors), [str(r.error) for r in errors]
        ran_after = [r for r in loop.answered if r.frame_id > loop.last_before_kill and r.features is not None]
        assert len(ran_after) >= loop.after - 3, "the loop went on on another replica"
        for r in (x for x in loop.answered if x.features is not None):
            np.testing.assert_allclose(r.features.features, tokens_ref, atol=ATOL)
        figures["aio" if loop.aio else "sync"] = {
            "frames_sent": len(loop.sent), "answered_with_features": sum(r.features is not None for r in loop.answered),
            "came_back_as_errors": len(errors), "skipped": sum(r.skipped for r in loop.answered)}
    FIGURES["stream_failover"] = {"replicas_killed": len(streaming), **figures}


def test_rolling_restart_loses_no_call_even_without_retries(fleet, images, reference):  # noqa: ANN001
    cls_ref, tokens_ref = _references(reference, images)
    for r in fleet.replicas:  # the stream test left one down
        if not r.alive:
            fleet.start(r)
    rejoin: list[float] = []
    with Load(fleet.target, images, cls_ref, tokens_ref, retries=False, embed=2, features=1, aio=1) as load:
        for r in fleet.replicas:
            wait_until(f"replica {r.index} serving before its restart", lambda r=r: fleet.served(r) > 0)
            os.kill(r.pid, signal.SIGTERM)
            wait_until(f"replica {r.index}'s health port NOT_SERVING while it drains",
                       lambda r=r: _health_or_gone(f"127.0.0.1:{r.health_port}"), interval=0.01)
            code = r.proc.wait(60) if r.proc is not None else fleet.child_exit_code(r)
            r.alive = False
            assert code == 0, f"replica {r.index} exited {code} after SIGTERM"
            ready_at = fleet.start(r)
            wait_until(f"replica {r.index} serving after its restart", lambda r=r: fleet.served(r) > 0,
                       timeout=REJOIN_BOUND_S, interval=0.02)
            rejoin.append(time.monotonic() - ready_at)
    assert not load.failures, load.failures[:5]
    assert not load.wrong, load.wrong[:5]
    FIGURES["rolling_restart_retries_off"] = {**load.figures(), "rejoin_s": [round(x, 3) for x in rejoin]}


def _health_or_gone(target: str) -> str | None:
    try:
        status = _health(target)
    except grpc.RpcError:
        return None  # not NOT_SERVING yet as far as we can tell; keep polling
    return status if status == "NOT_SERVING" else None


def test_admin_runs_on_every_replica_and_reports_each(fleet, rel_exported, capsys):  # noqa: ANN001
    from clients.commands import admin_main
    from serving.triton_launcher import free_port

    assert admin_main(["reload", rel_exported.name, "--target", fleet.target]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["target"] for o in out["replicas"]] == [r.target for r in fleet.replicas]
    assert all(o["ok"] and o["result"]["model"] == rel_exported.name for o in out["replicas"]), out
    assert out["failed"] == 0
    dead = f"127.0.0.1:{free_port()}"
    assert admin_main(["reload", rel_exported.name, "--target", f"{fleet.target},{dead}", "--timeout", "5"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [o["ok"] for o in out["replicas"]] == [True] * N + [False]
    assert out["replicas"][-1]["error"].startswith("UNAVAILABLE"), out["replicas"][-1]
    assert out["failed"] == 1


def test_autoscaling_metrics(fleet, images, rel_exported):  # noqa: ANN001
    """``vitserve_inflight_ratio`` is in [0, 1] and ``vitserve_queue_wait_seconds`` counts the
    requests Triton ran (read from Triton's statistics, polled every second)."""
    r = next(r for r in fleet.replicas if r.alive)
    with VitServeClient(r.target, timeout=30) as client:
        client.embed(images)
    assert 0.0 <= fleet.metric(r, "vitserve_inflight_ratio") <= 1.0
    count = wait_until("queue waits counted", lambda: fleet.metric(
        r, "vitserve_queue_wait_seconds_count", f'model="{rel_exported.name}"'), timeout=10)
    assert count >= 1
    assert fleet.metric(r, "vitserve_queue_wait_seconds_sum", f'model="{rel_exported.name}"') >= 0
