"""The FLOP counter against hand-computed counts of small ONNX graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bench.flops import graph_cost  # noqa: E402


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_matmul_gemm_and_conv_flops_at_batch_one(tmp_path: Path) -> None:
    # x [N, 3, 8, 8] -> Conv 4x4 stride 4, 3->16 channels: [N, 16, 2, 2]; -> reshape [N, 4, 16] (via a
    # Transpose-free Reshape) -> MatMul [16, 32]: [N, 4, 32]; -> Flatten [N, 128] -> Gemm [128, 10]
    w = numpy_helper.from_array(np.zeros((16, 3, 4, 4), np.float32), "w")
    m = numpy_helper.from_array(np.zeros((16, 32), np.float32), "m")
    g = numpy_helper.from_array(np.zeros((128, 10), np.float32), "g")
    shape = numpy_helper.from_array(np.array([-1, 4, 16], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "m"], ["y"]),
             helper.make_node("Flatten", ["y"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 10])],
                              [w, m, g, shape])
    cost = graph_cost(_save(graph, tmp_path / "g.onnx"))
    conv = 2 * (16 * 2 * 2) * (3 * 4 * 4)     # 2 x outputs x (C_in x kernel)
    matmul = 2 * (4 * 32) * 16                # 2 x outputs x K
    gemm = 2 * 10 * 128
    assert cost.flop == conv + matmul + gemm
    assert cost.activations == 16 * 2 * 2 + 4 * 32 + 10
    assert cost.params == 16 * 3 * 4 * 4 + 16 * 32 + 128 * 10  # the int64 shape constant is not a weight


def test_integer_matmul_counts_like_matmul(tmp_path: Path) -> None:
    b = numpy_helper.from_array(np.zeros((64, 8), np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "q",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, ["N", 5, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, ["N", 5, 8])], [b])
    cost = graph_cost(_save(graph, tmp_path / "q.onnx"))
    assert cost.flop == 2 * 5 * 8 * 64 and cost.params == 64 * 8


def test_a_graph_whose_token_count_is_computed_in_graph(tmp_path: Path) -> None:
    """timm's DINOv2 layout (4 registers) as our exporter writes it: static shape inference leaves the token
    axis open, so the shapes come from one ONNX Runtime run; the count equals a ViT's hand count."""
    pytest.importorskip("timm")
    from export.options import ExportOptions, TritonOptions
    from export.repository import export_entries
    from export.sources import load_timm_encoder

    d, depth, heads = 48, 2, 2
    source = load_timm_encoder("vit_small_patch14_reg4_dinov2",
                               {"img_size": 28, "embed_dim": d, "depth": depth, "num_heads": heads})
    [entry] = export_entries(source, tmp_path, "dinov2_reg", ExportOptions(triton=TritonOptions(max_batch_size=2)))
    cost = graph_cost(entry / "1" / "model.onnx")
    n = (28 // 14) ** 2          # patches
    t = n + 1 + 4                # + CLS + 4 registers
    block = (2 * t * d * 3 * d   # qkv
             + 2 * t * t * d     # q @ k^T, all heads
             + 2 * t * t * d     # attn @ v
             + 2 * t * d * d     # proj
             + 2 * t * d * 4 * d + 2 * t * 4 * d * d)  # MLP
    patch_embed = 2 * (n * d) * (3 * 14 * 14)
    assert cost.flop == depth * block + patch_embed
