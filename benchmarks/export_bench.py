"""CPU throughput and quality of every precision path, side by side in one run (``python -m benchmarks.export_bench``).

For each model — ViT-S/16 at 224 (random init) and the Fashion-MNIST encoder (a run directory, or
the default architecture with random weights) — it times PyTorch eager fp32, PyTorch bf16 autocast,
ONNX Runtime fp32 and the ONNX variants of ``export.variants`` at batch 1 and 8 with the same
thread count, interleaving the paths round by round so that load from other jobs hits all of them
alike, and reports the median img/s of the rounds. Quality is each path's figures against fp32
PyTorch on Fashion-MNIST images (``export.variants.judge``), including the k-NN check for 28x28
models. Writes ``docs/EXPORT_BENCHMARK.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from export.model import make_session
from export.onnx_export import INPUT_NAME, OUTPUT_NAMES, export_onnx
from export.variants import VariantGate, build_variant, gate_data, judge
from training.backbone import EncoderSpec, create_encoder
from training.data import to_float_nchw

log = logging.getLogger(__name__)

ONNX_KINDS = ("int8-dynamic", "int8-static", "fp16")


def _torch_runner(model: nn.Module, spec: EncoderSpec, bf16: bool) -> Callable[[np.ndarray], Any]:
    def run(images: np.ndarray) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model.forward_features(to_float_nchw(images, spec.mean, spec.std))
    return run


def _onnx_runner(path: Path, threads: int) -> Callable[[np.ndarray], Any]:
    session = make_session(str(path), threads)
    return lambda images: session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})


def _bf16_quality(model: nn.Module, spec: EncoderSpec, data: Any,
                  gate: VariantGate) -> tuple[dict[str, Any], str | None]:
    """The gate figures of PyTorch bf16 autocast: ``variants.judge`` with the autocast model as runner."""
    run = _torch_runner(model, spec, bf16=True)

    def outputs(images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        parts = [run(images[i:i + 64]).float() for i in range(0, len(images), 64)]
        tokens = torch.cat(parts).numpy()
        p = spec.num_prefix_tokens
        got = {"cls": tokens[:, 0] if spec.has_cls_token else tokens[:, p:].mean(axis=1),
               "patch_tokens": tokens[:, p:]}
        return {k: got[k] for k in names}

    return judge(None, data, gate, runner=outputs)


# Ops of an exported ViT graph (MatMul/Gemm: projections and attention; Add/Mul/Div: residuals,
# scaling; Softmax; Erf: GELU; LayerNormalization; Transpose/Reshape: heads).
BF16_PROBE_OPS: dict[str, list[list[int]]] = {
    "MatMul": [[2, 4], [4, 3]], "Gemm": [[2, 4], [4, 3]], "Add": [[2, 4], [2, 4]], "Mul": [[2, 4], [2, 4]],
    "Div": [[2, 4], [2, 4]], "Softmax": [[2, 4]], "Erf": [[2, 4]], "LayerNormalization": [[2, 4], [4], [4]],
    "Transpose": [[2, 4]],
}


def ort_bf16_kernels(ops: dict[str, list[list[int]]] | None = None) -> dict[str, str]:
    """Whether ONNX Runtime's CPU provider has a bfloat16 kernel for each op: op -> "yes" or its error.

    One single-node bf16 graph per op (opset 17); a session is created, which is where ORT reports
    ``NOT_IMPLEMENTED`` for a missing kernel. Measured on every run rather than assumed.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    result: dict[str, str] = {}
    for op, shapes in (ops or BF16_PROBE_OPS).items():
        inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.BFLOAT16, s) for i, s in enumerate(shapes)]
        node = helper.make_node(op, [i.name for i in inputs], ["y"])
        graph = helper.make_graph([node], op, inputs, [helper.make_tensor_value_info("y", TensorProto.BFLOAT16,
                                                                                     None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            result[op] = "yes"
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            result[op] = " ".join(str(e).split())[:160]
    return result


def ort_bf16_path(kernels: dict[str, str]) -> bool:
    """An ORT bf16 path exists only if the compute-heavy ops (MatMul, Add, Softmax, Erf) have kernels."""
    return all(kernels.get(op) == "yes" for op in ("MatMul", "Add", "Softmax", "Erf"))


def time_paths(runners: dict[str, Callable[[np.ndarray], Any]], images: np.ndarray, batch: int,
               rounds: int, min_seconds: float, settle_seconds: float = 0.3) -> dict[str, dict[str, float]]:
    """img/s of each runner at ``batch``: median (and min/max) over ``rounds`` interleaved rounds."""
    x = np.ascontiguousarray(images[:batch])
    for run in runners.values():  # warm-up (allocations, ORT kernel selection)
        run(x)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            # Idle threads of the previous path (ORT and OpenMP spin after a run) must not steal from
            # this one, and its own caches are re-warmed before the clock starts.
            time.sleep(settle_seconds)
            run(x)
            n, t0 = 0, time.perf_counter()
            while True:
                run(x)
                n += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= min_seconds:
                    break
            samples[name].append(n * batch / elapsed)
    return {k: {"img_per_s": statistics.median(v), "min": min(v), "max": max(v)} for k, v in samples.items()}


def bench_model(label: str, model: nn.Module, spec: EncoderSpec, gate: VariantGate, threads: int,
                batches: Sequence[int], rounds: int, min_seconds: float, workdir: Path) -> dict[str, Any]:
    """Build every path for one model, measure its quality and its throughput; return the results."""
    model.eval()
    data = gate_data(model, spec, gate)
    workdir = Path(tempfile.mkdtemp(prefix="model-", dir=workdir))  # one folder per model
    fp32_onnx = export_onnx(model, spec, workdir / "fp32.onnx")
    paths: dict[str, Path] = {"onnxruntime fp32": fp32_onnx}
    for kind in ONNX_KINDS:
        paths[f"onnxruntime {kind}"] = build_variant(kind, fp32_onnx, workdir / f"{kind}.onnx",
                                                     data.calibration)
    quality: dict[str, Any] = {"pytorch eager fp32": None}
    failures: dict[str, str | None] = {"pytorch eager fp32": None}
    quality["pytorch bf16 autocast"], failures["pytorch bf16 autocast"] = _bf16_quality(model, spec, data, gate)
    for name, path in paths.items():
        quality[name], failures[name] = judge(path, data, gate)
    runners = {"pytorch eager fp32": _torch_runner(model, spec, bf16=False),
               "pytorch bf16 autocast": _torch_runner(model, spec, bf16=True)}
    runners.update({name: _onnx_runner(path, threads) for name, path in paths.items()})
    speed = {b: time_paths(runners, data.eval_images, b, rounds, min_seconds) for b in batches}
    rows = []
    for name in runners:
        q = quality[name]
        row = {"path": name, "passes_gate": failures[name] is None, "gate_failure": failures[name], "quality": q}
        for b in batches:
            row[f"b{b}"] = speed[b][name]
            row[f"b{b}_speedup"] = speed[b][name]["img_per_s"] / speed[b]["pytorch eager fp32"]["img_per_s"]
        rows.append(row)
    return {"label": label, "model_name": spec.model_name, "overrides": spec.overrides,
            "img_size": list(spec.img_size), "in_chans": spec.in_chans, "data": data.description,
            "rows": rows}


def machine() -> dict[str, Any]:
    """CPU model, cores, load average and library versions at the time of the run."""
    import onnxruntime
    import timm

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
            "avx512_bf16": "avx512_bf16" in flags, "avx512_vnni": "avx512_vnni" in flags,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "utc": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())}


NOTES = [
    "Paths: *pytorch eager fp32* is the model as trained (timm, fused attention), the baseline of every "
    "ratio. *pytorch bf16 autocast* is `torch.autocast('cpu', torch.bfloat16)` around the same eager "
    "model: the bf16 path of this CPU (ONNX Runtime's CPU provider: see the probe below). "
    "*onnxruntime fp32* is the exported graph `vitserve export` serves; the three ONNX variants are "
    "`export.variants.build_variant` of it, exactly what `vitserve export --variants` writes. fp16 "
    "is meant for GPUs; on CPU it runs only to check its numbers (ORT inserts casts around unsupported "
    "fp16 kernels).",
    "",
    "Quality is measured against fp32 PyTorch on Fashion-MNIST images (resized to 224x224x3 for "
    "ViT-S/16); ViT-S/16 is random-init, so only cosine and max abs error apply to it. Dynamic int8 "
    "picks activation ranges per batch, so its outputs depend slightly on which images share a batch.",
    "",
]


def _verdict(rows: list[dict[str, Any]], batch: int) -> str:
    """The fastest gated path at ``batch`` against eager fp32: median ratio and best-of-rounds ratio.

    The best-of-rounds ratio (fastest round of each path) is given too because PyTorch's OpenMP
    threads suffer far more than ONNX Runtime's from other jobs on shared cores (wide min-max).
    """
    key = f"b{batch}"
    best = max((r for r in rows if r["passes_gate"]), key=lambda r: r[f"{key}_speedup"])
    eager = next(r for r in rows if r["path"] == "pytorch eager fp32")[key]
    peak = best[key]["max"] / eager["max"]
    median = best[f"{key}_speedup"]
    return (f"Fastest path passing the gate at batch {batch}: {best['path']}, {median:.2f}x PyTorch eager "
            f"fp32 on medians, {peak:.2f}x on best-of-rounds (eager fp32 ranged {eager['min']:.1f}-"
            f"{eager['max']:.1f} img/s, {best['path']} {best[key]['min']:.1f}-{best[key]['max']:.1f}); "
            f"target 2.5x: {'met' if median >= 2.5 else 'NOT met'} on medians, "
            f"{'met' if peak >= 2.5 else 'NOT met'} on best-of-rounds.")


def to_markdown(report: dict[str, Any]) -> str:
    """The benchmark report as a Markdown page."""
    m, gate = report["machine"], report["gate"]
    lines = ["# Export benchmark (CPU)", "", f"Command: `{report['command']}`", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores visible (AVX-512 BF16 {m['avx512_bf16']}, "
             f"VNNI {m['avx512_vnni']}); load average at start {report['load_start']}, at end "
             f"{m['load_average']} (the cores are shared with other jobs: absolute img/s is noisy, the "
             f"ratios are measured side by side, interleaved over {report['rounds']} rounds, median). "
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, timm {m['timm']}, {m['utc']}.", "",
             f"Threads: torch.set_num_threads({report['threads']}), ORT intra_op_num_threads="
             f"{report['threads']}. Gate: mean cosine >= {gate['min_mean_cosine']} for every output "
             f"(here cls and patch_tokens: the benchmark exports the default outputs) vs fp32 PyTorch, k-NN "
             f"drop <= {gate['max_knn_drop_points']} points (28x28 models only), with its paired bootstrap "
             "95% interval and McNemar's exact p over the query images.", ""]
    lines += NOTES
    kernels = report.get("ort_bf16_kernels")
    if kernels:
        have = [op for op, v in kernels.items() if v == "yes"]
        missing = [op for op, v in kernels.items() if v != "yes"]
        lines += [f"bf16 on this CPU: PyTorch eager under `torch.autocast('cpu', torch.bfloat16)` (oneDNN bf16 "
                  "kernels; this CPU has AVX-512 BF16 dot products but no AMX tiles) is the *pytorch bf16 "
                  f"autocast* row. ONNX Runtime {m['onnxruntime']}'s CPU provider, probed on this run with one "
                  f"bf16 node per op: kernels for {', '.join(have) or 'none'}; NOT_IMPLEMENTED for "
                  f"{', '.join(missing) or 'none'} — "
                  + ("the ops needed exist, but this benchmark builds no ORT bf16 graph (not implemented)."
                     if report.get("ort_bf16_path") else
                     "so there is no ONNX Runtime bf16 path on this CPU and no such row (a bf16 graph would "
                     "not load; ORT's bf16 GEMM fast-math option is for ARM64 only)."), ""]
    for model in report["models"]:
        batches = report["batches"]
        lines += [f"## {model['label']}: `{model['model_name']}` {model['overrides']} "
                  f"({model['img_size'][0]}x{model['img_size'][1]}x{model['in_chans']})", "",
                  f"Quality data: {model['data']}", "",
                  "| path | " + " | ".join(f"img/s b{b} median [min-max] (x eager)" for b in batches)
                  + " | cos cls | cos patches | max abs err | k-NN drop (pt) | k-NN drop 95% CI, McNemar p | gate |",
                  "|---|" + "---|" * len(batches) + "---|---|---|---|---|---|"]
        for r in model["rows"]:
            q = r["quality"]
            speeds = " | ".join(f"{r[f'b{b}']['img_per_s']:.1f} [{r[f'b{b}']['min']:.1f}-{r[f'b{b}']['max']:.1f}]"
                                f" ({r[f'b{b}_speedup']:.2f}x)" for b in batches)
            if q is None:
                lines.append(f"| {r['path']} | {speeds} | reference | | | | | |")
                continue
            knn = q.get("knn")
            knn_text = (f"{knn['drop_points']:+.2f} ({100 * knn['fp32_accuracy']:.1f}% -> "
                        f"{100 * knn['variant_accuracy']:.1f}%)" if knn else "n/a")
            conf = (knn or {}).get("confidence")
            ci_text = (f"[{conf['ci_points'][0]:+.2f}, {conf['ci_points'][1]:+.2f}], p={conf['mcnemar_p']:.2g}"
                       if conf else "n/a")
            lines.append(f"| {r['path']} | {speeds} | {q['mean_cosine']['cls']:.5f} | "
                         f"{q['mean_cosine']['patch_tokens']:.5f} | {max(q['max_abs_err'].values()):.3g} | "
                         f"{knn_text} | {ci_text} | {'pass' if r['passes_gate'] else 'FAIL'} |")
        lines += [""] + [_verdict(model["rows"], b) for b in batches] + [""]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.export_bench [--run-dir RUN] [--threads T] ...``: prints and writes the report."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.export_bench", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", help="Fashion-MNIST run directory (default: random-init default encoder)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds per path per round")
    p.add_argument("--gate-images", type=int, default=1000, help="Fashion-MNIST queries (bank: 2x)")
    p.add_argument("--vit-s-images", type=int, default=32, help="quality images for ViT-S/16 (no k-NN)")
    p.add_argument("--skip-vit-s", action="store_true")
    p.add_argument("--out", default="docs/EXPORT_BENCHMARK.md")
    p.add_argument("--render", metavar="JSON", help="only re-render the Markdown of a saved JSON report")
    a = p.parse_args(argv)
    if a.render:
        report = json.loads(Path(a.render).read_text())
        Path(a.out).write_text(to_markdown(report))
        print(to_markdown(report))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    for handler in logging.getLogger().handlers:  # ORT's quantizer chatters on the root logger
        handler.addFilter(lambda r: r.name != "root" or (r.levelno >= logging.WARNING
                                                         and "pre-process" not in r.getMessage()))
    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    load_start = list(os.getloadavg())
    models: list[tuple[str, nn.Module, EncoderSpec, VariantGate]] = []
    if a.run_dir:
        from export.repository import load_run_encoder

        fm_model, fm_spec = load_run_encoder(a.run_dir)
        fm_label = f"Fashion-MNIST encoder (trained, {a.run_dir})"
    else:
        torch.manual_seed(0)
        fm_model, fm_spec = create_encoder()
        fm_label = "Fashion-MNIST encoder (default architecture, RANDOM init, seed 0)"
    models.append((fm_label, fm_model, fm_spec, VariantGate(n_eval=a.gate_images, n_knn_train=2 * a.gate_images)))
    if not a.skip_vit_s:
        torch.manual_seed(0)
        vit_model, vit_spec = create_encoder("vit_small_patch16_224", {})
        models.append(("ViT-S/16 224 (random init, seed 0)", vit_model, vit_spec,
                       VariantGate(n_eval=a.vit_s_images, n_knn_train=0, n_calibration=32)))
    results = []
    with tempfile.TemporaryDirectory(prefix="vitserve-bench-") as tmp:
        for label, model, spec, gate in models:
            log.info("benchmarking %s", label)
            results.append(bench_model(label, model, spec, gate, a.threads, batches, a.rounds,
                                       a.min_seconds, Path(tmp)))
    kernels = ort_bf16_kernels()
    report = {"command": "python -m benchmarks.export_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "load_start": load_start, "ort_bf16_kernels": kernels,
              "ort_bf16_path": ort_bf16_path(kernels), "threads": a.threads, "batches": batches,
              "rounds": a.rounds, "gate": asdict(VariantGate()), "models": results}
    text = to_markdown(report)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
