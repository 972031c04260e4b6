import json

import pytest

from serving.catalog import CatalogError, model_from_config


def config(manifest: dict | None = None, max_batch_size: int = 8, patch_dims=("49", "192")) -> dict:
    """Triton's JSON model config as ``get_model_config(as_json=True)['config']`` returns it."""
    cfg = {
        "name": "m", "max_batch_size": max_batch_size, "backend": "python",
        "input": [{"name": "images", "data_type": "TYPE_UINT8", "dims": ["28", "28", "1"]}],
        "output": [{"name": "cls", "data_type": "TYPE_FP32", "dims": ["192"]},
                   {"name": "patch_tokens", "data_type": "TYPE_FP32", "dims": list(patch_dims)}],
    }
    if manifest is not None:
        cfg["parameters"] = {"vitserve_manifest": {"string_value": json.dumps(manifest)}}
    return cfg


MANIFEST = {"version": 1, "weights_sha256": "ab" * 32,
            "encoder_spec": {"grid_size": [7, 7], "patch_size": [4, 4], "num_prefix_tokens": 1,
                             "mean": [0.286], "std": [0.353], "model_name": "vit_tiny_patch16_224"}}


def test_manifest_describes_the_model():
    m = model_from_config(config(MANIFEST), "1")
    assert (m.name, m.version, m.max_batch_size) == ("m", "1", 8)
    assert (m.geometry.height, m.geometry.width, m.geometry.channels) == (28, 28, 1)
    assert (m.embed_dim, m.grid, m.patch_size, m.num_prefix_tokens) == (192, (7, 7), 4, 1)
    assert m.weights_sha256 == "ab" * 32
    assert "mean=[0.286]" in m.normalization
    info = m.info(ready=True)
    assert json.loads(info.encoder_spec_json)["model_name"] == "vit_tiny_patch16_224"
    assert info.model.name == "m" and info.grid_height == 7


def test_without_manifest_shapes_come_from_dims():
    m = model_from_config(config(None))
    assert (m.grid, m.patch_size, m.embed_dim) == ((7, 7), 4, 192)


def test_non_square_grid_without_manifest_is_refused():
    with pytest.raises(CatalogError, match="not a square grid"):
        model_from_config(config(None, patch_dims=("50", "192")))


def test_manifest_disagreeing_with_dims_is_refused():
    with pytest.raises(CatalogError, match="disagree"):
        model_from_config(config(MANIFEST, patch_dims=("64", "192")))


def test_unbatched_model_is_refused():
    with pytest.raises(CatalogError, match="max_batch_size 0"):
        model_from_config(config(MANIFEST, max_batch_size=0))


def test_missing_tensor_is_refused():
    cfg = config(MANIFEST)
    cfg["output"] = cfg["output"][:1]
    with pytest.raises(CatalogError, match="no tensor 'patch_tokens'"):
        model_from_config(cfg)
