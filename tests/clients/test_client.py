import asyncio
import io
import socket

import grpc
import numpy as np
import pytest
from PIL import Image

from clients.client import (AsyncVitServeClient, VitServeClient, VitServeError, embed_request,
                            tensor_to_numpy, to_proto_images)
from protos import vitserve_pb2


def png_bytes(value: int = 7) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 5), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_array_shapes_become_raw_frames():
    (grey,) = to_proto_images(np.zeros((5, 6), np.uint8))
    assert (grey.raw.height, grey.raw.width, grey.raw.channels, len(grey.raw.data)) == (5, 6, 1, 30)
    (rgb,) = to_proto_images(np.zeros((5, 6, 3), np.uint8))
    assert rgb.raw.channels == 3 and len(rgb.raw.data) == 90
    batch = to_proto_images(np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1))
    assert len(batch) == 2 and batch[1].raw.data == bytes(range(16, 32))


def test_non_contiguous_arrays_are_sent_in_row_major_order():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (im,) = to_proto_images(a.T)
    assert im.raw.data == np.ascontiguousarray(a.T).tobytes()


def test_bytes_and_paths_are_sent_encoded(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes())
    images = to_proto_images([png_bytes(), path, str(path)])
    assert [im.WhichOneof("source") for im in images] == ["encoded"] * 3
    assert images[1].encoded == png_bytes()


def test_bad_inputs_are_explained(tmp_path):
    with pytest.raises(ValueError, match="must be uint8"):
        to_proto_images(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 1\]"):
        to_proto_images(np.zeros((8, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="cannot read image file"):
        to_proto_images(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="no images"):
        to_proto_images([])
    with pytest.raises(TypeError, match="unsupported image type"):
        to_proto_images([3.5])


def test_tensor_to_numpy_round_trip():
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    for dtype, np_dtype in ((vitserve_pb2.FLOAT32, "<f4"), (vitserve_pb2.FLOAT16, "<f2")):
        t = vitserve_pb2.Tensor(data=x.astype(np_dtype).tobytes(), shape=[2, 3, 4], dtype=dtype)
        out = tensor_to_numpy(t)
        assert out.shape == (2, 3, 4) and out.flags.writeable
        np.testing.assert_array_equal(out, x.astype(np_dtype))


def test_embed_sends_options_and_decodes(fake_service):
    target, servicer = fake_service
    with VitServeClient(target) as client:
        emb = client.embed(np.full((2, 3, 3, 1), 10, np.uint8), model="fake", l2_normalize=True)
        assert emb.shape == (2, 4) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
        request = servicer.requests[-1]
        assert request.model == "fake" and request.l2_normalize and len(request.images) == 2
        half = client.embed(png_bytes(), dtype="float16")
        assert half.dtype == np.float16 and servicer.requests[-1].dtype == vitserve_pb2.FLOAT16


def test_features_result_carries_metadata(fake_service):
    target, _ = fake_service
    with VitServeClient(target) as client:
        res = client.features(np.zeros((3, 28, 28, 1), np.uint8), include_cls=True)
        assert res.features.shape == (3, 2, 3, 4) and res.cls.shape == (3, 4)
        assert (res.grid, res.patch_size, res.num_prefix_tokens) == ((2, 3), 4, 1)
        assert res.model == {"name": "fake", "version": "1", "weights_sha256": "f" * 64, "lane": ""}
        assert res.preprocessing["resize_mode"] == "bilinear" and res.timing["total_ms"] == 2.0
        tokens = client.features(np.zeros((28, 28), np.uint8), layout="tokens")
        assert tokens.features.shape == (1, 6, 4) and tokens.cls is None


def test_server_errors_become_vitserve_errors(fake_service):
    target, _ = fake_service
    with VitServeClient(target) as client:
        with pytest.raises(VitServeError) as e:
            client.embed(png_bytes(), model="missing")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert e.value.details == "unknown model 'missing'; available: fake"
        assert str(e.value) == "NOT_FOUND: unknown model 'missing'; available: fake"


def test_unreachable_server_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with VitServeClient(f"127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(VitServeError) as e:
            client.list_models()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_argument_errors_before_any_call(fake_service):
    with VitServeClient(fake_service[0]) as client:
        with pytest.raises(ValueError, match="layout must be 'grid' or 'tokens'"):
            client.features(png_bytes(), layout="hwc")
        with pytest.raises(ValueError, match="dtype must be"):
            client.embed(png_bytes(), dtype="int8")


def test_list_models(fake_service):
    with VitServeClient(fake_service[0]) as client:
        (m,) = client.list_models()
    assert (m.name, m.embed_dim, m.grid, m.input_size) == ("fake", 4, (2, 3), (28, 28))
    assert m.encoder_spec == {"embed_dim": 4} and m.manifest == {"format_version": 1}


def test_async_client_same_methods(fake_service):
    async def run():
        async with AsyncVitServeClient(fake_service[0]) as client:
            emb, res, models = await asyncio.gather(
                client.embed(np.zeros((2, 5, 5, 1), np.uint8)),
                client.features(png_bytes(), layout="tokens"), client.list_models())
            with pytest.raises(VitServeError) as e:
                await client.embed(png_bytes(), model="missing")
            return emb, res, models, e.value.code
    emb, res, models, code = asyncio.run(run())
    assert emb.shape == (2, 4) and res.features.shape == (1, 6, 4) and models[0].name == "fake"
    assert code == grpc.StatusCode.NOT_FOUND


def test_pooling_names_and_token_metadata(fake_service):
    image = np.zeros((28, 28), np.uint8)
    assert embed_request(image, "", False, "float32").pooling == vitserve_pb2.EmbedRequest.CLS
    assert embed_request(image, "", False, "float32", "mean").pooling == vitserve_pb2.EmbedRequest.MEAN_PATCH
    with pytest.raises(ValueError, match="pooling must be one of cls, mean, both"):
        embed_request(image, "", False, "float32", "max")
    with VitServeClient(fake_service[0], token="t0k") as client:
        client.embed(image)
    assert fake_service[1].metadata[-1]["authorization"] == "Bearer t0k"
    with VitServeClient(fake_service[0]) as client:
        client.embed(image)
    assert "authorization" not in fake_service[1].metadata[-1]


def test_bucket_and_version_options_build_the_request():
    from clients.client import features_request, stream_request

    image = np.zeros((28, 28, 1), np.uint8)
    request = embed_request(image, "m", False, "float32", bucket="auto", version=2)
    assert (request.bucket, request.version) == (vitserve_pb2.BUCKET_AUTO, "2")
    request = features_request(image, "m", "grid", False, "float32", bucket="AUTO", version="3")
    assert (request.bucket, request.version) == (vitserve_pb2.BUCKET_AUTO, "3")
    frame = stream_request((5, image), "m", "grid", False, "float32", False, version=1)
    assert (frame.request.bucket, frame.request.version) == (vitserve_pb2.BUCKET_UNSPECIFIED, "1")
    assert embed_request(image, "m", False, "float32").version == ""  # the newest
    with pytest.raises(ValueError, match="bucket must be one of default, auto"):
        embed_request(image, "m", False, "float32", bucket="largest")
    for bad in (0, "-1", "v2"):
        with pytest.raises(ValueError, match="version must be an integer >= 1"):
            embed_request(image, "m", False, "float32", version=bad)


def test_async_client_has_every_method_of_the_sync_client():
    import inspect

    public = {n for n in dir(VitServeClient) if not n.startswith("_")}
    assert public <= set(dir(AsyncVitServeClient)), public - set(dir(AsyncVitServeClient))
    for name in public:
        method = getattr(AsyncVitServeClient, name)
        assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), name


def test_admin_calls_sync_and_async(fake_service):
    with VitServeClient(fake_service[0]) as client:
        sync = (client.load_model("fake"), client.unload_model("fake"), client.reload_model("fake"),
                client.list_repository())

    async def run():
        async with AsyncVitServeClient(fake_service[0]) as client:
            results = (await client.load_model("fake"), await client.unload_model("fake"),
                       await client.reload_model("fake"), await client.list_repository())
            with pytest.raises(VitServeError) as e:
                await client.load_model("missing")
            return results, e.value.code

    results, code = asyncio.run(run())
    assert results == sync
    assert [r.state for r in results[:3]] == ["READY", "UNAVAILABLE", "READY"]
    assert results[0].served_models == ("fake",) and results[0].elapsed_ms == 1.5 and results[0].info is None
    assert results[3] == [{"name": "fake", "version": "1", "state": "READY", "reason": ""},
                          {"name": "other", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}]
    assert code == grpc.StatusCode.NOT_FOUND

