"""Shared fixtures for the serving tests: an exported model repository, Triton, and the gateway.

The repository is exported once per session through ``export.repository.export_entries`` (the real
exporter, so these tests also check the export -> serve contract); Triton and the gateway start once
per test module on free loopback ports and are always stopped.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from serving.tied_process import popen_tied

MODEL_NAME = "fmnist_tiny"
# Small on purpose: requests of more images than this exercise the gateway's batch splitting.
MAX_BATCH_SIZE = 16


@dataclass
class ExportedModel:
    """The in-process PyTorch encoder and the repository it was exported into."""

    model: object  # torch.nn.Module (typed loosely so this file imports torch lazily)
    spec: object   # training.backbone.EncoderSpec
    repository: Path
    name: str
    max_batch_size: int


def build_model_repository(repository: Path, name: str = MODEL_NAME, seed: int = 0) -> ExportedModel:
    """Export a freshly initialised default encoder (28x28 grey, patch 4) into ``repository``."""
    export_repository = pytest.importorskip("export.repository", reason="export/ has not landed yet")
    import torch

    from training.backbone import FASHION_MNIST_MEAN, FASHION_MNIST_STD, create_encoder

    torch.manual_seed(seed)
    model, spec = create_encoder(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    model.eval()
    from export.options import ExportOptions, TritonOptions
    from export.sources import EncoderSource

    export_repository.export_entries(EncoderSource(model, spec), repository, name,
                                     ExportOptions(triton=TritonOptions(max_batch_size=MAX_BATCH_SIZE)))
    return ExportedModel(model, spec, repository, name, MAX_BATCH_SIZE)


def reference_tokens(exported: ExportedModel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In-process PyTorch CLS ``[N, D]`` and patch tokens ``[N, h*w, D]`` for uint8 ``[N, H, W, C]``."""
    import torch

    from training.data import to_float_nchw

    spec = exported.spec
    with torch.no_grad():
        tokens = exported.model.forward_features(to_float_nchw(images, spec.mean, spec.std)).numpy()
    return tokens[:, 0], tokens[:, spec.num_prefix_tokens:]


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    return build_model_repository(tmp_path_factory.mktemp("model_repository"))


@pytest.fixture(scope="session")
def torch_reference(exported: ExportedModel):
    """``f(images) -> (cls, patch_tokens)`` computed by the in-process PyTorch encoder."""
    return lambda images: reference_tokens(exported, images)


@pytest.fixture(scope="session")
def fmnist_test_images() -> np.ndarray:
    from training.data import DataError, load_fashion_mnist

    try:
        return load_fashion_mnist("test").images
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")


@pytest.fixture(scope="module")
def triton(exported: ExportedModel) -> Iterator[object]:
    from serving.triton_launcher import TritonLauncher

    launcher = TritonLauncher(exported.repository)
    try:
        launcher.start(timeout=120)
        yield launcher
    finally:
        launcher.stop()


@pytest.fixture(scope="module")
def gateway(triton: object) -> Iterator[object]:
    from serving.gateway import BackgroundGateway

    gw = BackgroundGateway(triton.grpc_url)  # type: ignore[attr-defined]
    try:
        gw.start(timeout=60)
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def broken_repository(exported: ExportedModel, tmp_path: Path) -> Path:
    """A copy of the exported model whose model.py raises at import (a model that fails to load)."""
    repo = tmp_path / "broken_repository"
    shutil.copytree(exported.repository / exported.name, repo / "broken")
    config = repo / "broken" / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{exported.name}"', 'name: "broken"'))
    (repo / "broken" / "1" / "model.py").write_text(
        "raise RuntimeError('deliberately broken model for a test')\n")
    return repo


@pytest.fixture(scope="module")
def client(gateway: object) -> Iterator[object]:
    """A sync client of the module's gateway."""
    from clients.client import VitServeClient

    with VitServeClient(gateway.target, timeout=60) as c:
        yield c


ROOT = Path(__file__).resolve().parents[2]
SERVE_READY = re.compile(r"^vitserve ready: gateway (127\.0\.0\.1:\d+), triton grpc (127\.0\.0\.1:\d+), "
                         r"models: (.+)$")
# with --http-port: group 2 is the HTTP API's URL
SERVE_READY_HTTP = re.compile(r"^vitserve ready: gateway (127\.0\.0\.1:\d+), http (https?://127\.0\.0\.1:\d+), "
                              r"triton grpc (127\.0\.0\.1:\d+), models: (.+)$")


@dataclass
class ServeProcess:
    """A running ``vitserve serve``: the process, its parsed ready line, and its stderr so far."""

    proc: subprocess.Popen
    ready: re.Match
    lines: list[str] = field(default_factory=list)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


@contextlib.contextmanager
def serve_process(*args: str, ready: re.Pattern = SERVE_READY) -> Iterator[ServeProcess]:
    """``python -m serving.server ARGS`` up to its ready line; killed on exit if still running.

    stderr is read by a thread throughout (so the process never blocks on a full pipe) and is
    complete once the ``with`` block has ended.
    """
    proc = popen_tied([sys.executable, "-m", "serving.server", *args], cwd=ROOT,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    drain.start()
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = ready.match(line.strip())
        if not match:  # the server's own log, complete, in the failure
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            drain.join(5)
            raise AssertionError(f"vitserve serve {' '.join(args)}: unexpected first line {line!r} "
                                 f"(exit code {proc.poll()}); stderr:\n{''.join(lines[-60:])}")
        yield ServeProcess(proc, match, lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        drain.join(5)
