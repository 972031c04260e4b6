import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.errors import ExportError, ExportUsageError
from export.gate import check_parity, default_parity_images
from export.onnx_export import ExportableEncoder, export_onnx, exportable_attention
from training.data import to_float_nchw


@pytest.fixture(scope="module")
def onnx_path(encoder, tmp_path_factory):
    model, spec = encoder
    return export_onnx(model, spec, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_parity_on_fashion_mnist_within_1e4(encoder, onnx_path, fmnist_images):
    model, spec = encoder
    parity = check_parity(model, spec, onnx_path)  # default images: Fashion-MNIST test[:64]
    assert parity["data"].startswith("fashion-mnist test")
    assert parity["n_images"] == 64 and parity["tolerance"] == 1e-4
    assert parity["batch_sizes"] == [1, 32]
    assert "CPUExecutionProvider" in parity["providers"]
    assert set(parity["max_abs_err"]) == {"cls", "patch_tokens"}
    assert all(0 <= e < 1e-4 for e in parity["max_abs_err"].values())


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_output_shapes_and_dynamic_batch(encoder, onnx_path, fmnist_images, batch):
    model, spec = encoder
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images = fmnist_images[:batch]
    cls, patches = session.run(["cls", "patch_tokens"], {"images": images})
    assert cls.shape == (batch, spec.embed_dim) and cls.dtype == np.float32
    assert patches.shape == (batch, spec.num_patches, spec.embed_dim) and patches.dtype == np.float32
    with torch.no_grad():
        tokens = model.forward_features(to_float_nchw(images, spec.mean, spec.std))
    np.testing.assert_allclose(cls, tokens[:, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(patches, tokens[:, 1:].numpy(), atol=1e-4)


def test_graph_declares_uint8_nhwc_input_with_dynamic_batch(encoder, onnx_path):
    _, spec = encoder
    graph = onnx.load(str(onnx_path)).graph
    (inp,) = graph.input
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [28, 28, 1]
    for out in graph.output:
        assert out.type.tensor_type.shape.dim[0].dim_param, f"{out.name} has a fixed batch axis"
    assert [o.name for o in graph.output] == ["cls", "patch_tokens"]
    assert any(n.op_type == "LayerNormalization" for n in graph.node)  # opset 17 keeps it whole


def test_in_graph_preprocessing_is_to_float_nchw(encoder, fmnist_images):
    model, spec = encoder
    images = torch.from_numpy(fmnist_images[:4])
    with torch.no_grad():
        cls, patches = ExportableEncoder(model, spec)(images)
        tokens = model.forward_features(to_float_nchw(images, spec.mean, spec.std))
    assert torch.equal(cls, tokens[:, 0]) and torch.equal(patches, tokens[:, 1:])


def test_register_tokens_are_skipped(make_encoder):
    model, spec = make_encoder(reg_tokens=2)
    assert spec.num_prefix_tokens == 3
    images = torch.randint(0, 256, (2, 28, 28, 1), dtype=torch.uint8)
    with torch.no_grad():
        cls, patches = ExportableEncoder(model.eval(), spec)(images)
        tokens = model.forward_features(to_float_nchw(images, spec.mean, spec.std))
    assert patches.shape == (2, 49, spec.embed_dim)
    assert torch.equal(patches, tokens[:, 3:]) and torch.equal(cls, tokens[:, 0])


def test_exportable_attention_restores_fused_flags(encoder):
    model, _ = encoder
    before = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert before and all(before)
    with exportable_attention(model):
        assert not any(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == before


def test_random_parity_images_for_non_fashion_mnist_shapes(make_encoder):
    _, spec = make_encoder(img_size=16, in_chans=3)
    a, what = default_parity_images(spec, n=5)
    b, _ = default_parity_images(spec, n=5)
    assert a.shape == (5, 16, 16, 3) and a.dtype == np.uint8 and "random" in what
    np.testing.assert_array_equal(a, b)


def test_parity_gate_raises_above_tolerance(encoder, onnx_path, make_encoder, fmnist_images):
    _, spec = encoder
    other, _ = make_encoder(seed=1)  # different weights: the graph does not match this model
    with pytest.raises(ExportError, match="beyond tolerance"):
        check_parity(other.eval(), spec, onnx_path, fmnist_images[:8])
    model, _ = encoder
    with pytest.raises(ExportError, match="beyond tolerance 0"):
        check_parity(model, spec, onnx_path, fmnist_images[:8], tol=0.0)


def test_parity_rejects_images_of_the_wrong_shape(encoder, onnx_path):
    model, spec = encoder
    with pytest.raises(ExportUsageError, match=r"uint8 \[N, 28, 28, 1\]"):
        check_parity(model, spec, onnx_path, np.zeros((2, 32, 32, 1), np.uint8))
    with pytest.raises(ExportUsageError):
        check_parity(model, spec, onnx_path, np.zeros((2, 28, 28, 1), np.float32))


def test_opset_below_17_is_refused(encoder, tmp_path):
    model, spec = encoder
    with pytest.raises(ExportUsageError, match="opset"):
        export_onnx(model, spec, tmp_path / "m.onnx", opset=16)
