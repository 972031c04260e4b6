"""``vitserve serve`` as a real subprocess: one ready line, queries work, SIGTERM exits 0."""

import io
import signal
import socket

import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image

from clients.client import VitServeClient, VitServeError
from serving import server
from serving.catalog import ServedModel
from serving.errors import GatewayError
from serving.gateway import BackgroundGateway
from serving.grpc_server import ServerOptions
from serving.images import InputGeometry
from serving.service import EncoderService
from serving.triton_launcher import free_port
from tests.serving.conftest import serve_process


def test_serve_prints_ready_line_and_exits_0_on_sigterm(exported, fmnist_test_images, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("process-token\n")
    metrics_port = free_port()
    with serve_process("--model-repository", str(exported.repository), "--port", "0",
                       "--auth-token-file", str(token_file), "--metrics-port", str(metrics_port),
                       "--max-in-flight", "4", "--max-message-mb", "8", "--enable-admin",
                       "--max-images-per-request", "3", "--max-pixels", "40x40") as serve:
        proc, match = serve.proc, serve.ready
        assert match.group(3) == exported.name
        with VitServeClient(match.group(1), token="process-token") as client:
            emb = client.embed(fmnist_test_images[:2])
            # --enable-admin: Triton runs with explicit model control, so models can be unloaded.
            assert client.unload_model(exported.name).state == "UNAVAILABLE"
            assert client.list_repository()[0]["reason"] == "unloaded"
            assert client.load_model(exported.name).state == "READY"
            # The image limits of the command line.
            with pytest.raises(VitServeError) as e:
                client.embed(fmnist_test_images[:4])
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "4 images is over the limit of 3 per request" in e.value.details
            big = io.BytesIO()
            Image.fromarray(np.zeros((41, 40), np.uint8)).save(big, format="PNG")
            with pytest.raises(VitServeError) as e:
                client.embed(big.getvalue())
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "40x41 = 1640 pixels is over the limit of 1600 pixels" in e.value.details
        assert emb.shape == (2, exported.spec.embed_dim) and np.isfinite(emb).all()
        with VitServeClient(match.group(1)) as client, pytest.raises(VitServeError) as e:
            client.embed(fmnist_test_images[:2])
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert f'vitserve_requests_total{{code="OK",model="{exported.name}",rpc="Embed"}} 1.0' in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read() == ""  # type: ignore[union-attr]  # exactly one line on stdout
    assert "stopping tritonserver" in serve.stderr


def test_serve_flag_errors_exit_2(tmp_path, capsys):
    repo = ["--triton-url", "127.0.0.1:1", "--port", "0"]
    assert server.main([*repo, "--max-in-flight", "0"]) == 2
    assert server.main([*repo, "--auth-token-file", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").write_text("\n")
    assert server.main([*repo, "--auth-token-file", str(tmp_path / "empty")]) == 2
    assert server.main([*repo, "--triton-max-restarts", "-1"]) == 2
    assert server.main([*repo, "--max-images-per-request", "0"]) == 2
    assert server.main([*repo, "--max-pixels", "lots"]) == 2
    assert server.main([*repo, "--max-pixels", "0x64"]) == 2
    assert server.main([*repo, "--max-pixels", "-5"]) == 2
    err = capsys.readouterr().err
    assert "--max-images-per-request must be >= 1, got 0" in err
    assert "--max-pixels: 'lots' is not a pixel count (e.g. 16777216) or a size (e.g. 4096x4096)" in err
    assert "--max-pixels: '0x64' is not a pixel count" in err and "'-5' must be at least 1 pixel" in err
    assert server.parse_pixels("4096x2048") == 4096 * 2048 and server.parse_pixels("1000") == 1000
    assert "--max-in-flight must be >= 1" in err and "missing" in err and "is empty" in err
    assert "--triton-max-restarts must be >= 0" in err


def test_admin_on_a_public_address_needs_a_token(capsys):
    argv = ["--triton-url", "127.0.0.1:1", "--port", "0", "--enable-admin"]
    assert server.main([*argv, "--host", "0.0.0.0"]) == 2
    assert server.main([*argv, "--host", "gateway.example"]) == 2
    err = capsys.readouterr().err
    assert "--enable-admin on --host 0.0.0.0" in err and "needs --auth-token-file" in err
    assert server._is_loopback("127.0.0.1") and server._is_loopback("::1") and server._is_loopback("localhost")



def test_metrics_port_in_use_is_a_clear_error():
    service = EncoderService(f"127.0.0.1:{free_port()}")  # knows a model, so no Triton is needed
    service.registry.models = {"a": ServedModel("a", "1", InputGeometry(28, 28, 1), embed_dim=8, grid=(7, 7),
                                       patch_size=4, num_prefix_tokens=1, max_batch_size=4,
                                       weights_sha256="0" * 64, normalization="test")}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        options = ServerOptions(metrics_port=port)
        background = BackgroundGateway(service.triton_url, options=options, service=service)
        with pytest.raises(GatewayError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            background.start()


def test_serve_in_front_of_running_triton_stops_on_sigint(exported, triton, fmnist_test_images):
    """``--triton-url``: no Triton of its own; SIGINT stops the gateway, the external Triton lives on."""
    with serve_process("--triton-url", triton.grpc_url, "--port", "0") as serve:
        proc, match = serve.proc, serve.ready
        assert match.group(2) == triton.grpc_url
        with VitServeClient(match.group(1)) as client:
            emb = client.embed(fmnist_test_images[:3], model=exported.name)
        assert emb.shape == (3, exported.spec.embed_dim)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    assert triton.poll() is None  # the external Triton was not stopped by the gateway
