"""HTTP against gRPC on the same service, in one run: ``Embed`` throughput at batch 8 x concurrency 8 and
the batch-1 p50 latency overhead of HTTP.

``python -m benchmarks.http_vs_grpc [--model-repository R --model M] [--duration 5] [--rounds 3]
[--json docs/HTTP_BENCHMARK.json] [--markdown docs/HTTP_BENCHMARK.md]``

One ``vitserve serve --port 0 --http-port 0`` (Triton + gateway, a subprocess) serves both sides; without
``--model-repository`` a random-init default encoder (28x28 grey, patch 4, 192-d: the smallest model,
where the transport's share of a call is largest) is exported into a temporary repository. Each side
is C asyncio tasks in this process sending the same B Fashion-MNIST PNGs per call: gRPC ``Embed``
(``grpc.aio``, images as encoded bytes) and HTTP ``POST /v1/embeddings`` (aiohttp client, the same
files as data URLs; ``encoding_format`` float, as the OpenAI default JSON, and base64). Every batch-8
side runs ``--duration`` seconds per round, in an order that alternates between rounds; figures pool
the rounds. Batch 1 runs gRPC and HTTP calls alternately, one at a time, so that both see the same
moments of a shared machine; the gateway's CPU time per request is read from ``/proc``.
The machine is measured in the same run (``benchmarks.machine``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import numpy as np

from benchmarks.machine import machine
from serving.tied_process import popen_tied

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.9
_READY = re.compile(r"^vitserve ready: gateway (\S+), http (\S+), triton grpc")


def pngs(n: int) -> list[bytes]:
    """``n`` Fashion-MNIST test images as PNG files (random 28x28 images without the data set)."""
    from PIL import Image

    try:
        from training.data import load_fashion_mnist

        images = load_fashion_mnist("test").images[:n]
    except Exception:  # noqa: BLE001 - the data set is optional here
        images = np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    out = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def export_tiny(repository: Path, name: str = "bench_tiny") -> str:
    """A random-init default encoder exported into ``repository`` (needs the export extra)."""
    import torch

    from export.options import ExportOptions, TritonOptions
    from export.repository import export_entries
    from export.sources import EncoderSource
    from training.backbone import FASHION_MNIST_MEAN, FASHION_MNIST_STD, create_encoder

    torch.manual_seed(0)
    model, spec = create_encoder(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    model.eval()
    export_entries(EncoderSource(model, spec), repository, name, ExportOptions(triton=TritonOptions(max_batch_size=16)))
    return name


class Service:
    """``vitserve serve --http-port 0`` on ``repository`` until ``stop``."""

    def __init__(self, repository: Path, timeout: float = 300.0) -> None:
        self.proc = popen_tied([sys.executable, "-m", "serving.server", "--model-repository", str(repository),
                                "--port", "0", "--http-port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = _READY.match(line.strip())
        if match is None:
            self.stop()
            raise RuntimeError(f"vitserve serve did not start (first line {line!r})")
        self.target, self.http_url = match.group(1), match.group(2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _drive(call: Callable[[], Awaitable[None]], concurrency: int, duration: float) -> tuple[list[float], float]:
    """``concurrency`` tasks calling ``call`` until ``duration`` is up: (latencies in s, elapsed s)."""
    latencies: list[float] = []
    t_end = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


Call = Callable[[], Awaitable[None]]


@contextlib.asynccontextmanager
async def grpc_caller(target: str, model: str, files: list[bytes]) -> AsyncIterator[Call]:
    """``Embed`` of ``files`` on one ``grpc.aio`` channel, warmed up (connected) before it is yielded."""
    import grpc

    from protos import vitserve_pb2, vitserve_pb2_grpc

    request = vitserve_pb2.EmbedRequest(model=model, images=[vitserve_pb2.Image(encoded=f) for f in files])
    async with grpc.aio.insecure_channel(target) as channel:
        stub = vitserve_pb2_grpc.VisionEncoderStub(channel)

        async def call() -> None:
            response = await stub.Embed(request, timeout=60)
            assert len(response.embeddings.data) > 0

        await call()
        yield call


@contextlib.asynccontextmanager
async def http_caller(url: str, model: str, files: list[bytes], encoding: str = "float",
                      connections: int = 8) -> AsyncIterator[Call]:
    """``POST /v1/embeddings`` of ``files`` as data URLs on one aiohttp session, warmed up."""
    import aiohttp

    body = json.dumps({"model": model, "encoding_format": encoding,
                       "input": [f"data:image/png;base64,{base64.b64encode(f).decode()}" for f in files]}).encode()
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        async def call() -> None:
            async with session.post(f"{url}/v1/embeddings", data=body, headers=headers) as r:
                answer = json.loads(await r.read())
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {answer}")
                assert len(answer["data"]) == len(files)

        await call()
        yield call


async def grpc_side(target: str, model: str, files: list[bytes], concurrency: int,
                    duration: float) -> tuple[list[float], float]:
    async with grpc_caller(target, model, files) as call:
        return await _drive(call, concurrency, duration)


async def http_side(url: str, model: str, files: list[bytes], concurrency: int, duration: float,
                    encoding: str = "float") -> tuple[list[float], float]:
    async with http_caller(url, model, files, encoding, concurrency) as call:
        return await _drive(call, concurrency, duration)


async def paired_b1(target: str, url: str, model: str, file: bytes,
                    duration: float) -> tuple[list[float], list[float], float]:
    """Batch 1, one call at a time, gRPC and HTTP alternating (the order swapped every pair), so both
    see the same moment of a shared machine: (gRPC latencies, HTTP latencies, elapsed s)."""
    async with grpc_caller(target, model, [file]) as grpc_call, http_caller(url, model, [file], connections=1) as http_call:
        lat: dict[Call, list[float]] = {grpc_call: [], http_call: []}
        t_start = time.perf_counter()
        while time.perf_counter() - t_start < 2 * duration:
            for call in ((grpc_call, http_call) if len(lat[grpc_call]) % 2 == 0 else (http_call, grpc_call)):
                t0 = time.perf_counter()
                await call()
                lat[call].append(time.perf_counter() - t0)
        return lat[grpc_call], lat[http_call], time.perf_counter() - t_start


def _summary(latencies: list[float], seconds: float, batch: int) -> dict[str, Any]:
    lat = np.asarray(latencies) * 1e3
    return {"requests": len(lat), "seconds": round(seconds, 3), "img_per_s": round(len(lat) * batch / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 3), "p95_ms": round(float(np.percentile(lat, 95)), 3)}


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (its threads, not its children); 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(target: str, url: str, model: str, files: list[bytes], *, duration: float, rounds: int,
        batch: int = 8, concurrency: int = 8, gateway_pid: int | None = None) -> dict[str, Any]:
    """Every side for ``duration`` s per round, alternating the order; latencies and time pooled; with
    ``gateway_pid``, the gateway process's CPU time per request of each side."""
    sides: dict[str, Callable[[], Awaitable[tuple[list[float], float]]]] = {
        "grpc_b8_c8": lambda: grpc_side(target, model, files[:batch], concurrency, duration),
        "http_float_b8_c8": lambda: http_side(url, model, files[:batch], concurrency, duration),
        "http_base64_b8_c8": lambda: http_side(url, model, files[:batch], concurrency, duration, "base64"),
    }
    pooled: dict[str, tuple[list[float], float]] = {name: ([], 0.0) for name in sides}
    per_round: dict[str, list[float]] = {name: [] for name in sides}  # img/s of each round
    cpu: dict[str, float] = {name: 0.0 for name in sides}  # gateway CPU seconds (Triton is its child)
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            cpu0 = cpu_seconds(gateway_pid)
            latencies, seconds = asyncio.run(sides[name]())
            cpu[name] += cpu_seconds(gateway_pid) - cpu0
            pooled[name] = (pooled[name][0] + latencies, pooled[name][1] + seconds)
            per_round[name].append(len(latencies) * batch / seconds)
    grpc_b1: list[float] = []
    http_b1: list[float] = []
    b1_seconds = 0.0
    for _ in range(rounds):
        g, h, seconds = asyncio.run(paired_b1(target, url, model, files[0], duration))
        grpc_b1, http_b1, b1_seconds = grpc_b1 + g, http_b1 + h, b1_seconds + seconds / 2
    result = {name: _summary(lat, sec, batch) for name, (lat, sec) in pooled.items()}
    result["grpc_b1_c1"] = _summary(grpc_b1, b1_seconds, 1)
    result["http_float_b1_c1"] = _summary(http_b1, b1_seconds, 1)
    if gateway_pid is not None:
        for name, side in result.items():  # the warm-up call of each run is a few more; noise at this scale
            if name in cpu:
                side["gateway_cpu_ms_per_request"] = round(1e3 * cpu[name] / max(side["requests"], 1), 3)
    grpc_tp = result["grpc_b8_c8"]["img_per_s"]

    def round_ratios(side: str) -> list[float]:
        return [round(h / g, 3) for h, g in zip(per_round[side], per_round["grpc_b8_c8"])]

    return {
        "sides": result,
        "throughput_ratio_http_float": round(result["http_float_b8_c8"]["img_per_s"] / grpc_tp, 3),
        "throughput_ratio_http_base64": round(result["http_base64_b8_c8"]["img_per_s"] / grpc_tp, 3),
        # each round's ratio: how much of the spread is the shared machine's load moving
        "round_ratios_http_float": round_ratios("http_float_b8_c8"),
        "round_ratios_http_base64": round_ratios("http_base64_b8_c8"),
        "p50_overhead_ms_b1": round(result["http_float_b1_c1"]["p50_ms"] - result["grpc_b1_c1"]["p50_ms"], 3),
        # the same from pairs of calls made back to back (HTTP minus gRPC, median over pairs)
        "paired_median_overhead_ms_b1": round(float(np.median(np.subtract(http_b1[:len(grpc_b1)],
                                                                         grpc_b1[:len(http_b1)]))) * 1e3, 3),
        "target_ratio": TARGET_RATIO,
    }


def to_markdown(report: dict[str, Any]) -> str:
    m, figures = report["machine"], report["result"]
    lines = ["# HTTP against gRPC on the same service", "",
             f"Command: `{report['command']}`", "",
             f"Machine (measured in the same run): {m.get('cpu', '?')}, {m['cpus']} CPUs, fp32 matmul "
             f"{m['fp32_matmul_gflops']} GFLOP/s, load average at start {m['load_average']}, at end "
             f"{report['load_end']}; flags {' '.join(m.get('flags', []))}.", "",
             f"Model: `{report['model']}` ({report['model_note']}); the clients run in the benchmark process on the "
             f"same CPUs as the server; {report['rounds']} rounds of {report['duration_s']} s per side, order "
             f"alternating.", "",
             "| side | requests | img/s | p50 ms | p95 ms | gateway CPU ms / request |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, s in figures["sides"].items():
        lines.append(f"| {name} | {s['requests']} | {s['img_per_s']} | {s['p50_ms']} | {s['p95_ms']} | "
                     f"{s.get('gateway_cpu_ms_per_request', '—')} |")
    verdict = "meets" if figures["throughput_ratio_http_float"] >= TARGET_RATIO else "misses"
    lines += ["", f"- Embed batch 8 x concurrency 8, HTTP/gRPC throughput: **{figures['throughput_ratio_http_float']}x** "
                  f"(float JSON; {verdict} the {TARGET_RATIO}x target), {figures['throughput_ratio_http_base64']}x with "
                  f"`encoding_format: base64`.",
              f"- Each round's HTTP/gRPC img/s ratio: float "
              f"{figures['round_ratios_http_float']}, base64 {figures['round_ratios_http_base64']}.",
              f"- Batch 1 at concurrency 1 (gRPC and HTTP calls alternating), HTTP p50 overhead: "
              f"**{figures['p50_overhead_ms_b1']} ms** (median of back-to-back pairs: "
              f"{figures['paired_median_overhead_ms_b1']} ms).", "",
              "Reading: at batch 8 x concurrency 8 the service is bound by the CPUs that Triton, the gateway and "
              "the clients share, so HTTP's throughput is what its extra gateway CPU per request (last column: "
              "the JSON body, base64 of the images, the answer as JSON) takes from inference. Float embeddings "
              "written as JSON text cost the most (numpy's shortest float32 repr, exact); base64 costs little more "
              "than protobuf, and it is what the official `openai` Python client asks for unless told otherwise. "
              "The per-round ratios show how much the machine's other load moves a single round; the pooled "
              "figure is the one to read.", ""]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http_vs_grpc", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, help="serve this repository (default: export a tiny model)")
    p.add_argument("--model", help="the model of --model-repository to call")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per side per round (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating the order (default 3)")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.add_argument("--markdown", type=Path, help="write the report as Markdown here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (args.model_repository is None) != (args.model is None):
        print("http_vs_grpc: give --model-repository and --model together", file=sys.stderr)
        return 2
    facts = machine()
    with tempfile.TemporaryDirectory(prefix="http_vs_grpc_") as tmp:
        repository, model = args.model_repository, args.model
        note = "as given"
        if repository is None:
            repository = Path(tmp) / "repository"
            model = export_tiny(repository)
            note = "random-init default encoder, 28x28x1, patch 4, 192-d, 6 blocks, 3 heads; fp32 ONNX Runtime in Triton"
        service = Service(repository)
        try:
            result = run(service.target, service.http_url, model, pngs(8), duration=args.duration, rounds=args.rounds,
                         gateway_pid=service.proc.pid)
        finally:
            service.stop()
    command = "python -m benchmarks.http_vs_grpc " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command.strip(), "machine": facts, "load_end": [round(v, 2) for v in os.getloadavg()],
              "model": model, "model_note": note, "duration_s": args.duration, "rounds": args.rounds, "result": result}
    print(to_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
