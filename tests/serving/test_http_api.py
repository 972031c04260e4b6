"""The HTTP API against gRPC on the same gateway and Triton: the same numbers (float within 1e-6,
base64 the same bytes), the official ``openai`` client, one in-flight limit for both transports, and
``vitserve serve --http-port``."""

from __future__ import annotations

import asyncio
import base64

import grpc
import numpy as np
import pytest

from clients.client import AsyncVitServeClient
from protos import vitserve_pb2, vitserve_pb2_grpc
from serving.gateway import BackgroundGateway
from serving.grpc_server import ServerOptions
from serving.http_json import tensor_from_json, vectors_from_json
from tests.serving.conftest import SERVE_READY_HTTP, serve_process
from tests.serving.http_calls import call, data_url, png

MAX_ABS_ERR = 1e-6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gw(triton):
    with BackgroundGateway(triton.grpc_url, options=ServerOptions(http_port=0)) as gateway:  # type: ignore[attr-defined]
        yield gateway


@pytest.fixture(scope="module")
def stub(gw):
    with grpc.insecure_channel(gw.target) as channel:
        yield vitserve_pb2_grpc.VisionEncoderStub(channel)


@pytest.fixture(scope="module")
def files(fmnist_test_images):
    return [png(image) for image in fmnist_test_images[:6]]


def _grpc_images(files: list[bytes]) -> list[vitserve_pb2.Image]:
    return [vitserve_pb2.Image(encoded=f) for f in files]


@pytest.mark.parametrize("pooling, grpc_pooling, l2", [
    ("cls", vitserve_pb2.EmbedRequest.CLS, False),
    ("mean", vitserve_pb2.EmbedRequest.MEAN_PATCH, True),
    ("both", vitserve_pb2.EmbedRequest.CLS_AND_MEAN_PATCH, True),
])
def test_embeddings_equal_grpc(gw, stub, files, exported, pooling, grpc_pooling, l2):
    expected = stub.Embed(vitserve_pb2.EmbedRequest(model=exported.name, images=_grpc_images(files),
                                                    pooling=grpc_pooling, l2_normalize=l2), timeout=60)
    vectors = np.frombuffer(expected.embeddings.data, "<f4").reshape(tuple(expected.embeddings.shape))
    body = {"model": exported.name, "input": [data_url(f) for f in files], "pooling": pooling, "l2_normalize": l2}
    as_float = call(f"{gw.http_url}/v1/embeddings", body)
    assert as_float.status == 200, as_float.body
    assert np.abs(vectors_from_json(as_float.body["data"]) - vectors).max() <= MAX_ABS_ERR
    as_b64 = call(f"{gw.http_url}/v1/embeddings", {**body, "encoding_format": "base64"}).body
    row_bytes = vectors.shape[1] * 4
    for i, item in enumerate(as_b64["data"]):
        assert item["object"] == "embedding" and item["index"] == i
        assert base64.b64decode(item["embedding"]) == expected.embeddings.data[i * row_bytes:(i + 1) * row_bytes]
    assert as_b64["object"] == "list" and as_b64["model"] == exported.name
    h, w = exported.spec.grid_size
    tokens = len(files) * (h * w + exported.spec.num_prefix_tokens)
    assert as_b64["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    meta = as_b64["vitserve"]
    assert meta["model"]["name"] == exported.name and meta["model"]["version"] == expected.model.version
    assert meta["model"]["weights_sha256"] == expected.model.weights_sha256 and len(meta["model"]["weights_sha256"]) == 64
    assert meta["pooling"] == pooling and meta["l2_normalized"] is l2 and meta["source"] == expected.source
    assert meta["preprocessing"]["height"] == 28 and len(meta["preprocessing"]["images"]) == len(files)


def test_bare_base64_and_a_single_string_input(gw, stub, files, exported):
    expected = stub.Embed(vitserve_pb2.EmbedRequest(images=_grpc_images(files[:1])), timeout=60)
    answer = call(f"{gw.http_url}/v1/embeddings", {"input": base64.b64encode(files[0]).decode(),
                                                   "encoding_format": "base64"})
    assert answer.status == 200, answer.body
    assert base64.b64decode(answer.body["data"][0]["embedding"]) == expected.embeddings.data


def test_features_equal_grpc(gw, stub, files, exported):
    request = vitserve_pb2.FeaturesRequest(model=exported.name, images=_grpc_images(files), include_cls=True,
                                           layout=vitserve_pb2.FeaturesRequest.TOKENS)
    expected = stub.Features(request, timeout=60)
    body = {"model": exported.name, "input": [data_url(f) for f in files], "include_cls": True,
            "layout": "tokens", "outputs": ["patch_tokens"]}
    answer = call(f"{gw.http_url}/v1/features", body)
    assert answer.status == 200, answer.body
    got = answer.body
    assert base64.b64decode(got["features"]["data"]) == expected.features.data
    assert base64.b64decode(got["cls"]["data"]) == expected.cls.data
    assert got["features"]["shape"] == list(expected.features.shape) and got["features"]["dtype"] == "float32"
    reference = np.frombuffer(expected.features.data, "<f4").reshape(tuple(expected.features.shape))
    assert np.abs(tensor_from_json(got["features"]) - reference).max() <= MAX_ABS_ERR
    assert (got["grid_height"], got["grid_width"]) == (expected.grid_height, expected.grid_width)
    assert (got["patch_size"], got["num_prefix_tokens"]) == (expected.patch_size, expected.num_prefix_tokens)
    assert got["layout"] == "TOKENS" and got["source"] == expected.source
    assert [layer["name"] for layer in got["layers"]] == ["patch_tokens"]
    assert base64.b64decode(got["layers"][0]["features"]["data"]) == expected.layers[0].features.data
    assert got["model"]["weights_sha256"] == expected.model.weights_sha256
    assert got["preprocessing"]["normalization"] == expected.preprocessing.normalization
    assert got["timing"]["total_ms"] >= got["timing"]["inference_ms"] > 0


def test_features_fp16_grid_and_raw_images(gw, stub, fmnist_test_images):
    frame = fmnist_test_images[0]
    raw = vitserve_pb2.Image(raw=vitserve_pb2.RawFrame(data=frame.tobytes(), height=28, width=28, channels=1))
    expected = stub.Features(vitserve_pb2.FeaturesRequest(images=[raw], dtype=vitserve_pb2.FLOAT16), timeout=60)
    body = {"images": [{"raw": {"data": base64.b64encode(frame.tobytes()).decode(), "height": 28, "width": 28,
                                "channels": 1}}], "dtype": "float16"}
    got = call(f"{gw.http_url}/v1/features", body).body
    assert got["features"]["dtype"] == "float16" and got["features"]["shape"] == [1, 7, 7, 192]
    assert base64.b64decode(got["features"]["data"]) == expected.features.data


def test_models_list_the_served_model(gw, exported):
    listed = call(f"{gw.http_url}/v1/models").body
    assert listed["object"] == "list"
    (entry,) = [m for m in listed["data"] if m["id"] == exported.name]
    assert entry["object"] == "model" and entry["owned_by"] == "vitserve"
    assert entry["embed_dim"] == exported.spec.embed_dim and entry["precision"] == "fp32"
    assert "max_abs_err" in entry["manifest"]["parity"] and entry["encoder_spec"]["embed_dim"] == exported.spec.embed_dim
    assert call(f"{gw.http_url}/v1/models/{exported.name}").body == entry


def test_the_openai_client_works_against_it(gw, stub, files, exported):
    openai = pytest.importorskip("openai", reason="pip install openai (a dev dependency)")
    client = openai.OpenAI(base_url=f"{gw.http_url}/v1", api_key="unused")
    result = client.embeddings.create(model=exported.name, input=[data_url(f) for f in files[:3]])
    expected = stub.Embed(vitserve_pb2.EmbedRequest(model=exported.name, images=_grpc_images(files[:3])), timeout=60)
    vectors = np.frombuffer(expected.embeddings.data, "<f4").reshape(3, -1)
    got = np.asarray([d.embedding for d in result.data], np.float32)
    assert got.shape == vectors.shape and np.abs(got - vectors).max() <= MAX_ABS_ERR
    assert result.model == exported.name and result.usage.prompt_tokens > 0
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'"):
        client.embeddings.create(model="nope", input=[data_url(files[0])])
    with pytest.raises(openai.BadRequestError, match="not an image"):
        client.embeddings.create(model=exported.name, input=["data:text/plain;base64,aGk="])


def test_one_in_flight_limit_for_grpc_and_http(triton, fmnist_test_images):
    """A gRPC stream holding the only slot: an HTTP call is refused 429, and served once it is free."""
    image = fmnist_test_images[0]
    body = {"input": [data_url(png(image))]}

    async def run(gateway: BackgroundGateway):
        async with AsyncVitServeClient(gateway.target) as c:
            release = asyncio.Event()

            async def frames():
                yield 1, image
                await release.wait()

            stream = c.stream_features(frames())
            await stream.__anext__()
            refused = await asyncio.to_thread(call, f"{gateway.http_url}/v1/embeddings", body)
            release.set()
            _ = [r async for r in stream]
            served = await asyncio.to_thread(call, f"{gateway.http_url}/v1/embeddings", body)
            return refused, served

    with BackgroundGateway(triton.grpc_url, options=ServerOptions(http_port=0, max_in_flight=1)) as gateway:
        refused, served = asyncio.run(run(gateway))
    assert refused.status == 429 and refused.body["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert refused.message.startswith("1 requests are in flight, the limit is 1")
    assert served.status == 200


def test_serve_command_with_http_port(exported):
    with serve_process("--model-repository", str(exported.repository), "--port", "0", "--http-port", "0",
                       ready=SERVE_READY_HTTP) as served:
        url = served.ready.group(2)
        assert call(f"{url}/health/ready").body == {"status": "SERVING"}
        assert [m["id"] for m in call(f"{url}/v1/models").body["data"]] == [exported.name]
        assert "<canvas" in call(f"{url}/").body  # the page
        served.proc.terminate()
        assert served.proc.wait(30) == 0
