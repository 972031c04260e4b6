"""Fixtures for the embed-dataset tests: a tiny exported model and one local Ray per test module.

The model is a freshly initialised 28x28 grey encoder exported with the real exporter, built by the
serving tests' ``build_model_repository``; Ray starts once per module with 2 CPUs and is always shut down.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.embed_dataset.datasets import Exported

MODEL_NAME = "embed_tiny"


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    from tests.serving.conftest import build_model_repository

    built = build_model_repository(tmp_path_factory.mktemp("embed_repository"), MODEL_NAME)
    return Exported(built.repository, built.name)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[str]:
    """One local Ray (2 CPUs) for the module; yields its address for drivers in subprocesses."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
