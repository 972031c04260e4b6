"""The run-directory reader: clear errors for missing and corrupt files."""

from __future__ import annotations

import json
import os

import pytest
import torch

from training.backbone import DEFAULT_OVERRIDES, create_encoder
from training.run_dir import (
    RunDirError, atomic_torch_save, atomic_write_bytes, load_encoder, save_encoder,
)


@pytest.fixture()
def run_dir(tmp_path):
    torch.manual_seed(0)
    model, spec = create_encoder(overrides={**DEFAULT_OVERRIDES, "depth": 1})
    save_encoder(tmp_path, model, spec)
    return tmp_path, model


def test_load_encoder_restores_weights(run_dir):
    path, model = run_dir
    loaded, spec = load_encoder(path)
    assert not loaded.training
    assert spec.depth == 1 and spec.grid_size == (7, 7)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), model.eval().forward_features(x))


def test_missing_directory_and_files_are_named(tmp_path, run_dir):
    with pytest.raises(RunDirError, match="does not exist"):
        load_encoder(tmp_path / "nope")
    path, _ = run_dir
    (path / "encoder.pt").unlink()
    with pytest.raises(RunDirError, match="missing encoder.pt"):
        load_encoder(path)


def test_corrupt_files_are_reported(run_dir):
    path, _ = run_dir
    data = (path / "encoder.pt").read_bytes()
    (path / "encoder.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirError, match="encoder.pt cannot be read"):
        load_encoder(path)
    (path / "encoder_spec.json").write_text("{not json")
    with pytest.raises(RunDirError, match="encoder_spec.json"):
        load_encoder(path)


def test_weights_that_do_not_match_the_spec_are_reported(run_dir):
    path, _ = run_dir
    spec = json.loads((path / "encoder_spec.json").read_text())
    spec["overrides"]["depth"] = 2
    spec["depth"] = 2
    (path / "encoder_spec.json").write_text(json.dumps(spec))
    with pytest.raises(RunDirError, match="missing keys"):
        load_encoder(path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_torch_save({"a": torch.ones(2)}, tmp_path / "b.pt")
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.pt"]
    assert (tmp_path / "a.bin").stat().st_mode & 0o044  # not left at mkstemp's 0600
