"""``vitserve export --attention``: the ``cls_attention`` output, checked against timm's own attention
weights, the ONNX graph against PyTorch within the parity gate, and exports without it unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from contract.manifest import Manifest
from contract.names import ATTENTION_OUTPUT
from export.attention import cls_attention, last_block_input
from export.cli import _parser, export_options
from export.errors import ExportUsageError
from export.gate import DEFAULT_TOLERANCE, reference_outputs, run_onnx
from export.onnx_export import export_onnx
from export.options import ExportOptions
from export.outputs import OutputSelection, selection_from_manifest
from export.repository import export_entries
from export.sources import EncoderSource
from tests.export.conftest import small_encoder

SAVED = [*(Path(__file__).parents[1] / "contract" / "data").glob("manifest_*.json")]
ATTENTION = OutputSelection(attention=True)


def timm_attention_weights(model, spec, images: np.ndarray) -> torch.Tensor:
    """The last block's full softmax weights ``[N, heads, L, L]`` as timm's own unfused path computes
    them: fused attention off, the input of ``attn_drop`` (an identity at eval) recorded."""
    from training.data import to_float_nchw

    attn = model.blocks[-1].attn
    seen: list[torch.Tensor] = []
    handle = attn.attn_drop.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            model.forward_features(to_float_nchw(images, spec.mean, spec.std))
    finally:
        attn.fused_attn = fused
        handle.remove()
    return seen[-1]


@pytest.mark.parametrize("overrides", [{}, {"reg_tokens": 4, "qk_norm": True}], ids=["plain", "registers+qk_norm"])
def test_cls_attention_is_timms_cls_row_without_the_prefix_columns(overrides, fmnist_images) -> None:
    model, spec = small_encoder(0, **overrides)
    model.eval()
    images = fmnist_images[:8]
    full = timm_attention_weights(model, spec, images)            # [N, heads, L, L]
    p = spec.num_prefix_tokens
    ours = reference_outputs(model, spec, images, 8, ATTENTION)[ATTENTION_OUTPUT]
    assert ours.shape == (8, model.blocks[-1].attn.num_heads, spec.num_patches)
    np.testing.assert_allclose(ours, full[:, :, 0, p:].numpy(), atol=1e-6)
    rows = ours.sum(axis=-1)
    prefix = full[:, :, 0, :p].sum(dim=-1).numpy()                # what CLS gives to CLS (and registers)
    np.testing.assert_allclose(rows + prefix, 1.0, atol=1e-5)
    assert np.all(ours >= 0) and np.all(rows <= 1 + 1e-6) and np.all(prefix > 0)


def test_attention_hook_sees_the_last_blocks_input(encoder) -> None:
    model, spec = encoder
    x = torch.randn(2, spec.in_chans, *spec.img_size)
    with torch.no_grad(), last_block_input(model) as seen:
        model.forward_features(x)
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for block in model.blocks[:-1]:
            tokens = block(tokens)
    assert len(seen) == 1 and torch.equal(seen[0], tokens)
    assert cls_attention(model.blocks[-1], seen[0], 1).shape == (2, model.blocks[-1].attn.num_heads, spec.num_patches)
    assert not model.blocks[-1]._forward_pre_hooks  # removed


def test_onnx_equals_pytorch_within_the_gate(encoder, fmnist_images, tmp_path: Path) -> None:
    model, spec = encoder
    path = export_onnx(model, spec, tmp_path / "m.onnx", selection=ATTENTION)
    names = [o.name for o in onnx.load(str(path)).graph.output]
    assert names == ["cls", "patch_tokens", ATTENTION_OUTPUT]
    images = fmnist_images[:32]
    got = run_onnx(path, images, names=[ATTENTION_OUTPUT])[ATTENTION_OUTPUT]
    ref = reference_outputs(model, spec, images, 32, ATTENTION)[ATTENTION_OUTPUT]
    err = float(np.abs(got - ref).max())
    print(f"cls_attention ONNX vs PyTorch max abs error {err:.2e} (gate {DEFAULT_TOLERANCE:g})")
    assert err <= DEFAULT_TOLERANCE
    assert np.all(got >= 0) and np.all(got.sum(axis=-1) <= 1 + 1e-5)


def test_export_with_attention_gates_describes_and_configures_it(encoder, fmnist_images, tmp_path: Path) -> None:
    model, spec = encoder
    (entry,) = export_entries(EncoderSource(model, spec), tmp_path / "repo", "att",
                              ExportOptions(attention=True, parity_images=fmnist_images[:16]))
    manifest = Manifest.read(entry)
    heads = model.blocks[-1].attn.num_heads
    described = manifest.output(ATTENTION_OUTPUT)
    assert described["shape"] == [-1, heads, spec.num_patches] and described["heads"] == heads
    assert described["block"] == spec.depth - 1 and described["tokens"] == [1, 1 + spec.num_patches]
    assert "sums to <= 1" in described["description"]
    assert manifest.architecture["attention_heads"] == heads
    assert manifest.parity["max_abs_err"][ATTENTION_OUTPUT] <= DEFAULT_TOLERANCE
    pbtxt = (entry / "config.pbtxt").read_text()
    assert f'name: "{ATTENTION_OUTPUT}"\n  data_type: TYPE_FP32\n  dims: {heads}\n  dims: {spec.num_patches}' in pbtxt
    assert selection_from_manifest(manifest) == OutputSelection(attention=True)


def test_export_without_attention_is_unchanged(exported: Path) -> None:
    manifest = Manifest.read(exported)
    assert list(manifest.outputs) == ["cls", "patch_tokens"]
    assert "attention_heads" not in manifest.architecture
    graph = onnx.load(str(exported / "1" / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["cls", "patch_tokens"]
    assert ATTENTION_OUTPUT not in (exported / "config.pbtxt").read_text()
    assert ExportOptions().outputs == OutputSelection() and not ExportOptions().attention


@pytest.mark.parametrize("path", SAVED, ids=lambda p: p.name)
def test_saved_manifests_without_it_still_load(path: Path) -> None:
    manifest = Manifest.from_dict(json.loads(path.read_text()))
    assert ATTENTION_OUTPUT not in (manifest.outputs or {})
    assert not selection_from_manifest(manifest).attention


def test_the_flag_and_the_option_agree() -> None:
    assert export_options(_parser().parse_args(["RUN", "--repository", "REPO", "--attention"])).attention
    assert export_options(_parser().parse_args(["RUN", "--repository", "REPO", "--attention"])).outputs.attention
    assert ExportOptions(attention=True).outputs == OutputSelection(attention=True)
    assert ExportOptions(outputs=OutputSelection(attention=True)).attention


def test_a_model_without_cls_token_is_refused(tmp_path: Path) -> None:
    model, spec = small_encoder(0, class_token=False, global_pool="avg")
    with pytest.raises(ExportUsageError, match="no CLS token"):
        export_entries(EncoderSource(model, spec), tmp_path / "repo", "nocls", ExportOptions(attention=True))
