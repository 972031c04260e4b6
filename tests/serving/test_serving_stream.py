"""End to end through Triton + gateway: Embed pooling options and the StreamFeatures control-loop stream."""

import asyncio
import math

import grpc
import numpy as np
import pytest

from clients.client import AsyncVitServeClient, VitServeClient
from tests.serving.triton_stats import inference_count

MAX_ABS_ERR = 1e-4


@pytest.fixture(scope="module")
def images(fmnist_test_images):
    return fmnist_test_images[:20]


@pytest.fixture(scope="module")
def reference(torch_reference, images):
    return torch_reference(images)


def test_embed_mean_pooling_is_the_mean_of_patch_tokens(client, images, reference):
    mean = client.embed(images, pooling="mean")
    np.testing.assert_allclose(mean, reference[1].mean(axis=1), rtol=0, atol=MAX_ABS_ERR)


def test_embed_both_concatenates_cls_and_mean_each_normalised(client, images, reference):
    cls, patches = reference
    d = cls.shape[1]
    both = client.embed(images, pooling="both")
    assert both.shape == (len(images), 2 * d)
    np.testing.assert_allclose(both[:, :d], cls, rtol=0, atol=MAX_ABS_ERR)
    np.testing.assert_allclose(both[:, d:], patches.mean(axis=1), rtol=0, atol=MAX_ABS_ERR)
    unit = client.embed(images, pooling="both", l2_normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit[:, :d], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(unit[:, d:], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit[:, d:], both[:, d:] / np.linalg.norm(both[:, d:], axis=1, keepdims=True),
                               atol=1e-5)


def test_embed_response_names_pooling_and_model(gateway, exported, images):
    from protos import vitserve_pb2, vitserve_pb2_grpc
    from clients.client import to_proto_images

    request = vitserve_pb2.EmbedRequest(images=to_proto_images(images[:2]), l2_normalize=True,
                                        pooling=vitserve_pb2.EmbedRequest.MEAN_PATCH)
    with grpc.insecure_channel(gateway.target) as ch:
        stub = vitserve_pb2_grpc.VisionEncoderStub(ch)
        reply = stub.Embed(request, timeout=30)
        default = stub.Embed(vitserve_pb2.EmbedRequest(images=request.images), timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(vitserve_pb2.EmbedRequest(images=request.images, pooling=9), timeout=30)
    assert (reply.source, reply.pooling, reply.l2_normalized) == (
        "mean_patch", vitserve_pb2.EmbedRequest.MEAN_PATCH, True)
    assert (default.source, default.pooling) == ("cls", vitserve_pb2.EmbedRequest.CLS)
    assert reply.model.name == exported.name and len(reply.model.weights_sha256) == 64
    assert reply.preprocessing.height == 28 and reply.timing.total_ms >= reply.timing.inference_ms > 0
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown pooling 9" in e.value.details()


def test_stream_answers_every_frame_in_order(client, images, reference):
    frames = [(100 + i, images[2 * i:2 * i + 2]) for i in range(4)]
    results = list(client.stream_features(frames, layout="tokens", include_cls=True))
    assert [r.frame_id for r in results] == [100, 101, 102, 103]
    for i, r in enumerate(results):
        assert not r.skipped and r.error is None
        np.testing.assert_allclose(r.features.features, reference[1][2 * i:2 * i + 2], atol=MAX_ABS_ERR)
        np.testing.assert_allclose(r.features.cls, reference[0][2 * i:2 * i + 2], atol=MAX_ABS_ERR)
        assert r.features.model["version"] == "1" and r.features.timing["inference_ms"] > 0


def test_stream_bad_frame_is_reported_and_the_stream_goes_on(client, images):
    frames = [(1, images[:1]), (2, b"\x89PNG\r\n\x1a\n not really"), (3, images[1:2])]
    results = list(client.stream_features(frames))
    assert [r.frame_id for r in results] == [1, 2, 3]
    assert results[1].error is not None and results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert results[1].error.details.startswith("image 0: cannot decode") and results[1].features is None
    assert results[0].features is not None and results[2].features is not None


def test_latest_frame_wins_skips_stale_frames_without_inference(triton, gateway, exported, fmnist_test_images):
    # Frames big enough (8 Triton calls each) that the next ones arrive while one is being run.
    big = fmnist_test_images[:128]
    calls_per_frame = math.ceil(len(big) / exported.max_batch_size)
    frames = [(i, big) for i in range(1, 7)]
    before = inference_count(triton.grpc_url, exported.name)
    with VitServeClient(gateway.target) as c:
        results = list(c.stream_features(frames, layout="tokens", latest_only=True))
    ran = [r.frame_id for r in results if not r.skipped]
    skipped = [r.frame_id for r in results if r.skipped]
    assert [r.frame_id for r in results] == [1, 2, 3, 4, 5, 6]
    assert ran[-1] == 6, "the newest frame is never stale"
    assert skipped, f"no frame was skipped although 6 large frames were sent back to back: {ran}"
    assert all(r.features is None for r in results if r.skipped)
    assert inference_count(triton.grpc_url, exported.name) - before == calls_per_frame * len(ran)


def test_async_stream_from_an_async_camera_loop(gateway, images, reference):
    async def camera():
        for i in range(3):
            await asyncio.sleep(0.01)
            yield i, images[i]

    async def run():
        async with AsyncVitServeClient(gateway.target) as c:
            emb = await c.embed(images[:2], pooling="mean")
            return emb, [r async for r in c.stream_features(camera(), latest_only=True)]

    emb, results = asyncio.run(run())
    np.testing.assert_allclose(emb, reference[1][:2].mean(axis=1), atol=MAX_ABS_ERR)
    assert [r.frame_id for r in results] == [0, 1, 2]
    ran = [r for r in results if not r.skipped]
    assert ran[-1].frame_id == 2
    for r in ran:
        np.testing.assert_allclose(r.features.features.reshape(1, -1, reference[1].shape[-1]),
                                   reference[1][r.frame_id:r.frame_id + 1], atol=MAX_ABS_ERR)
