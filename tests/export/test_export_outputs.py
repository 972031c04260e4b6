"""Outputs chosen at export: patch tokens of chosen blocks, with or without the final norm, registers, mean."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.cli import main
from export.errors import ExportUsageError
from export.options import ExportOptions
from export.outputs import OutputSelection, parse_layers
from export.repository import export_entries
from export.sources import EncoderSource
from export.triton_config import parse_pbtxt
from tests.export.conftest import read_manifest
from training.backbone import create_encoder
from training.data import to_float_nchw

DINO_REG = ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "depth": 3, "embed_dim": 192, "num_heads": 3})
ALL = OutputSelection(layers=(-1, -2, 0), registers=True, mean_patch=True)


def block_outputs(model, spec, images):
    """Token sequence after every block, computed by hand (no forward_intermediates): list of [N, L, D]."""
    with torch.no_grad():
        x = model.patch_embed(to_float_nchw(images, spec.mean, spec.std))
        x = model.norm_pre(model._pos_embed(x))
        seq = []
        for block in model.blocks:
            x = block(x)
            seq.append(x)
    return seq


@pytest.fixture(scope="module")
def dino_reg():
    torch.manual_seed(0)
    model, spec = create_encoder(*DINO_REG)
    with torch.no_grad():  # non-trivial register and LayerScale weights, so the checks can tell tokens apart
        model.reg_token.normal_()
        for block in model.blocks:
            block.ls1.gamma.fill_(0.5)
            block.ls2.gamma.fill_(0.5)
    return model.eval(), spec


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 28, 28, 3), np.uint8)


@pytest.fixture(scope="module", params=[True, False], ids=["normed", "no_final_norm"])
def exported(request, dino_reg, images, tmp_path_factory):
    model, spec = dino_reg
    selection = OutputSelection(layers=ALL.layers, final_norm=request.param, registers=True, mean_patch=True)
    (path,) = export_entries(EncoderSource(model, spec), tmp_path_factory.mktemp("outputs") / "repo", "m",
                             ExportOptions(outputs=selection, parity_images=images))
    return path, selection


def test_every_output_is_the_tensor_the_manifest_names(exported, dino_reg, images):
    path, selection = exported
    model, spec = dino_reg
    names = ["cls", "patch_tokens", "patch_tokens_l-1", "patch_tokens_l-2", "patch_tokens_l0", "registers",
             "mean_patch"]
    assert [o.name for o in onnx.load(str(path / "1/model.onnx")).graph.output] == names
    manifest = read_manifest(path)
    assert list(manifest["outputs"]) == names
    assert set(manifest["parity"]["max_abs_err"]) == set(names)  # the gate covered every output
    assert all(e <= 1e-4 for e in manifest["parity"]["max_abs_err"].values())

    session = ort.InferenceSession(str(path / "1/model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip(names, session.run(names, {"images": images})))
    seq = block_outputs(model, spec, images)
    for name, entry in manifest["outputs"].items():
        start, stop = entry["tokens"]
        with torch.no_grad():
            tokens = seq[entry["block"]]
            tokens = model.norm(tokens) if entry["final_norm"] else tokens
            expected = tokens[:, start:stop]
            expected = expected.mean(dim=1) if entry["pooling"] == "mean" else expected
            expected = expected[:, 0] if stop - start == 1 else expected
        assert list(got[name].shape[1:]) == entry["shape"][1:], name
        np.testing.assert_allclose(got[name], expected.numpy(), atol=1e-4, err_msg=name)
    out = manifest["outputs"]
    assert out["patch_tokens_l-2"]["block"] == 1 and out["patch_tokens_l-2"]["layer"] == -2
    assert out["patch_tokens_l0"]["block"] == 0 and out["patch_tokens_l0"]["layer"] == -3
    assert out["registers"]["tokens"] == [1, 5] and out["registers"]["shape"] == [-1, 4, 192]
    assert out["mean_patch"]["pooling"] == "mean" and out["mean_patch"]["shape"] == [-1, 192]
    for name in names[2:]:
        assert out[name]["final_norm"] is selection.final_norm
    assert ("WITHOUT the final norm" in out["patch_tokens_l-2"]["description"]) is (not selection.final_norm)
    assert ("the same tensor as patch_tokens" in out["patch_tokens_l-1"]["description"]) is selection.final_norm
    if not selection.final_norm:  # un-normed tokens really differ from the normed ones
        assert not np.allclose(got["patch_tokens_l-1"], got["patch_tokens"], atol=1e-3)

    config = parse_pbtxt((path / "config.pbtxt").read_text())
    assert [(o.name, list(o.dims)) for o in config.output] == [
        (n, out[n]["shape"][1:]) for n in names]


def test_default_outputs_are_unchanged_by_a_selection(exported, dino_reg, images, tmp_path):
    path, _ = exported
    model, spec = dino_reg
    (plain,) = export_entries(EncoderSource(model, spec), tmp_path / "repo", "plain",
                              ExportOptions(parity_images=images))
    assert [o.name for o in onnx.load(str(plain / "1/model.onnx")).graph.output] == ["cls", "patch_tokens"]
    a = ort.InferenceSession(str(plain / "1/model.onnx"), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(path / "1/model.onnx"), providers=["CPUExecutionProvider"])
    for x, y in zip(a.run(["cls", "patch_tokens"], {"images": images}),
                    b.run(["cls", "patch_tokens"], {"images": images})):
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert read_manifest(plain)["outputs"]["patch_tokens"] == read_manifest(path)["outputs"]["patch_tokens"]


def test_model_without_a_real_final_norm_says_so(tmp_path):
    torch.manual_seed(0)
    model, spec = create_encoder("vit_base_patch16_224", {"img_size": 32, "global_pool": "avg", "depth": 2,
                                                           "embed_dim": 64, "num_heads": 2})
    (path,) = export_entries(EncoderSource(model.eval(), spec), tmp_path / "repo", "mae",
                             ExportOptions(outputs=OutputSelection(layers=(-2,), mean_patch=True)))
    out = read_manifest(path)["outputs"]
    assert out["patch_tokens_l-2"]["final_norm"] is False and out["mean_patch"]["final_norm"] is False
    assert "the model has none" in out["patch_tokens_l-2"]["description"]


@pytest.mark.parametrize("selection, message", [
    (OutputSelection(layers=(3,)), r"layer 3 does not exist: the model has 3 blocks"),
    (OutputSelection(layers=(-4,)), r"layer -4 does not exist"),
    (OutputSelection(layers=(-1, 2)), "same block twice"),
])
def test_bad_layers_are_refused_before_exporting(dino_reg, tmp_path, selection, message):
    model, spec = dino_reg
    with pytest.raises(ExportUsageError, match=message):
        export_entries(EncoderSource(model, spec), tmp_path / "repo", "m", ExportOptions(outputs=selection))
    assert not (tmp_path / "repo").exists() or list((tmp_path / "repo").iterdir()) == []


def test_registers_on_a_model_without_registers_is_refused(make_encoder, tmp_path):
    model, spec = make_encoder()
    with pytest.raises(ExportUsageError, match=r"has no register tokens \(prefix tokens: cls\)"):
        export_entries(EncoderSource(model, spec), tmp_path / "repo", "m",
                       ExportOptions(outputs=OutputSelection(registers=True)))


def test_parse_layers():
    assert parse_layers("-1, -2") == (-1, -2) and parse_layers("0") == (0,)
    for bad in ("a", "-1,-1", "1.5"):
        with pytest.raises(ExportUsageError):
            parse_layers(bad)


def test_cli_no_final_norm_alone_adds_the_unnormed_last_block(tmp_path, make_run_dir, capsys):
    run = make_run_dir(tmp_path / "run")
    repo = tmp_path / "repo"
    assert main([str(run), "--repository", str(repo), "--name", "m", "--no-final-norm", "--mean-pooled"]) == 0
    out = read_manifest(repo / "m")["outputs"]
    assert list(out) == ["cls", "patch_tokens", "patch_tokens_l-1", "mean_patch"]
    assert out["patch_tokens_l-1"]["final_norm"] is False and out["patch_tokens"]["final_norm"] is True
    assert main([str(run), "--repository", str(repo), "--name", "x", "--layers", "-1,x"]) == 2
    assert "--layers takes comma-separated block indices" in capsys.readouterr().err
    assert main([str(run), "--repository", str(repo), "--name", "l2", "--layers", "-2,-1"]) == 0
    assert list(read_manifest(repo / "l2")["outputs"])[2:] == ["patch_tokens_l-2", "patch_tokens_l-1"]
    assert main([str(run), "--repository", str(repo), "--name", "x", "--registers"]) == 2
    assert "no register tokens" in capsys.readouterr().err
    assert sorted(p.name for p in repo.iterdir()) == ["l2", "m"]
    assert json.loads(parse_pbtxt((repo / "m/config.pbtxt").read_text())
                      .parameters["vitserve_manifest"].string_value)["outputs"] == out
