"""The job against the running service: its embeddings equal the gateway's, and --service gives the same.

One module: embedded Triton serving the exported model, two gateways in front of it (for --service's
round-robin), a local Ray; all on loopback ports and always stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from tests.embed_dataset.datasets import bad_images, native_images, odd_images, png, write_folder

pytest.importorskip("ray")

from embed_dataset.job import embed_dataset  # noqa: E402
from embed_dataset.options import EmbedOptions  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateways(exported) -> Iterator[tuple[str, str]]:
    from serving.gateway import BackgroundGateway
    from serving.triton_launcher import TritonLauncher

    launcher = TritonLauncher(exported.repository)
    first = second = None
    try:
        launcher.start(timeout=120)
        first, second = BackgroundGateway(launcher.grpc_url), BackgroundGateway(launcher.grpc_url)
        first.start(timeout=60)
        second.start(timeout=60)
        yield first.target, second.target
    finally:
        for gw in (first, second):
            if gw is not None:
                gw.stop()
        launcher.stop()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    """Images at the model's size, ones the gateway must resize or convert, and one broken file."""
    out = {f"{n}.png": png(a) for n, a in native_images(20, seed=3).items()}
    out.update(odd_images())
    out["bad_truncated.png"] = bad_images()["bad_truncated.png"][0]
    return out


@pytest.fixture(scope="module")
def folder(files, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("service_src"), files)


def _run(exported, folder: Path, out: Path, **kw):
    opts = EmbedOptions(source=str(folder), out=out, model=exported.name, pooling="both", l2_normalize=True,
                        shard_size=6, batch_size=4, progress=False, **kw)
    return embed_dataset(opts)


def _table(out: Path) -> dict[str, dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    t = pq.read_table(out / "embeddings")
    cols = {"embedding": t["embedding"].to_numpy(zero_copy_only=False)}
    if "patch_features" in t.column_names:
        cols["patch_features"] = [np.stack(r) for r in t["patch_features"].to_pylist()]
    return {i: {k: np.asarray(v[n]) for k, v in cols.items()} for n, i in enumerate(t["id"].to_pylist())}


@pytest.fixture(scope="module")
def local_run(exported, folder, local_ray, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("local") / "out"
    return out, _run(exported, folder, out, model_repository=exported.repository)


def test_job_embeddings_equal_the_services(exported, gateways, files, local_run):
    from clients.client import VitServeClient

    out, result = local_run
    assert (result.embedded, result.errors) == (len(files) - 1, 1)
    rows = _table(out)
    names = sorted(n for n in files if not n.startswith("bad"))
    with VitServeClient(gateways[0]) as client:
        want = client.embed([files[n] for n in names], model=exported.name, pooling="both", l2_normalize=True)
    got = np.stack([rows[n]["embedding"] for n in names])
    assert np.abs(got - want).max() <= 1e-5


def test_service_mode_gives_the_same_embeddings_and_features(exported, gateways, files, folder, local_run,
                                                             tmp_path):
    from clients.client import VitServeClient

    local_out, _ = local_run
    out = tmp_path / "out"
    result = _run(exported, folder, out, service=gateways, features=True, workers=2)
    assert (result.embedded, result.errors) == (len(files) - 1, 1)
    local, remote = _table(local_out), _table(out)
    assert sorted(local) == sorted(remote)
    for name in local:
        assert np.abs(local[name]["embedding"] - remote[name]["embedding"]).max() <= 1e-5, name
    names = sorted(local)
    with VitServeClient(gateways[1]) as client:
        want = client.features([files[n] for n in names], model=exported.name, layout="tokens").features
    got = np.stack([remote[n]["patch_features"] for n in names])
    assert got.shape == want.shape == (len(names), 49, 192)
    assert np.abs(got - want).max() <= 1e-5
