"""The report of a benchmark: its conditions first, then one leaderboard (a row per model and system),
LoadGen's verdicts with what to change, cold starts, deadline misses and output parity; also a CSV whose
columns are a superset of timm's benchmark CSV, a JSON document and a throughput-vs-p99 plot with the
Pareto front marked."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

from bench.run import ModelRun, SystemRun
from bench.scenarios import SCENARIOS, ScenarioResult

# timm's benchmark CSV (benchmark.py --results-file), in its order; our columns follow.
TIMM_COLUMNS = ("model", "infer_img_size", "infer_samples_per_sec", "infer_step_time", "infer_batch_size",
                "param_count", "infer_gmacs", "infer_macts")
IN_PROCESS = ("onnxruntime",)  # the reference of the overhead columns (else the first torch system)
LATENCY_SCENARIOS = ("single-stream", "multi-stream", "server")


def _result(sr: SystemRun, scenario: str) -> ScenarioResult | None:
    return next((r for r in sr.results if r.scenario == scenario and r.mode != "accuracy"), None)


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def matmul_rate_gflops(conditions: dict[str, Any], precision: str) -> tuple[float | None, str]:
    """The machine's matmul rate at ``precision`` measured in this run, and what measured it."""
    m = conditions.get("machine", {})
    if precision == "int8" and m.get("int8_matmul_gops"):
        return m["int8_matmul_gops"], "int8 ORT MatMulInteger"
    if precision == "fp32":
        return m.get("fp32_matmul_gflops"), "fp32 GEMM (numpy/torch)"
    return m.get("fp32_matmul_gflops"), f"fp32 GEMM (numpy/torch; the {precision} rate is not measured)"


def scenario_metric(r: ScenarioResult | None) -> str:
    """A cell: LoadGen's metric of the scenario, in the unit a reader compares, and the verdict."""
    if r is None:
        return "-"
    if r.scenario in ("single-stream", "multi-stream"):
        value = f"{r.metric / 1e6:.2f} ms" if r.metric is not None else "-"
    else:
        value = f"{r.metric:.1f}/s" if r.metric is not None else "-"
    if r.peak_qps is not None:
        value += f" (peak {r.peak_qps:.0f} qps)"
    return f"{value} {r.verdict}"


def rows(runs: Sequence[ModelRun], conditions: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model and system: timm's columns, then ours (CSV and leaderboard)."""
    out = []
    for run in runs:
        info = run.info
        by_system = {s.system: s for s in run.systems}
        reference = next((by_system[s] for s in by_system if s in IN_PROCESS or s.startswith("torch")), None)
        for sr in run.systems:
            off = _result(sr, "offline")
            sps = off.samples_per_s if off else None
            batch = info["max_batch_size"]
            rate, rate_how = matmul_rate_gflops(conditions, info["precision"])
            row: dict[str, Any] = {
                "model": run.model, "infer_img_size": info["resolution"][0],
                "infer_samples_per_sec": sps, "infer_step_time": 1e3 * batch / sps if sps else None,
                "infer_batch_size": batch, "param_count": round(info["params"] / 1e6, 3),
                "infer_gmacs": round(info["gflop"] / 2, 4), "infer_macts": round(info["activations"] / 1e6, 3),
                "system": sr.system, "precision": info["precision"], "tokens": info["tokens"],
                "gflop_per_image": round(info["gflop"], 4),
            }
            for scenario in SCENARIOS:
                r = _result(sr, scenario)
                key = scenario.replace("-", "_")
                row[f"{key}_metric"] = r.metric if r else None
                row[f"{key}_verdict"] = r.verdict if r else None
                row[f"{key}_p99_ms"] = r.p99_ms if r else None
                row[f"{key}_samples_per_sec"] = r.samples_per_s if r else None
                if scenario in ("single-stream", "multi-stream"):
                    row[f"{key}_deadline_miss"] = r.deadline_miss if r else None
            srv = _result(sr, "server")
            row["server_target_qps"] = srv.settings.get("target_qps") if srv else None
            row["server_peak_qps"] = srv.peak_qps if srv else None
            row["cold_start_ms"] = max((v["first_ms"] for v in sr.cold_start.values()), default=None)
            row["warm_one_image_ms"] = min((v["warm_ms"] for v in sr.cold_start.values()), default=None)
            achieved = sps * info["gflop"] if sps else None
            row["achieved_gflops"] = achieved
            row["matmul_rate_gflops"] = rate
            row["matmul_rate_measured_with"] = rate_how
            row["fraction_of_matmul_rate"] = achieved / rate if achieved and rate else None
            ref = reference if reference is not None and reference is not sr else None
            ref_off = _result(ref, "offline") if ref else None
            row["offline_vs_in_process"] = (sps / ref_off.samples_per_s
                                            if ref and sps and ref_off and ref_off.samples_per_s else None)
            ss, ref_ss = _result(sr, "single-stream"), (_result(ref, "single-stream") if ref else None)
            row["single_stream_p90_minus_in_process_ms"] = (
                (ss.metric - ref_ss.metric) / 1e6 if ss and ref_ss and ss.metric and ref_ss.metric else None)
            for k, v in info["quality"].items():
                row[k] = v
            out.append(row)
    return out


def write_csv(table: list[dict[str, Any]], path: str | Path) -> None:
    """The rows as CSV: timm's columns first, then every other column any row has."""
    columns = list(TIMM_COLUMNS)
    for r in table:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        for r in table:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both lower latency (x) and higher throughput (y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_points(runs: Sequence[ModelRun]) -> list[dict[str, Any]]:
    """(p99 ms, samples/s) of each model, system and latency scenario that LoadGen measured."""
    pts = []
    for run in runs:
        for sr in run.systems:
            for scenario in LATENCY_SCENARIOS:
                r = _result(sr, scenario)
                if r and r.p99_ms and r.samples_per_s:
                    pts.append({"model": run.model, "precision": run.info["precision"], "system": sr.system,
                                "scenario": scenario, "p99_ms": r.p99_ms, "samples_per_s": r.samples_per_s,
                                "valid": r.valid})
    return pts


def write_plot(runs: Sequence[ModelRun], path: str | Path, title: str = "") -> bool:
    """Throughput against p99 latency, a marker per point, the Pareto front as a line; False without points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = plot_points(runs)
    if not pts:
        return False
    markers = {"single-stream": "o", "multi-stream": "s", "server": "^"}
    systems = sorted({p["system"] for p in pts})
    colors = {s: f"C{i}" for i, s in enumerate(systems)}
    fig, ax = plt.subplots(figsize=(9, 6))
    for p in pts:
        ax.scatter(p["p99_ms"], p["samples_per_s"], marker=markers[p["scenario"]], color=colors[p["system"]],
                   s=60, edgecolors="black" if p["valid"] else "red", linewidths=0.8)
        ax.annotate(f"{p['model']} ({p['scenario']})", (p["p99_ms"], p["samples_per_s"]), fontsize=6,
                    xytext=(4, 3), textcoords="offset points")
    # the front over VALID runs only (an INVALID run's figures are not a result), over all when none is
    eligible = [i for i, p in enumerate(pts) if p["valid"]] or list(range(len(pts)))
    front = [eligible[i] for i in pareto_front([(pts[i]["p99_ms"], pts[i]["samples_per_s"]) for i in eligible])]
    ax.plot([pts[i]["p99_ms"] for i in front], [pts[i]["samples_per_s"] for i in front], "k--", lw=1,
            label="Pareto front")
    ax.scatter([pts[i]["p99_ms"] for i in front], [pts[i]["samples_per_s"] for i in front], s=220,
               facecolors="none", edgecolors="black", linewidths=1.2)
    for s in systems:
        ax.scatter([], [], color=colors[s], label=s)
    for sc, m in markers.items():
        ax.scatter([], [], marker=m, color="grey", label=sc)
    ax.set(xscale="log", yscale="log", xlabel="p99 latency (ms, LoadGen)", ylabel="samples/s",
           title=title or "throughput vs p99 latency (red edge: INVALID run; ringed: Pareto front of the VALID runs)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def leaderboard_markdown(table: list[dict[str, Any]], scenarios: Sequence[str]) -> str:
    """The leaderboard as a Markdown table."""
    head = ["model", "system", "precision", "res", "tokens", "params M", "GFLOP/img",
            *scenarios, "svc/in-proc offline", "ss p90 - in-proc ms", "fraction of matmul rate", "cold start ms",
            "quality"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["model"], r["system"], r["precision"], str(r["infer_img_size"]), str(r["tokens"]),
                 _fmt(r["param_count"]), _fmt(r["gflop_per_image"], 3)]
        for sc in scenarios:
            key = sc.replace("-", "_")
            m, v = r.get(f"{key}_metric"), r.get(f"{key}_verdict")
            if m is None:
                cells.append("-")
            elif sc in ("single-stream", "multi-stream"):
                cells.append(f"{m / 1e6:.2f} ms {v}")
            else:
                cells.append(f"{m:.1f}/s {v}" + (f" peak {r['server_peak_qps']:.0f}" if sc == "server"
                                                 and r.get("server_peak_qps") else ""))
        quality = ", ".join(f"{k}={_fmt(r[k], 4) if isinstance(r[k], float) else r[k]}"
                            for k in r if k.startswith(("parity_", "variant_", "probe_")))
        cells += [_fmt(r["offline_vs_in_process"]), _fmt(r["single_stream_p90_minus_in_process_ms"]),
                  _fmt(r["fraction_of_matmul_rate"], 3), _fmt(r["cold_start_ms"]), quality or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conditions_markdown(c: dict[str, Any]) -> str:
    """The conditions block every report starts with."""
    m = c["machine"]
    lines = [f"- machine: {m.get('cpu') or 'unknown CPU'}, {m['cpus']} logical CPUs, GPU: {m.get('gpu') or 'none'}; "
             f"flags: {' '.join(m.get('flags', [])) or '-'}; load average at start {m.get('load_average')}",
             f"- measured matmul rate (this run, {m['matmul_n']}^2 GEMM): fp32 {m.get('fp32_matmul_gflops')} GFLOP/s "
             f"(the faster of numpy {m.get('numpy_fp32_matmul_gflops')} and torch {m.get('torch_fp32_matmul_gflops') or '-'}), int8 {m.get('int8_matmul_gops') or '-'} GOP/s (ONNX Runtime MatMulInteger u8 x s8)",
             f"- software: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()),
             f"- transport: {c['transport']}; input: {c['input']}; decoding timed: {c['decoding_timed']}",
             f"- batching: {c['batching']}",
             f"- requests: {c['requests']}",
             f"- LoadGen: {c['loadgen']}",
             f"- FLOP counting: {c['flop_convention']}",
             f"- command: `{c.get('command', '')}`"]
    return "\n".join(lines)


def details_markdown(runs: Sequence[ModelRun]) -> str:
    """Per run: verdict, failed checks and LoadGen's advice, cold start, deadline misses, parity, log dir."""
    lines = []
    for run in runs:
        lines.append(f"### {run.model}\n")
        for sr in run.systems:
            cold = "; ".join(f"{k}: first {v['first_ms']:.1f} ms, warm {v['warm_ms']:.1f} ms"
                             for k, v in sr.cold_start.items())
            lines.append(f"- **{sr.system}** cold start (first request after load, excluded from the runs): {cold}")
            for r in sr.results:
                extra = f"; deadline missed in {r.deadline_miss:.1%} of steps" if r.deadline_miss is not None else ""
                lines.append(f"  - {r.scenario}: {r.verdict}, {r.metric_name} = {_fmt(r.metric)}, "
                             f"p99 {_fmt(r.p99_ms)} ms, {_fmt(r.samples_per_s)} samples/s{extra} (logs: `{r.log_dir}`)")
                if r.valid is False:
                    lines.append(f"    - failed: {'; '.join(r.failed_checks) or '-'}")
                    lines.append(f"    - LoadGen says: {' '.join(r.advice) or '-'}")
        if run.accuracy:
            for k, v in run.accuracy.items():
                lines.append(f"- accuracy mode, {k}: max abs err {v['max_abs_err']:.2e} over {v['samples']} samples")
        lines.append("")
    return "\n".join(lines)


def write_report(runs: Sequence[ModelRun], conditions: dict[str, Any], out_dir: str | Path,
                 scenarios: Sequence[str]) -> dict[str, Path]:
    """``bench.md``, ``bench.csv``, ``bench.json`` and ``bench.png`` in ``out_dir``; their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = rows(runs, conditions)
    paths = {"csv": out / "bench.csv", "json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    write_csv(table, paths["csv"])
    doc = {"conditions": conditions, "rows": table, "plot_points": plot_points(runs),
           "models": [{"model": r.model, "info": r.info, "accuracy": r.accuracy,
                       "systems": [{"system": s.system, "cold_start": s.cold_start,
                                    "results": [x.to_dict() for x in s.results]} for s in r.systems]}
                      for r in runs]}
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if not write_plot(runs, paths["png"]):
        del paths["png"]
    md = ["# vitserve bench", "", "## Conditions", "", conditions_markdown(conditions), "", "## Leaderboard", "",
          leaderboard_markdown(table, scenarios), "", "## Runs", "", details_markdown(runs)]
    paths["md"].write_text("\n".join(md) + "\n")
    return paths


def text_table(table: list[dict[str, Any]], scenarios: Sequence[str]) -> str:
    """A compact stdout table."""
    head = f"{'model':<28} {'system':<12} {'prec':<5} " + " ".join(f"{s:>22}" for s in scenarios) + f" {'frac':>6}"
    lines = [head, "-" * len(head)]
    for r in table:
        cells = []
        for sc in scenarios:
            key = sc.replace("-", "_")
            m, v = r.get(f"{key}_metric"), r.get(f"{key}_verdict")
            cells.append("-" if m is None else (f"{m / 1e6:.2f}ms {v}" if sc in ("single-stream", "multi-stream")
                                                else f"{m:.1f}/s {v}"))
        lines.append(f"{r['model']:<28} {r['system']:<12} {r['precision']:<5} " + " ".join(f"{c:>22}" for c in cells)
                     + f" {_fmt(r['fraction_of_matmul_rate'], 3):>6}")
    return "\n".join(lines)
