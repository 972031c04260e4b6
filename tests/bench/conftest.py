"""Fixtures for the bench tests: a repository of two tiny Fashion-MNIST encoders (different seeds, exported
by the real exporter), and Triton + the gateway serving it, started once per module on free ports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

MODELS = ("tiny_a", "tiny_b")


@dataclass
class BenchRepository:
    path: Path
    torch_models: dict[str, tuple[Any, Any]]  # name -> (module, EncoderSpec), the exported weights


@pytest.fixture(scope="session")
def bench_repository(tmp_path_factory: pytest.TempPathFactory) -> BenchRepository:
    pytest.importorskip("mlperf_loadgen", reason="the bench extra (mlcommons-loadgen) is not installed")
    import torch

    from export.options import ExportOptions, TritonOptions
    from export.repository import export_entries
    from export.sources import EncoderSource
    from training.backbone import FASHION_MNIST_MEAN, FASHION_MNIST_STD, create_encoder

    repo = tmp_path_factory.mktemp("bench_repository")
    models = {}
    for seed, name in enumerate(MODELS):
        torch.manual_seed(seed)
        model, spec = create_encoder(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
        model.eval()
        export_entries(EncoderSource(model, spec), repo, name,
                       ExportOptions(triton=TritonOptions(max_batch_size=16, intra_op_threads=1)))
        models[name] = (model, spec)
    return BenchRepository(repo, models)


@pytest.fixture(scope="module")
def service(bench_repository: BenchRepository) -> Iterator[Any]:
    """A gateway (gRPC and the HTTP API) in front of Triton serving the repository (stopped after the module)."""
    from serving.gateway import embedded_service
    from serving.grpc_server import ServerOptions

    with embedded_service(bench_repository.path, ServerOptions(http_port=0)) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def service_target(service: Any) -> str:
    """HOST:PORT of the module's gateway."""
    return service.target


@pytest.fixture(scope="module")
def service_http_url(service: Any) -> str:
    """http://HOST:PORT of the module's gateway's HTTP API."""
    return service.http_url
