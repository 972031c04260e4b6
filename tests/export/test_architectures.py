"""Export of the ViT families users bring (DINOv2 +/- registers, MAE, CLIP, DeiT-distilled), random init."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.architecture import describe_architecture, prefix_token_names
from export.errors import ExportUsageError
from export.repository import export_entries
from export.sources import EncoderSource
from tests.export.conftest import read_manifest
from training.backbone import build_from_spec, create_encoder
from training.data import to_float_nchw

SMALL = {"depth": 2, "embed_dim": 192, "num_heads": 3}
# (timm name, overrides, expected prefix tokens, grid, architecture facts that must hold)
FAMILIES = [
    ("vit_small_patch14_dinov2", {"img_size": 56, **SMALL}, ["cls"], (4, 4),
     {"layer_scale": True, "final_norm": True, "pre_norm": False}),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 56, **SMALL}, ["cls", "reg0", "reg1", "reg2", "reg3"],
     (4, 4), {"layer_scale": True, "final_norm": True}),
    ("vit_small_patch14_dinov2", {"img_size": 56, "dynamic_img_size": True, **SMALL}, ["cls"], (4, 4),
     {"dynamic_img_size": True}),
    ("vit_base_patch16_224", {"img_size": 64, "global_pool": "avg", **SMALL}, ["cls"], (4, 4),
     {"final_norm": False, "fc_norm": True, "global_pool": "avg", "layer_scale": False}),
    ("vit_base_patch16_clip_224", {"img_size": 64, **SMALL}, ["cls"], (4, 4),
     {"pre_norm": True, "final_norm": True}),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 2}, ["cls", "dist"], (4, 4),
     {"timm_class": "VisionTransformerDistilled"}),
]
IDS = ["dinov2", "dinov2_reg4", "dinov2_dynamic_img_size", "mae_avgpool", "clip", "deit_distilled"]


@pytest.mark.parametrize("name, overrides, prefix, grid, facts", FAMILIES, ids=IDS)
def test_family_exports_within_1e4_and_is_described(tmp_path, name, overrides, prefix, grid, facts):
    torch.manual_seed(0)
    model, spec = create_encoder(name, overrides)
    model.eval()
    assert spec.num_prefix_tokens == len(prefix) and spec.grid_size == grid
    assert spec.num_register_tokens == sum(p.startswith("reg") for p in prefix)
    (target,) = export_entries(EncoderSource(model, spec), tmp_path / "repo", "m")
    manifest = read_manifest(target)
    parity = manifest["parity"]
    assert all(0 <= e <= 1e-4 for e in parity["max_abs_err"].values()), parity
    arch = manifest["architecture"]
    assert arch["prefix_tokens"] == prefix
    assert {k: arch[k] for k in facts} == facts
    described = manifest["outputs"]["patch_tokens"]["description"]
    assert f"{len(prefix)} prefix token(s) removed ({', '.join(prefix)})" in described
    assert ("WITHOUT a final norm" in described) == (not arch["final_norm"])
    # The spec alone rebuilds the same architecture (what a consumer of the manifest would do).
    rebuilt = build_from_spec(spec)
    assert describe_architecture(rebuilt, spec) == arch

    # Independently of the spec's prefix count: ONNX patch tokens are the *last* h*w tokens.
    images = np.random.default_rng(1).integers(0, 256, (3, *spec.img_size, spec.in_chans), np.uint8)
    session = ort.InferenceSession(str(target / "1/model.onnx"), providers=["CPUExecutionProvider"])
    cls, patches = session.run(["cls", "patch_tokens"], {"images": images})
    with torch.no_grad():
        tokens = model.forward_features(to_float_nchw(images, spec.mean, spec.std)).numpy()
    assert tokens.shape[1] == len(prefix) + grid[0] * grid[1]
    assert patches.shape == (3, grid[0] * grid[1], spec.embed_dim)
    np.testing.assert_allclose(patches, tokens[:, -grid[0] * grid[1]:], atol=1e-4)
    np.testing.assert_allclose(cls, tokens[:, 0], atol=1e-4)


def test_prefix_count_mismatch_is_refused(make_encoder):
    model, spec = make_encoder(reg_tokens=2)
    wrong = type(spec)(**{**spec.to_dict(), "num_prefix_tokens": 1})
    with pytest.raises(ExportUsageError, match=r"prefix tokens \['cls', 'reg0', 'reg1'\]"):
        prefix_token_names(model, wrong)
