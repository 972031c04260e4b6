"""End to end: exported model -> embedded Triton -> gateway -> client, against the PyTorch encoder."""

import asyncio
import io
import json

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from clients.client import AsyncVitServeClient, VitServeClient, VitServeError
from protos import vitserve_pb2, vitserve_pb2_grpc

# The service must reproduce the in-process PyTorch encoder (fp32 ONNX Runtime vs fp32 PyTorch).
MAX_ABS_ERR = 1e-4


@pytest.fixture(scope="module")
def images(fmnist_test_images):
    return fmnist_test_images[:40]  # > MAX_BATCH_SIZE: the gateway splits it into 3 Triton calls


@pytest.fixture(scope="module")
def reference(torch_reference, images):
    return torch_reference(images)


def test_features_grid_and_cls_match_pytorch(client, exported, images, reference):
    assert len(images) > exported.max_batch_size
    ref_cls, ref_patches = reference
    res = client.features(images, model=exported.name, layout="grid", include_cls=True)
    h, w = exported.spec.grid_size
    assert res.features.shape == (len(images), h, w, exported.spec.embed_dim)
    assert res.features.dtype == np.float32
    assert (res.grid, res.patch_size) == ((h, w), exported.spec.patch_size[0])
    assert res.num_prefix_tokens == exported.spec.num_prefix_tokens
    np.testing.assert_allclose(res.features.reshape(len(images), h * w, -1), ref_patches, rtol=0, atol=MAX_ABS_ERR)
    np.testing.assert_allclose(res.cls, ref_cls, rtol=0, atol=MAX_ABS_ERR)
    assert res.model["name"] == exported.name and res.model["version"] == "1"
    assert len(res.model["weights_sha256"]) == 64
    assert res.preprocessing["height"] == 28 and res.preprocessing["channels"] == 1
    assert (res.preprocessing["resized"], res.preprocessing["converted"]) == (0, 0)
    assert res.timing["total_ms"] >= res.timing["inference_ms"] > 0


def test_features_tokens_layout(client, images, reference):
    res = client.features(images[:5], layout="tokens")  # model omitted: the only one served
    np.testing.assert_allclose(res.features, reference[1][:5], rtol=0, atol=MAX_ABS_ERR)
    assert res.cls is None


def test_embed_is_the_cls_token(client, images, reference):
    emb = client.embed(images)
    np.testing.assert_allclose(emb, reference[0], rtol=0, atol=MAX_ABS_ERR)
    unit = client.embed(images[:4], l2_normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(unit, emb[:4] / np.linalg.norm(emb[:4], axis=1, keepdims=True), atol=1e-6)


def test_fp16_output_is_close(client, images, reference):
    emb = client.embed(images[:8], dtype="float16")
    res = client.features(images[:8], dtype="float16", layout="tokens")
    assert emb.dtype == np.float16 and res.features.dtype == np.float16
    np.testing.assert_allclose(emb.astype(np.float32), reference[0][:8], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(res.features.astype(np.float32), reference[1][:8], rtol=1e-3, atol=1e-3)


def test_encoded_png_and_resized_rgb_inputs(client, images, reference):
    png = io.BytesIO()
    Image.fromarray(images[0, ..., 0]).save(png, format="PNG")
    np.testing.assert_allclose(client.embed(png.getvalue()), reference[0][:1], atol=MAX_ABS_ERR)
    rgb56 = np.asarray(Image.fromarray(images[1, ..., 0]).convert("RGB").resize((56, 56)))
    res = client.features(rgb56)
    assert (res.preprocessing["resized"], res.preprocessing["converted"]) == (1, 1)
    assert res.features.shape == (1, 7, 7, 192)


def test_malformed_image_is_invalid_argument(client, images):
    with pytest.raises(VitServeError) as e:
        client.embed([images[0], b"\x89PNG\r\n\x1a\n garbage"])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details.startswith("image 1: cannot decode")


def test_raw_frame_size_mismatch_is_invalid_argument(gateway):
    frame = vitserve_pb2.RawFrame(data=b"\x00" * 100, height=28, width=28, channels=1)
    with grpc.insecure_channel(gateway.target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            vitserve_pb2_grpc.VisionEncoderStub(ch).Embed(
                vitserve_pb2.EmbedRequest(images=[vitserve_pb2.Image(raw=frame)]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 0: raw frame data is 100 bytes but 28x28x1 needs 784" in e.value.details()


def test_empty_batch_is_invalid_argument(gateway):
    with grpc.insecure_channel(gateway.target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            vitserve_pb2_grpc.VisionEncoderStub(ch).Features(vitserve_pb2.FeaturesRequest())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no images" in e.value.details()


def test_unknown_model_is_not_found_and_lists_models(client, exported, images):
    with pytest.raises(VitServeError) as e:
        client.embed(images[:1], model="no_such_model")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert "'no_such_model'" in e.value.details and exported.name in e.value.details


def test_list_models_describes_the_encoder(client, exported):
    (info,) = client.list_models()
    spec = exported.spec
    assert info.name == exported.name and info.ready
    assert (info.input_size, info.input_channels, info.embed_dim) == (spec.img_size, spec.in_chans, spec.embed_dim)
    assert (info.grid, info.patch_size) == (spec.grid_size, spec.patch_size[0])
    assert info.encoder_spec["model_name"] == spec.model_name
    assert info.manifest["parity"] and info.manifest["weights_sha256"] == info.weights_sha256


def test_async_client(gateway, images, reference):
    async def run():
        async with AsyncVitServeClient(gateway.target) as c:
            emb, res, models = await asyncio.gather(
                c.embed(images[:3]), c.features(images[:3], layout="tokens"), c.list_models())
            with pytest.raises(VitServeError) as e:
                await c.embed(images[:1], model="nope")
            return emb, res, models, e.value.code
    emb, res, models, code = asyncio.run(run())
    np.testing.assert_allclose(emb, reference[0][:3], atol=MAX_ABS_ERR)
    np.testing.assert_allclose(res.features, reference[1][:3], atol=MAX_ABS_ERR)
    assert len(models) == 1 and code == grpc.StatusCode.NOT_FOUND


def test_health_is_serving(gateway):
    with grpc.insecure_channel(gateway.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "vitserve.v1.VisionEncoder"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(gateway):
    with grpc.insecure_channel(gateway.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert {"vitserve.v1.VisionEncoder", "grpc.health.v1.Health"} <= names


def test_manifest_round_trips_as_json(client):
    (info,) = client.list_models()
    json.dumps(info.manifest)  # plain JSON types only


def test_center_crop_and_letterbox_through_the_service(client, images, reference):
    """A wide frame whose centre is a test image: center_crop gives that image's exact embedding."""
    rng = np.random.default_rng(1)
    wide = np.concatenate([rng.integers(0, 256, (28, 14, 1), dtype=np.uint8), images[2],
                           rng.integers(0, 256, (28, 14, 1), dtype=np.uint8)], axis=1)
    res = client.embed_result(wide, resize_op="center_crop")
    np.testing.assert_allclose(res.embeddings, reference[0][2:3], rtol=0, atol=MAX_ABS_ERR)
    pre = res.preprocessing
    assert pre["resize_op"] == "CENTER_CROP" and pre["resized"] == 1
    assert pre["images"][0]["source_box"] == {"x0": 14.0, "y0": 0.0, "x1": 42.0, "y1": 0.0 + 28}
    assert (pre["images"][0]["original_width"], pre["images"][0]["op"]) == (56, "CENTER_CROP")
    stretched = client.embed_result(wide)  # the model's default (no manifest entry): resize
    assert stretched.preprocessing["resize_op"] == "RESIZE"
    assert not np.allclose(stretched.embeddings, res.embeddings, atol=1e-3)
    boxed = client.features(wide, resize_op="letterbox")
    rec = boxed.preprocessing["images"][0]
    assert rec["op"] == "LETTERBOX" and rec["target_box"] == {"x0": 0.0, "y0": 7.0, "x1": 28.0, "y1": 21.0}
    assert set(res.timing) == {"decode_ms", "queue_ms", "inference_ms", "total_ms"}
    assert res.timing["total_ms"] >= res.timing["inference_ms"] > 0 and res.timing["queue_ms"] >= 0
    assert len(res.model["weights_sha256"]) == 64


def test_webp_input(client, images, reference):
    from PIL import features
    if not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    webp = io.BytesIO()
    Image.fromarray(images[3, ..., 0]).save(webp, format="WEBP", lossless=True)
    res = client.embed_result(webp.getvalue())
    np.testing.assert_allclose(res.embeddings, reference[0][3:4], rtol=0, atol=MAX_ABS_ERR)
    # WebP has no grey mode: the file decodes as RGB (R=G=B) and is converted back, losslessly.
    assert res.preprocessing["images"][0]["conversion"] == "RGB->L"
