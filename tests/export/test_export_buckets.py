"""Resolution buckets: one entry per input size, position embeddings resampled by timm's rule."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.buckets import bucket_names, parse_resolutions, resize_encoder
from export.cli import main
from export.errors import ExportUsageError
from export.options import ExportOptions
from export.repository import export_entries
from export.sources import EncoderSource
from export.triton_config import parse_pbtxt
from tests.export.conftest import read_manifest
from training.backbone import build_from_spec, create_encoder
from training.data import to_float_nchw

DINO = ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "depth": 2, "embed_dim": 96, "num_heads": 2})
SIZES = [(28, 28), (56, 56), (28, 42)]


@pytest.fixture(scope="module")
def dino():
    torch.manual_seed(0)
    model, spec = create_encoder(*DINO)
    with torch.no_grad():
        model.pos_embed.normal_()  # a position embedding with structure to resample
    return model.eval(), spec


@pytest.fixture(scope="module")
def entries(dino, tmp_path_factory):
    model, spec = dino
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 3), np.uint8)
    return export_entries(EncoderSource(model, spec, probes={"scores": {"knn_cls_top1": 50.0}}),
                          tmp_path_factory.mktemp("buckets") / "repo", "m",
                          ExportOptions(resolutions=SIZES, parity_images=images))


def test_one_entry_per_bucket_with_the_table_in_every_manifest(entries, dino):
    model, spec = dino
    assert [p.name for p in entries] == ["m", "m_r56", "m_r28x42"]
    table = [{"size": [28, 28], "grid": [2, 2], "model": "m"},
             {"size": [56, 56], "grid": [4, 4], "model": "m_r56"},
             {"size": [28, 42], "grid": [2, 3], "model": "m_r28x42"}]
    for path, (h, w) in zip(entries, SIZES):
        manifest = read_manifest(path)
        assert manifest["buckets"] == table
        assert manifest["bucket"] == {"size": [h, w], "grid": [h // 14, w // 14]}
        assert manifest["encoder_spec"]["img_size"] == [h, w]
        assert manifest["inputs"]["images"]["shape"] == [-1, h, w, 3]
        assert manifest["outputs"]["patch_tokens"]["shape"] == [-1, (h // 14) * (w // 14), 96]
        assert all(e <= 1e-4 for e in manifest["parity"]["max_abs_err"].values())
        assert ("position_embedding" in manifest["parity"]) is ((h, w) != (28, 28))
        assert manifest["probes"] == ({"scores": {"knn_cls_top1": 50.0}} if (h, w) == (28, 28) else {})
        config = parse_pbtxt((path / "config.pbtxt").read_text())
        assert list(config.input[0].dims) == [h, w, 3] and config.name == path.name
        # the spec alone rebuilds the bucket's architecture
        assert build_from_spec(type(spec).from_dict(manifest["encoder_spec"])).patch_embed.grid_size == (
            h // 14, w // 14)
    assert tuple(model.pos_embed.shape) == (1, 4, 96)  # the caller's model was not resized


def test_bucket_equals_timm_dynamic_img_size_at_that_size(entries, dino):
    # timm's run-time rule for other sizes (dynamic_img_size=True) on the same weights gives the same tokens
    model, spec = dino
    dynamic, _ = create_encoder(DINO[0], {**DINO[1], "dynamic_img_size": True})
    dynamic.load_state_dict(model.state_dict())
    dynamic.eval()
    images = np.random.default_rng(1).integers(0, 256, (2, 56, 56, 3), np.uint8)
    session = ort.InferenceSession(str(entries[1] / "1/model.onnx"), providers=["CPUExecutionProvider"])
    cls, patches = session.run(["cls", "patch_tokens"], {"images": images})
    with torch.no_grad():
        tokens = dynamic.forward_features(to_float_nchw(images, spec.mean, spec.std)).numpy()
    np.testing.assert_allclose(patches, tokens[:, 5:], atol=1e-4)
    np.testing.assert_allclose(cls, tokens[:, 0], atol=1e-4)
    # and the resampled embedding really differs from a naive reuse (the check can fail)
    resized, _ = resize_encoder(model, spec, (56, 56))
    assert resized.pos_embed.shape == (1, 16, 96)


def test_parse_and_names():
    assert parse_resolutions("224, 336,224x320") == [(224, 224), (336, 336), (224, 320)]
    assert bucket_names("m", [(224, 224), (336, 336), (224, 320)]) == ["m", "m_r336", "m_r224x320"]
    for bad in ("", "224,224", "big", "224x"):
        with pytest.raises(ExportUsageError, match="--resolutions"):
            parse_resolutions(bad)


def test_bad_size_and_existing_bucket_entry_write_nothing(dino, tmp_path, capsys):
    model, spec = dino
    repo = tmp_path / "repo"
    with pytest.raises(ExportUsageError, match="not a positive multiple of the patch size 14x14"):
        export_entries(EncoderSource(model, spec), repo, "m", ExportOptions(resolutions=[(28, 28), (50, 50)]))
    (repo / "m_r56").mkdir(parents=True)
    with pytest.raises(ExportUsageError, match="'m_r56' already exists"):
        export_entries(EncoderSource(model, spec), repo, "m", ExportOptions(resolutions=[(28, 28), (56, 56)]))
    assert sorted(p.name for p in repo.iterdir()) == ["m_r56"]


def test_cli_resolutions(tmp_path, make_run_dir, capsys):
    run = make_run_dir(tmp_path / "run")
    assert main([str(run), "--repository", str(tmp_path / "repo"), "--name", "fm", "--resolutions", "28,56"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and " 28x28 " in lines[0] and " 56x56 " in lines[1]
    assert read_manifest(tmp_path / "repo/fm_r56")["encoder_spec"]["grid_size"] == [14, 14]
    assert main([str(run), "--repository", str(tmp_path / "repo"), "--resolutions", "30"]) == 2
    assert "multiple of the patch size" in capsys.readouterr().err
