"""``vitserve probe``: k-NN, linear and dense probes of one feature source (and the baselines).

    vitserve probe --run RUN_DIR [--write-run]              # in-process PyTorch encoder
    vitserve probe --onnx REPO/NAME/1/model.onnx            # exported model on ONNX Runtime (CPU)
    vitserve probe --service HOST:PORT --model NAME         # a running vitserve service
      [--baselines] [--probes knn,linear,dense] [--poolings cls,mean,last4] [--knn-poolings cls,mean]
      [--limit-train N --limit-test N] [--out results.json]

Exit codes: 0 done, 2 a usage error (missing run dir or ONNX file, bad arguments), 1 missing data, an
unreachable service or a failed probe.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from probes.evaluate import (DEFAULT_TEST_SCENES, DEFAULT_TRAIN_SCENES, KNN_POOLINGS, PROBES, ProbeReport, load_probe_data,
                             parse_poolings, parse_probes, probe_source, probes_record, protocol_record,
                             write_probes_json)
from probes.linear import LinearProtocol
from probes.sources import (DEFAULT_BATCH, POOLINGS, FeatureSource, OnnxSource, RawPixelSource, ServiceSource,
                            SourceError, TorchEncoderSource, random_init_source)

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("knn_cls_top1", "knn_mean_top1", "knn_last4_top1", "linear_cls_top1", "linear_mean_top1",
                 "linear_last4_top1", "dense_patch_acc", "dense_miou")


IN_PROCESS_BATCH = 64  # torch forward passes of 32-64 images ran fastest here (docs/PROBES.md)


class UsageError(ValueError):
    """Bad arguments or a missing input file: exit 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitserve probe", description="Probe quality (k-NN, linear, dense) of "
                                "an encoder on Fashion-MNIST and its dense scene set.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR", help="a run directory written by `vitserve train`")
    src.add_argument("--onnx", metavar="PATH", help="an exported model.onnx (or its REPO/NAME directory)")
    src.add_argument("--service", metavar="TARGET", help="a running vitserve gateway HOST:PORT, or several "
                     "(HOST:PORT,HOST:PORT or dns:///NAME:PORT, balanced) (needs --model)")
    p.add_argument("--model", help="model name on the service")
    p.add_argument("--baselines", action="store_true",
                   help="also probe raw pixels and a randomly initialised encoder of the same architecture")
    p.add_argument("--probes", default=",".join(PROBES), help=f"comma-separated subset of {','.join(PROBES)}")
    p.add_argument("--poolings", default=",".join(POOLINGS),
                   help="global features for the linear probe: cls, mean (of patch tokens), last4 (CLS of the "
                        "last 4 blocks + mean patch, in-process encoders only; docs/PROBES.md)")
    p.add_argument("--knn-poolings", default=",".join(KNN_POOLINGS),
                   help="global features for the k-NN (default the final layer's, as DINO's eval_knn)")
    p.add_argument("--limit-train", type=int, metavar="N", help="a seeded random subset of N train images")
    p.add_argument("--limit-test", type=int, metavar="N", help="a seeded random subset of N test images")
    p.add_argument("--train-scenes", type=int, metavar="N",
                   help=f"dense train scenes (default {DEFAULT_TRAIN_SCENES}, at most limit-train/4)")
    p.add_argument("--test-scenes", type=int, metavar="N",
                   help=f"dense test scenes (default {DEFAULT_TEST_SCENES}, at most limit-test/4)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"images per forward pass / request (default {IN_PROCESS_BATCH} in process: ~400 vs "
                        f"~300 img/CPU-s at 256 on this CPU; {DEFAULT_BATCH} for --onnx/--service)")
    p.add_argument("--data-dir", help="directory of the four Fashion-MNIST IDX .gz files")
    p.add_argument("--out", metavar="JSON", help="write every source's record, details and timings here")
    p.add_argument("--write-run", action="store_true", help="write the encoder's record to RUN_DIR/probes.json")
    p.add_argument("--timeout", type=float, default=120.0, help="service call deadline in seconds")
    p.add_argument("--threads", type=int, default=0,
                   help="torch / ONNX Runtime threads (default 0: the libraries' default, all cores); "
                        "on a loaded machine 1 is several times faster")
    p.add_argument("--l2-grid", default=",".join(f"{v:g}" for v in LinearProtocol().l2_grid), metavar="L2S",
                   help="linear/dense probe: L2 strengths searched on the validation split")
    p.add_argument("--max-iter", type=int, default=LinearProtocol().max_iter,
                   help="linear/dense probe: L-BFGS iterations per fit")
    return p


def open_source(a: argparse.Namespace) -> FeatureSource:
    """The feature source the arguments name; UsageError for a missing path, SourceError otherwise."""
    if a.run is not None:
        if not Path(a.run).is_dir():
            raise UsageError(f"run directory {a.run} does not exist (train one with `vitserve train`)")
        try:
            return TorchEncoderSource.from_run_dir(a.run)
        except SourceError as e:
            raise UsageError(str(e)) from e
    if a.onnx is not None:
        if not Path(a.onnx).exists():
            raise UsageError(f"ONNX model {a.onnx} does not exist (export one with `vitserve export`)")
        try:
            return OnnxSource(a.onnx, intra_op_threads=a.threads)
        except SourceError as e:
            raise UsageError(str(e)) from e
    if not a.model:
        raise UsageError("--service needs --model NAME (the model to probe; `ListModels` names them)")
    return ServiceSource(a.service, a.model, timeout=a.timeout)


def baseline_sources(source: FeatureSource) -> list[FeatureSource]:
    """Raw pixels and a random-init encoder shaped like ``source`` (its encoder spec)."""
    from training.backbone import EncoderSpec

    spec = getattr(source, "spec", None)
    if isinstance(spec, dict):
        spec = EncoderSpec.from_dict(spec)
    out: list[FeatureSource] = [RawPixelSource.like(source)]
    if spec is not None:
        out.append(random_init_source(spec))
    return out


def format_table(reports: Sequence[ProbeReport]) -> str:
    """A fixed-width table of scores, one row per source."""
    cols = [c for c in SCORE_COLUMNS if any(c in r.scores for r in reports)]
    width = max(len(r.source) for r in reports)
    head = f"{'source':<{width}}  " + "  ".join(f"{c:>16}" for c in cols)
    rows = [f"{r.source:<{width}}  " + "  ".join(
        f"{r.scores[c]:>16.2f}" if c in r.scores else f"{'-':>16}" for c in cols) for r in reports]
    return "\n".join([head, *rows])


def run(a: argparse.Namespace) -> int:
    try:
        probes = parse_probes(a.probes)
    except ValueError as e:
        raise UsageError(f"--probes: {e}") from e
    try:
        poolings = parse_poolings(a.poolings)
    except ValueError as e:
        raise UsageError(f"--poolings: {e}") from e
    try:
        knn_poolings = parse_poolings(a.knn_poolings)
    except ValueError as e:
        raise UsageError(f"--knn-poolings: {e}") from e
    for flag in ("limit_train", "limit_test", "train_scenes", "test_scenes"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    try:
        l2_grid = tuple(float(v) for v in a.l2_grid.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--l2-grid must be comma-separated numbers, got {a.l2_grid!r}") from None
    if not l2_grid or any(not v >= 0 for v in l2_grid):
        raise UsageError(f"--l2-grid needs at least one strength >= 0, got {a.l2_grid!r}")
    if a.batch is None:
        a.batch = IN_PROCESS_BATCH if a.run is not None else DEFAULT_BATCH
    if a.max_iter < 1 or a.threads < 0 or a.batch < 1:
        raise UsageError("--max-iter and --batch must be >= 1 and --threads >= 0")
    if a.write_run and a.run is None:
        raise UsageError("--write-run needs --run RUN_DIR (it writes RUN_DIR/probes.json)")
    if a.service is None and a.model:
        raise UsageError("--model is for --service")
    source = open_source(a)
    try:
        from probes.scenes import SceneSpec

        grid_ok = source.img_size[0] % source.patch_size[0] == 0
        scene_spec = SceneSpec(tile_size=source.img_size[0], patch_size=source.patch_size[0]) if grid_ok else SceneSpec()
        data = load_probe_data(a.limit_train, a.limit_test, a.train_scenes, a.test_scenes, scene_spec,
                               dense="dense" in probes, data_dir=a.data_dir)
        protocol = LinearProtocol(l2_grid=l2_grid, max_iter=a.max_iter)
        record_protocol = protocol_record(data, probes, protocol, poolings, knn_poolings)
        sources = [source] + (baseline_sources(source) if a.baselines else [])
        reports = []
        t0 = time.perf_counter()
        for s in sources:
            reports.append(probe_source(s, data, probes, protocol, a.batch, a.threads, poolings, knn_poolings))
        elapsed = time.perf_counter() - t0
    finally:
        if hasattr(source, "close"):
            source.close()
    print(format_table(reports))
    print(f"({len(data.train_images)} train / {len(data.test_images)} test images"
          + ("" if data.full_split else ": a subset, not the full Fashion-MNIST split")
          + (f", {len(data.train_scenes)} / {len(data.test_scenes)} scenes" if data.train_scenes is not None else "")
          + f"; {elapsed:.0f} s)")
    for r in reports:
        for pooling, reason in r.skipped.items():
            print(f"skipped {pooling} for {r.source}: {reason}")
    records = [probes_record(r, record_protocol) for r in reports]
    if a.write_run:
        path = write_probes_json(a.run, records[0])
        print(f"wrote {path}")
    if a.out:
        from training.run_dir import write_json

        out: dict[str, Any] = {"records": records, "details": {r.source: r.details for r in reports},
                               "timings": {r.source: r.timings for r in reports}}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {write_json(a.out, out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``vitserve probe ...``; see the module docstring for the exit codes."""
    from training.data import DataError

    try:
        a = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse printed the message
        return int(e.code or 0)
    try:
        return run(a)
    except UsageError as e:
        print(f"vitserve probe: error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"vitserve probe: data missing: {e}", file=sys.stderr)
        return 1
    except SourceError as e:
        print(f"vitserve probe: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
