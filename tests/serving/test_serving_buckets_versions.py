"""Resolution-bucket routing (``bucket=auto``) and model versions through a real Triton and gateway.

The repository holds ``multi`` and ``multi_r56`` (one export at ``--resolutions 28,56`` through the
real exporter) and ``versioned``: version 1 exported with ``version_policy all``, version 2 added by
``export_entries(..., add_version=True)`` (``vitserve export --version 2 --add-version``) from a
differently initialised encoder, so the two versions answer differently, each can be checked
against its own PyTorch model and each reports its own weights hash.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from clients.client import VitServeClient, VitServeError
from protos import vitserve_pb2
from serving.gateway import BackgroundGateway
from serving.grpc_server import ServerOptions
from serving.triton_launcher import TritonLauncher

pytestmark = pytest.mark.slow


def tokens(model, spec, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In-process PyTorch CLS ``[N, D]`` and patch tokens ``[N, h*w, D]`` of uint8 ``[N, H, W, C]``."""
    import torch

    from training.data import to_float_nchw

    with torch.no_grad():
        out = model.forward_features(to_float_nchw(images, spec.mean, spec.std)).numpy()
    return out[:, 0], out[:, spec.num_prefix_tokens:]


@pytest.fixture(scope="module")
def second_model():
    """Another encoder of the same architecture (other weights): version 2's."""
    import torch

    from training.backbone import FASHION_MNIST_MEAN, FASHION_MNIST_STD, create_encoder

    torch.manual_seed(1)
    model, spec = create_encoder(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    return model.eval(), spec


@pytest.fixture(scope="module")
def repository(exported, second_model, tmp_path_factory) -> Path:
    export_repository = pytest.importorskip("export.repository")
    from export.options import ExportOptions, TritonOptions
    from export.sources import EncoderSource
    from export.triton_config import VersionPolicy

    repo = tmp_path_factory.mktemp("bucket_version_repository")
    base = EncoderSource(exported.model, exported.spec)
    all_versions = TritonOptions(max_batch_size=8, version_policy=VersionPolicy("all"))
    export_repository.export_entries(base, repo, "multi", ExportOptions(
        resolutions=[(28, 28), (56, 56)], triton=TritonOptions(max_batch_size=8)))
    export_repository.export_entries(base, repo, "versioned", ExportOptions(triton=all_versions))
    export_repository.export_entries(EncoderSource(*second_model), repo, "versioned", ExportOptions(
        version=2, add_version=True, triton=all_versions))
    return repo


@pytest.fixture(scope="module")
def client(repository) -> Iterator[VitServeClient]:
    launcher = TritonLauncher(repository)
    try:
        launcher.start(timeout=180)
        with BackgroundGateway(launcher.grpc_url) as gw, VitServeClient(gw.target, timeout=120) as c:
            yield c
    finally:
        launcher.stop()


def images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 1), dtype=np.uint8)


def png(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(images(1, h, w)[0, ..., 0]).save(buf, format="PNG")
    return buf.getvalue()


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(VitServeError) as e:
        call()
    return e.value.code, e.value.details


def test_get_model_lists_buckets_and_versions(client):
    multi = client.get_model("multi")
    assert [(b["height"], b["width"], b["grid_height"], b["model"]) for b in multi.buckets] == [
        (28, 28, 7, "multi"), (56, 56, 14, "multi_r56")]
    assert client.get_model("multi_r56").buckets == multi.buckets
    assert multi.versions == ("1",)
    versioned = client.get_model("versioned")
    assert versioned.versions == ("1", "2") and versioned.version == "2"  # the newest is the default


def test_bucket_auto_routes_each_request_to_the_bucket_that_fits(client, exported):
    from export.buckets import resize_encoder

    big_model, big_spec = resize_encoder(exported.model, exported.spec, (56, 56))
    x56 = images(2, 56, 56)
    res = client.features(x56, model="multi", layout="tokens", bucket="auto")
    assert res.model["name"] == "multi_r56" and res.grid == (14, 14)
    assert res.model["bucket"] == {"height": 56, "width": 56, "grid_height": 14, "grid_width": 14,
                                   "model": "multi_r56"}
    np.testing.assert_allclose(res.features, tokens(big_model, big_spec, x56)[1], rtol=1e-4, atol=1e-4)
    assert res.preprocessing["images"][0]["op"] == "RESIZE_OP_UNSPECIFIED"  # no resampling: the right size

    # The same images without bucket routing: the named entry, resized to its 28x28.
    plain = client.features(x56, model="multi", layout="tokens")
    assert plain.model["name"] == "multi" and plain.grid == (7, 7)

    x28 = images(3, 28, 28)
    small = client.embed_result(x28, model="multi", bucket="auto")
    assert small.model["name"] == "multi" and small.model["bucket"]["height"] == 28
    np.testing.assert_allclose(small.embeddings, tokens(exported.model, exported.spec, x28)[0],
                               rtol=1e-4, atol=1e-4)
    # Asked by its other bucket's name, routing still picks by size.
    assert client.embed_result(x28, model="multi_r56", bucket="auto").model["name"] == "multi"

    def routed(imgs) -> str:
        return client.embed_result(imgs, model="multi", bucket="auto").model["name"]

    assert routed(images(1, 40, 50)) == "multi_r56"   # shorter side 40: 28 is too small, 56 fits
    assert routed(images(1, 20, 90)) == "multi"       # shorter side 20 fits 28
    assert routed(images(1, 300, 300)) == "multi_r56"  # nothing that large: the largest bucket
    assert routed([images(1, 28, 28)[0], images(1, 30, 64)[0]]) == "multi_r56"  # the largest shorter side decides
    assert routed(png(50, 50)) == "multi_r56" and routed(png(24, 24)) == "multi"  # encoded: from the header
    # A model without buckets is served itself.
    assert client.embed_result(x28, model="versioned", bucket="auto").model["name"] == "versioned"
    # A stream frame is routed the same way.
    (frame,) = client.stream_features([(7, x56)], model="multi", bucket="auto", timeout=60)
    assert frame.features.model["name"] == "multi_r56" and frame.features.grid == (14, 14)


def test_unknown_bucket_value_is_invalid_argument(client):
    request = vitserve_pb2.EmbedRequest(model="multi", images=[vitserve_pb2.Image(
        raw=vitserve_pb2.RawFrame(data=bytes(28 * 28), height=28, width=28, channels=1))], bucket=9)
    code, details = code_of(lambda: client._call(client._stub.Embed, request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown bucket 9" in details


def test_requests_name_a_version(client, exported, second_model):
    from export.sources import state_dict_sha256

    x = images(2, 28, 28, seed=5)
    want_1 = tokens(exported.model, exported.spec, x)[0]
    want_2 = tokens(*second_model, x)[0]
    assert np.abs(want_1 - want_2).max() > 1e-2  # the two versions really differ

    hash_1, hash_2 = state_dict_sha256(exported.model), state_dict_sha256(second_model[0])
    assert hash_1 != hash_2

    newest = client.embed_result(x, model="versioned")
    assert newest.model["version"] == "2" and newest.model["weights_sha256"] == hash_2
    np.testing.assert_allclose(newest.embeddings, want_2, rtol=1e-4, atol=1e-4)

    one = client.embed_result(x, model="versioned", version=1)
    assert one.model["version"] == "1" and one.model["weights_sha256"] == hash_1  # from the versions map
    np.testing.assert_allclose(one.embeddings, want_1, rtol=1e-4, atol=1e-4)
    two = client.features(x, model="versioned", version="2", include_cls=True)
    assert two.model["version"] == "2" and two.model["weights_sha256"] == hash_2
    np.testing.assert_allclose(two.cls, want_2, rtol=1e-4, atol=1e-4)
    (frame,) = client.stream_features([(1, x)], model="versioned", version=1, timeout=60)
    assert frame.features.model["version"] == "1" and frame.features.model["weights_sha256"] == hash_1

    code, details = code_of(lambda: client.embed(x, model="versioned", version=3))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "model 'versioned' has no version 3 loaded (loaded versions: 1, 2" in details
    code, details = code_of(lambda: client.embed(x, model="multi", version="2"))
    assert code == grpc.StatusCode.NOT_FOUND and "loaded versions: 1" in details
    request = vitserve_pb2.EmbedRequest(model="versioned", images=[vitserve_pb2.Image(
        raw=vitserve_pb2.RawFrame(data=x[0].tobytes(), height=28, width=28, channels=1))], version="latest")
    code, details = code_of(lambda: client._call(client._stub.Embed, request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "version 'latest' is not a version number" in details
    with pytest.raises(ValueError, match="version must be an integer >= 1"):
        client.embed(x, model="versioned", version="v2")


@pytest.fixture(scope="module")
def live(exported, tmp_path_factory) -> Iterator[tuple[Path, VitServeClient]]:
    """A repository with ``live``/``live_latency`` version 1 behind an admin gateway (explicit control)."""
    from export.options import ExportOptions, TritonOptions
    from export.repository import export_entries
    from export.sources import EncoderSource
    from export.triton_config import VersionPolicy

    repo = tmp_path_factory.mktemp("add_version_at_run_time")
    export_entries(EncoderSource(exported.model, exported.spec), repo, "live", ExportOptions(
        lanes=True, triton=TritonOptions(max_batch_size=8, version_policy=VersionPolicy("all"))))
    launcher = TritonLauncher(repo, explicit_model_control=True)
    try:
        launcher.start(timeout=180)
        with BackgroundGateway(launcher.grpc_url, options=ServerOptions(enable_admin=True)) as gw, \
                VitServeClient(gw.target, timeout=120) as c:
            yield repo, c
    finally:
        launcher.stop()


def test_a_version_added_at_run_time_is_served_after_reload(live, exported, second_model):
    from export.options import ExportOptions, TritonOptions
    from export.repository import export_entries
    from export.sources import EncoderSource, state_dict_sha256
    from export.triton_config import VersionPolicy

    repo, client = live
    x = images(2, 28, 28, seed=7)
    hash_1, hash_2 = state_dict_sha256(exported.model), state_dict_sha256(second_model[0])
    assert client.get_model("live").versions == ("1",)

    # `vitserve export ... --lanes --version-policy all --version 2 --add-version` while it serves
    export_entries(EncoderSource(*second_model), repo, "live", ExportOptions(
        version=2, add_version=True, lanes=True,
        triton=TritonOptions(max_batch_size=8, version_policy=VersionPolicy("all"))))
    assert client.get_model("live").versions == ("1",)  # Triton reads the repository on reload only
    for name in ("live", "live_latency"):
        out = client.reload_model(name)
        assert out.state == "READY" and out.info.versions == ("1", "2")
        assert (out.info.version, out.info.weights_sha256) == ("2", hash_2)

    for name in ("live", "live_latency"):
        two = client.embed_result(x, model=name, version=2)
        assert (two.model["name"], two.model["weights_sha256"]) == (name, hash_2)
        np.testing.assert_allclose(two.embeddings, tokens(*second_model, x)[0], rtol=1e-4, atol=1e-4)
        one = client.embed_result(x, model=name, version=1)
        assert (one.model["version"], one.model["weights_sha256"]) == ("1", hash_1)
        np.testing.assert_allclose(one.embeddings, tokens(exported.model, exported.spec, x)[0],
                                   rtol=1e-4, atol=1e-4)
