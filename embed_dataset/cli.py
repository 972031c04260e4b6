"""``vitserve embed-dataset``: a thin shell over ``embed_dataset.job.embed_dataset``.

Exit codes: 0 done (also when a rerun finds nothing left to do), 2 a usage error (nothing was
started and OUTDIR was not touched), 1 the job stopped (a stall, unreachable gateways); the same
command resumes it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from embed_dataset.options import (DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, DEFAULT_STALL_TIMEOUT_S, DTYPES,
                                   POOLINGS, SOURCE_KINDS, EmbedOptions, JobError, UsageError)
from clients.targets import TargetError, parse_target
from serving.images import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _targets(text: str) -> tuple[str, ...]:
    try:
        parse_target(text)
    except TargetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return (text.strip(),)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitserve embed-dataset",
        description="Embed a folder of images, a Parquet table or WebDataset shards with an exported model, "
                    "on Ray Data (a local Ray unless --address); resumable: rerun the same command.")
    p.add_argument("source", help="a directory of images, a Parquet file or directory, or a .tar glob")
    p.add_argument("--model-repository", type=Path, help="the model repository (ONNX Runtime in the actors)")
    p.add_argument("--model", required=True, help="the model's name in the repository or on the gateways")
    p.add_argument("--out", required=True, type=Path, help="output directory (embeddings/, errors/)")
    p.add_argument("--pooling", choices=POOLINGS, default="cls",
                   help="cls token, mean of patch tokens, or both concatenated [cls | mean]")
    p.add_argument("--l2-normalize", action="store_true", help="unit-norm embeddings (each half with both)")
    p.add_argument("--features", action="store_true", help="also write the patch features [h*w, D]")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--batch-size", type=_at_least(1), default=DEFAULT_BATCH_SIZE, help="images per inference")
    p.add_argument("--workers", type=_at_least(1), default=1, help="actors in the inference pool")
    p.add_argument("--threads", type=_at_least(0), default=0,
                   help="ONNX Runtime threads per worker (default: the node's CPUs / workers)")
    p.add_argument("--address", help="an existing Ray cluster: auto, ray://HOST:PORT or HOST:PORT "
                                     "(default: start a local Ray on this machine)")
    p.add_argument("--service", type=_targets, default=(),
                   help="running vitserve gateways to embed with: HOST:PORT[,HOST:PORT...], ipv4:A:P,B:P or "
                        "dns:///NAME:PORT (gRPC round_robin over every replica, UNAVAILABLE retried on another)")
    p.add_argument("--source-kind", choices=SOURCE_KINDS, default="auto", help="default: detected from the files")
    p.add_argument("--image-column", help="Parquet: the column of image bytes or paths (default: detected)")
    p.add_argument("--id-column", help="Parquet: the column of ids (default: <file>:<row>)")
    p.add_argument("--shard-size", type=_at_least(1), default=DEFAULT_SHARD_SIZE,
                   help="folder sources: image files per shard, the unit of commit and resume")
    p.add_argument("--max-pixels", type=_at_least(1), default=DEFAULT_MAX_PIXELS,
                   help="refuse images declaring more pixels (decompression bombs) as errors")
    p.add_argument("--stall-timeout", type=_seconds, default=DEFAULT_STALL_TIMEOUT_S,
                   help="fail when Ray Data makes no progress for this many seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def options_from_args(args: argparse.Namespace) -> EmbedOptions:
    """``EmbedOptions`` from parsed arguments (``UsageError`` for a wrong combination)."""
    return EmbedOptions(
        source=args.source, out=args.out, model=args.model, model_repository=args.model_repository,
        pooling=args.pooling, l2_normalize=args.l2_normalize, features=args.features, dtype=args.dtype,
        batch_size=args.batch_size, workers=args.workers, threads=args.threads, address=args.address,
        service=tuple(args.service), source_kind=args.source_kind, image_column=args.image_column,
        id_column=args.id_column, shard_size=args.shard_size, max_pixels=args.max_pixels,
        stall_timeout_s=args.stall_timeout, progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    """``vitserve embed-dataset``; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or an argparse usage error (2, already printed)
        return int(e.code or 0)
    from embed_dataset.job import embed_dataset

    try:
        result = embed_dataset(options_from_args(args))
    except UsageError as e:
        print(f"vitserve embed-dataset: {e}", file=sys.stderr)
        return 2
    except JobError as e:
        print(f"vitserve embed-dataset: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
