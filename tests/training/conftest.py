"""Shared fixtures for the training tests."""

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """64 small random grey PNGs in two class folders (``a``, ``b``)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(32):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root
