"""The training loop, its schedule and its CLI (tiny runs on synthetic image folders)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import training.mae
from training.backbone import FASHION_MNIST_MEAN
from training.data import DataError
from training.run_dir import load_encoder
from training.augment import mae_flip as augment
from training.pretraining_data import channel_mean_std
from training.train import (
    ConfigError, NonFiniteLossError, TrainConfig, apply_overrides, lr_at, main, param_groups, train, train_step,
)

TINY = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 1, "num_heads": 2}


def tiny_config(tmp_path, image_folder, **kw) -> TrainConfig:
    base = dict(data=str(image_folder), overrides=dict(TINY), batch_size=16, epochs=2, log_every=1,
                decoder_dim=16, decoder_depth=1, decoder_heads=2, num_threads=1,
                out_dir=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_values():
    assert lr_at(0, 100, 10, 1.0) == 0.0
    assert lr_at(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(150, 100, 10, 1.0, 0.1) == pytest.approx(0.1)  # clamps past the end
    assert lr_at(3, 100, 0, 2.0) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.03)))
    assert lr_at(2.5, 10.0, 5.0, 1.0) == pytest.approx(0.5)  # fractional (time-based) progress


def test_lr_scaling_and_weight_decay_groups():
    assert TrainConfig(base_lr=1.5e-4, batch_size=512).lr == pytest.approx(3e-4)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.05)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_augment_flips_whole_images_reproducibly():
    x = torch.arange(64 * 4, dtype=torch.float32).view(64, 1, 1, 4)
    a = augment(x, torch.Generator().manual_seed(3), hflip=True)
    b = augment(x, torch.Generator().manual_seed(3), hflip=True)
    assert torch.equal(a, b)
    flipped = (a != x).any(dim=(1, 2, 3))
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(a[flipped], x[flipped].flip(-1)) and torch.equal(a[~flipped], x[~flipped])
    assert augment(x, torch.Generator(), hflip=False) is x


def test_channel_mean_std_matches_numpy():
    images = np.random.default_rng(0).integers(0, 256, (10, 5, 4, 3), dtype=np.uint8)
    mean, std = channel_mean_std(images, chunk=3)
    px = images.reshape(-1, 3) / 255.0
    assert np.allclose(mean, px.mean(0)) and np.allclose(std, px.std(0))
    assert channel_mean_std(np.zeros((2, 2, 2, 1), np.uint8))[1] == (1e-3,)


def test_tiny_run_writes_complete_run_dir(tmp_path, image_folder):
    run = train(tiny_config(tmp_path, image_folder))
    assert {p.name for p in run.iterdir()} >= {
        "config.json", "encoder_spec.json", "encoder.pt", "checkpoint.pt", "metrics.jsonl"}
    config = json.loads((run / "config.json").read_text())
    assert config["out_dir"] == str(run) and config["overrides"]["embed_dim"] == 32
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]  # 64 images / 16, 2 epochs
    assert set(records[0]) == {"step", "epoch", "loss", "lr", "img_per_s", "elapsed_s"}
    assert all(math.isfinite(r["loss"]) for r in records)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 8 and ckpt["epoch"] == 2
    assert {"model", "optimizer", "config", "rng", "encoder_spec"} <= set(ckpt)
    assert any(k.startswith("decoder_") for k in ckpt["model"])

    model, spec = load_encoder(run)
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted(image_folder.rglob("*.png"))]) / 255.0
    assert spec.mean[0] == pytest.approx(pixels.mean(), abs=1e-4)  # computed from the folder
    assert spec.std[0] == pytest.approx(pixels.std(), abs=1e-4)
    enc_state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    x = torch.randn(3, 1, 28, 28)
    reference, _ = load_encoder(run)
    reference.load_state_dict(enc_state)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), reference.forward_features(x))


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_budget_stops_and_saves(tmp_path, image_folder, clock):
    # A budget of 60 ns that no training step can fit in, on any CPU and with either clock: the run
    # must stop after its first step and save it.
    run = train(tiny_config(tmp_path, image_folder, epochs=1000, max_minutes=1e-9, budget_clock=clock))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 1
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 1
    load_encoder(run)


def test_budget_clock_must_be_known():
    with pytest.raises(ConfigError, match="budget_clock must be 'wall' or 'cpu'"):
        TrainConfig(budget_clock="gpu")


def test_non_finite_loss_raises(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr(training.mae, "mae_loss", lambda pred, *a, **k: pred.sum() * float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 0"):
        train(tiny_config(tmp_path, image_folder))


def test_fashion_mnist_subset_run(tmp_path):
    try:
        cfg = TrainConfig(overrides=dict(TINY), limit_train=64, batch_size=32, epochs=1, num_threads=1,
                          decoder_dim=16, decoder_depth=1, decoder_heads=2, out_dir=str(tmp_path / "r"))
        run = train(cfg)
    except DataError:
        pytest.skip("Fashion-MNIST is not installed")
    _, spec = load_encoder(run)
    assert spec.mean == FASHION_MNIST_MEAN


def test_config_validation_and_overrides():
    with pytest.raises(ConfigError, match="method 'byol'"):
        TrainConfig(method="byol")
    with pytest.raises(ConfigError, match="mask_ratio"):
        TrainConfig(mask_ratio=1.0)
    values = apply_overrides(TrainConfig().to_dict(), ["model.depth=4", "base_lr=3e-4", "bf16=true"])
    cfg = TrainConfig(**values)
    assert cfg.overrides["depth"] == 4 and cfg.overrides["embed_dim"] == 192
    assert cfg.base_lr == 3e-4 and cfg.bf16 is True
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        apply_overrides(TrainConfig().to_dict(), ["nope=1"])


def test_cli_rejects_bad_input_with_exit_code_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "r"), "nope=1"]) == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err
    assert main(["--method", "byol"]) == 2
    assert "invalid choice: 'byol'" in capsys.readouterr().err
    assert main(["--epochs", "many"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    assert main(["--config", str(bad)]) == 2
    assert "unknown config keys ['learning_rate']" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_yaml_flags_and_overrides_run(tmp_path, image_folder, capsys):
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text(
        "batch_size: 32\ndecoder_dim: 16\ndecoder_depth: 1\ndecoder_heads: 2\nnum_threads: 1\n"
        "model:\n  embed_dim: 32\n  depth: 1\n  num_heads: 2\n")
    out = tmp_path / "run"
    code = main(["--config", str(cfg_file), "--data", str(image_folder), "--out", str(out),
                 "--epochs", "1", "--batch-size", "16", "mask_ratio=0.5", "model.depth=2"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["batch_size"] == 16 and config["mask_ratio"] == 0.5
    assert config["overrides"]["depth"] == 2 and config["overrides"]["embed_dim"] == 32


class _Linear(torch.nn.Module):
    """A method stand-in: loss = 1000 * sum(w * x), with an after_step that counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.after = []

    def forward(self, x, momentum: float = 0.0):
        return {"loss": 1000 * (self.w * x).sum(), "signal": torch.tensor(2.5)}

    def after_step(self, out, momentum: float = 0.0) -> None:
        self.after.append(momentum)


def test_train_step_clips_gradients_and_calls_after_step():
    model = _Linear()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.tensor([3.0, 4.0, 0.0, 0.0])
    loss, parts = train_step(model, opt, x, 1.0, False, {"momentum": 0.9}, clip_grad=1.0)
    assert loss == 0.0 and parts == {"signal": 2.5} and model.after == [0.9]
    assert torch.allclose(model.w.detach(), -torch.tensor([0.6, 0.8, 0.0, 0.0]))  # unit-norm step
    train_step(model, opt, x, 1.0, False, {"momentum": 0.95})
    assert torch.allclose(model.w.detach(), -torch.tensor([3000.6, 4000.8, 0.0, 0.0]))  # unclipped
    assert model.after == [0.9, 0.95]


def test_existing_run_is_never_overwritten_by_accident(tmp_path, image_folder, capsys):
    cfg = tiny_config(tmp_path, image_folder, epochs=1)
    run = train(cfg)
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)
    args = ["--data", str(image_folder), "--out", str(run), "--epochs", "1", "batch_size=16",
            "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "decoder_dim=16",
            "decoder_depth=1", "decoder_heads=2", "num_threads=1"]
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert main(args + ["--overwrite"]) == 0


def test_cli_unknown_timm_model_is_a_clear_error(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "r"), "model_name=vit_nonexistent_xyz"]) == 2
    assert "unknown timm model 'vit_nonexistent_xyz'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
