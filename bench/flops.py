"""FLOPs, activations and parameters of one image through an exported ONNX graph.

Convention (stated in every report): shapes come from ``onnx.shape_inference`` with the batch axis
fixed to 1 (where it leaves a shape open, as for timm's DINOv2 layout, whose token count the graph
computes, from one ONNX Runtime run of the graph on a zero image at batch 1); counted are the matrix products only, at 2 FLOP per multiply-add: ``MatMul``,
``MatMulInteger``, ``QLinearMatMul``, ``Gemm`` (2 * prod(output) * K) and ``Conv``, ``ConvInteger``,
``QLinearConv`` (2 * prod(output) * C_in/groups * prod(kernel)). Softmax, norms, GELU and the
in-graph preprocessing are not counted (on a ViT they are a few percent). Activations (timm's
``infer_macts``) are the output elements of the counted ops; parameters are the elements of the
floating-point and integer initializers that are not scalars (quantization scales and zero points are
left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MATMUL_OPS = ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm")
CONV_OPS = ("Conv", "ConvInteger", "QLinearConv")
# onnx.TensorProto FLOAT, UINT8, INT8, FLOAT16, BFLOAT16: weights (INT64 initializers are shapes)
WEIGHT_TYPES = frozenset({1, 2, 3, 10, 16})
CONVENTION = ("2 FLOP per multiply-add; MatMul/MatMulInteger/QLinearMatMul/Gemm/Conv/ConvInteger/QLinearConv "
              "only, shapes from onnx.shape_inference at batch 1 (or one ONNX Runtime run where it leaves them open)")


@dataclass(frozen=True)
class GraphCost:
    """Per image: ``flop`` (matrix products), ``activations`` (their output elements), ``params``."""

    flop: int
    activations: int
    params: int

    @property
    def gflop(self) -> float:
        return self.flop / 1e9


def _shape(info) -> list[int] | None:
    dims = info.type.tensor_type.shape.dim
    if not all(d.HasField("dim_value") for d in dims):
        return None
    return [d.dim_value for d in dims]


def _shapes_by_running(model, names: list[str]) -> dict[str, list[int]]:
    """Shapes of the tensors ``names`` from one ONNX Runtime run of ``model`` (batch axis already 1) on
    zero inputs, each tensor made a graph output: for what static shape inference leaves open."""
    if not names:
        return {}
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    init_names = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if not all(dims):
            raise ValueError(f"input {inp.name!r} has an open dimension besides the batch: {dims}")
        feeds[inp.name] = np.zeros(dims, dtype=onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
    outputs = [o.name for o in session.get_outputs()]
    values = session.run([n for n in outputs if n in names], feeds)
    return {n: list(v.shape) for n, v in zip([n for n in outputs if n in names], values)}


def graph_cost(onnx_path: str | Path) -> GraphCost:
    """Count the matrix-product FLOPs of one image through ``onnx_path`` (module docstring)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(onnx_path))
    init_names = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name not in init_names and inp.type.tensor_type.shape.dim:
            dim = inp.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_param")
            dim.dim_value = 1
    inferred = shape_inference.infer_shapes(model, data_prop=True)  # data_prop: Reshape targets computed in-graph
    shapes: dict[str, list[int] | None] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        shapes[vi.name] = _shape(vi)
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    wanted = {name for node in inferred.graph.node if node.op_type in MATMUL_OPS + CONV_OPS
              for name in (node.output[0], node.input[0])}
    shapes.update(_shapes_by_running(model, sorted(n for n in wanted if shapes.get(n) is None)))
    flop = acts = 0
    for node in inferred.graph.node:
        if node.op_type not in MATMUL_OPS + CONV_OPS:
            continue
        out = shapes.get(node.output[0])
        if out is None:
            raise ValueError(f"{onnx_path}: no static shape for {node.op_type} output {node.output[0]!r}")
        n_out = int(np.prod(out))
        a = shapes.get(node.input[0])
        if a is None:
            raise ValueError(f"{onnx_path}: no static shape for {node.op_type} input {node.input[0]!r}")
        if node.op_type in ("MatMul", "MatMulInteger", "QLinearMatMul"):  # a [..., M, K] (QLinear: a first)
            k = a[-1]
        elif node.op_type == "Gemm":
            trans_a = next((att.i for att in node.attribute if att.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        else:  # convolutions: weight [C_out, C_in/groups, *kernel]
            w = shapes[node.input[3] if node.op_type == "QLinearConv" else node.input[1]]
            k = int(np.prod(w[1:]))
        flop += 2 * n_out * int(k)
        acts += n_out
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer
                 if t.data_type in WEIGHT_TYPES and int(np.prod(t.dims)) > 1)
    return GraphCost(flop, acts, params)
