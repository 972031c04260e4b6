"""Compare trained runs (and the baselines) on every probe: a markdown table, JSON and a PNG scatter.

    python -m benchmarks.probe_comparison runs/compare2/{mae,dino,simclr,moco} --out docs/PROBE_COMPARISON --threads 1 --jobs 2

probes each run directory's encoder in process on the full Fashion-MNIST split (60k train / 10k test;
``--limit-*`` for subsets), plus raw pixels and a randomly initialised encoder of the same
architecture, on one scene set (default 2000 train / 1000 test scenes). It reads each run's training
throughput and budget from ``config.json`` and ``metrics.jsonl``, writes ``OUT.json``, ``OUT.md`` and
``OUT.png``, and (unless ``--no-write-runs``) each run's ``probes.json``. ``--render OUT.json``
re-renders the table and plot from a saved JSON without probing again (``benchmarks.probe_report``
renders and judges).

The linear probe runs on three poolings (``probes.sources.POOLING_TENSORS``): CLS, the mean patch
token and ``last4`` (DINOv2's linear-eval input: the CLS of the last 4 blocks + the mean patch token);
the k-NN on CLS and mean (``--knn-poolings``); raw pixels have no ``last4`` (recorded as skipped). The online k-NN curve a run logged while training
(``knn_val_top1`` records of ``metrics.jsonl``, from ``vitserve train ... knn_val=N knn_every=E``) is
drawn against images seen, and its last value is in the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.probe_report import render_markdown, write_outputs
from probes.evaluate import (DEFAULT_TEST_SCENES, DEFAULT_TRAIN_SCENES, KNN_POOLINGS, PROBES, ProbeData, ProbeReport,
                             load_probe_data, parse_poolings, probe_source, probes_record, protocol_record,
                             utc_now, write_probes_json)
from probes.linear import LinearProtocol
from probes.sources import (POOLINGS, FeatureSource, RawPixelSource, SourceError, TorchEncoderSource,
                            random_init_source)

log = logging.getLogger(__name__)

# Images per forward pass in process: batches of 32-64 ran ~400 img/CPU-s on this CPU against ~300 at 256
# (6-block 192-d ViT at 28 px, one thread; docs/PROBES.md).
DEFAULT_COMPARE_BATCH = 64


def training_info(run_dir: str | Path) -> dict[str, Any]:
    """Method, budget and throughput of a run from its ``config.json`` and ``metrics.jsonl``.

    ``img_per_s`` is images seen over the last logged ``elapsed_s`` (wall clock, so it includes any
    contention on a shared machine); ``img_per_budget_s`` divides by the budget (``max_minutes`` on
    the run's ``budget_clock``) instead, when the run stopped on it. ``online_knn`` is the curve of the
    ``knn_val_top1`` records: ``[{"step", "images_seen", "elapsed_s", "top1" (percent)}]``, and
    ``online_knn_last`` / ``online_knn_images`` its last point.
    """
    run_dir = Path(run_dir)
    info: dict[str, Any] = {"run_dir": str(run_dir)}
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: no readable config.json (%s)", run_dir, e)
        cfg = {}
    info.update(method=cfg.get("method", run_dir.name), batch_size=cfg.get("batch_size"),
                max_minutes=cfg.get("max_minutes"), budget_clock=cfg.get("budget_clock", "wall"),
                epochs=cfg.get("epochs"), bf16=cfg.get("bf16"), num_threads=cfg.get("num_threads"),
                knn_val=cfg.get("knn_val"), knn_bank=cfg.get("knn_bank"))
    records = []
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a killed run
    except OSError as e:
        log.warning("%s: no readable metrics.jsonl (%s)", run_dir, e)
    if records and info["batch_size"]:
        last = records[-1]
        images = int(last["step"]) * int(info["batch_size"])
        info.update(steps=int(last["step"]), images_seen=images, wall_s=float(last["elapsed_s"]),
                    final_loss=float(last["loss"]),
                    img_per_s=images / max(float(last["elapsed_s"]), 1e-9))
        if info["max_minutes"]:
            info["img_per_budget_s"] = images / (60.0 * float(info["max_minutes"]))
        curve = [{"step": int(r["step"]), "images_seen": int(r["step"]) * int(info["batch_size"]),
                  "elapsed_s": float(r.get("elapsed_s", math.nan)), "top1": 100.0 * float(r["knn_val_top1"])}
                 for r in records if isinstance(r.get("knn_val_top1"), (int, float))]
        if curve:
            info.update(online_knn=curve, online_knn_last=curve[-1]["top1"],
                        online_knn_images=curve[-1]["images_seen"])
    return info


def _source(kind: str, run_dir: str | Path) -> FeatureSource:
    if kind == "run":
        return TorchEncoderSource.from_run_dir(run_dir)
    trained = TorchEncoderSource.from_run_dir(run_dir)  # the baselines take the first run's shape
    return RawPixelSource.like(trained) if kind == "raw-pixels" else random_init_source(trained.spec)


def _probe_task(kind: str, run_dir: str, data_args: tuple, protocol: LinearProtocol, batch: int,
                threads: int | None, data: ProbeData | None = None, poolings: Sequence[str] = POOLINGS,
                probes: Sequence[str] = PROBES,
                knn_poolings: Sequence[str] = KNN_POOLINGS) -> tuple[ProbeReport, dict[str, Any]]:
    """One source's report on ``probes`` and the protocol record; loads the (deterministic) data when
    not given, so that it can run in a worker process."""
    if data is None:
        data = load_probe_data(*data_args)
    report = probe_source(_source(kind, run_dir), data, probes, protocol, batch, threads, poolings, knn_poolings)
    return report, protocol_record(data, PROBES, protocol, poolings, knn_poolings)


def _merge(parts: list[ProbeReport]) -> ProbeReport:
    """One source's report from the reports of its global and dense tasks (CPU times add up)."""
    merged = ProbeReport(parts[0].source)
    for part in parts:
        merged.scores.update(part.scores)
        merged.details.update(part.details)
        merged.skipped.update(part.skipped)
        for k, v in part.timings.items():
            merged.timings[k] = merged.timings.get(k, 0.0) + v
    return merged


def compare_runs(run_dirs: Sequence[str | Path], limit_train: int | None = None, limit_test: int | None = None,
                 train_scenes: int | None = DEFAULT_TRAIN_SCENES, test_scenes: int | None = DEFAULT_TEST_SCENES,
                 baselines: bool = True, threads: int | None = None, write_runs: bool = True,
                 protocol: LinearProtocol = LinearProtocol(), batch: int = DEFAULT_COMPARE_BATCH, jobs: int = 1,
                 poolings: Sequence[str] = POOLINGS, knn_poolings: Sequence[str] = KNN_POOLINGS) -> dict[str, Any]:
    """Probe every run (and the baselines) on one data set; the result ``write_outputs`` renders.

    ``limit_train``/``limit_test`` None: the full splits (60k bank / linear train set, 10k test).
    ``jobs`` > 1 runs that many tasks at once in worker processes (each loads the same data); each
    source is then two tasks, its global probes (k-NN, linear) and its dense probe, queued encoders'
    global probes first and raw pixels last, so that the pool stays busy to the end.
    """
    sources = [TorchEncoderSource.from_run_dir(r) for r in run_dirs]  # fail early on a bad run dir
    specs = {json.dumps(s.spec.to_dict(), sort_keys=True) for s in sources}
    if baselines and len(specs) > 1:
        log.warning("the runs have %d different architectures; the random-init baseline uses the first's", len(specs))
    del sources
    t_start = time.perf_counter()
    data_args = (limit_train, limit_test, train_scenes, test_scenes)
    named = [("run", str(r)) for r in run_dirs]
    if baselines and run_dirs:
        named += [("raw-pixels", str(run_dirs[0])), ("random-init", str(run_dirs[0]))]
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # longest first: an encoder's global probes take ~4x its dense probe; raw pixels are cheap
        encoders = [n for n in named if n[0] != "raw-pixels"]
        raw = [n for n in named if n[0] == "raw-pixels"]
        tasks = ([(n, ("knn", "linear")) for n in encoders] + [(n, ("dense",)) for n in encoders]
                 + [(n, ("knn", "linear")) for n in raw] + [(n, ("dense",)) for n in raw])
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_probe_task, k, r, data_args, protocol, batch, threads, None, tuple(poolings),
                                   probes, tuple(knn_poolings)) for (k, r), probes in tasks]
            done = [(n, f.result()) for (n, _), f in zip(tasks, futures)]
        results = [(_merge([rep for m, (rep, _) in done if m == n]), next(rec for m, (_, rec) in done if m == n))
                   for n in named]
    else:
        data = load_probe_data(*data_args)
        results = [_probe_task(k, r, data_args, protocol, batch, threads, data, poolings, PROBES, knn_poolings)
                   for k, r in named]
    tasks = named
    rows = []
    record_protocol = results[0][1] if results else {}
    for (kind, run_dir), (report, _) in zip(tasks, results):
        if kind == "run" and write_runs:
            write_probes_json(run_dir, probes_record(report, record_protocol))
        rows.append({"label": Path(run_dir).name if kind == "run" else kind, "kind": kind, "source": report.source,
                     "scores": report.scores, "details": report.details, "timings": report.timings,
                     "skipped": report.skipped, "training": training_info(run_dir) if kind == "run" else {}})
    return {"format_version": 1, "protocol": record_protocol, "rows": rows, "created": utc_now(),
            "elapsed_s": time.perf_counter() - t_start, "threads": threads, "jobs": jobs}


def _protocol_diff(saved: dict[str, Any], fresh: dict[str, Any], prefix: str = "") -> tuple[list[str], list[str]]:
    """(dotted keys whose values differ, keys only the fresh protocol records): a key that an earlier
    comparison did not record yet (written by an older version) is not a difference, but is named."""
    differ, unrecorded = [], []
    for key in sorted(set(saved) | set(fresh)):
        path = f"{prefix}{key}"
        if key not in saved:
            unrecorded.append(path)
        elif key not in fresh:
            differ.append(path)
        elif isinstance(saved[key], dict) and isinstance(fresh[key], dict):
            d, u = _protocol_diff(saved[key], fresh[key], f"{path}.")
            differ += d
            unrecorded += u
        elif saved[key] != fresh[key]:
            differ.append(path)
    return differ, unrecorded


def merge_into(saved: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (an earlier comparison's JSON) with ``fresh``'s rows in it: a row of the same label is
    replaced, a new one goes before the baselines. Refused (ValueError) when the two protocols differ,
    since their scores would not be comparable. ``parts`` records when each row was probed."""
    differ, unrecorded = _protocol_diff(saved.get("protocol") or {}, fresh.get("protocol") or {})
    if differ:
        raise ValueError(f"the protocols differ (in {', '.join(differ)}): probe with the saved comparison's "
                         "settings (its JSON's protocol) or rerun every row")
    fresh_labels = [r["label"] for r in fresh["rows"]]
    kept = [r for r in saved["rows"] if r["label"] not in fresh_labels]
    runs = [r for r in kept if r["kind"] == "run"]
    baselines = [r for r in kept if r["kind"] != "run"]
    parts = saved.get("parts") or [{"created": saved.get("created"), "elapsed_s": saved.get("elapsed_s"),
                                     "labels": [r["label"] for r in saved["rows"]]}]
    parts = [{**part, "labels": [lb for lb in part["labels"] if lb not in fresh_labels]} for part in parts]
    parts = [part for part in parts if part["labels"]]
    parts.append({"created": fresh["created"], "elapsed_s": fresh["elapsed_s"], "labels": fresh_labels,
                  **({"not_recorded_before": unrecorded} if unrecorded else {})})
    fresh_runs = [r for r in fresh["rows"] if r["kind"] == "run"]
    fresh_baselines = [r for r in fresh["rows"] if r["kind"] != "run"]
    return {**saved, "rows": runs + fresh_runs + baselines + fresh_baselines, "parts": parts,
            "created": fresh["created"], "elapsed_s": sum(float(part["elapsed_s"] or 0) for part in parts)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe_comparison", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    p.add_argument("--out", default="docs/PROBE_COMPARISON", help="output path prefix (.json, .md, .png)")
    p.add_argument("--render", metavar="JSON", help="re-render OUT.md/OUT.png from a saved comparison JSON")
    p.add_argument("--limit-train", type=int, metavar="N",
                   help="a seeded subset of N train images for the k-NN bank and linear probe (default: all 60000)")
    p.add_argument("--limit-test", type=int, metavar="N", help="a seeded subset of N test images (default: all 10000)")
    p.add_argument("--train-scenes", type=int, default=DEFAULT_TRAIN_SCENES, metavar="N",
                   help=f"dense-probe train scenes (default {DEFAULT_TRAIN_SCENES})")
    p.add_argument("--test-scenes", type=int, default=DEFAULT_TEST_SCENES, metavar="N",
                   help=f"dense-probe test scenes (default {DEFAULT_TEST_SCENES})")
    p.add_argument("--poolings", default=",".join(POOLINGS), help="global poolings for the linear probe")
    p.add_argument("--knn-poolings", default=",".join(KNN_POOLINGS), help="global poolings for the k-NN")
    p.add_argument("--l2-grid", default=",".join(f"{v:g}" for v in LinearProtocol().l2_grid), metavar="L2S",
                   help="linear/dense probe: L2 strengths searched on the held-out train split")
    p.add_argument("--max-iter", type=int, default=LinearProtocol().max_iter,
                   help="linear/dense probe: L-BFGS iterations per fit")
    p.add_argument("--batch", type=int, default=DEFAULT_COMPARE_BATCH, help="images per forward pass")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a loaded machine")
    p.add_argument("--jobs", type=int, default=1,
                   help="sources probed at once in worker processes (with --threads 1: one per free core)")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--into", metavar="JSON",
                   help="put the probed (or --render) rows into an earlier comparison's JSON (same protocol; a row of "
                        "the same label is replaced) and write the merged table to --out")
    p.add_argument("--no-write-runs", action="store_true", help="do not write RUN_DIR/probes.json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from training.data import DataError

    a = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if a.render:
        result = json.loads(Path(a.render).read_text())
    else:
        if not a.run_dirs:
            print("benchmarks.probe_comparison: error: give at least one RUN_DIR (or --render JSON)", file=sys.stderr)
            return 2
        missing = [r for r in a.run_dirs if not Path(r).is_dir()]
        if missing:
            print(f"benchmarks.probe_comparison: error: run directories do not exist: {', '.join(missing)}", file=sys.stderr)
            return 2
        try:
            poolings = parse_poolings(a.poolings)
            knn_poolings = parse_poolings(a.knn_poolings)
            l2_grid = tuple(float(v) for v in a.l2_grid.split(",") if v.strip())
            if not l2_grid or any(not v >= 0 for v in l2_grid) or a.max_iter < 1 or a.batch < 1:
                raise ValueError("--l2-grid needs strengths >= 0, --max-iter and --batch >= 1")
        except ValueError as e:
            print(f"benchmarks.probe_comparison: error: {e}", file=sys.stderr)
            return 2
        try:
            result = compare_runs(a.run_dirs, a.limit_train, a.limit_test, a.train_scenes, a.test_scenes,
                                  not a.no_baselines, a.threads, not a.no_write_runs,
                                  LinearProtocol(l2_grid=l2_grid, max_iter=a.max_iter), a.batch, max(1, a.jobs),
                                  poolings, knn_poolings)
        except SourceError as e:
            print(f"benchmarks.probe_comparison: error: {e}", file=sys.stderr)
            return 2
        except DataError as e:
            print(f"benchmarks.probe_comparison: data missing: {e}", file=sys.stderr)
            return 1
    if a.into:
        try:
            result = merge_into(json.loads(Path(a.into).read_text()), result)
        except (OSError, json.JSONDecodeError, ValueError) as e:
            print(f"benchmarks.probe_comparison: error: --into {a.into}: {e}", file=sys.stderr)
            return 2
    for path in write_outputs(result, a.out):
        print(f"wrote {path}")
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
