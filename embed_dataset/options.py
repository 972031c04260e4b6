"""What an embed-dataset job is asked to do, and the errors a user can cause (exit 2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clients.targets import TargetError, parse_target
from serving.images import DEFAULT_MAX_PIXELS

POOLINGS = ("cls", "mean", "both")
DTYPES = ("float32", "float16")
SOURCE_KINDS = ("auto", "folder", "parquet", "webdataset")
DEFAULT_BATCH_SIZE = 64
DEFAULT_SHARD_SIZE = 1000          # image files per shard of a folder source (the unit of commit)
DEFAULT_STALL_TIMEOUT_S = 600.0    # Ray Data's no-progress timeout


class UsageError(ValueError):
    """A wrong option, a missing model or an unreadable source: reported before any work (exit 2)."""


class JobError(RuntimeError):
    """The job could not finish (a stall, an unreachable gateway); a rerun resumes it (exit 1)."""


def service_target(service: tuple[str, ...]) -> str:
    """One gRPC target of ``--service``'s gateways (given as one target, or as several ``HOST:PORT``)."""
    return ",".join(service)


@dataclass(frozen=True)
class EmbedOptions:
    """One ``embed-dataset`` job: the source, the model, what to write and how to run it."""

    source: str
    out: Path
    model: str
    model_repository: Path | None = None
    pooling: str = "cls"
    l2_normalize: bool = False
    features: bool = False
    dtype: str = "float32"
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = 1
    threads: int = 0                     # ONNX Runtime intra-op threads per worker; 0: the node's CPUs / workers
    address: str | None = None           # None: a local Ray on this machine; "auto", "ray://..." or host:port
    service: tuple[str, ...] = ()        # HOST:PORT of running gateways (round-robin) instead of ONNX Runtime
    source_kind: str = "auto"
    image_column: str | None = None      # Parquet: column of image bytes or paths (default: detected)
    id_column: str | None = None         # Parquet: column of ids (default: <file>:<row>)
    shard_size: int = DEFAULT_SHARD_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
    progress: bool = True

    def __post_init__(self) -> None:
        checks = (
            (self.pooling in POOLINGS, f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
            (self.source_kind in SOURCE_KINDS,
             f"--source-kind must be one of {', '.join(SOURCE_KINDS)}, got {self.source_kind!r}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (self.threads >= 0, f"--threads must be >= 0, got {self.threads}"),
            (self.shard_size >= 1, f"--shard-size must be >= 1, got {self.shard_size}"),
            (self.max_pixels >= 1, f"--max-pixels must be >= 1, got {self.max_pixels}"),
            (self.stall_timeout_s > 0, f"--stall-timeout must be > 0 seconds, got {self.stall_timeout_s}"),
            (bool(self.model), "--model names the model to embed with"),
            (self.model_repository is not None or bool(self.service),
             "give --model-repository DIR (ONNX Runtime in the actors) or --service HOST:PORT (running gateways)"),
        )
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.service:
            try:
                parse_target(service_target(self.service))
            except TargetError as e:
                raise UsageError(f"--service: {e}") from None
        if self.source_kind != "parquet" and (self.image_column or self.id_column):
            if self.source_kind != "auto":
                raise UsageError("--image-column and --id-column apply to Parquet sources only")

    @property
    def outputs_identity(self) -> dict[str, object]:
        """The options that change what is written (a rerun into the same OUTDIR must match them)."""
        return {"pooling": self.pooling, "l2_normalize": self.l2_normalize, "features": self.features,
                "dtype": self.dtype, "max_pixels": self.max_pixels}
