"""Shared fixtures for the export tests: small random-init encoders, a run dir, an exported model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from contract.manifest import Manifest
from training.backbone import DEFAULT_OVERRIDES, create_encoder
from training.data import DataError, load_fashion_mnist

SMALL_OVERRIDES = {**DEFAULT_OVERRIDES, "depth": 2}  # 28x28x1, patch 4 -> 7x7 grid, 192-d


def small_encoder(seed: int = 0, **overrides):
    """A depth-2 default-shaped (28x28 grey) encoder with seeded random weights."""
    torch.manual_seed(seed)
    return create_encoder(overrides={**SMALL_OVERRIDES, **overrides})


def read_manifest(model_dir: Path) -> dict:
    """An exported entry's manifest.json as the JSON object (read through ``contract.manifest.Manifest``)."""
    return Manifest.read(model_dir).to_dict()


def write_run_dir(directory: Path, seed: int = 0) -> Path:
    """A run directory per docs/CONTRACTS.md holding a small encoder."""
    model, spec = small_encoder(seed)
    directory.mkdir(parents=True)
    spec.save(directory)
    torch.save(model.state_dict(), directory / "encoder.pt")
    (directory / "config.json").write_text(json.dumps({"method": "test"}) + "\n")
    return directory


@pytest.fixture(scope="session")
def encoder():
    model, spec = small_encoder(0)
    return model.eval(), spec


@pytest.fixture(scope="session")
def fmnist_images() -> np.ndarray:
    try:
        return load_fashion_mnist("test").images[:64]
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return write_run_dir(tmp_path_factory.mktemp("runs") / "run0", seed=0)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, run_dir, fmnist_images) -> Path:
    """``export_run`` of ``run_dir`` into a fresh repository with the default parity gate."""
    from export.repository import export_run

    return export_run(run_dir, tmp_path_factory.mktemp("exported") / "repo", "fmnist")[0]


@pytest.fixture(scope="session")
def make_encoder():
    """``make_encoder(seed=0, **overrides) -> (model, spec)`` (fixture form of ``small_encoder``)."""
    return small_encoder


@pytest.fixture(scope="session")
def make_run_dir():
    """``make_run_dir(directory, seed=0) -> Path`` (fixture form of ``write_run_dir``)."""
    return write_run_dir
