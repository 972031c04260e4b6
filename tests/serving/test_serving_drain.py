"""Graceful shutdown of ``vitserve serve``: SIGTERM with calls in flight.

Calls in flight when the signal arrives finish OK, calls after it are refused UNAVAILABLE (none is
cancelled), Triton is stopped only after the drain, and the process exits 0.
"""

import re
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from clients.client import VitServeClient, VitServeError
from serving.triton_launcher import free_port
from tests.serving.conftest import serve_process

DRAINING = re.compile(r"draining (\d+) call\(s\) in flight")
STOPPED = re.compile(r"gateway stopped after [\d.]+s; (\d+) call\(s\) were still in flight")

pytestmark = pytest.mark.slow


def in_flight(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return float(re.search(r"^vitserve_requests_in_flight ([\d.]+)$", text, re.M).group(1))


class Caller(threading.Thread):
    """Embed calls back to back until one fails; records (finish time, code) of each."""

    def __init__(self, target: str, images: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.target, self.images = target, images
        self.results: list[tuple[float, grpc.StatusCode]] = []

    def run(self) -> None:
        with VitServeClient(self.target, timeout=120) as client:
            while True:
                try:
                    emb = client.embed(self.images)
                    assert emb.shape[0] == len(self.images)
                    self.results.append((time.monotonic(), grpc.StatusCode.OK))
                except VitServeError as e:
                    self.results.append((time.monotonic(), e.code))
                    return


def test_sigterm_drains_calls_in_flight_and_exits_0(exported):
    metrics_port = free_port()
    with serve_process("--model-repository", str(exported.repository), "--port", "0",
                       "--metrics-port", str(metrics_port), "--shutdown-grace", "60") as serve:
        proc, match = serve.proc, serve.ready
        images = np.random.default_rng(0).integers(0, 256, (128, 28, 28, 1), dtype=np.uint8)
        callers = [Caller(match.group(1), images) for _ in range(4)]
        for c in callers:
            c.start()
        t0 = time.monotonic()
        while in_flight(metrics_port) < 1:  # back-to-back callers: almost always some are in flight
            assert time.monotonic() - t0 < 60, "no call was ever in flight"
            time.sleep(0.01)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for c in callers:
            c.join(120)
            assert not c.is_alive()
        assert proc.wait(timeout=60) == 0
    log = serve.stderr
    draining = DRAINING.search(log)
    assert draining and int(draining.group(1)) >= 1, log[-3000:]
    assert STOPPED.search(log) and STOPPED.search(log).group(1) == "0", log[-3000:]  # none cut off
    assert log.index("gateway stopped") < log.index("stopping tritonserver")  # Triton outlives the drain
    finished_after = [code for c in callers for t, code in c.results if t > signalled and code == grpc.StatusCode.OK]
    assert finished_after, "no call in flight at SIGTERM completed"
    for c in callers:
        codes = [code for _, code in c.results]
        # Each caller: OK answers, then one refusal once the gateway stopped taking calls.
        assert codes[-1] == grpc.StatusCode.UNAVAILABLE, codes
        assert all(code == grpc.StatusCode.OK for code in codes[:-1]), codes


class HttpCaller(threading.Thread):
    """``POST /v1/embeddings`` back to back until one is not 200; records (finish time, status or error)."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.results: list[tuple[float, object]] = []

    def run(self) -> None:
        from tests.serving.http_calls import call

        while True:
            try:
                answer = call(f"{self.url}/v1/embeddings", self.body, timeout=120)
                outcome: object = answer.status if answer.status == 200 else (answer.status, answer.message)
            except OSError as e:  # the listener is gone (after the drain)
                outcome = f"connection: {e}"
            self.results.append((time.monotonic(), outcome))
            if outcome != 200:
                return


def test_sigterm_drains_http_calls_in_flight_too(exported):
    from tests.serving.conftest import SERVE_READY_HTTP
    from tests.serving.http_calls import data_url, png

    metrics_port = free_port()
    images = np.random.default_rng(0).integers(0, 256, (96, 28, 28, 1), dtype=np.uint8)
    body = {"input": [data_url(png(im)) for im in images]}
    with serve_process("--model-repository", str(exported.repository), "--port", "0", "--http-port", "0",
                       "--metrics-port", str(metrics_port), "--shutdown-grace", "60", ready=SERVE_READY_HTTP) as serve:
        callers = [HttpCaller(serve.ready.group(2), body) for _ in range(3)]
        for c in callers:
            c.start()
        t0 = time.monotonic()
        while not any(c.results for c in callers):  # the calls are answered: the next ones are in flight
            assert time.monotonic() - t0 < 60, "no HTTP call was ever answered"
            time.sleep(0.01)
        signalled = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        for c in callers:
            c.join(120)
            assert not c.is_alive()
        assert serve.proc.wait(timeout=60) == 0
    assert STOPPED.search(serve.stderr) and STOPPED.search(serve.stderr).group(1) == "0", serve.stderr[-3000:]
    finished_after = [o for c in callers for t, o in c.results if t > signalled and o == 200]
    assert finished_after, "no HTTP call in flight at SIGTERM completed"
    for c in callers:
        outcomes = [o for _, o in c.results]
        # Each caller: 200s, then a 503 (draining) or, once the listener closed, no connection.
        last = outcomes[-1]
        assert (isinstance(last, tuple) and last[0] == 503 and "shutting down" in last[1]) or \
            (isinstance(last, str) and last.startswith("connection:")), outcomes
        assert all(o == 200 for o in outcomes[:-1]), outcomes
