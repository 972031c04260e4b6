"""Fixtures for the reliability suite: one exported model, a real Triton and a real gateway.

The model is the serving tests' tiny Fashion-MNIST-shaped encoder (exported through the real
exporter by ``tests.serving.conftest.build_model_repository``); Triton and the gateway start once per
module on free loopback ports and are always stopped. ``reference`` computes the in-process PyTorch
answer the service must match.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pytest

from tests.serving.conftest import ExportedModel, build_model_repository, reference_tokens

# Limits the suite runs the gateway with, so that "over the limit" cases are cheap to build.
MAX_IMAGES = 64
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_PIXELS = 1024 * 1024
ATOL = 1e-4


@pytest.fixture(scope="session")
def rel_exported(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    return build_model_repository(tmp_path_factory.mktemp("reliability_repository"))


@pytest.fixture(scope="session")
def reference(rel_exported: ExportedModel) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``f(uint8 [N, H, W, C]) -> (cls [N, D], patch tokens [N, h*w, D])`` from in-process PyTorch."""
    return lambda images: reference_tokens(rel_exported, images)


@pytest.fixture(scope="session")
def sample_images() -> np.ndarray:
    """Eight Fashion-MNIST test images (28x28x1 uint8); random ones when the data set is absent."""
    from training.data import DataError, load_fashion_mnist

    try:
        return np.ascontiguousarray(load_fashion_mnist("test").images[:8])
    except DataError:
        return np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def rel_triton(rel_exported: ExportedModel) -> Iterator[object]:
    from serving.triton_launcher import TritonLauncher

    launcher = TritonLauncher(rel_exported.repository)
    try:
        launcher.start(timeout=180)
        yield launcher
    finally:
        launcher.stop()


def start_gateway(triton_url: str, **options: object) -> object:
    """A started ``BackgroundGateway`` with the suite's limits and the HTTP API (``options``: ServerOptions
    fields)."""
    from serving.gateway import BackgroundGateway
    from serving.grpc_server import ServerOptions

    options.setdefault("max_message_bytes", MAX_MESSAGE_BYTES)
    options.setdefault("http_port", 0)  # the HTTP API too (test_fuzz_http), on the same limits
    options = {"max_images": MAX_IMAGES, "max_pixels": MAX_PIXELS, **options}
    return BackgroundGateway(triton_url, options=ServerOptions(**options)).start(timeout=120)


@pytest.fixture(scope="module")
def rel_gateway(rel_triton: object) -> Iterator[object]:
    gw = start_gateway(rel_triton.grpc_url)  # type: ignore[attr-defined]
    try:
        yield gw
    finally:
        gw.stop()
