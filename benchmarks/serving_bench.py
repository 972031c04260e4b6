"""``python -m benchmarks.serving_bench`` (a report; ``vitserve bench`` until issue 21, now ``bench.cli``):
service vs in-process throughput and latency over a batch x concurrency sweep.

For each point (batch size B, concurrency C) it runs, for a fixed duration each and interleaved (the
order alternates from point to point so neither side always runs on a "warm" or "tired" machine):

* **service**: C concurrent ``Embed`` calls of B random uint8 images each, as C tasks on one
  ``grpc.aio`` channel (``--client aio``, the default) or C threads sharing one sync
  ``VitServeClient`` (``--client sync``), to a running gateway (``--target``) or to one this command
  starts itself on ``--model-repository`` (Triton + gateway, stopped afterwards);
* **in-process**: C threads calling ONNX Runtime directly on the same ``<model>/1/model.onnx``
  (same intra-op thread count as the served model's ``config.pbtxt``), with the same uint8 batches.

Latency is per request, measured by the caller (for the service: the whole gRPC round trip). The result
is a JSON document (``--json``), a table on stdout and, if matplotlib is installed, a PNG (``--plot``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.repository import served_intra_op_threads

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_CONCURRENCIES = (1, 4, 8)


def _summary(latencies_s: list[float], images: int, elapsed: float) -> dict[str, Any]:
    lat_ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    pct = (lambda q: float(np.percentile(lat_ms, q))) if len(lat_ms) else (lambda q: float("nan"))
    return {"requests": int(len(lat_ms)), "images": int(images), "seconds": round(elapsed, 4),
            "img_per_s": images / elapsed if elapsed > 0 else 0.0,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "mean_ms": float(lat_ms.mean()) if len(lat_ms) else float("nan")}


def model_files(model_repository: str | Path, model: str, version: int = 1) -> tuple[Path, int]:
    """``(onnx_path, intra_op_threads)`` of ``model`` in a repository (threads 0: the ORT default)."""
    model_dir = Path(model_repository) / model
    onnx_path = model_dir / str(version) / "model.onnx"
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no {onnx_path}: the in-process side needs the exported model.onnx")
    config = model_dir / "config.pbtxt"
    return onnx_path, served_intra_op_threads(config.read_text()) if config.is_file() else 0


def _batch(rng: np.random.Generator, batch: int, shape: Sequence[int]) -> np.ndarray:
    return rng.integers(0, 256, size=(batch, *shape), dtype=np.uint8)


def _threaded(call: Callable[[], Any], images: int, concurrency: int, duration: float,
              warmup: float) -> dict[str, Any]:
    """C threads looping ``call()`` for ``duration`` seconds (after ``warmup``); each call carries
    ``images`` images."""
    def worker(deadline: float, out: list[float] | None) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                return
            call()
            if out is not None:
                out.append(time.perf_counter() - t0)

    with ThreadPoolExecutor(concurrency) as pool:
        if warmup > 0:
            end = time.perf_counter() + warmup
            list(pool.map(lambda _: worker(end, None), range(concurrency)))
        per_thread: list[list[float]] = [[] for _ in range(concurrency)]
        start = time.perf_counter()
        end = start + duration
        list(pool.map(lambda i: worker(end, per_thread[i]), range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = [x for xs in per_thread for x in xs]
    return _summary(lat, len(lat) * images, elapsed)


def bench_in_process(session: Any, images: np.ndarray, concurrency: int, duration: float,
                     warmup: float = 0.0) -> dict[str, Any]:
    """C threads looping ``session.run`` on ``images`` for ``duration`` seconds (after ``warmup``)."""
    feeds = {session.get_inputs()[0].name: images}
    return _threaded(lambda: session.run(None, feeds), len(images), concurrency, duration, warmup)


async def _bench_service_async(target: str, model: str, images: np.ndarray, concurrency: int,
                               duration: float, warmup: float, timeout: float) -> dict[str, Any]:
    from clients.client import AsyncVitServeClient

    async with AsyncVitServeClient(target, timeout=timeout) as client:
        async def worker(deadline: float, out: list[float] | None) -> None:
            while True:
                t0 = time.perf_counter()
                if t0 >= deadline:
                    return
                await client.embed(images, model=model)
                if out is not None:
                    out.append(time.perf_counter() - t0)

        if warmup > 0:
            end = time.perf_counter() + warmup
            await asyncio.gather(*(worker(end, None) for _ in range(concurrency)))
        lat: list[float] = []
        start = time.perf_counter()
        end = start + duration
        await asyncio.gather(*(worker(end, lat) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return _summary(lat, len(lat) * len(images), elapsed)


def _bench_service_sync(target: str, model: str, images: np.ndarray, concurrency: int,
                        duration: float, warmup: float, timeout: float) -> dict[str, Any]:
    from clients.client import VitServeClient

    with VitServeClient(target, timeout=timeout) as client:
        return _threaded(lambda: client.embed(images, model=model), len(images), concurrency, duration, warmup)


CLIENT_KINDS = ("sync", "aio")


def bench_service(target: str, model: str, images: np.ndarray, concurrency: int, duration: float,
                  warmup: float = 0.0, timeout: float = 60.0, client: str = "aio") -> dict[str, Any]:
    """C concurrent ``Embed`` calls of ``images`` for ``duration`` seconds.

    ``client="sync"``: C threads share one ``VitServeClient`` (the thin client a control loop
    calls), the same structure as the in-process side; ``"aio"``: C tasks on one
    ``AsyncVitServeClient`` (grpc.aio) channel.
    """
    if client == "sync":
        return _bench_service_sync(target, model, images, concurrency, duration, warmup, timeout)
    if client == "aio":
        return asyncio.run(_bench_service_async(target, model, images, concurrency, duration, warmup, timeout))
    raise ValueError(f"client must be one of {CLIENT_KINDS}, got {client!r}")


def _conditions(target: str, model: str, onnx_path: Path | None, threads: int,
                item_shape: Sequence[int], duration: float, warmup: float, started: bool) -> dict[str, Any]:
    versions = {}
    for dist in ("onnxruntime", "onnxruntime-gpu", "grpcio", "numpy", "nvidia-pytriton"):
        try:
            from importlib.metadata import version
            versions[dist] = version(dist)
        except Exception:
            pass
    return {"target": target, "model": model, "onnx_path": str(onnx_path) if onnx_path else None,
            "intra_op_threads": threads, "image_shape": list(item_shape),
            "duration_s_per_point": duration, "warmup_s_per_point": warmup,
            "service_started_by_bench": started, "request": "Embed (CLS, float32), raw uint8 frames",
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "processor": platform.processor(), "versions": versions,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_bench(target: str, model: str, *, onnx_path: str | Path | None = None, intra_op_threads: int = 0,
              batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
              concurrencies: Sequence[int] = DEFAULT_CONCURRENCIES, duration: float = 5.0,
              warmup: float = 0.5, seed: int = 0, started: bool = False, client_kind: str = "aio",
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Sweep ``batch_sizes`` x ``concurrencies`` against ``target`` and, with ``onnx_path``, in-process.

    Returns ``{"conditions": ..., "points": [{"batch_size", "concurrency", "service", "in_process",
    "throughput_ratio", "p50_overhead_ms"}]}`` (``in_process`` and the ratios are ``None`` without
    ``onnx_path``).
    """
    from clients.client import VitServeClient

    with VitServeClient(target, timeout=30) as client:
        models = {m.name: m for m in client.list_models()}
    if model not in models:
        raise ValueError(f"model {model!r} is not served at {target}; served: {', '.join(models) or 'none'}")
    desc = models[model]
    item_shape = (*desc.input_size, desc.input_channels)
    session = None
    if onnx_path is not None:
        from export.model import make_session
        session = make_session(str(onnx_path), intra_op_threads)
    rng = np.random.default_rng(seed)
    points = []
    for i, (b, c) in enumerate((b, c) for b in batch_sizes for c in concurrencies):
        images = _batch(rng, b, item_shape)
        sides: dict[str, Any] = {"service": None, "in_process": None}
        order = ["service", "in_process"] if i % 2 == 0 else ["in_process", "service"]
        for side in order:
            if side == "service":
                sides[side] = bench_service(target, model, images, c, duration, warmup, client=client_kind)
            elif session is not None:
                sides[side] = bench_in_process(session, images, c, duration, warmup)
        svc, inp = sides["service"], sides["in_process"]
        point = {"batch_size": b, "concurrency": c, "order": order, **sides,
                 "throughput_ratio": (svc["img_per_s"] / inp["img_per_s"]) if inp and inp["img_per_s"] else None,
                 "p50_overhead_ms": (svc["p50_ms"] - inp["p50_ms"]) if inp else None}
        points.append(point)
        if progress is not None:
            progress(_row(point))
    conditions = _conditions(target, model, Path(onnx_path) if onnx_path else None,
                             intra_op_threads, item_shape, duration, warmup, started)
    conditions["client"] = client_kind
    return {"conditions": conditions, "points": points}


_HEADER = (f"{'batch':>5} {'conc':>4} | {'svc img/s':>9} {'p50':>7} {'p95':>7} {'p99':>7} | "
           f"{'inp img/s':>9} {'p50':>7} {'p95':>7} {'p99':>7} | {'ratio':>5} {'dp50 ms':>7}")


def _row(p: dict[str, Any]) -> str:
    s, q = p["service"], p["in_process"]

    def side(x: dict[str, Any] | None) -> str:
        if x is None:
            return f"{'-':>9} {'-':>7} {'-':>7} {'-':>7}"
        return f"{x['img_per_s']:9.0f} {x['p50_ms']:7.2f} {x['p95_ms']:7.2f} {x['p99_ms']:7.2f}"
    ratio = f"{p['throughput_ratio']:5.2f}" if p["throughput_ratio"] is not None else f"{'-':>5}"
    over = f"{p['p50_overhead_ms']:7.2f}" if p["p50_overhead_ms"] is not None else f"{'-':>7}"
    return f"{p['batch_size']:5d} {p['concurrency']:4d} | {side(s)} | {side(q)} | {ratio} {over}"


def format_table(result: dict[str, Any]) -> str:
    """The sweep as a text table (latencies in ms; ratio = service/in-process img/s)."""
    return "\n".join([_HEADER, "-" * len(_HEADER), *(_row(p) for p in result["points"])])


def write_plot(result: dict[str, Any], path: str | Path) -> bool:
    """Throughput and p50 latency per point, service vs in-process; False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = result["points"]
    batches = sorted({p["batch_size"] for p in points})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for b in batches:
        ps = sorted((p for p in points if p["batch_size"] == b), key=lambda p: p["concurrency"])
        cs = [p["concurrency"] for p in ps]
        for side, style in (("service", "-o"), ("in_process", "--s")):
            if all(p[side] for p in ps):
                label = f"{side.replace('_', '-')} B={b}"
                axes[0].plot(cs, [p[side]["img_per_s"] for p in ps], style, label=label)
                axes[1].plot(cs, [p[side]["p50_ms"] for p in ps], style, label=label)
    axes[0].set(xlabel="concurrency", ylabel="images/s", title="throughput")
    axes[1].set(xlabel="concurrency", ylabel="p50 latency (ms)", title="p50 latency per request",
                yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    c = result["conditions"]
    fig.suptitle(f"serving_bench: {c['model']} {tuple(c['image_shape'])}, "
                 f"{c['duration_s_per_point']}s/point, intra-op threads {c['intra_op_threads'] or 'default'}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", help="HOST:PORT of a running gateway, or several (HOST:PORT,HOST:PORT or "
                   "dns:///NAME:PORT: balanced round-robin) (default: start one on --model-repository)")
    p.add_argument("--model-repository", help="model repository: served by this command when --target is "
                   "absent; its <model>/1/model.onnx is the in-process side (without it: service only)")
    p.add_argument("--model", help="model name (default: the only model served)")
    p.add_argument("--batch-sizes", type=_int_list, default=list(DEFAULT_BATCH_SIZES), help="e.g. 1,8,32")
    p.add_argument("--concurrency", type=_int_list, default=list(DEFAULT_CONCURRENCIES), help="e.g. 1,4,8")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per point and side")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each measurement")
    p.add_argument("--intra-op-threads", type=int,
                   help="in-process ORT threads (default: the served model's config.pbtxt value)")
    p.add_argument("--client", choices=CLIENT_KINDS, default="aio",
                   help="service side: C threads on the sync thin client (VitServeClient, as a control loop "
                   "calls it; the in-process side is C threads too) or C tasks on one grpc.aio channel")
    p.add_argument("--json", default="bench.json", help="where to write the JSON result")
    p.add_argument("--plot", default=None, help="PNG path (default: the --json path with .png)")
    p.add_argument("--triton-timeout", type=float, default=180.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.target is None and args.model_repository is None:
        print("serving_bench: give --target HOST:PORT or --model-repository DIR", file=sys.stderr)
        return 2
    if args.target is not None:
        from clients.targets import TargetError, parse_target
        try:
            parse_target(args.target)
        except TargetError as e:
            print(f"serving_bench: --target: {e}", file=sys.stderr)
            return 2
    if args.duration <= 0 or args.warmup < 0:
        print("serving_bench: --duration must be > 0 and --warmup >= 0", file=sys.stderr)
        return 2
    try:
        with contextlib.ExitStack() as stack:
            target = args.target
            started = target is None
            if started:
                from serving.gateway import embedded_service
                target = stack.enter_context(embedded_service(args.model_repository,
                                                              triton_timeout=args.triton_timeout)).target
            model = args.model
            if model is None:
                from clients.client import VitServeClient
                with VitServeClient(target, timeout=30) as client:
                    names = [m.name for m in client.list_models()]
                if len(names) != 1:
                    print(f"serving_bench: --model is required (served: {', '.join(names) or 'none'})",
                          file=sys.stderr)
                    return 2
                model = names[0]
            onnx_path, threads = None, 0
            if args.model_repository is not None:
                onnx_path, threads = model_files(args.model_repository, model)
            else:
                print("serving_bench: no --model-repository, so no in-process comparison", file=sys.stderr)
            if args.intra_op_threads is not None:
                threads = args.intra_op_threads
            print(_HEADER + "\n" + "-" * len(_HEADER), flush=True)
            result = run_bench(target, model, onnx_path=onnx_path, intra_op_threads=threads,
                               batch_sizes=args.batch_sizes, concurrencies=args.concurrency,
                               duration=args.duration, warmup=args.warmup, started=started,
                               client_kind=args.client,
                               progress=lambda line: print(line, flush=True))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"serving_bench: {e}", file=sys.stderr)
        return 1
    result["conditions"]["command"] = "python -m benchmarks.serving_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")
    wrote = write_plot(result, plot_path)
    print(f"wrote {json_path}" + (f" and {plot_path}" if wrote else " (no plot: matplotlib is not installed)"))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
