"""Faults under load, on ``vitserve serve`` as a subprocess (gateway + its supervised embedded Triton).

* ``kill -9`` of tritonserver while clients run: calls in flight at the kill end UNAVAILABLE (or
  had already finished correctly), none hangs; health turns NOT_SERVING; the launcher restarts
  Triton and correct answers resume. The recovery time (kill -> first correct answer to a call
  started after the kill; kill -> health SERVING again) is printed.
* SIGTERM to the gateway with calls in flight: every call ends correct or with a clear status
  (UNAVAILABLE once the server is gone), the process exits 0 and takes its Triton with it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.reliability.loadtest import (EXPECTED_REFUSALS, Load, Service, fashion_mnist_pool, onnx_reference,
                                        run_load)

SERVING = health_pb2.HealthCheckResponse.SERVING


class HealthWatch:
    """Polls the gateway's health service every 50 ms: ``[(monotonic time, status name)]``."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.seen: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as e:
                    name = e.code().name
                self.seen.append((time.monotonic(), name))
                self._stop.wait(0.05)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _load_in_background(load: Load, clients: int, seconds: float, pid: int) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(run_load(load, clients, seconds, pid)), daemon=True)
    thread.start()
    return thread, result


def wait_until(predicate, timeout: float, what: str, last=lambda: None) -> None:
    """Poll ``predicate`` every 50 ms; fail after ``timeout`` s naming ``what`` and ``last()``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s; last seen: {last()}")
        time.sleep(0.05)


def _ok_calls(load: Load, after: float = 0.0) -> int:
    return sum(1 for start, _, _, code in list(load.timeline) if code == "OK" and start > after)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def reference_pool(rel_exported):
    pool = fashion_mnist_pool(64)
    return pool, *onnx_reference(rel_exported.repository / rel_exported.name, pool)


@pytest.mark.slow
def test_triton_killed_under_load_recovers(rel_exported, reference_pool):
    pool, cls, tokens = reference_pool
    with Service(rel_exported.repository, max_in_flight=16) as service, HealthWatch(service.target) as health:
        load = Load(service.target, pool, cls, tokens, (7, 7), deadline_s=30.0,
                    allowed=EXPECTED_REFUSALS | {"UNAVAILABLE"})
        # The load runs until the service is seen to have recovered (at most 120 s).
        thread, result = _load_in_background(load, 8, 120.0, service.pid)
        wait_until(lambda: _ok_calls(load) >= 40, 60, "40 correct answers before the kill",
                   lambda: load.codes)
        triton = service.triton_pid()
        assert triton is not None
        t_kill = time.monotonic()
        os.kill(triton, signal.SIGKILL)

        def recovered() -> bool:  # health back, and correct answers to calls started after the outage
            unavailable = [end for _, end, _, code in list(load.timeline) if code == "UNAVAILABLE"]
            back = any(t > t_kill and s == "SERVING" for t, s in list(health.seen)[1:]) and any(
                s == "NOT_SERVING" for t, s in list(health.seen) if t > t_kill)
            return bool(unavailable) and back and _ok_calls(load, after=min(unavailable)) >= 20
        wait_until(recovered, 110, "recovery after kill -9 of tritonserver",
                   lambda: (load.codes, list(health.seen)[-3:]))
        load.stop.set()
        thread.join(120)
        assert not thread.is_alive(), "the load did not finish: a call hung"
        restarted = service.triton_pid()
    (report,) = result
    assert report.failures == [] and report.wrong == 0 and report.unaccounted == 0, report.failures
    in_flight = [code for start, end, _, code in load.timeline if start < t_kill < end]
    assert set(in_flight) <= {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}, in_flight
    unavailable = [end - t_kill for start, end, _, code in load.timeline if code == "UNAVAILABLE"]
    assert unavailable and min(unavailable) >= 0  # the outage was seen, and only after the kill
    down = [t for t, s in health.seen if t > t_kill and s == "NOT_SERVING"]
    assert down, "health never reported NOT_SERVING while Triton was down"
    first_unavailable = min(end for start, end, _, code in load.timeline if code == "UNAVAILABLE")
    # Recovery: the first correct answer to a call started once the outage was visible.
    after = [end for start, end, _, code in load.timeline if code == "OK" and start > first_unavailable]
    assert after, "no correct answer after the kill: service did not resume"
    first_ok = min(after) - t_kill
    early = [(round(start - t_kill, 3), round(end - t_kill, 3), rpc, code)
             for start, end, rpc, code in sorted(load.timeline) if start > t_kill][:6]
    back = [t for t, s in health.seen if t > down[0] and s == "SERVING"]
    assert back, "health never returned to SERVING"
    assert restarted is not None and restarted != triton
    print(f"\ntriton kill -9 under load (8 clients): {len(in_flight)} calls in flight at the kill -> "
          f"{sorted(set(in_flight))}; {len(unavailable)} calls UNAVAILABLE during the outage; health "
          f"NOT_SERVING after {down[0] - t_kill:.2f} s, SERVING again after {back[0] - t_kill:.1f} s; first "
          f"correct answer to a call started during the outage {first_ok:.1f} s after the kill; first calls "
          f"after the kill (start, end, rpc, code): {early}; {report.summary()}")


@pytest.mark.slow
def test_sigterm_with_calls_in_flight_drains(rel_exported, reference_pool):
    pool, cls, tokens = reference_pool
    service = Service(rel_exported.repository, max_in_flight=16).start()
    try:
        triton = service.triton_pid()
        load = Load(service.target, pool, cls, tokens, (7, 7), deadline_s=30.0,
                    allowed=EXPECTED_REFUSALS | {"UNAVAILABLE", "CANCELLED"})
        thread, result = _load_in_background(load, 8, 120.0, service.pid)
        wait_until(lambda: _ok_calls(load) >= 40, 60, "40 correct answers before SIGTERM", lambda: load.codes)
        t_term = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        code = service.proc.wait(60)
        t_exit = time.monotonic()
        wait_until(lambda: sum(1 for start, *_ in list(load.timeline) if start > t_exit) >= 8, 60,
                   "8 calls started after the exit", lambda: load.codes)
        load.stop.set()
        thread.join(120)
    finally:
        service.stop()
    (report,) = result
    assert code == 0
    assert triton is not None and not _pid_alive(triton), "tritonserver outlived the gateway"
    assert report.failures == [] and report.wrong == 0 and report.unaccounted == 0, report.failures
    in_flight = [c for start, end, _, c in load.timeline if start < t_term < end]
    finished = [c for start, end, _, c in load.timeline if start < t_term < end and end <= t_exit]
    during = [c for start, end, _, c in load.timeline if t_term < start < t_exit]
    # A call still running when the drain's grace ends, or arriving during it, is CANCELLED by grpc.
    assert set(in_flight) <= {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"}, in_flight
    after = {c for start, end, _, c in load.timeline if start > t_exit}
    assert after <= {"UNAVAILABLE"}, after  # a stopped server refuses clearly, nothing hangs
    print(f"\nSIGTERM with load (8 clients): exit 0 after {t_exit - t_term:.1f} s; {len(in_flight)} calls in "
          f"flight at the signal -> {dict((c, in_flight.count(c)) for c in set(in_flight))} "
          f"({len(finished)} finished before exit); calls started during the drain -> "
          f"{dict((c, during.count(c)) for c in set(during))}; calls started after exit: {sorted(after)}; "
          f"tritonserver stopped with it")
