"""The manifest's ``preprocessing`` entry: derived from timm's data config or the run, read by the gateway."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from export.cli import main as cli_main
from export.onnx_export import ExportUsageError
from export.preprocessing import check_preprocessing, run_preprocessing, timm_preprocessing
from export.repository import read_manifest
from export.triton_config import parse_pbtxt
from protos import vitserve_pb2
from serving.catalog import model_from_config
from contract.preprocess import PreprocessSpec
from training.backbone import create_encoder

ResizeOp = vitserve_pb2.ResizeOp


def served(model_dir):
    """The gateway's view of an exported entry: its config.pbtxt as Triton's JSON model config."""
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    return model_from_config(json_format.MessageToDict(config, preserving_proto_field_name=True), "1")


def test_run_export_writes_plain_resize_the_gateway_reads(exported):
    entry = read_manifest(exported)["preprocessing"]
    assert {k: entry[k] for k in ("resize_op", "crop_pct", "interpolation", "exact")} == {
        "resize_op": "resize", "crop_pct": 1.0, "interpolation": "bilinear", "exact": True}
    assert "without crop" in entry["source"]
    model = served(exported)
    assert model.preprocess.resize_op == ResizeOp.RESIZE and model.preprocess.interpolation == "bilinear"
    assert model.manifest["preprocessing"] == entry


def test_run_preprocessing_names_an_image_folder(tmp_path, encoder):
    _, spec = encoder
    (tmp_path / "config.json").write_text(json.dumps({"data": "/data/flowers"}))
    entry = run_preprocessing(tmp_path, spec)
    assert entry["resize_op"] == "resize" and "/data/flowers" in entry["source"]


@pytest.mark.parametrize("name, crop_pct, interpolation", [
    ("vit_small_patch14_reg4_dinov2", 1.0, "bicubic"),
    ("vit_base_patch16_224.mae", 0.9, "bicubic"),
    ("deit_tiny_distilled_patch16_224", 0.9, "bicubic"),
    ("vit_base_patch16_clip_224", 0.95, "bicubic"),
])
def test_timm_families_get_their_eval_transform(name, crop_pct, interpolation):
    model, spec = create_encoder(name, {"img_size": 56, "depth": 1, "embed_dim": 64, "num_heads": 2})
    entry = timm_preprocessing(model, spec)
    assert entry["resize_op"] == "center_crop" and entry["exact"] is True
    assert entry["crop_pct"] == pytest.approx(crop_pct) and entry["interpolation"] == interpolation
    assert entry["timm"]["mean"] == pytest.approx(list(spec.mean))
    parsed = PreprocessSpec.from_manifest({"encoder_spec": spec.to_dict(), "preprocessing": entry}, 3)
    assert (parsed.resize_op, parsed.crop_pct, parsed.interpolation) == (
        ResizeOp.CENTER_CROP, pytest.approx(crop_pct), interpolation)


@pytest.mark.parametrize("mode, pct, op, exact", [
    ("squash", 1.0, "resize", True), ("squash", 0.9, "resize", False),
    ("border", 1.0, "letterbox", True), ("border", 0.875, "letterbox", False),
])
def test_squash_and_border_modes(mode, pct, op, exact):
    model, spec = create_encoder("vit_small_patch14_dinov2", {"img_size": 28, "depth": 1, "embed_dim": 64,
                                                             "num_heads": 2})
    model.pretrained_cfg = {**model.pretrained_cfg, "crop_mode": mode, "crop_pct": pct}
    entry = timm_preprocessing(model, spec)
    assert (entry["resize_op"], entry["crop_pct"], entry["exact"]) == (op, 1.0, exact)
    assert bool(entry.get("notes")) is (not exact)
    check_preprocessing(entry, spec)


def test_entry_the_gateway_would_refuse_is_refused(encoder):
    _, spec = encoder
    with pytest.raises(ExportUsageError, match="refused by the gateway"):
        check_preprocessing({"resize_op": "zoom"}, spec)


def test_timm_cli_export_manifest_is_read_by_the_gateway(tmp_path):
    repo = tmp_path / "repo"
    rc = cli_main(["--timm", "vit_base_patch16_224.mae", "--override", "img_size=32", "--override", "depth=1",
                   "--override", "embed_dim=64", "--override", "num_heads=2", "--repository", str(repo),
                   "--name", "mae_tiny"])
    assert rc == 0
    entry = read_manifest(repo / "mae_tiny")["preprocessing"]
    assert entry["resize_op"] == "center_crop" and entry["crop_pct"] == pytest.approx(0.9)
    model = served(repo / "mae_tiny")
    assert model.preprocess.resize_op == ResizeOp.CENTER_CROP
    assert model.preprocess.crop_pct == pytest.approx(0.9) and model.preprocess.interpolation == "bicubic"
