"""Typed description of a Triton model configuration, rendered to ``config.pbtxt`` via protobuf.

As in PyTriton's ``model_config/generator.py``, the configuration is a dataclass that is turned into
Triton's own ``ModelConfig`` message and printed with ``google.protobuf.text_format``, so every file
is valid by construction and parses back; nothing is string-templated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

Backend = Literal["python", "onnxruntime", "tensorrt"]
InstanceKind = Literal["CPU", "GPU"]

BACKENDS: tuple[str, ...] = ("python", "onnxruntime")  # what an ONNX export can be served by
TENSORRT = "tensorrt"  # tensorrt_plan: serialized engines, one per GPU compute capability
ALL_BACKENDS: tuple[str, ...] = (*BACKENDS, TENSORRT)
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), TENSORRT: ("tensorrt_plan", "model.plan")}
_KINDS = {"CPU": mc.ModelInstanceGroup.KIND_CPU, "GPU": mc.ModelInstanceGroup.KIND_GPU}
_DTYPES = {
    np.dtype(np.bool_): "TYPE_BOOL", np.dtype(np.uint8): "TYPE_UINT8",
    np.dtype(np.uint16): "TYPE_UINT16", np.dtype(np.uint32): "TYPE_UINT32",
    np.dtype(np.uint64): "TYPE_UINT64", np.dtype(np.int8): "TYPE_INT8",
    np.dtype(np.int16): "TYPE_INT16", np.dtype(np.int32): "TYPE_INT32",
    np.dtype(np.int64): "TYPE_INT64", np.dtype(np.float16): "TYPE_FP16",
    np.dtype(np.float32): "TYPE_FP32", np.dtype(np.float64): "TYPE_FP64",
}


class TritonConfigError(ValueError):
    """A model configuration that Triton would reject."""


def triton_dtype(dtype: np.dtype | type | str) -> str:
    """Triton's name (``TYPE_FP32``...) for a numpy dtype."""
    try:
        return _DTYPES[np.dtype(dtype)]
    except (KeyError, TypeError) as e:
        raise TritonConfigError(f"no Triton data type for numpy dtype {dtype!r}") from e


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor; ``dims`` exclude the batch dimension when ``max_batch_size > 0``."""

    name: str
    dtype: np.dtype | type | str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class DynamicBatching:
    """Triton's dynamic batcher: wait up to ``max_queue_delay_microseconds`` to form larger batches."""

    max_queue_delay_microseconds: int = 500
    preferred_batch_size: tuple[int, ...] = ()


@dataclass(frozen=True)
class InstanceGroup:
    """``count`` model instances on ``kind`` (CPU or GPU)."""

    count: int = 1
    kind: InstanceKind = "CPU"


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions Triton serves: ``latest`` (the newest ``num_versions``), ``all``, or ``specific``."""

    kind: Literal["latest", "all", "specific"] = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()


@dataclass(frozen=True)
class GpuAccelerator:
    """An ORT-backend GPU execution accelerator, e.g. TensorRT with ``precision_mode`` FP16."""

    name: Literal["tensorrt"] = "tensorrt"
    parameters: tuple[tuple[str, str], ...] = (("precision_mode", "FP16"),
                                               ("max_workspace_size_bytes", str(1 << 30)))


@dataclass(frozen=True)
class TritonModelConfig:
    """A Triton ``config.pbtxt``: backend, batching, tensors, instances and string parameters."""

    name: str
    backend: Backend
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_batching: DynamicBatching | None = field(default_factory=DynamicBatching)
    instance_groups: tuple[InstanceGroup, ...] = (InstanceGroup(),)
    parameters: dict[str, str] = field(default_factory=dict)
    version_policy: VersionPolicy | None = None
    gpu_accelerators: tuple[GpuAccelerator, ...] = ()
    # tensorrt only: (compute capability "9.0", engine file) pairs -> Triton's cc_model_filenames
    cc_model_filenames: tuple[tuple[str, str], ...] = ()

    def validate(self) -> None:
        """Raise ``TritonConfigError`` for what Triton would refuse at load time."""
        if self.backend not in ALL_BACKENDS:
            raise TritonConfigError(f"backend {self.backend!r} is not one of {ALL_BACKENDS}")
        if self.max_batch_size < 0:
            raise TritonConfigError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.dynamic_batching is not None and self.max_batch_size == 0:
            raise TritonConfigError("dynamic batching needs max_batch_size > 0")
        if not self.inputs or not self.outputs:
            raise TritonConfigError("a model needs at least one input and one output")
        names = [t.name for t in (*self.inputs, *self.outputs)]
        if len(set(names)) != len(names):
            raise TritonConfigError(f"tensor names must be unique, got {names}")
        for t in (*self.inputs, *self.outputs):
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                raise TritonConfigError(f"tensor {t.name!r} has invalid dims {t.dims}")
            triton_dtype(t.dtype)
        if self.dynamic_batching is not None:
            for b in self.dynamic_batching.preferred_batch_size:
                if not 0 < b <= self.max_batch_size:
                    raise TritonConfigError(
                        f"preferred batch size {b} outside 1..max_batch_size={self.max_batch_size}")
        for g in self.instance_groups:
            if g.count < 1 or g.kind not in _KINDS:
                raise TritonConfigError(f"invalid instance group {g}")
        policy = self.version_policy
        if policy is not None:
            if policy.kind not in ("latest", "all", "specific"):
                raise TritonConfigError(f"version policy {policy.kind!r} is not latest, all or specific")
            if policy.kind == "latest" and policy.num_versions < 1:
                raise TritonConfigError(f"latest version policy needs num_versions >= 1, got {policy.num_versions}")
            if policy.kind == "specific" and (not policy.versions or min(policy.versions) < 1):
                raise TritonConfigError(f"specific version policy needs versions >= 1, got {policy.versions}")
        if self.backend == TENSORRT:
            if any(g.kind != "GPU" for g in self.instance_groups):
                raise TritonConfigError("tensorrt_plan models run only on KIND_GPU instance groups")
            if not self.cc_model_filenames:
                raise TritonConfigError("a tensorrt_plan model needs at least one engine (cc_model_filenames)")
            for cc, filename in self.cc_model_filenames:
                parts = cc.split(".")
                if len(parts) != 2 or not all(p.isdigit() for p in parts) or not filename.endswith(".plan"):
                    raise TritonConfigError(f"engine entry ({cc!r}, {filename!r}) is not (\"<major>.<minor>\", "
                                            "\"<file>.plan\")")
            if len({cc for cc, _ in self.cc_model_filenames}) != len(self.cc_model_filenames):
                raise TritonConfigError(f"two engines for one compute capability: {self.cc_model_filenames}")
        elif self.cc_model_filenames:
            raise TritonConfigError("cc_model_filenames (per-GPU engines) are for the tensorrt backend only")
        if self.gpu_accelerators:
            if self.backend != "onnxruntime":
                raise TritonConfigError("GPU execution accelerators (TensorRT) need the onnxruntime backend")
            if not any(g.kind == "GPU" for g in self.instance_groups):
                raise TritonConfigError("a GPU execution accelerator (TensorRT) needs a KIND_GPU instance group")

    def to_proto(self) -> mc.ModelConfig:
        """The ``ModelConfig`` protobuf message Triton reads."""
        self.validate()
        config = mc.ModelConfig(name=self.name, backend=self.backend, max_batch_size=self.max_batch_size)
        if self.backend in PLATFORMS:
            config.platform, config.default_model_filename = PLATFORMS[self.backend]
        for cc, filename in self.cc_model_filenames:
            config.cc_model_filenames[cc] = filename
        for spec, repeated in ((self.inputs, config.input), (self.outputs, config.output)):
            for t in spec:
                repeated.add(name=t.name, data_type=mc.DataType.Value(triton_dtype(t.dtype)),
                             dims=list(t.dims))
        if self.dynamic_batching is not None:
            config.dynamic_batching.max_queue_delay_microseconds = (
                self.dynamic_batching.max_queue_delay_microseconds)
            config.dynamic_batching.preferred_batch_size.extend(
                self.dynamic_batching.preferred_batch_size)
        for g in self.instance_groups:
            config.instance_group.add(count=g.count, kind=_KINDS[g.kind])
        policy = self.version_policy
        if policy is not None and policy.kind == "latest":
            config.version_policy.latest.num_versions = policy.num_versions
        elif policy is not None and policy.kind == "all":
            config.version_policy.all.SetInParent()
        elif policy is not None:
            config.version_policy.specific.versions.extend(policy.versions)
        for acc in self.gpu_accelerators:
            entry = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name=acc.name)
            for key, value in acc.parameters:
                entry.parameters[key] = value
        for key in sorted(self.parameters):
            config.parameters[key].string_value = str(self.parameters[key])
        return config

    def to_pbtxt(self) -> str:
        """``config.pbtxt`` text, generated through ``google.protobuf.text_format``."""
        return text_format.MessageToString(self.to_proto())


def parse_pbtxt(text: str) -> mc.ModelConfig:
    """Parse ``config.pbtxt`` text back into a ``ModelConfig`` message."""
    return text_format.Parse(text, mc.ModelConfig())
