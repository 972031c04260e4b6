"""The probe comparison's report: the markdown table, the targets and the lecture's claims judged
from the numbers, the PNG scatter, and the files they are written to (``benchmarks.probe_comparison``
computes the result they render)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from probes.evaluate import HEADLINE
from probes.sources import POOLINGS

CONTRASTIVE = ("simclr", "moco")
SCORE_COLUMNS = (("knn_cls_top1", "k-NN CLS"), ("knn_mean_top1", "k-NN mean"), ("knn_last4_top1", "k-NN last4"),
                 ("linear_cls_top1", "linear CLS"), ("linear_mean_top1", "linear mean"),
                 ("linear_last4_top1", "linear last4"), ("dense_patch_acc", "dense patch acc"),
                 ("dense_miou", "dense mIoU"))
# The lecture's property table (../shared/lecture), as orderings our probes can test.
LECTURE_TABLE = """| Property | Contrastive (SimCLR/MoCo) | MAE (Reconstruction) | Self-distillation (DINOv2) |
|---|---|---|---|
| Global semantics | Strong | Moderate | Strong |
| Spatial precision | Weak (invariant to crops) | Strong | Strong (emergent boundaries) |
| Linear probe accuracy | High | Moderate | High |
| Dense prediction (detection) | Moderate | High | High |
| Training efficiency | Requires massive memory queue | Highly efficient (only processes 25% of patches) | Moderate |"""


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _online_knn_cell(t: dict[str, Any]) -> str:
    if t.get("online_knn_last") is None:
        return "–"
    return f"{t['online_knn_last']:.2f} ({t['online_knn_images']:,})"


def _split_text(p: dict[str, Any]) -> str:
    full = p.get("full_split")
    if full is True:
        return "the full splits"
    if full is False:
        return "**a seeded subset, not the full splits**"
    return "full split not recorded"


def render_markdown(result: dict[str, Any]) -> str:
    """The comparison as markdown: measured table, targets, and the lecture's claims checked."""
    rows = result["rows"]
    p = result["protocol"]
    cols = [(k, name) for k, name in SCORE_COLUMNS if any(k in r["scores"] for r in rows)]
    lines = [
        "| encoder | method | steps | images seen | img/s (wall) | img per budget s | online k-NN (at images) | "
        + " | ".join(name for _, name in cols) + " |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(cols)]
    for r in rows:
        s, t = r["scores"], r.get("training", {})
        lines.append(
            f"| {r['label']} | {t.get('method', r['kind'])} | {_fmt(t.get('steps'))} | {_fmt(t.get('images_seen'))} | "
            f"{_fmt(t.get('img_per_s'), 0)} | {_fmt(t.get('img_per_budget_s'), 0)} | {_online_knn_cell(t)} | "
            + " | ".join(_fmt(None if s.get(k) is None else float(s[k]), 2) for k, _ in cols) + " |")
    scenes = p.get("scenes") or {}
    features = p.get("global_features") or {}
    pooling_lines = [f"- **{k}**: {v}" for k, v in features.items() if k != "headline"]
    skipped = [f"- {r['label']}: no {pooling} ({reason})" for r in rows
               for pooling, reason in (r.get("skipped") or {}).items()]
    knn_runs = [r["training"] for r in rows if r.get("training", {}).get("online_knn_last") is not None]
    online = ""
    if knn_runs:
        t = knn_runs[0]
        online = (f" Online k-NN: the last `knn_val_top1` the run logged while training (DINO's weighted 20-NN "
                  f"of {t.get('knn_val')} held-out train images against a bank of {t.get('knn_bank')} training "
                  "images, CLS of the evaluation encoder; not the probe protocol of the other columns), with the "
                  "images seen when it was taken.")
    out = ["# Probe comparison", "",
           f"Fashion-MNIST, {p['n_train']} train / {p['n_test']} test images ({_split_text(p)}); dense probe on "
           f"{scenes.get('n_train_scenes')} train / {scenes.get('n_test_scenes')} test scenes of "
           f"{scenes.get('canvas_size')} px ({scenes.get('grid')}x{scenes.get('grid')} patches, 11 classes). "
           f"All scores are top-1 / accuracy / IoU in percent; the headline global feature is "
           f"{HEADLINE.upper()} (`Embed`'s default), the other poolings are shown beside it.{online}", "",
           *lines, "",
           f"k-NN: cosine, k={p['knn']['k']}, T={p['knn']['temperature']}. Linear and dense: "
           f"{p['linear']['method']}; L2 grid {p['linear']['l2_grid']}, {p['linear']['max_iter']} iterations. "
           + _provenance(result), ""]
    if pooling_lines:
        out += ["Global features (poolings):", "", *pooling_lines, *skipped, ""]
    out += ["## Targets (issue 4)", "", *[f"- {c}" for c in check_targets(rows)], ""]
    if dinov2 := check_dinov2(rows):
        out += ["## Targets (issue 22: DINOv2)", "", *[f"- {c}" for c in dinov2], ""]
    out += [
            "## The lecture's property table, and what we measured", "", LECTURE_TABLE, "",
            f"Orderings the table implies, tested on our numbers (best pooling per method: k-NN of "
            f"{_pooling_names(rows, 'knn')}, linear of {_pooling_names(rows, 'linear')}):",
            "", *[f"- {c}" for c in check_claims(rows)], ""]
    return "\n".join(out)


def _provenance(result: dict[str, Any]) -> str:
    parts = result.get("parts")
    if not parts:
        return f"Created {result['created']}; probing took {result['elapsed_s']:.0f} s."
    return "Probed in parts with the same protocol: " + "; ".join(
        f"{', '.join(part['labels'])} at {part['created']} ({float(part['elapsed_s'] or 0):.0f} s)" for part in parts) + "."


def _pooling_names(rows: list[dict[str, Any]], probe: str) -> str:
    present = [p for p in POOLINGS if any(f"{probe}_{p}_top1" in r["scores"] for r in rows if r["kind"] == "run")]
    return " / ".join("CLS" if p == "cls" else p for p in present) or "CLS / mean"


def _best(scores: dict[str, float], probe: str) -> tuple[float, str] | None:
    """The best ``probe`` ("knn"/"linear") score over the poolings and the pooling that gave it."""
    vals = [(scores[f"{probe}_{p}_top1"], p) for p in POOLINGS if f"{probe}_{p}_top1" in scores]
    return max(vals, key=lambda v: v[0]) if vals else None


def _best_value(scores: dict[str, float], probe: str) -> float | None:
    best = _best(scores, probe)
    return None if best is None else best[0]


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each with a yes/no, the numbers and the pooling that reached them."""
    runs = [r for r in rows if r["kind"] == "run"]
    by_kind = {r["kind"]: r for r in rows}
    out = []
    rand, raw = by_kind.get("random-init"), by_kind.get("raw-pixels")
    if rand and runs:
        misses = [f"{r['label']} {k} {r['scores'][k]:.2f} <= {rand['scores'][k]:.2f}"
                  for r in runs for k in r["scores"] if k in rand["scores"] and not r["scores"][k] > rand["scores"][k]]
        out.append("every method beats the random-init encoder on every probe (each probe and pooling against the "
                   "same one of random-init): " + ("**yes**" if not misses else "**no** (" + "; ".join(misses) + ")"))
    if raw and runs and "knn_cls_top1" in raw["scores"]:
        best = max(runs, key=lambda r: _best_value(r["scores"], "knn") or -1)
        b = _best(best["scores"], "knn")
        if b is not None:
            out.append(f"the best method beats raw-pixel k-NN ({raw['scores']['knn_cls_top1']:.2f}, the 784 pixels): "
                       f"{'**yes**' if b[0] > raw['scores']['knn_cls_top1'] else '**no**'} ({best['label']} "
                       f"{b[0]:.2f} with {b[1]} pooling; best of {_pooling_names(rows, 'knn')})")
    if runs:
        best = max(runs, key=lambda r: _best_value(r["scores"], "linear") or -1)
        b = _best(best["scores"], "linear")
        if b is not None:
            out.append(f"the best method reaches >= 88% linear-probe accuracy: {'**yes**' if b[0] >= 88 else '**no**'} "
                       f"({best['label']} {b[0]:.2f} with {b[1]} pooling; best of {_pooling_names(rows, 'linear')})")
    return out


SELF_DISTILLATION = ("dino", "dinov2")


def check_claims(rows: list[dict[str, Any]]) -> list[str]:
    """The lecture table's orderings that our runs can test, each marked agree/disagree with numbers.

    The table's third column is "Self-distillation (DINOv2)": each of DINO and DINOv2 that is present
    stands in it, under its own name, so the claims are judged for both."""
    method = {r["training"].get("method"): r for r in rows if r["kind"] == "run"}
    contrastive = [m for m in CONTRASTIVE if m in method]
    distilled = [m for m in SELF_DISTILLATION if m in method]
    out = []

    def compare(claim: str, hi: str, lo: str, get) -> None:
        a, b = get(method[hi]), get(method[lo])
        if a is None or b is None:
            return
        out.append(f"{claim}: {hi} {a:.2f} vs {lo} {b:.2f} — **{'agrees' if a > b else 'disagrees'}**")

    knn = lambda r: _best_value(r["scores"], "knn")      # noqa: E731
    lin = lambda r: _best_value(r["scores"], "linear")   # noqa: E731
    dense = lambda r: r["scores"].get("dense_miou")      # noqa: E731
    # images per second of the training budget (its clock, CPU time for budget_clock=cpu), else per wall second
    speed = lambda r: r["training"].get("img_per_budget_s") or r["training"].get("img_per_s")  # noqa: E731
    for c in contrastive:
        if "mae" in method:
            compare("global semantics: contrastive strong, MAE moderate (k-NN)", c, "mae", knn)
            compare("linear probe: contrastive high, MAE moderate", c, "mae", lin)
            compare("dense prediction: MAE high, contrastive moderate (dense mIoU)", "mae", c, dense)
        for d in distilled:
            compare("spatial precision: self-distillation strong, contrastive weak (dense mIoU)", d, c, dense)
    for d in distilled:
        if "mae" in method:
            compare("global semantics: self-distillation strong, MAE moderate (k-NN)", d, "mae", knn)
            compare("linear probe: self-distillation high, MAE moderate", d, "mae", lin)
    if "mae" in method:
        for other in [m for m in method if m != "mae"]:
            compare("training efficiency: MAE highly efficient (img/s)", "mae", other, speed)
    return out or ["(no pair of methods to compare)"]


def check_dinov2(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 22's targets, when a DINOv2 run is in the table: above DINO on k-NN, linear and dense mIoU
    (best pooling each), and the highest dense mIoU of every method."""
    method = {r["training"].get("method"): r for r in rows if r["kind"] == "run"}
    v2 = method.get("dinov2")
    if v2 is None:
        return []
    out = []
    if "dino" in method:
        v1 = method["dino"]
        for name, get in (("k-NN", lambda r: _best_value(r["scores"], "knn")),
                          ("linear", lambda r: _best_value(r["scores"], "linear")),
                          ("dense mIoU", lambda r: r["scores"].get("dense_miou"))):
            a, b = get(v2), get(v1)
            if a is not None and b is not None:
                out.append(f"DINOv2 above DINO on {name}: {'**yes**' if a > b else '**no**'} ({a:.2f} vs {b:.2f})")
    others = [r for m, r in method.items() if m != "dinov2" and r["scores"].get("dense_miou") is not None]
    if others and v2["scores"].get("dense_miou") is not None:
        best = max(others, key=lambda r: r["scores"]["dense_miou"])
        a, b = v2["scores"]["dense_miou"], best["scores"]["dense_miou"]
        out.append(f"DINOv2's dense mIoU above every other method: {'**yes**' if a > b else '**no**'} "
                   f"({a:.2f}; the best other is {best['label']} {b:.2f})")
    return out


def render_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Top: global quality (k-NN, linear; CLS filled, mean hollow, last4 cross) against dense mIoU.
    Bottom: each run's online k-NN (``knn_val_top1``) against images seen while training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(11, 8.5))
    axes = [fig.add_subplot(2, 2, 1), fig.add_subplot(2, 2, 2)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, probe, title in ((axes[0], "knn", "k-NN top-1 (k=20, T=0.07)"), (axes[1], "linear", "linear probe top-1")):
        for i, r in enumerate(result["rows"]):
            s = r["scores"]
            x = s.get("dense_miou")
            if x is None:
                continue
            color = "0.5" if r["kind"] != "run" else colors[i % len(colors)]
            marker = "s" if r["kind"] != "run" else "o"
            if f"{probe}_cls_top1" in s:
                ax.scatter([x], [s[f"{probe}_cls_top1"]], color=color, marker=marker, s=60, zorder=3)
                ax.annotate(r["label"], (x, s[f"{probe}_cls_top1"]), textcoords="offset points", xytext=(6, 4),
                            fontsize=9)
            if f"{probe}_mean_top1" in s:
                ax.scatter([x], [s[f"{probe}_mean_top1"]], facecolors="none", edgecolors=color, marker=marker,
                           s=60, zorder=3)
            if f"{probe}_last4_top1" in s:
                ax.scatter([x], [s[f"{probe}_last4_top1"]], color=color, marker="x", s=60, zorder=3)
        ax.set_title(title)
        ax.set_xlabel("dense probe mIoU (%, 11 classes)")
        ax.set_ylabel("top-1 (%)  filled: CLS, hollow: mean, x: last4")
        ax.grid(alpha=0.3)
    curve_ax = fig.add_subplot(2, 1, 2)
    drawn = 0
    for i, r in enumerate(result["rows"]):
        curve = (r.get("training") or {}).get("online_knn") or []
        if not curve:
            continue
        curve_ax.plot([c["images_seen"] for c in curve], [c["top1"] for c in curve], marker="o",
                      color=colors[i % len(colors)], label=r["label"])
        drawn += 1
    if drawn:
        curve_ax.set_xscale("log")
        curve_ax.legend()
    else:
        curve_ax.text(0.5, 0.5, "no online k-NN records (train with knn_val=N knn_every=E)", ha="center",
                      va="center", transform=curve_ax.transAxes)
    curve_ax.set_title("online k-NN while training (held-out train images, weighted 20-NN)")
    curve_ax.set_xlabel("images seen (log scale)")
    curve_ax.set_ylabel("online k-NN top-1 (%)")
    curve_ax.grid(alpha=0.3)
    fig.suptitle("Fashion-MNIST probes: global vs spatial quality, and the online k-NN curves")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: dict[str, Any], out: str | Path) -> list[Path]:
    """``OUT.json``, ``OUT.md`` and ``OUT.png`` (``out`` is a path prefix)."""
    from training.run_dir import atomic_write_bytes, write_json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [write_json(out.with_suffix(".json"), result),
             atomic_write_bytes(out.with_suffix(".md"), (render_markdown(result) + "\n").encode())]
    paths.append(render_plot(result, out.with_suffix(".png")))
    return paths
