"""Fixtures for the benchmark tests: the Fashion-MNIST test images the export benchmark times, and
the small probe run directory the probe comparison compares (built by the probe tests' helper)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest


@pytest.fixture(scope="session")
def fmnist_images() -> np.ndarray:
    """The first 64 Fashion-MNIST test images (skips when the data set is not installed)."""
    from training.data import DataError, load_fashion_mnist

    try:
        return load_fashion_mnist("test").images[:64]
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random 4-block 64-d run directory (``tests/probes/conftest.py``'s ``write_small_run``)."""
    from tests.probes.conftest import write_small_run

    return write_small_run(tmp_path_factory.mktemp("probe_runs") / "run0")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test (restored after), as the probe tests run."""
    from probes.evaluate import torch_threads

    with torch_threads(1):
        yield
