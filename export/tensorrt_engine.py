"""TensorRT engines from the exported ONNX graph - only where the ``tensorrt`` package and a CUDA GPU exist.

``tensorrt_unavailable_reason`` says why engines cannot be built here (``vitserve export --tensorrt``
exits 1 with that message before exporting anything). ``build_engine`` is the builder for machines
that have both: min/opt/max batch optimisation profile, FP16 with LayerNorm layers kept in FP32, and
a ``engine_key`` of GPU compute capability and TensorRT version (an engine only runs where both
match). UNTESTED: neither tensorrt nor a GPU was available where this was written; the code follows
the TensorRT 10 Python API (``Builder``, ``OnnxParser``, ``IBuilderConfig.add_optimization_profile``,
``build_serialized_network``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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
    """``{"compute_capability": "9.0", "tensorrt": "10.x"}`` of this machine (what an engine is tied to)."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"compute_capability": f"{major}.{minor}", "tensorrt": trt.__version__}


def build_engine(onnx_path: str | Path, plan_path: str | Path, item_shape: tuple[int, ...],
                 min_batch: int = 1, opt_batch: int = 8, max_batch: int = 64, fp16: bool = True,
                 workspace_bytes: int = 1 << 30, input_name: str = "images") -> dict[str, Any]:
    """Build a serialized engine for ``onnx_path`` (input ``[N, *item_shape]``) into ``plan_path``.

    Returns ``{"key": engine_key(), "profile": {...}, "fp16": fp16}``; raises ``RuntimeError`` with
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
    return {"key": engine_key(), "profile": {"min": shapes[0], "opt": shapes[1], "max": shapes[2]},
            "fp16": fp16}
