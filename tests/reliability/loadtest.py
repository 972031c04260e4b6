"""A bounded load test of ``vitserve serve`` on loopback: many concurrent clients for a fixed time.

Each client (an asyncio task with its own channel and HTTP session) loops over a random mix of Embed,
Features and StreamFeatures calls and the HTTP API's ``/v1/embeddings`` and ``/v1/features``
(``load_http``) on random batches of Fashion-MNIST images (raw frames and PNG files) until the
duration is up. Every call is accounted for: an answer equal to in-process ONNX Runtime features of
the same images (on the same ``model.onnx`` the server runs, within ``atol``), or an explicit
RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED; anything else, including a wrong answer, is a failure. The
gateway process's resident memory is sampled from ``/proc/<pid>/status`` throughout.

    python tests/reliability/loadtest.py --duration 120 --clients 32 [--json out.json]

exports a fresh model into a temporary repository, starts ``vitserve serve`` on it, runs the load,
prints the report and exits 1 if any call was lost or wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script by path
    sys.path.insert(0, str(ROOT))

from protos import vitserve_pb2, vitserve_pb2_grpc  # noqa: E402
from tests.reliability.load_http import HttpCalls, HttpRefused, WrongAnswer  # noqa: E402
from tests.reliability.load_service import (Service, export_test_model, fashion_mnist_pool, onnx_reference,  # noqa: E402,F401
                                            png, rss_mb)

EXPECTED_REFUSALS = {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}


# -- the load -----------------------------------------------------------------------------------

@dataclass
class LoadReport:
    duration_s: float
    clients: int
    calls: int = 0
    frames: int = 0  # stream frames (each also checked)
    ok: int = 0
    wrong: int = 0
    by_code: dict[str, int] = field(default_factory=dict)
    by_rpc: dict[str, int] = field(default_factory=dict)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    calls_per_s: float = 0.0
    images_per_s: float = 0.0
    rss_start_mb: float = 0.0
    rss_max_mb: float = 0.0
    rss_end_mb: float = 0.0
    failures: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=lambda: sorted(EXPECTED_REFUSALS))

    @property
    def unaccounted(self) -> int:
        """Calls (and stream frames) that ended neither correct nor with an accounted-for refusal."""
        ok = set(self.allowed) | {"OK"} | {f"frame:{c}" for c in self.allowed}
        return sum(n for code, n in self.by_code.items() if code not in ok) + self.wrong

    def summary(self) -> str:
        return (f"{self.calls} calls ({self.frames} stream frames) by {self.clients} clients in "
                f"{self.duration_s:.0f} s: {self.calls_per_s:.1f} calls/s, {self.images_per_s:.0f} img/s; "
                f"codes {self.by_code}; wrong answers {self.wrong}; latency p50 {self.p50_ms:.1f} ms, "
                f"p99 {self.p99_ms:.1f} ms, max {self.max_ms:.0f} ms; gateway RSS {self.rss_start_mb:.0f} -> "
                f"max {self.rss_max_mb:.0f} -> end {self.rss_end_mb:.0f} MiB")


class Load:
    """The clients, their bookkeeping and the checks of every answer."""

    def __init__(self, target: str, images: np.ndarray, cls: np.ndarray, tokens: np.ndarray, grid: tuple[int, int],
                 atol: float = 1e-4, deadline_s: float = 10.0, max_batch: int = 8, seed: int = 0,
                 allowed: frozenset[str] | set[str] = frozenset(EXPECTED_REFUSALS), http_url: str = "") -> None:
        self.target, self.images, self.cls, self.tokens, self.grid = target, images, cls, tokens, grid
        self.pngs = [png(im) for im in images]
        self.atol, self.deadline_s, self.max_batch = atol, deadline_s, max_batch
        self.seed = seed
        self.allowed = set(allowed)  # codes that count as an explicit, accounted-for refusal
        self.timeline: list[tuple[float, float, str, str]] = []  # (start, end, rpc, code), monotonic
        # Set to end the load before its duration: a test stops once it has seen what it waits for.
        self.stop = threading.Event()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="stream")
        self.codes: collections.Counter[str] = collections.Counter()
        self.rpcs: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []
        self.wrong = 0
        self.frames = 0
        self.images_done = 0
        self.failures: list[str] = []
        # with the service's HTTP API: its two calls join the mix (same batches, checks and deadline)
        self.http = HttpCalls(http_url, images, self.pngs, cls, tokens, self._check, deadline_s, max_batch) \
            if http_url else None
        self.rpcs_mix = ["Embed", "Features", "StreamFeatures"] + (["HTTP:embeddings", "HTTP:features"]
                                                                   if http_url else [])

    def _batch(self, rng: random.Random) -> tuple[list[int], list[vitserve_pb2.Image]]:
        idx = [rng.randrange(len(self.images)) for _ in range(rng.randint(1, self.max_batch))]
        protos = []
        for i in idx:
            if rng.random() < 0.3:
                protos.append(vitserve_pb2.Image(encoded=self.pngs[i]))
            else:
                im = self.images[i]
                protos.append(vitserve_pb2.Image(raw=vitserve_pb2.RawFrame(
                    data=im.tobytes(), height=im.shape[0], width=im.shape[1], channels=im.shape[2])))
        return idx, protos

    def _check(self, what: str, got: np.ndarray, want: np.ndarray) -> bool:
        if got.shape == want.shape and np.allclose(got, want, atol=self.atol, rtol=self.atol):
            return True
        self.wrong += 1
        err = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
        self.failures.append(f"{what}: wrong answer (shape {got.shape} vs {want.shape}, max err {err:.2e})")
        return False

    @staticmethod
    def _array(t: vitserve_pb2.Tensor) -> np.ndarray:
        return np.frombuffer(t.data, "<f4").reshape(tuple(t.shape))

    def _check_features(self, response: vitserve_pb2.FeaturesResponse, idx: list[int], grid: bool) -> bool:
        want = self.tokens[idx]
        if grid:
            want = want.reshape(len(idx), *self.grid, -1)
        return self._check("Features", self._array(response.features), want)

    def _record(self, rpc: str, code: str, t0: float, images: int) -> None:
        self.rpcs[rpc] += 1
        self.codes[code] += 1
        if code == "OK":
            self.latencies.append(time.perf_counter() - t0)
            self.images_done += images

    async def client(self, k: int, until: float) -> None:
        rng = random.Random(self.seed * 1000 + k)
        session = None
        if self.http is not None:
            import aiohttp

            session = aiohttp.ClientSession()
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = vitserve_pb2_grpc.VisionEncoderStub(channel)
            sync_channel = grpc.insecure_channel(self.target)
            sync_stub = vitserve_pb2_grpc.VisionEncoderStub(sync_channel)
            while time.monotonic() < until and not self.stop.is_set():
                rpc = rng.choice(self.rpcs_mix)
                t0, start = time.perf_counter(), time.monotonic()
                try:
                    if rpc == "StreamFeatures":  # a stream's code: its first failed frame's, else OK
                        images, code = await self.streamfeatures(sync_stub, rng)
                    elif rpc.startswith("HTTP:"):
                        assert self.http is not None
                        images, code = await getattr(self.http, rpc[5:])(session, rng), "OK"
                    else:
                        images, code = await getattr(self, rpc.lower())(stub, rng), "OK"
                except (grpc.RpcError, HttpRefused) as e:
                    code, details = (e.code, e.message) if isinstance(e, HttpRefused) else (e.code().name, e.details())
                    images = 0
                    if code not in self.allowed:
                        self.failures.append(f"{rpc}: {code}: {details}")
                    else:
                        await asyncio.sleep(rng.uniform(0.02, 0.1))  # back off, as a client should
                except (_WrongAnswer, WrongAnswer):
                    code, images = "OK", 0  # answered, but wrongly: counted in self.wrong
                self._record(rpc, code, t0, images)
                self.timeline.append((start, time.monotonic(), rpc, code))
            sync_channel.close()
        if session is not None:
            await session.close()

    async def embed(self, stub: vitserve_pb2_grpc.VisionEncoderStub, rng: random.Random) -> int:
        idx, protos = self._batch(rng)
        r = await stub.Embed(vitserve_pb2.EmbedRequest(images=protos), timeout=self.deadline_s)
        if not self._check("Embed", self._array(r.embeddings), self.cls[idx]):
            raise _WrongAnswer
        return len(idx)

    async def features(self, stub: vitserve_pb2_grpc.VisionEncoderStub, rng: random.Random) -> int:
        idx, protos = self._batch(rng)
        grid = rng.random() < 0.5
        layout = vitserve_pb2.FeaturesRequest.GRID if grid else vitserve_pb2.FeaturesRequest.TOKENS
        r = await stub.Features(vitserve_pb2.FeaturesRequest(images=protos, layout=layout, include_cls=True),
                                timeout=self.deadline_s)
        ok = self._check_features(r, idx, grid) and self._check("Features.cls", self._array(r.cls), self.cls[idx])
        if not ok:
            raise _WrongAnswer
        return len(idx)

    async def streamfeatures(self, sync_stub: vitserve_pb2_grpc.VisionEncoderStub,
                             rng: random.Random) -> tuple[int, str]:
        """A stream of 2-5 frames on the *sync* API in a thread: grpc.aio's client reports a stream the
        server refuses before reading it (RESOURCE_EXHAUSTED, UNAUTHENTICATED) as INTERNAL "Internal
        error from Core" when a request write races the server's status (grpc/grpc#36066)."""
        frames = [(i + 1, *self._batch(rng)) for i in range(rng.randint(2, 5))]
        requests = [vitserve_pb2.StreamFeaturesRequest(frame_id=fid, request=vitserve_pb2.FeaturesRequest(
            images=protos, layout=vitserve_pb2.FeaturesRequest.TOKENS)) for fid, _, protos in frames]
        responses = await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: list(sync_stub.StreamFeatures(iter(requests), timeout=self.deadline_s)))
        self.frames += len(frames)
        if [r.frame_id for r in responses] != [f[0] for f in frames]:
            self.wrong += 1
            self.failures.append(f"StreamFeatures: frames {[f[0] for f in frames]} answered as "
                                 f"{[r.frame_id for r in responses]}")
            raise _WrongAnswer
        images, first_error = 0, None
        for (_, idx, _), r in zip(frames, responses):
            if r.error_code:
                code = grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == r.error_code)).name
                if code not in self.allowed:
                    self.failures.append(f"StreamFeatures frame: {code}: {r.error_message}")
                self.codes[f"frame:{code}"] += 1
                first_error = first_error or code
                continue
            if not self._check_features(r.features, idx, grid=False):
                raise _WrongAnswer
            images += len(idx)
        return images, first_error or "OK"


class _WrongAnswer(Exception):
    pass


async def _sample_rss(pid: int, samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        value = rss_mb(pid)
        if value is not None:
            samples.append(value)
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


async def run_load_async(load: Load, clients: int, duration_s: float, gateway_pid: int | None) -> LoadReport:
    samples: list[float] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(gateway_pid, samples, stop)) if gateway_pid else None
    t0 = time.monotonic()
    await asyncio.gather(*(load.client(k, t0 + duration_s) for k in range(clients)))
    elapsed = time.monotonic() - t0
    stop.set()
    if sampler is not None:
        await sampler
    lat = np.array(load.latencies) * 1e3 if load.latencies else np.zeros(1)
    calls = sum(load.rpcs.values())
    return LoadReport(
        duration_s=elapsed, clients=clients, calls=calls, frames=load.frames, ok=load.codes["OK"],
        wrong=load.wrong, by_code=dict(sorted(load.codes.items())), by_rpc=dict(sorted(load.rpcs.items())),
        p50_ms=float(np.percentile(lat, 50)), p99_ms=float(np.percentile(lat, 99)), max_ms=float(lat.max()),
        calls_per_s=calls / elapsed, images_per_s=load.images_done / elapsed,
        rss_start_mb=samples[0] if samples else 0.0, rss_max_mb=max(samples, default=0.0),
        rss_end_mb=samples[-1] if samples else 0.0, failures=load.failures[:20], allowed=sorted(load.allowed))


def run_load(load: Load, clients: int, duration_s: float, gateway_pid: int | None = None) -> LoadReport:
    return asyncio.run(run_load_async(load, clients, duration_s, gateway_pid))


# -- script -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--max-in-flight", type=int, default=16, help="the gateway's --max-in-flight (default 16)")
    p.add_argument("--deadline", type=float, default=10.0, help="per-call deadline in seconds (default 10)")
    p.add_argument("--json", type=Path, help="write the report here")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vitserve-load-") as tmp:
        model_dir = export_test_model(Path(tmp) / "repo")
        pool = fashion_mnist_pool()
        cls, tokens = onnx_reference(model_dir, pool)
        with Service(Path(tmp) / "repo", a.max_in_flight) as service:
            load = Load(service.target, pool, cls, tokens, (7, 7), deadline_s=a.deadline, http_url=service.http_url)
            report = run_load(load, a.clients, a.duration, service.pid)
    load_avg = os.getloadavg()
    print(report.summary())
    print(f"machine: {os.cpu_count()} cores, load average {load_avg[0]:.1f} {load_avg[1]:.1f} {load_avg[2]:.1f}")
    for failure in report.failures:
        print("FAILURE", failure)
    if a.json:
        a.json.write_text(json.dumps({**asdict(report), "load_average": load_avg,
                                      "max_in_flight": a.max_in_flight}, indent=2) + "\n")
    return 1 if report.unaccounted else 0


if __name__ == "__main__":
    sys.exit(main())
