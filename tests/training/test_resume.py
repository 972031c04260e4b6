"""Exact resume: a run stopped mid-epoch and resumed logs the same losses as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import ConfigError, TrainConfig
from training.train import main, train

TINY = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for i in range(64):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def config(method: str, image_folder, out, **kw) -> TrainConfig:
    return TrainConfig.for_method(
        method, data=str(image_folder), overrides=dict(TINY), batch_size=16, epochs=2, log_every=1,
        num_threads=1, decoder_dim=16, decoder_depth=1, decoder_heads=2, dino_out_dim=32, head_hidden_dim=16,
        head_bottleneck_dim=8, proj_dim=8, queue_size=24, n_local_crops=2, out_dir=str(out), **kw)


def losses(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("method,stop", [("mae", 6), ("dino", 3), ("dinov2", 5), ("moco", 3), ("simclr", 4)])
def test_resume_matches_uninterrupted_run(tmp_path, image_folder, method, stop):
    full = train(config(method, image_folder, tmp_path / "full"))
    part_cfg = config(method, image_folder, tmp_path / "part", stop_at_step=stop)
    part = train(part_cfg)
    ckpt = torch.load(part / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == stop and (ckpt["epoch"], ckpt["batch"]) == divmod(stop, 4)
    assert (ckpt["perm"] is None) == (ckpt["batch"] == 0)
    train(dataclasses.replace(part_cfg, stop_at_step=None), resume=True)
    a, b = losses(full), losses(part)
    assert [s for s, _ in b] == list(range(1, 9))
    assert all(abs(la - lb) <= 1e-6 for (_, la), (_, lb) in zip(a, b))
    wa = torch.load(full / "checkpoint.pt", weights_only=False)["model"]
    wb = torch.load(part / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)  # teacher, queue included


def test_cli_resume(tmp_path, image_folder, capsys):
    out = tmp_path / "run"
    args = ["--method", "moco", "--data", str(image_folder), "--out", str(out), "--epochs", "2", "--batch-size", "16",
            "num_threads=1", "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "log_every=1",
            "queue_size=24", "stop_at_step=5"]
    assert main(args) == 0
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5]
    assert main(["--resume", str(out), "--method", "dino"]) == 2
    assert "cannot resume as dino" in capsys.readouterr().err
    assert main(["--resume", str(out)]) == 0
    assert [s for s, _ in losses(out)] == list(range(1, 9))
    assert json.loads((out / "config.json").read_text())["stop_at_step"] is None
    with pytest.raises(ConfigError, match="does not exist"):
        train(config("mae", image_folder, tmp_path / "none"), resume=True)
