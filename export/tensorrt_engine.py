"""TensorRT engines from the exported ONNX graph - only where the ``tensorrt`` package and a CUDA GPU exist.

``tensorrt_unavailable_reason`` says why engines cannot be built here (``vitserve export --tensorrt``
exits 1 with that message before exporting anything). Where both exist, ``export_tensorrt`` turns an
exported entry ``<name>`` into ``<name>_trt``, a Triton ``tensorrt_plan`` model:

- ``build_engine``: min/opt/max batch optimisation profile, FP16 with the normalisation layers kept in
  FP32 (``OBEY_PRECISION_CONSTRAINTS``), one engine per GPU compute capability and TensorRT version
  (``engine_key``; an engine runs only where both match), file ``model_cc<major>.<minor>_trt<version>.plan``;
- the engine is gated like a precision variant (``export.gate.judge`` with ``run_engine`` in place of
  ONNX Runtime: every output's mean cosine and max abs error against fp32 PyTorch, k-NN drop with its
  confidence statement) and not written when it misses, unless forced;
- ``write_tensorrt_entry`` publishes the entry atomically (``export.publish.Staging``): ``config.pbtxt``
  from the same typed description (``platform: "tensorrt_plan"``, ``cc_model_filenames`` {capability: engine file}, KIND_GPU),
  the engines, and a manifest whose ``tensorrt.engines`` are keyed by compute capability with the
  TensorRT version, GPU name, profile and precision of each.

UNTESTED on a GPU: neither tensorrt nor a GPU was available where this was written. The builder and
runner follow the TensorRT 10 Python API (``Builder``, ``OnnxParser``,
``IBuilderConfig.add_optimization_profile``, ``build_serialized_network``, ``Runtime``,
``IExecutionContext.set_input_shape/set_tensor_address/execute_async_v3``); the entry writer, the
config and the gate are tested on CPU.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from contract.manifest import Manifest
from contract.names import CONFIG_FILENAME, INPUT_NAME
from export.entry import triton_config
from export.errors import ExportUsageError
from export.gate import VariantGate, gate_data, judge
from export.layout import validate_model_name
from export.options import TritonOptions
from export.outputs import selection_from_manifest
from export.publish import Staging, refuse_existing
from export.triton_config import TENSORRT, TritonConfigError, parse_pbtxt
from training.backbone import EncoderSpec

log = logging.getLogger(__name__)


def tensorrt_unavailable_reason() -> str | None:
    """``None`` when TensorRT engines can be built here, else what is missing."""
    import torch

    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("the `tensorrt` Python package is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    return "; ".join(missing) or None


def engine_key() -> dict[str, str]:
    """``{"compute_capability": "9.0", "tensorrt": "10.x", "gpu": name}`` of this machine (an engine runs
    only where compute capability and TensorRT version match)."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"compute_capability": f"{major}.{minor}", "tensorrt": trt.__version__,
            "gpu": torch.cuda.get_device_name()}


def engine_filename(key: dict[str, str]) -> str:
    """``model_cc9.0_trt10.3.0.plan``: the engine file of one (compute capability, TensorRT) key."""
    return f"model_cc{key['compute_capability']}_trt{key['tensorrt']}.plan"


def build_engine(onnx_path: str | Path, plan_path: str | Path, item_shape: tuple[int, ...],
                 min_batch: int = 1, opt_batch: int = 8, max_batch: int = 64, fp16: bool = True,
                 workspace_bytes: int = 1 << 30, input_name: str = INPUT_NAME) -> dict[str, Any]:
    """Build a serialized engine for ``onnx_path`` (input ``[N, *item_shape]``) into ``plan_path``.

    Returns ``{"key": engine_key(), "profile": {...}, "precision": ...}``; raises ``RuntimeError`` with
    the parser's messages when the graph does not parse or the build fails. UNTESTED (see module doc).
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):  # LayerNorm in fp16 overflows on large activations
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    profile = builder.create_optimization_profile()
    shapes = [(b, *item_shape) for b in (min_batch, opt_batch, max_batch)]
    profile.set_shape(input_name, *shapes)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see the log above)")
    Path(plan_path).write_bytes(bytes(serialized))
    return {"key": engine_key(), "profile": {"min": list(shapes[0]), "opt": list(shapes[1]),
                                             "max": list(shapes[2])},
            "precision": "fp16, normalisation layers fp32" if fp16 else "fp32"}


def run_engine(plan_path: str | Path, images: np.ndarray, names: Sequence[str],
               batch: int = 8, input_name: str = INPUT_NAME) -> dict[str, np.ndarray]:
    """Run a serialized engine on uint8 ``images [N, H, W, C]``; the ``names`` outputs as fp32 numpy.

    CUDA buffers are torch tensors (no pycuda); ``batch`` must lie inside the engine's profile.
    UNTESTED (see module doc).
    """
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT cannot deserialize {plan_path} (built for another GPU or TensorRT?)")
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    all_outputs = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                   if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT]
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch])).cuda()
        context.set_input_shape(input_name, tuple(x.shape))
        context.set_tensor_address(input_name, x.data_ptr())
        buffers = {}
        for name in all_outputs:  # every output needs an address, wanted or not
            shape = tuple(context.get_tensor_shape(name))
            dtype = torch.float16 if engine.get_tensor_dtype(name) == trt.float16 else torch.float32
            buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {plan_path} failed")
        stream.synchronize()
        for name in names:
            outs[name].append(buffers[name].float().cpu().numpy())
    return {n: np.concatenate(v) for n, v in outs.items()}


def write_tensorrt_entry(repository: str | Path, name: str, base: str | Path,
                         engines: Sequence[tuple[Path, dict[str, Any]]], gate_record: dict[str, Any],
                         force: bool = False, instance_count: int = 1) -> Path:
    """Publish ``repository/<name>``, a ``tensorrt_plan`` entry of the exported entry ``base``.

    ``engines``: (engine file, ``build_engine`` record) pairs, one per compute capability. The config
    is the base's typed description with ``backend="tensorrt"``, KIND_GPU and ``cc_model_filenames``;
    the manifest is the base's with ``files`` (engine hashes), ``exporter.target`` ``tensorrt_plan``
    and ``tensorrt``: {``engines``: {capability: {file, tensorrt, gpu, profile, precision, sha256}},
    ``gate``: ``gate_record``, ``base_model``}.
    """
    repository, base = Path(repository), Path(base)
    validate_model_name(name)
    if not engines:
        raise ExportUsageError("a tensorrt_plan entry needs at least one engine")
    base_manifest = Manifest.read(base)
    version = int(base_manifest.version)  # type: ignore[arg-type]
    spec = EncoderSpec.from_dict(base_manifest.spec)
    refuse_existing([repository / name], force)
    with Staging(repository, version, force) as staging:
        staged = staging.entry(name)
        records: dict[str, dict[str, Any]] = {}
        cc_files: list[tuple[str, str]] = []
        for path, record in engines:
            key = record["key"]
            cc, filename = key["compute_capability"], engine_filename(key)
            if cc in records:
                raise ExportUsageError(f"two engines for compute capability {cc}")
            staged.add_file(filename, Path(path))
            records[cc] = {"file": f"{version}/{filename}", "tensorrt": key["tensorrt"], "gpu": key.get("gpu"),
                           "profile": record.get("profile"), "precision": record.get("precision"),
                           "sha256": staged.files[f"{version}/{filename}"]}
            cc_files.append((cc, filename))
        # lanes and buckets name the base's ONNX entries; probe scores were measured on fp32
        manifest = base_manifest.replace(
            name=name, probes={}, files={r["file"]: r["sha256"] for r in records.values()},
            lanes=None, lane=None, buckets=None, bucket=None, variant=None,
            exporter={**(base_manifest.exporter or {}), "backend": TENSORRT, "target": "tensorrt_plan"},
            tensorrt={"engines": records, "gate": gate_record, "base_model": base.name,
                      "base_files": base_manifest.files},
            parity={"max_abs_err": gate_record.get("max_abs_err", {}),
                    "mean_cosine": gate_record.get("mean_cosine", {}),
                    "n_images": gate_record.get("n_images"), "tolerance": None,
                    "data": gate_record.get("data"), "reference": "fp32 PyTorch"})
        outputs = [(n, tuple(o["shape"][1:])) for n, o in (base_manifest.outputs or {}).items()]
        triton = TritonOptions(max_batch_size=_max_batch(engines), backend=TENSORRT,
                               instance_count=instance_count, instance_kind="GPU")
        try:
            pbtxt = triton_config(name, spec, manifest, triton, outputs=outputs,
                                  cc_model_filenames=cc_files).to_pbtxt()
        except TritonConfigError as e:
            raise ExportUsageError(f"invalid tensorrt_plan configuration: {e}") from e
        staged.finish(manifest, pbtxt)
        return staging.publish()[0]


def _max_batch(engines: Sequence[tuple[Path, dict[str, Any]]]) -> int:
    """Triton's max_batch_size: the smallest profile maximum over the engines."""
    return min(int(r["profile"]["max"][0]) for _, r in engines)


def export_tensorrt(model: nn.Module, spec: EncoderSpec, base: str | Path, name: str | None = None,
                    force: bool = False, force_gate: bool = False, gate: VariantGate | None = None,
                    fp16: bool = True, opt_batch: int = 8,
                    workspace_bytes: int = 1 << 30) -> tuple[Path | None, dict[str, Any], str | None]:
    """Build this GPU's engine for the exported entry ``base``, gate it, publish ``<base>_trt``.

    Returns (path or None when not written, gate figures, failure reason or None). Raises
    ``RuntimeError`` when TensorRT is unavailable or the build fails. UNTESTED (see module doc).
    """
    reason = tensorrt_unavailable_reason()
    if reason:
        raise RuntimeError(f"TensorRT engines cannot be built here: {reason}")
    base = Path(base)
    manifest = Manifest.read(base)
    gate = gate or VariantGate()
    max_batch = parse_pbtxt((base / CONFIG_FILENAME).read_text()).max_batch_size
    h, w = spec.img_size
    with tempfile.TemporaryDirectory(prefix="vitserve-trt-") as tmp:
        plan = Path(tmp) / "model.plan"
        record = build_engine(base / str(manifest.version) / "model.onnx", plan, (h, w, spec.in_chans),
                              min_batch=1, opt_batch=min(opt_batch, max_batch), max_batch=max_batch, fp16=fp16,
                              workspace_bytes=workspace_bytes)
        data = gate_data(model, spec, gate, selection_from_manifest(manifest))
        batch = min(8, max_batch)  # inside the engine's profile

        def runner(images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
            return run_engine(plan, images, names, batch=batch)

        figures, failure = judge(None, data, gate, runner=runner)
        figures["gate"] = asdict(gate)
        written = failure is None or force_gate
        path = None
        if written:
            figures["passed"], figures["forced"] = failure is None, failure is not None
            path = write_tensorrt_entry(base.parent, name or f"{base.name}_trt", base, [(plan, record)], figures,
                                        force)
    return path, figures, failure
