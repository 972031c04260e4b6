"""Every experiment file in ``configs/`` loads through ``vitserve train --config``, validates and
builds its model; its name says its method."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.methods import build_model
from training.train import build_parser, config_from_args

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_one_file_per_method():
    assert {p.stem for p in CONFIGS} == {"mae", "dino", "dinov2", "simclr", "moco", "moco_v3"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_experiment_file_loads_validates_and_builds(path):
    cfg = config_from_args(build_parser().parse_args(["--config", str(path), "seed=3"]))
    assert cfg.method == path.stem.split("_")[0]
    assert cfg.moco_v3 == (path.stem == "moco_v3")
    assert cfg.seed == 3  # key=value overrides still apply on top of the file
    assert cfg.overrides["img_size"] == 28 and cfg.knn_val > 0
    build_model(cfg)
    assert "paper" in path.read_text()  # each file says what it kept and scaled from its paper
