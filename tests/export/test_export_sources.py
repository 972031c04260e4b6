"""Weights from timm names and local checkpoint files (safetensors/torch), and probes.json from run dirs."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import save_file

from export.cli import main
from export.errors import ExportUsageError
from export.layout import sha256_file
from export.options import ExportOptions
from export.repository import export_run
from export.sources import load_checkpoint_into, load_timm_encoder, read_probes
from tests.export.conftest import read_manifest
from training.data import to_float_nchw

SMALL = {"depth": 2, "embed_dim": 192, "num_heads": 3}
# (timm name, overrides, prefix tokens, architecture facts): small random-initialised members of each family
FAMILIES = [
    ("vit_small_patch14_dinov2", {"img_size": 56, **SMALL}, ["cls"], {"layer_scale": True}),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 56, **SMALL}, ["cls", "reg0", "reg1", "reg2", "reg3"],
     {"layer_scale": True}),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 2}, ["cls", "dist"],
     {"timm_class": "VisionTransformerDistilled"}),
    ("vit_base_patch16_clip_224", {"img_size": 64, **SMALL}, ["cls"], {"pre_norm": True}),
    ("vit_base_patch16_224.mae", {"img_size": 64, **SMALL}, ["cls"], {"final_norm": True, "layer_scale": False}),
]
IDS = ["dinov2", "dinov2_reg4", "deit_distilled", "clip", "mae"]


def overrides_args(overrides):
    return [a for k, v in overrides.items() for a in ("--override", f"{k}={v}")]


def save_full_model(name, overrides, path, seed=0):
    """A timm model WITH its classifier head(s), saved as a real checkpoint would be; returns it."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **overrides).eval()
    with torch.no_grad():  # trained-like magnitudes: LayerScale starts at 1e-5, tokens at ~0.02
        for key, param in model.named_parameters():
            if key.endswith(".gamma"):
                param.fill_(0.5)
            elif key in ("cls_token", "reg_token", "dist_token"):
                param.normal_()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return model


@pytest.mark.parametrize("name, overrides, prefix, facts", FAMILIES, ids=IDS)
def test_family_exports_from_a_safetensors_file(tmp_path, capsys, name, overrides, prefix, facts):
    ckpt = tmp_path / "weights.safetensors"
    original = save_full_model(name, overrides, ckpt)
    repo = tmp_path / "repo"
    assert main(["--timm", name, "--checkpoint", str(ckpt), *overrides_args(overrides),
                 "--repository", str(repo), "--name", "m"]) == 0
    assert str(repo / "m") in capsys.readouterr().out
    manifest = read_manifest(repo / "m")
    assert all(0 <= e <= 1e-4 for e in manifest["parity"]["max_abs_err"].values())
    assert manifest["architecture"]["prefix_tokens"] == prefix
    assert {k: manifest["architecture"][k] for k in facts} == facts
    assert manifest["weights_sha256"] == sha256_file(ckpt)
    assert manifest["source"] == f"timm:{name} checkpoint {ckpt.resolve()}"
    assert manifest["weights"]["kind"] == "checkpoint"
    heads = {"deit_tiny_distilled_patch16_224": ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"],
             "vit_base_patch16_clip_224": ["head.bias", "head.weight"]}
    assert manifest["weights"]["dropped_keys"] == heads.get(name, [])
    # The graph computes the checkpoint's function: compare with the model that wrote the file.
    spec = manifest["encoder_spec"]
    images = np.random.default_rng(2).integers(0, 256, (2, *spec["img_size"], spec["in_chans"]), np.uint8)
    session = ort.InferenceSession(str(repo / "m/1/model.onnx"), providers=["CPUExecutionProvider"])
    cls, patches = session.run(["cls", "patch_tokens"], {"images": images})
    with torch.no_grad():
        tokens = original.forward_features(to_float_nchw(images, spec["mean"], spec["std"])).numpy()
    np.testing.assert_allclose(cls, tokens[:, 0], atol=1e-4)
    np.testing.assert_allclose(patches, tokens[:, len(prefix):], atol=1e-4)


def test_torch_checkpoint_with_state_dict_key_loads(tmp_path):
    name, overrides = "vit_small_patch14_reg4_dinov2", {"img_size": 28, **SMALL}
    original = save_full_model(name, overrides, tmp_path / "w.pth", seed=3)
    loaded = load_timm_encoder(name, overrides, tmp_path / "w.pth")
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert loaded.weights_sha256 == sha256_file(tmp_path / "w.pth")


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(tmp_path, capsys):
    # a key the model does not have (say, from another codebase's wrapper)
    model = save_full_model("vit_small_patch14_dinov2", {"img_size": 28, **SMALL}, tmp_path / "w.safetensors")
    save_file({**model.state_dict(), "projector.weight": torch.zeros(2, 2)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ExportUsageError, match=r"1 unexpected key\(s\): projector.weight"):
        load_timm_encoder("vit_small_patch14_dinov2", {"img_size": 28, **SMALL}, tmp_path / "extra.safetensors")
    # registers in the file, none in the model: the family filter cannot make it fit
    save_full_model("vit_small_patch14_reg4_dinov2", {"img_size": 28, **SMALL}, tmp_path / "reg.safetensors")
    with pytest.raises(ExportUsageError, match="does not fit VisionTransformer.*pos_embed"):
        load_timm_encoder("vit_small_patch14_dinov2", {"img_size": 28, **SMALL}, tmp_path / "reg.safetensors")
    # a 2-block file for a 3-block model: the third block is missing
    args = ["--timm", "vit_small_patch14_reg4_dinov2", "--checkpoint", str(tmp_path / "reg.safetensors"),
            *overrides_args({"img_size": 28, **SMALL, "depth": 3}), "--repository", str(tmp_path / "repo")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "missing key(s): blocks.2." in err and "more" in err
    assert not (tmp_path / "repo").exists()


def test_shape_mismatch_and_bad_files_are_user_errors(tmp_path):
    save_full_model("vit_small_patch14_dinov2", {"img_size": 28, **SMALL}, tmp_path / "w.safetensors")
    wider = {**SMALL, "img_size": 28, "embed_dim": 384, "num_heads": 6}
    with pytest.raises(ExportUsageError, match="does not fit"):
        load_timm_encoder("vit_small_patch14_dinov2", wider, tmp_path / "w.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ExportUsageError, match="cannot read checkpoint"):
        load_timm_encoder("vit_small_patch14_dinov2", {"img_size": 28, **SMALL}, tmp_path / "junk.safetensors")
    with pytest.raises(ExportUsageError, match="does not exist"):
        load_timm_encoder("vit_small_patch14_dinov2", {}, tmp_path / "absent.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ExportUsageError, match="unsupported file type"):
        load_checkpoint_into(torch.nn.Linear(1, 1), tmp_path / "w.npz")


def test_unknown_timm_name_and_option_misuse_exit_2(tmp_path, capsys):
    repo = str(tmp_path / "repo")
    assert main(["--timm", "vit_nonexistent_patch3", "--repository", repo]) == 2
    assert "unknown timm model" in capsys.readouterr().err
    assert main(["--checkpoint", "x.pt", "--repository", repo]) == 2
    assert "need --timm" in capsys.readouterr().err
    assert main(["--timm", "vit_small_patch14_dinov2", "--checkpoint", "x.pt", "--pretrained",
                 "--repository", repo]) == 2
    assert "not both" in capsys.readouterr().err


def test_pretrained_without_network_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # the same switch as HF_HUB_OFFLINE=1 (read at import, so set on the module): no 60 s of retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ExportUsageError, match=r"not reachable \(timm/vit_small_patch14_dinov2.*--checkpoint"):
        load_timm_encoder("vit_small_patch14_dinov2", {"img_size": 28, **SMALL}, pretrained=True)


def test_probes_json_is_copied_verbatim(tmp_path, make_run_dir, fmnist_images):
    run = make_run_dir(tmp_path / "run")
    probes = {"format_version": 1, "scores": {"knn_cls_top1": 71.25, "linear_cls_top1": 74.5},
              "protocol": {"knn": {"k": 20, "temperature": 0.07}}, "data": "fashion-mnist",
              "source": str(run), "created": "2026-11-22T18:00:00Z"}
    (run / "probes.json").write_text(json.dumps(probes))
    (model_dir,) = export_run(run, tmp_path / "repo", "m", ExportOptions(parity_images=fmnist_images[:4]))
    assert read_manifest(model_dir)["probes"] == probes
    config_manifest = json.loads(
        __import__("export.triton_config", fromlist=["parse_pbtxt"]).parse_pbtxt(
            (model_dir / "config.pbtxt").read_text()).parameters["vitserve_manifest"].string_value)
    assert config_manifest["probes"] == probes


def _record(run, **split):
    return {"format_version": 1, "scores": {"knn_cls_top1": 80.5}, **split,
            "protocol": {"n_train": split.get("n_train", 20000), "n_test": split.get("n_test", 10000)},
            "data": "fashion-mnist", "source": str(run), "created": "2026-11-22T23:00:00Z"}


@pytest.mark.parametrize("split, warned", [
    ({"n_train": 2000, "n_test": 1000, "full_split": False}, "come from a subset of Fashion-MNIST (2000 train / 1000 test"),
    ({"n_train": 60000, "n_test": 10000, "full_split": True}, None),
    ({}, "does not say whether its probe scores come from the full Fashion-MNIST splits"),  # an older file
], ids=["subset", "full", "unknown"])
def test_probe_split_is_copied_and_a_subset_warned_about(tmp_path, make_run_dir, fmnist_images, caplog, split, warned):
    run = make_run_dir(tmp_path / "run")
    probes = _record(run, **split)
    (run / "probes.json").write_text(json.dumps(probes))
    with caplog.at_level("WARNING", logger="export.sources"):
        (model_dir,) = export_run(run, tmp_path / "repo", "m", ExportOptions(parity_images=fmnist_images[:4]))
    manifest_probes = read_manifest(model_dir)["probes"]
    assert manifest_probes == probes  # verbatim: n_train/n_test/full_split travel with the scores
    warnings = [r.getMessage() for r in caplog.records if r.name == "export.sources" and r.levelname == "WARNING"]
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0] and str(run / "probes.json") in warnings[0]


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"scores": 3}', '{"scores": {}, "full_split": "yes"}'])
def test_malformed_probes_json_is_refused(tmp_path, make_run_dir, capsys, text):
    run = make_run_dir(tmp_path / "run")
    (run / "probes.json").write_text(text)
    with pytest.raises(ExportUsageError, match="probes.json"):
        read_probes(run)
    assert main([str(run), "--repository", str(tmp_path / "repo")]) == 2
    assert "probes.json" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()
