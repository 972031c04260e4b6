"""What an export is asked to write (``ExportOptions``), separate from the encoder it exports.

``ExportOptions`` groups the choices of ``vitserve export`` (and of ``export.repository.export_entries``,
which the command line calls): which version to write and how (versioning), which outputs every
graph returns and which entries to write (one per resolution bucket and lane), how Triton serves
them (``TritonOptions``: the config.pbtxt), and the graph's opset and parity gate. ``check`` refuses
values no export could use, before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from export.errors import ExportUsageError
from export.gate import DEFAULT_TOLERANCE
from export.onnx_export import DEFAULT_OPSET
from export.outputs import DEFAULT_SELECTION, OutputSelection
from export.triton_config import BACKENDS, GpuAccelerator, VersionPolicy

TARGETS = ("embedded", "production")


@dataclass(frozen=True)
class TritonOptions:
    """How Triton serves an entry: backend, batching, instances, versions and GPU accelerators."""

    max_batch_size: int = 64
    backend: str = "python"  # python (ORT inside the Python backend) | onnxruntime | tensorrt (engines)
    instance_count: int = 1
    instance_kind: str = "CPU"
    intra_op_threads: int = 0  # ONNX Runtime threads per instance; 0: one per core
    max_queue_delay_us: int = 500  # dynamic batching delay (the throughput lane's; latency has none)
    version_policy: VersionPolicy | None = None  # None: Triton's (latest 1)
    gpu_accelerators: Sequence[GpuAccelerator] = ()
    target: str | None = None  # the manifest's exporter.target; None: production for onnxruntime, else embedded

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu_accelerators", tuple(self.gpu_accelerators))

    @property
    def resolved_target(self) -> str:
        """``target``, or what the backend implies (``production`` for the native onnxruntime backend)."""
        return self.target or ("production" if self.backend == "onnxruntime" else "embedded")


@dataclass(frozen=True)
class ExportOptions:
    """Everything ``export_entries`` is asked to do besides which encoder and which name (defaults: one
    entry, version 1, ``cls`` and ``patch_tokens``, Python backend, parity within 1e-4)."""

    # versioning: the version directory written, and what may be replaced
    version: int = 1
    force: bool = False  # replace existing entries (with add_version: only that version directory)
    add_version: bool = False  # add ``version`` to existing entries (same config) instead of new ones
    # the entries: the outputs of every graph, one entry per resolution bucket (and per lane)
    outputs: OutputSelection = DEFAULT_SELECTION
    resolutions: Sequence[tuple[int, int]] | None = None  # None: the encoder's own size, no buckets
    lanes: bool = False  # also <name>_latency; <name> becomes the throughput lane
    # also the output cls_attention [N, heads, h*w] (the same as outputs.attention; either sets both)
    attention: bool = False
    # how Triton serves them
    triton: TritonOptions = field(default_factory=TritonOptions)
    # the graph and its parity gate
    opset: int = DEFAULT_OPSET
    tol: float = DEFAULT_TOLERANCE
    parity_images: np.ndarray | None = field(default=None, compare=False, repr=False)  # None: the default set

    def __post_init__(self) -> None:
        if self.resolutions is not None:
            object.__setattr__(self, "resolutions", tuple((int(h), int(w)) for h, w in self.resolutions))
        if self.attention or self.outputs.attention:
            object.__setattr__(self, "attention", True)
            object.__setattr__(self, "outputs", replace(self.outputs, attention=True))

    def check(self) -> None:
        """Raise ``ExportUsageError`` for a version, batch size or backend no ONNX export can write."""
        version = self.version
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ExportUsageError(f"version must be an integer >= 1, got {version!r}")
        if self.triton.max_batch_size < 1:
            raise ExportUsageError(f"max_batch_size must be >= 1, got {self.triton.max_batch_size}")
        if self.triton.backend not in BACKENDS:
            raise ExportUsageError(f"backend {self.triton.backend!r} is not one of {BACKENDS} for an ONNX "
                                   "export (TensorRT engines: export.tensorrt_engine.export_tensorrt)")
