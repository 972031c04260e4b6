"""The machine a benchmark ran on, measured in the same run: CPU model and SIMD flags (lscpu) or GPU,
cores, load, software versions, and the matmul rates (fp32 numpy GEMM, int8 ONNX Runtime MatMulInteger)
that the achieved FLOP/s of a model are a fraction of."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable

import numpy as np

MATMUL_N = 1024  # square GEMM side: large enough to reach the BLAS kernels' steady rate, 2 N^3 FLOP
SOFTWARE = ("mlcommons-loadgen", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "timm", "numpy", "grpcio",
            "tritonclient", "nvidia-pytriton")


def _rate(step: Callable[[], Any], flop: float, seconds: float) -> float:
    """GFLOP/s of ``step`` (``flop`` per call) over ``seconds`` after one warm-up call."""
    step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return flop * n / (time.perf_counter() - t0) / 1e9


def fp32_matmul_gflops(seconds: float = 1.0) -> float:
    """numpy fp32 ``[N, N] @ [N, N]`` (its BLAS, all its threads), GFLOP/s at 2 FLOP per multiply-add."""
    a = np.random.default_rng(0).standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    return _rate(lambda: a @ a, 2 * MATMUL_N**3, seconds)


def torch_fp32_matmul_gflops(seconds: float = 1.0) -> float | None:
    """torch fp32 ``[N, N] @ [N, N]`` on the CPU (its own BLAS/oneDNN, its threads); None without torch."""
    try:
        import torch
    except ImportError:
        return None
    a = torch.randn(MATMUL_N, MATMUL_N, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return _rate(lambda: a @ a, 2 * MATMUL_N**3, seconds)


def int8_matmul_gops(seconds: float = 1.0, threads: int = 0) -> float | None:
    """ONNX Runtime ``MatMulInteger`` uint8 x int8 -> int32 ``[N, N]`` (the op a dynamically quantized
    int8 graph runs), GOP/s at 2 OP per multiply-add; None when onnx/onnxruntime are missing."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    n = MATMUL_N
    rng = np.random.default_rng(0)
    b = helper.make_tensor("b", TensorProto.INT8, [n, n], rng.integers(-128, 128, (n, n), dtype=np.int8).tobytes(),
                           raw=True)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "matmul_int8",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    return _rate(lambda: session.run(None, {"a": a}), 2 * n**3, seconds)


def versions() -> dict[str, str]:
    """Installed versions of the distributions a benchmark's figures depend on."""
    out = {}
    for dist in SOFTWARE:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def gpu_name() -> str | None:
    """The first CUDA device's name, if torch sees one."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine(matmul_seconds: float = 1.0, int8: bool = False) -> dict[str, Any]:
    """CPU model and flags (lscpu), GPU, cores, load, versions, and the fp32 (and int8) matmul rates."""
    facts: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "platform": platform.platform()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        facts["cpu"] = fields.get("Model name", "").strip()
        flags = fields.get("Flags", "").split()
        facts["flags"] = [f for f in flags if f.startswith(("avx", "amx", "fma", "sse4", "vnni"))]
    except (OSError, subprocess.SubprocessError):
        facts["cpu"] = platform.processor()
    facts["gpu"] = gpu_name()
    facts["matmul_n"] = MATMUL_N
    # the machine's fp32 rate: the faster of numpy's and torch's GEMM, both measured now
    facts["numpy_fp32_matmul_gflops"] = round(fp32_matmul_gflops(matmul_seconds), 1)
    torch_rate = torch_fp32_matmul_gflops(matmul_seconds) if int8 else None
    facts["torch_fp32_matmul_gflops"] = round(torch_rate, 1) if torch_rate is not None else None
    facts["fp32_matmul_gflops"] = max(facts["numpy_fp32_matmul_gflops"], facts["torch_fp32_matmul_gflops"] or 0.0)
    if int8:
        rate = int8_matmul_gops(matmul_seconds)
        facts["int8_matmul_gops"] = round(rate, 1) if rate is not None else None
    facts["load_average"] = [round(v, 2) for v in os.getloadavg()]
    facts["versions"] = versions()
    return facts
