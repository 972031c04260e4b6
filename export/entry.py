"""What one repository entry says about its graph: the manifest (a ``contract.manifest.Manifest``) and
the typed Triton config that carries it.

``entry_manifest`` builds the manifest of one entry of an export (docs/CONTRACTS.md): encoder spec,
architecture, tensors (``tensor_layout``), weights hash, files, parity, exporter versions, probes,
source, preprocessing, and the buckets and lanes it belongs to. ``triton_config`` builds its
``TritonModelConfig`` from ``TritonOptions``; a lane picks the dynamic batching (``lane_batching``).
"""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version as _dist_version
from typing import Any, Sequence

import numpy as np
import torch

from contract.manifest import FORMAT_VERSION, Manifest
from contract.names import CLS_OUTPUT, INPUT_NAME, LANES, MANIFEST_PARAMETER, PATCH_OUTPUT
from export import model as triton_model
from export.architecture import output_descriptions
from export.errors import ExportUsageError
from export.layout import manifest_parameter
from export.onnx_export import TORCH_EXPORTER
from export.options import TritonOptions
from export.outputs import OutputSelection, describe_outputs
from export.triton_config import DynamicBatching, InstanceGroup, TensorSpec, TritonModelConfig
from training.backbone import EncoderSpec

LATENCY_SUFFIX = "_latency"
LATENCY_PREFERRED = (1, 2, 4)        # latency lane: answer alone or with the few requests already there
THROUGHPUT_PREFERRED = (8, 16, 32)   # throughput lane: wait (max_queue_delay) to fill larger batches


def _dist(name: str) -> str | None:
    try:
        return _dist_version(name)
    except PackageNotFoundError:
        return None


def exporter_info(opset: int, backend: str) -> dict[str, Any]:
    """The manifest's ``exporter`` entry: versions of everything that shaped the graph, and the opset."""
    import onnx
    import onnxruntime
    import timm

    versions = {"torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                "vitserve": _dist("vitserve")}
    return {"versions": versions, "opset": int(opset), "torch_exporter": TORCH_EXPORTER,
            "backend": backend, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def tensor_layout(spec: EncoderSpec, architecture: dict[str, Any], selection: OutputSelection
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Manifest ``inputs`` and ``outputs``: name -> {dtype, shape (batch as -1), description, ...}.

    ``architecture`` (``export.architecture.describe_architecture``) makes the descriptions say which
    prefix tokens were removed and whether the tokens carry a final norm. Each output also states its
    ``block``, ``layer``, ``final_norm``, ``tokens`` range and ``pooling`` (``export.outputs.describe_outputs``).
    """
    h, w = spec.img_size
    cls_what, patch_what = output_descriptions(spec, architecture)
    inputs = {INPUT_NAME: {"dtype": "uint8", "shape": [-1, h, w, spec.in_chans],
                           "description": "raw pixels NHWC; (x/255 - mean)/std is inside the graph"}}
    return inputs, describe_outputs(spec, architecture, selection, cls_what, patch_what)


def lane_entry_name(bucket_entry: str, lane: str | None) -> str:
    """``<bucket entry>`` for the throughput lane (or no lanes), ``<bucket entry>_latency`` for latency."""
    return bucket_entry + (LATENCY_SUFFIX if lane == "latency" else "")


def entry_manifest(*, name: str, version: int, spec: EncoderSpec, architecture: dict[str, Any],
                   selection: OutputSelection, weights_sha256: str, files: dict[str, str],
                   parity: dict[str, Any], exporter: dict[str, Any], probes: dict[str, Any], source: str,
                   preprocessing: dict[str, Any], weights: dict[str, Any] | None = None,
                   buckets: list[dict[str, Any]] | None = None, lane: str | None = None,
                   lanes: dict[str, str] | None = None) -> Manifest:
    """The manifest of entry ``name``: its bucket's ``spec`` and tensors, the export's shared records, and
    (when the export writes several) the bucket table and the lane pair it belongs to."""
    inputs, outputs = tensor_layout(spec, architecture, selection)
    return Manifest(
        format_version=FORMAT_VERSION, name=name, version=version, encoder_spec=spec.to_dict(),
        architecture=architecture, inputs=inputs, outputs=outputs, weights_sha256=weights_sha256,
        files=files, parity=parity, exporter=exporter, probes=probes, source=source,
        preprocessing=preprocessing, weights=dict(weights) if weights else None, buckets=buckets,
        bucket={"size": list(spec.img_size), "grid": list(spec.grid_size)} if buckets is not None else None,
        lanes=lanes if lane is not None else None, lane=lane)


def lane_batching(lane: str | None, max_batch_size: int, max_queue_delay_us: int) -> DynamicBatching:
    """Dynamic batching of a lane: none given -> ``max_queue_delay_us`` without preferred sizes;
    ``throughput`` -> the same delay, preferred 8/16/32; ``latency`` -> no delay, preferred 1/2/4
    (sizes above ``max_batch_size`` dropped)."""
    if lane is None:
        return DynamicBatching(max_queue_delay_microseconds=max_queue_delay_us)
    if lane not in LANES:
        raise ExportUsageError(f"lane {lane!r} is not one of {list(LANES)}")
    preferred, delay = ((LATENCY_PREFERRED, 0) if lane == "latency"
                        else (THROUGHPUT_PREFERRED, max_queue_delay_us))
    sizes = tuple(b for b in preferred if b <= max_batch_size) or (max_batch_size,)
    return DynamicBatching(max_queue_delay_microseconds=delay, preferred_batch_size=sizes)


def triton_config(name: str, spec: EncoderSpec, manifest: Manifest, triton: TritonOptions, *,
                  outputs: Sequence[tuple[str, tuple[int, ...]]] | None = None, lane: str | None = None,
                  cc_model_filenames: Sequence[tuple[str, str]] = ()) -> TritonModelConfig:
    """The typed Triton configuration of an exported encoder, carrying ``manifest`` as a parameter.

    ``outputs`` (name, dims) default to ``cls`` and ``patch_tokens``; ``lane`` picks the batching
    (``lane_batching``); ``cc_model_filenames`` ((compute capability, engine file) pairs) are for
    ``backend="tensorrt"``.
    """
    h, w = spec.img_size
    params = {MANIFEST_PARAMETER: manifest_parameter(manifest)}
    if triton.backend == "python":
        params[triton_model.THREADS_PARAMETER] = str(triton.intra_op_threads)
    elif triton.intra_op_threads > 0:  # the onnxruntime backend's own knob
        params["intra_op_thread_count"] = str(triton.intra_op_threads)
    if outputs is None:
        outputs = [(CLS_OUTPUT, (spec.embed_dim,)), (PATCH_OUTPUT, (spec.num_patches, spec.embed_dim))]
    return TritonModelConfig(
        name=name, backend=triton.backend, max_batch_size=triton.max_batch_size,
        inputs=(TensorSpec(INPUT_NAME, np.uint8, (h, w, spec.in_chans)),),
        outputs=tuple(TensorSpec(n, np.float32, tuple(d)) for n, d in outputs),
        dynamic_batching=lane_batching(lane, triton.max_batch_size, triton.max_queue_delay_us),
        instance_groups=(InstanceGroup(count=triton.instance_count, kind=triton.instance_kind),),
        parameters=params, version_policy=triton.version_policy,
        gpu_accelerators=tuple(triton.gpu_accelerators),
        cc_model_filenames=tuple((str(cc), str(f)) for cc, f in cc_model_filenames))
