"""Fixtures for the probe tests: Fashion-MNIST subsets, a small run directory, its ONNX export, and
(for the slow service test) embedded Triton plus the gateway serving that export.

The other test folders' conftests are not importable from here (pytest loads each as ``conftest``),
so this file builds the same things through the library functions they use: ``save_encoder`` for the
run directory, ``export.repository.export_run`` for the model repository, ``TritonLauncher`` and
``BackgroundGateway`` for the service, on free loopback ports, always stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

MODEL_NAME = "probe_tiny"
SMALL_OVERRIDES = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 2}


def write_small_run(directory: Path, seed: int = 0) -> Path:
    """A run directory (docs/CONTRACTS.md) holding a seeded random 4-block 64-d encoder for 28x28 grey
    (4 blocks: the last4 pooling concatenates the CLS of the last 4)."""
    import json

    import torch

    from training.backbone import FASHION_MNIST_MEAN, FASHION_MNIST_STD, create_encoder
    from training.run_dir import save_encoder

    torch.manual_seed(seed)
    model, spec = create_encoder("vit_tiny_patch16_224", SMALL_OVERRIDES, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    directory.mkdir(parents=True)
    save_encoder(directory, model, spec)
    (directory / "config.json").write_text(json.dumps({"method": "test", "batch_size": 32}) + "\n")
    return directory


@pytest.fixture(scope="session")
def fmnist():
    """``(train, test)`` Fashion-MNIST ``LabelledImages`` (skips when the data set is not installed)."""
    from training.data import DataError, load_fashion_mnist

    try:
        return load_fashion_mnist("train"), load_fashion_mnist("test")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_run(tmp_path_factory.mktemp("probe_runs") / "run0")


@pytest.fixture(scope="session")
def small_export(tmp_path_factory: pytest.TempPathFactory, small_run: Path, fmnist) -> Path:
    """The small run exported (ONNX + parity gate) into a fresh repository; returns the model directory."""
    from export.options import ExportOptions, TritonOptions
    from export.repository import export_run

    return export_run(small_run, tmp_path_factory.mktemp("probe_repo") / "repo", MODEL_NAME,
                      ExportOptions(triton=TritonOptions(max_batch_size=64)))[0]


@pytest.fixture(scope="module")
def probe_service(small_export: Path) -> Iterator[str]:
    """``HOST:PORT`` of a gateway in front of embedded Triton serving ``small_export``."""
    from serving.gateway import BackgroundGateway
    from serving.triton_launcher import TritonLauncher

    launcher = TritonLauncher(small_export.parent)
    try:
        launcher.start(timeout=120)
        gw = BackgroundGateway(launcher.grpc_url)
        try:
            gw.start(timeout=60)
            yield gw.target
        finally:
            gw.stop()
    finally:
        launcher.stop()


@pytest.fixture
def separable():
    """Synthetic features: 10 well-separated Gaussian clusters in 32-d, 500 train / 300 test."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 32)) * 4.0
    ytr, yte = rng.integers(0, 10, 500), rng.integers(0, 10, 300)
    xtr = (centers[ytr] + rng.normal(size=(500, 32))).astype(np.float32)
    xte = (centers[yte] + rng.normal(size=(300, 32))).astype(np.float32)
    return xtr, ytr, xte, yte


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Each probe test runs on one torch thread (restored after): the fits are small, and on the
    shared CI machine two threads that wait for each other are several times slower than one."""
    from probes.evaluate import torch_threads

    with torch_threads(1):
        yield
