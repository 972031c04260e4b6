"""Gateway behaviour that needs no running Triton: model resolution, errors, tensor encoding."""

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import VitServeClient, VitServeError
from protos import vitserve_pb2, vitserve_pb2_grpc
from contract.tensors import to_tensor
from serving import server
from serving.catalog import ServedModel
from serving.gateway import BackgroundGateway
from serving.images import InputGeometry
from serving.pooling import l2_normalize
from serving.service import EncoderService
from serving.triton_launcher import free_port


def served(name: str) -> ServedModel:
    return ServedModel(name=name, version="1", geometry=InputGeometry(28, 28, 1), embed_dim=8,
                       grid=(7, 7), patch_size=4, num_prefix_tokens=1, max_batch_size=4,
                       weights_sha256="0" * 64, normalization="test")


@pytest.fixture
def dead_triton_gateway():
    """A gateway that believes in two models but whose Triton is not listening."""
    service = EncoderService(f"127.0.0.1:{free_port()}")
    service.registry.models = {"a": served("a"), "b": served("b")}
    with BackgroundGateway(service.triton_url, service=service) as gw:
        yield gw


IMAGE = np.zeros((28, 28, 1), np.uint8)


def test_triton_unreachable_is_unavailable(dead_triton_gateway):
    with VitServeClient(dead_triton_gateway.target, timeout=20) as client:
        with pytest.raises(VitServeError) as e:
            client.embed(IMAGE, model="a")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(VitServeError) as e:
            client.list_models()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_empty_model_name_with_several_models_is_invalid_argument(dead_triton_gateway):
    with VitServeClient(dead_triton_gateway.target) as client:
        with pytest.raises(VitServeError) as e:
            client.features(IMAGE)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "several models are served (a, b); set `model`" in e.value.details


def test_unknown_model_lists_the_available_ones(dead_triton_gateway):
    with VitServeClient(dead_triton_gateway.target) as client:
        with pytest.raises(VitServeError) as e:
            client.embed(IMAGE, model="c")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert e.value.details == "unknown model 'c'; available: a, b"


def test_too_many_images_is_invalid_argument(dead_triton_gateway):
    with VitServeClient(dead_triton_gateway.target) as client:
        with pytest.raises(VitServeError) as e:
            client.embed(np.zeros((1025, 28, 28, 1), np.uint8), model="a")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "1025 images is over the limit of 1024" in e.value.details


def test_health_turns_not_serving_while_triton_is_down(dead_triton_gateway):
    request = health_pb2.HealthCheckRequest(service="vitserve.v1.VisionEncoder")
    with grpc.insecure_channel(dead_triton_gateway.target) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(request, timeout=10)
        statuses = [next(stream).status, next(stream).status]
        stream.cancel()
    assert statuses == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]


def test_to_tensor_little_endian_in_requested_dtype():
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    t32 = to_tensor(x, vitserve_pb2.FLOAT32)
    assert list(t32.shape) == [2, 3] and t32.dtype == vitserve_pb2.FLOAT32
    np.testing.assert_array_equal(np.frombuffer(t32.data, "<f4").reshape(2, 3), x)
    t16 = to_tensor(x, vitserve_pb2.FLOAT16)
    assert t16.dtype == vitserve_pb2.FLOAT16 and len(t16.data) == 12
    np.testing.assert_array_equal(np.frombuffer(t16.data, "<f2").reshape(2, 3), x.astype(np.float16))
    assert to_tensor(x, vitserve_pb2.DTYPE_UNSPECIFIED).dtype == vitserve_pb2.FLOAT32


def test_l2_normalize_keeps_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]])


def test_gateway_without_triton_fails_to_start_with_a_message(capsys):
    code = server.main(["--triton-url", f"127.0.0.1:{free_port()}", "--port", "0", "--triton-timeout", "1"])
    assert code == 1
    assert "was not ready within 1s" in capsys.readouterr().err


def test_serve_usage_errors_exit_2(capsys):
    assert server.main(["--port", "0"]) == 2  # neither --model-repository nor --triton-url
    assert server.main(["--triton-url", "x:1", "--port", "70000"]) == 2
    assert "not a port number" in capsys.readouterr().err


def test_empty_repository_is_refused(tmp_path, capsys):
    assert server.main(["--model-repository", str(tmp_path), "--port", "0"]) == 1
    assert "holds no models" in capsys.readouterr().err


def test_unknown_enum_values_are_invalid_argument(dead_triton_gateway):
    frame = vitserve_pb2.Image(raw=vitserve_pb2.RawFrame(data=IMAGE.tobytes(), height=28, width=28, channels=1))
    with grpc.insecure_channel(dead_triton_gateway.target) as ch:
        stub = vitserve_pb2_grpc.VisionEncoderStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(vitserve_pb2.EmbedRequest(model="a", images=[frame], dtype=7))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown dtype 7" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Features(vitserve_pb2.FeaturesRequest(model="a", images=[frame], layout=9))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown layout 9" in e.value.details()
