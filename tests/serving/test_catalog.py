import json

import pytest

from protos import vitserve_pb2
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


def test_model_info_lists_probes_variants_lanes_buckets_and_batching():
    manifest = {**MANIFEST,
                "probes": {"format_version": 1, "scores": {"knn_cls_top1": 0.7, "dense_miou": 0.2, "note": "x"}},
                "lane": "latency", "lanes": {"throughput": "m_tp", "latency": "m"},
                "buckets": [{"size": [28, 28], "grid": [7, 7], "model": "m"},
                            {"size": [56, 56], "grid": [14, 14], "model": "m_r56"}, {"size": "bad"}],
                "variant": {"precision": "int8", "base_model": "m_base"},
                "preprocessing": {"resize_op": "letterbox"}}
    cfg = config(manifest)
    cfg["dynamic_batching"] = {"preferred_batch_size": [1, 2], "max_queue_delay_microseconds": "0"}
    m = model_from_config(cfg, "1")
    info = m.info(ready=True, variants=["m_fp16"])
    assert dict(info.probe_scores) == pytest.approx({"knn_cls_top1": 0.7, "dense_miou": 0.2})  # numbers only
    assert (info.lane, dict(info.lanes), info.model.lane) == ("latency", {"throughput": "m_tp", "latency": "m"},
                                                             "latency")
    assert [(b.height, b.grid_width, b.model) for b in info.buckets] == [(28, 7, "m"), (56, 14, "m_r56")]
    assert (info.precision, info.base_model, list(info.variants)) == ("int8", "m_base", ["m_fp16"])
    assert (list(info.preferred_batch_sizes), info.max_queue_delay_us, info.max_batch_size) == ([1, 2], 0, 8)
    assert list(info.outputs) == ["cls", "patch_tokens"] and m.token_outputs == ["patch_tokens"]
    assert info.default_resize_op == vitserve_pb2.LETTERBOX


def test_model_without_probes_or_lanes():
    info = model_from_config(config({**MANIFEST, "probes": {}}), "1").info(ready=True)
    assert dict(info.probe_scores) == {} and info.lane == "" and dict(info.lanes) == {}
    assert info.precision == "fp32" and list(info.buckets) == []
    assert info.default_resize_op == vitserve_pb2.RESIZE


def test_bad_preprocessing_entry_is_refused():
    with pytest.raises(CatalogError, match="preprocessing.resize_op 'zoom'"):
        model_from_config(config({**MANIFEST, "preprocessing": {"resize_op": "zoom"}}))


def test_each_recorded_version_has_its_own_weights_hash_and_probes():
    # what `vitserve export --add-version` writes: the top level describes version 2, `versions` both
    manifest = {**MANIFEST, "version": 2, "weights_sha256": "cd" * 32, "probes": {"scores": {"knn": 0.8}},
                "versions": {"1": {"weights_sha256": "ab" * 32, "probes": {"scores": {"knn": 0.7}}},
                             "2": {"weights_sha256": "cd" * 32, "probes": {"scores": {"knn": 0.8}}}}}
    one, two = (model_from_config(config(manifest), v) for v in ("1", "2"))
    assert (one.weights_sha256, one.ref().weights_sha256, one.probe_scores) == ("ab" * 32, "ab" * 32, {"knn": 0.7})
    assert (two.weights_sha256, dict(two.info(ready=True).probe_scores)) == ("cd" * 32, {"knn": 0.8})
    # a version directory the map does not record (copied by hand, or an interrupted add): no claim
    three = model_from_config(config(manifest), "3")
    assert (three.weights_sha256, three.probe_scores) == ("", {})
    # no version given: the manifest's own version
    assert model_from_config(config(manifest)).weights_sha256 == "cd" * 32
    # an empty map (the only record dropped while `--force` replaced its directory) describes nothing
    assert model_from_config(config({**MANIFEST, "versions": {}}), "1").weights_sha256 == ""


def test_manifest_without_versions_describes_only_its_own_version():
    manifest = {**MANIFEST, "probes": {"scores": {"knn": 0.7}}}
    assert model_from_config(config(manifest), "1").weights_sha256 == "ab" * 32
    other = model_from_config(config(manifest), "2")
    assert other.weights_sha256 == "" and other.version == "2"
    assert other.probe_scores == {"knn": 0.7}  # as before the versions map: the manifest's scores
