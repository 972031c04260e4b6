"""Security of ``vitserve serve`` as users run it: the CLI with mutual TLS, a bearer token and admin on.

* Only a client with a certificate from the test CA gets a connection (plaintext, no client
  certificate: UNAVAILABLE); a missing or wrong token is UNAUTHENTICATED and costs no inference
  (Triton's own statistics); the right token gets correct features.
* The HTTP API (``--http-port``) is behind the same mutual TLS and token (HTTPS without a client
  certificate or in plaintext: no connection; no or a wrong token: 401 and no inference).
* Triton's ports (and the gateway's) listen on loopback only (``/proc/net/tcp*`` of the processes).
* No path from a request is ever opened on the server: a model-shaped directory beside the model
  repository (reachable as ``../canary``) is watched with inotify while requests name it every way
  (model names, admin LoadModel/GetModel, image bytes); the watch must see no access at all.
"""

from __future__ import annotations

import base64
import ctypes
import os
import shutil
import struct
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import vitserve_pb2, vitserve_pb2_grpc
from tests.reliability.fuzz_cases import valid_raw
from tests.reliability.loadtest import Service
from tests.serving.tls_certs import make_certificates
from tests.serving.triton_stats import inference_count

TOKEN = "reliability-token-7f3a"
IN_ACCESS, IN_OPEN, IN_NONBLOCK = 0x1, 0x20, 0o4000


class InotifyWatch:
    """Counts IN_OPEN / IN_ACCESS events on a directory and every file directly in it (Linux)."""

    def __init__(self, directory: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK)
        if self.fd < 0:
            pytest.skip("inotify is not available")
        self.paths = [directory, *sorted(p for p in directory.rglob("*"))]
        for p in self.paths:
            if self.libc.inotify_add_watch(self.fd, os.fsencode(p), IN_OPEN | IN_ACCESS) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {p}")

    def events(self) -> int:
        count = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return count
            offset = 0
            while offset < len(data):
                _, _, _, length = struct.unpack_from("iIII", data, offset)
                offset += 16 + length
                count += 1

    def close(self) -> None:
        os.close(self.fd)


def listening_addresses(pid: int) -> set[str]:
    """``ip:port`` of every listening TCP socket the process holds (from /proc/<pid>/fd + /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            host, port = local.split(":")
            raw = bytes.fromhex(host)
            if v6:
                words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                ip = ":".join(b"".join(words)[i:i + 2].hex() for i in range(0, 16, 2))
            else:
                ip = ".".join(str(b) for b in raw[::-1])
            found.add(f"{ip}:{int(port, 16)}")
    return found


def is_loopback(address: str) -> bool:
    ip = address.rsplit(":", 1)[0]
    v4_mapped = "0000:0000:0000:0000:0000:ffff:7f"  # ::ffff:127.x.y.z (gRPC binds IPv4 this way)
    return ip.startswith(("127.", v4_mapped)) or ip == "0000:0000:0000:0000:0000:0000:0000:0001"


@pytest.fixture(scope="module")
def secured(rel_exported, tmp_path_factory):
    """``vitserve serve`` with mutual TLS, a token file and admin RPCs on; yields (service, certs, triton url)."""
    tmp = tmp_path_factory.mktemp("secured")
    certs = make_certificates(tmp)
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    service = Service(rel_exported.repository, extra=[
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
        "--tls-client-ca", str(certs.ca), "--auth-token-file", str(token_file), "--enable-admin"])
    service.start()
    try:
        ready = next(line for line in service.log if line.startswith("vitserve ready"))
        triton_url = ready.split("triton grpc ", 1)[1].split(",", 1)[0]
        yield service, certs, triton_url
    finally:
        service.stop()


def channel(target: str, certs, client_cert: bool = True) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        certs.ca.read_bytes(), certs.client_key.read_bytes() if client_cert else None,
        certs.client_cert.read_bytes() if client_cert else None)
    return grpc.secure_channel(target, creds)


def auth(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


@pytest.mark.slow
def test_mtls_and_token_gate_every_call(secured, rel_exported, reference, sample_images):
    service, certs, triton_url = secured
    images = sample_images[:2]
    request = vitserve_pb2.FeaturesRequest(images=valid_raw(images), layout=vitserve_pb2.FeaturesRequest.TOKENS)
    before = inference_count(triton_url, rel_exported.name)
    with channel(service.target, certs) as ch:
        stub = vitserve_pb2_grpc.VisionEncoderStub(ch)
        for token, message in ((None, "missing credentials"), ("wrong", "invalid bearer token"),
                               (TOKEN + "x", "invalid bearer token")):
            for call in (lambda: stub.Features(request, metadata=auth(token), timeout=20),
                         lambda: stub.LoadModel(vitserve_pb2.ModelControlRequest(model=rel_exported.name),
                                                metadata=auth(token), timeout=20),
                         lambda: list(stub.StreamFeatures(iter([vitserve_pb2.StreamFeaturesRequest(
                             frame_id=1, request=request)]), metadata=auth(token), timeout=20))):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and message in e.value.details()
        assert inference_count(triton_url, rel_exported.name) == before  # refused calls cost nothing
        response = stub.Features(request, metadata=auth(TOKEN), timeout=20)
        got = np.frombuffer(response.features.data, "<f4").reshape(tuple(response.features.shape))
        np.testing.assert_allclose(got, reference(images)[1], atol=1e-4, rtol=1e-4)
    for client_cert, plaintext in ((False, False), (True, True)):
        ch = grpc.insecure_channel(service.target) if plaintext else channel(service.target, certs, client_cert)
        with ch:
            with pytest.raises(grpc.RpcError) as e:
                vitserve_pb2_grpc.VisionEncoderStub(ch).Features(request, metadata=auth(TOKEN), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.slow
def test_https_mtls_and_token_gate_the_http_api(secured, rel_exported, reference, sample_images):
    import ssl
    import urllib.error

    from serving.http_json import tensor_from_json
    from tests.serving.http_calls import call

    service, certs, triton_url = secured
    assert service.http_url.startswith("https://127.0.0.1:")
    url = f"{service.http_url}/v1/features"
    images = sample_images[:2]
    body = {"images": [{"raw": {"data": base64.b64encode(im.tobytes()).decode(), "height": 28,
                                "width": 28, "channels": 1}} for im in images], "layout": "TOKENS"}
    trusted = ssl.create_default_context(cafile=str(certs.ca))
    trusted.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    before = inference_count(triton_url, rel_exported.name)
    for headers, message in (({}, "missing credentials"), ({"Authorization": "Bearer wrong"}, "invalid bearer token")):
        answer = call(url, body, headers=headers, context=trusted, timeout=20)
        assert answer.status == 401 and message in answer.message
    assert inference_count(triton_url, rel_exported.name) == before  # refused calls cost nothing
    answer = call(url, body, headers={"Authorization": f"Bearer {TOKEN}"}, context=trusted, timeout=20)
    assert answer.status == 200, answer.body
    np.testing.assert_allclose(tensor_from_json(answer.body["features"]), reference(images)[1], atol=1e-4, rtol=1e-4)
    no_client_cert = ssl.create_default_context(cafile=str(certs.ca))
    for context, target in ((no_client_cert, url), (None, url.replace("https://", "http://"))):
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            call(target, body, headers={"Authorization": f"Bearer {TOKEN}"}, context=context, timeout=10)


@pytest.mark.slow
def test_triton_and_gateway_listen_on_loopback_only(secured):
    service, _, _ = secured
    triton = service.triton_pid()
    assert triton is not None
    triton_ports, gateway_ports = listening_addresses(triton), listening_addresses(service.pid)
    assert len(triton_ports) >= 3, triton_ports  # gRPC, HTTP, metrics
    assert all(is_loopback(a) for a in triton_ports), triton_ports
    assert gateway_ports and all(is_loopback(a) for a in gateway_ports), gateway_ports
    print(f"\nlistening: tritonserver {sorted(triton_ports)}, gateway {sorted(gateway_ports)}")


@pytest.mark.slow
def test_no_request_path_is_ever_opened(secured, rel_exported, sample_images):
    service, certs, _ = secured
    repository = rel_exported.repository
    canary = repository.parent / "canary"  # "../canary" from inside the repository: a loadable model
    if not canary.exists():
        shutil.copytree(repository / rel_exported.name, canary)
        config = canary / "config.pbtxt"
        config.write_text(config.read_text().replace(f'name: "{rel_exported.name}"', 'name: "canary"'))
    names = ["../canary", str(canary), f"{rel_exported.name}/../../canary", "../canary/config.pbtxt",
             str(canary / "1" / "model.onnx"), "..", "/", "canary"]
    watch = InotifyWatch(canary)
    refused = 0
    try:
        with channel(service.target, certs) as ch:
            stub = vitserve_pb2_grpc.VisionEncoderStub(ch)
            md = auth(TOKEN)
            for name in names:
                calls = [
                    lambda: stub.Embed(vitserve_pb2.EmbedRequest(model=name, images=valid_raw(sample_images[:1])),
                                       metadata=md, timeout=20),
                    lambda: stub.GetModel(vitserve_pb2.GetModelRequest(model=name), metadata=md, timeout=20),
                    lambda: stub.LoadModel(vitserve_pb2.ModelControlRequest(model=name), metadata=md, timeout=20),
                    lambda: stub.ReloadModel(vitserve_pb2.ModelControlRequest(model=name), metadata=md, timeout=20),
                ]
                for call in calls:
                    with pytest.raises(grpc.RpcError) as e:
                        call()
                    assert e.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), \
                        (name, e.value.code(), e.value.details())
                    refused += 1
            for path in (str(canary / "config.pbtxt"), "file://" + str(canary / "1" / "model.onnx")):
                with pytest.raises(grpc.RpcError) as e:  # a path sent as image bytes is just bytes
                    stub.Embed(vitserve_pb2.EmbedRequest(images=[vitserve_pb2.Image(encoded=path.encode())]),
                               metadata=md, timeout=20)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                refused += 1
        events = watch.events()
    finally:
        watch.close()
    assert events == 0, f"the server touched {canary} {events} times"
    print(f"\npath safety: {refused} requests naming {canary} (model names, admin load/reload, image bytes) "
          f"refused; inotify saw {events} accesses")
