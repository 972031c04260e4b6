"""The benchmark of many models: for each model, the systems side by side on the same samples, through
each scenario (LoadGen), with the graph's cost, the model's quality and the machine's matmul rate."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.flops import CONVENTION, graph_cost
from bench.loadgen_sut import LoadGenSUT
from bench.repository import RepositoryModel, model_entry
from bench.samples import SampleSet, load_source_images, make_samples
from bench.scenarios import REQUEST, ScenarioConfig, ScenarioResult, read_accuracy_log, run_scenario
from bench.systems import HttpSystem, OrtSystem, ServiceSystem, System, TorchSystem, warm_up

log = logging.getLogger(__name__)

SYSTEMS = ("service", "http", "onnxruntime", "torch")
# Offline's expected QPS over the calibration run's samples/s: LoadGen sizes its one query as expected QPS x
# min duration x 1.1, so the run meets the minimum duration unless the system turns this much faster.
OFFLINE_HEADROOM = 3.0


@dataclass
class BenchOptions:
    """How to run: scenarios, systems, samples and LoadGen settings shared by every model."""

    scenarios: Sequence[str] = ("single-stream", "offline")
    systems: Sequence[str] = ("service", "onnxruntime")
    input_kind: str = "raw"
    images: str | None = None  # folder; None: Fashion-MNIST test
    num_samples: int = 64
    cameras: int = 4
    target_qps: float | None = None  # None: half the system's warm single-sample rate
    latency_bound_ms: float = 200.0
    find_peak: bool = False
    control_hz: float | None = None
    min_duration_ms: int = 3000
    min_query_count: dict[str, int] = field(default_factory=dict)  # scenario -> count (else early stopping's)
    strict: bool = False
    accuracy: bool = False
    service_workers: int = 8
    offline_batch: int | None = None  # None: the model's max batch size
    torch_device: str = "cpu"
    intra_op_threads: int | None = None  # None: the served config's


@dataclass
class SystemRun:
    system: str
    cold_start: dict[str, float]
    results: list[ScenarioResult]


@dataclass
class ModelRun:
    """One model: its description, cost, quality and each system's scenario results."""

    model: str
    info: dict[str, Any]
    systems: list[SystemRun]
    accuracy: dict[str, Any] | None = None


def _config(opts: BenchOptions, scenario: str, **kw: Any) -> ScenarioConfig:
    from bench.scenarios import STRICT_MIN_DURATION_MS, STRICT_MIN_QUERIES

    if opts.strict:
        duration, count = STRICT_MIN_DURATION_MS, STRICT_MIN_QUERIES[scenario]
    else:
        duration, count = opts.min_duration_ms, opts.min_query_count.get(scenario)
    return ScenarioConfig(scenario, min_duration_ms=duration, min_query_count=count, cameras=opts.cameras,
                          latency_bound_ms=opts.latency_bound_ms, **kw)


def describe_model(entry: RepositoryModel) -> dict[str, Any]:
    """Resolution, tokens, params, GFLOP per image (counted from the ONNX graph), precision, quality."""
    cost = graph_cost(entry.onnx_path)
    spec = entry.manifest.spec
    h, w = entry.input_size
    patch = spec.get("patch_size", 16)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    grid = (h // patch) * (w // patch)
    prefix = int(spec.get("num_prefix_tokens", 1))
    return {"model": entry.name, "resolution": [h, w], "channels": entry.channels, "patch": patch,
            "tokens": grid + prefix, "patch_tokens": grid, "prefix_tokens": prefix,
            "params": cost.params, "gflop": cost.gflop, "activations": cost.activations,
            "flop_convention": CONVENTION, "precision": entry.precision, "max_batch_size": entry.max_batch_size,
            "intra_op_threads": entry.intra_op_threads, "onnx": str(entry.onnx_path),
            "quality": entry.quality(), "source": entry.manifest.source}


def _make_system(kind: str, entry: RepositoryModel, samples: SampleSet, opts: BenchOptions, target: str | None,
                 torch_models: dict[str, tuple[Any, Any]], http_url: str | None = None) -> System:
    batch = opts.offline_batch or entry.max_batch_size
    if kind == "service":
        if target is None:
            raise ValueError("the service system needs a running service (--target or --model-repository)")
        return ServiceSystem(target, entry.name, samples, batch)
    if kind == "http":
        if http_url is None:
            raise ValueError("the http system needs the service's HTTP API (--http-url, or no --target)")
        return HttpSystem(http_url, entry.name, samples, batch)
    if kind == "onnxruntime":
        threads = entry.intra_op_threads if opts.intra_op_threads is None else opts.intra_op_threads
        return OrtSystem(entry.onnx_path, samples, batch, threads)
    if kind == "torch":
        if entry.name not in torch_models:
            raise ValueError(f"no PyTorch module for {entry.name}: the torch system needs the model in memory "
                             "(bench.run.run_models(torch_models=...), e.g. benchmarks/backbone_sweep.py)")
        model, spec = torch_models[entry.name]
        return TorchSystem(model, spec, samples, batch, opts.torch_device)
    raise ValueError(f"system must be one of {SYSTEMS}, got {kind!r}")


def _sut_shape(kind: str) -> tuple[int, bool]:
    """(worker threads, coalesce): the service gets concurrent requests (Triton batches them);
    an in-process system one worker that batches what is waiting."""
    return (8, False) if kind in ("service", "http") else (1, True)


def _calibrated_offline_qps(sut: LoadGenSUT, n: int, log_dir: Path) -> float:
    """Samples/s of a short LoadGen Offline run: Offline's expected QPS is ``OFFLINE_HEADROOM`` times this, the
    Server target derives from it."""
    sut.request = "embed"
    cfg = ScenarioConfig("offline", min_duration_ms=0, min_query_count=max(n, 8 * sut.system.max_batch),
                         offline_expected_qps=1.0)
    r = run_scenario(sut, n, cfg, log_dir)
    return float(r.metric or 1.0)


def auto_target_qps(offline_qps: float | None, warm_ms: float) -> float:
    """The default Server target: half the lower of the batched (Offline calibration) and one-at-a-time
    (1 / warm single-request latency) rates, so Poisson bursts meet a spare system."""
    one_at_a_time = 1e3 / max(warm_ms, 1e-3)
    return round(0.5 * min(offline_qps or one_at_a_time, one_at_a_time), 2)


def bench_system(kind: str, entry: RepositoryModel, samples: SampleSet, opts: BenchOptions, target: str | None,
                 out_dir: Path, torch_models: dict[str, tuple[Any, Any]],
                 http_url: str | None = None) -> tuple[SystemRun, dict[str, np.ndarray]]:
    """Every scenario of ``opts`` against one system; and, with ``opts.accuracy``, its outputs per sample."""
    system = _make_system(kind, entry, samples, opts, target, torch_models, http_url)
    workers, coalesce = _sut_shape(kind)
    if kind in ("service", "http"):
        workers = opts.service_workers
    results: list[ScenarioResult] = []
    outputs: dict[str, Any] = {}
    try:
        cold = {}
        for request in sorted({REQUEST[s] for s in opts.scenarios}):
            c = warm_up(system, request)
            cold[request] = {"first_ms": c.first_ms, "warm_ms": c.warm_ms}
        warm_ms = min(v["warm_ms"] for v in cold.values())
        sut = LoadGenSUT(system, "embed", workers=workers, coalesce=coalesce)
        try:
            base = out_dir / "loadgen" / entry.name / system.name
            offline_qps = (_calibrated_offline_qps(sut, len(samples), base / "offline-calibration")
                           if {"offline", "server"} & set(opts.scenarios) else None)
            for scenario in opts.scenarios:
                sut.request = REQUEST[scenario]
                log_dir = out_dir / "loadgen" / entry.name / system.name / scenario
                kw: dict[str, Any] = {}
                if scenario == "offline":
                    kw["offline_expected_qps"] = OFFLINE_HEADROOM * offline_qps
                elif scenario == "server":
                    kw["target_qps"] = opts.target_qps or auto_target_qps(offline_qps, warm_ms)
                    kw["find_peak"] = opts.find_peak
                else:
                    per_query = opts.cameras if scenario == "multi-stream" else 1
                    # LoadGen pre-generates min_duration / expected latency queries and the run ends when
                    # they are done: an expected latency above the real one (a warm-up slowed by a busy
                    # machine) ends the run before its minimum duration (INVALID). A tenth of the warm
                    # latency leaves room; the run still stops once duration and count are met.
                    kw["expected_latency_ms"] = max(warm_ms * per_query / 10, 0.05)
                log.info("%s / %s / %s ...", entry.name, system.name, scenario)
                t0 = time.perf_counter()
                r = run_scenario(sut, len(samples), _config(opts, scenario, **kw), log_dir, opts.control_hz)
                log.info("%s / %s / %s: %s %s = %s (%.1f s)", entry.name, system.name, scenario, r.verdict,
                         r.metric_name, r.metric, time.perf_counter() - t0)
                results.append(r)
            if opts.accuracy:
                for request in sorted({REQUEST[s] for s in opts.scenarios}):
                    sut.request, sut.keep_outputs = request, True
                    acc_dir = out_dir / "loadgen" / entry.name / system.name / f"accuracy-{request}"
                    run_scenario(sut, len(samples), ScenarioConfig("offline", accuracy=True, min_duration_ms=0,
                                                                   min_query_count=len(samples)), acc_dir)
                    shape = system.run(np.array([0]), request).shape[1:]
                    outputs[request] = read_accuracy_log(acc_dir, shape)
        finally:
            sut.close()
    finally:
        system.close()
    return SystemRun(system.name, cold, results), outputs


def compare_outputs(outputs: dict[str, dict[str, dict[int, np.ndarray]]]) -> dict[str, Any]:
    """Max abs difference, per request kind, of each system's LoadGen accuracy-log outputs against the
    first system's, over the samples both logged."""
    names = list(outputs)
    out: dict[str, Any] = {}
    if len(names) < 2:
        return out
    ref = names[0]
    for other in names[1:]:
        for request, per_sample in outputs[ref].items():
            theirs = outputs[other].get(request, {})
            common = sorted(set(per_sample) & set(theirs))
            err = max((float(np.max(np.abs(per_sample[i] - theirs[i]))) for i in common), default=float("nan"))
            out[f"{ref} vs {other} {request}"] = {"samples": len(common), "max_abs_err": err}
    return out


def run_models(models: Sequence[str], repository: str | Path, opts: BenchOptions, out_dir: str | Path,
               target: str | None = None, torch_models: dict[str, tuple[Any, Any]] | None = None,
               progress: Callable[[str], None] | None = None, http_url: str | None = None) -> list[ModelRun]:
    """Benchmark ``models`` of ``repository``: each system through each scenario, one model at a time."""
    out_dir = Path(out_dir)
    runs = []
    source_images, label = load_source_images(opts.images, opts.num_samples)
    for name in models:
        entry = model_entry(repository, name)
        info = describe_model(entry)
        samples = make_samples(source_images, label, entry.input_size, entry.channels, opts.input_kind)
        info["samples"] = {"source": samples.source, "count": len(samples), "kind": samples.kind}
        system_runs, outputs = [], {}
        for kind in opts.systems:
            sr, outs = bench_system(kind, entry, samples, opts, target, out_dir, torch_models or {}, http_url)
            system_runs.append(sr)
            if outs:
                outputs[sr.system] = outs
            if progress is not None:
                progress(f"{name} {sr.system}: " + ", ".join(f"{r.scenario} {r.verdict}" for r in sr.results))
        runs.append(ModelRun(name, info, system_runs, compare_outputs(outputs) if opts.accuracy else None))
    return runs
