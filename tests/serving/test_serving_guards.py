"""Faults and load through the real Triton + gateway: deadlines, in-flight limit, message size,
decompression bombs, bearer-token authentication and Prometheus metrics (the interceptors)."""

import asyncio
import struct
import time
import urllib.request
import zlib

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from clients.client import (AsyncVitServeClient, VitServeClient, VitServeError, channel_credentials,
                            to_proto_images)
from protos import vitserve_pb2
from serving.errors import RequestError
from serving.gateway import BackgroundGateway
from serving.grpc_server import ServerOptions
from serving.service import EncoderService
from tests.serving.tls_certs import make_certificates
from tests.serving.triton_stats import inference_count

TOKEN = "s3cret-token"
MAX_MESSAGE_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def guarded(triton):
    """A gateway as production runs it: token, metrics, one call at a time, 1 MiB messages."""
    options = ServerOptions(max_in_flight=1, max_message_bytes=MAX_MESSAGE_BYTES, auth_token=TOKEN,
                            metrics_port=0)
    with BackgroundGateway(triton.grpc_url, options=options) as gw:
        yield gw


@pytest.fixture
def count(triton, exported):
    return lambda: inference_count(triton.grpc_url, exported.name)


def metrics(gw) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.options.metrics.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte grey PNG whose header declares ``width x height`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


# -- deadlines ------------------------------------------------------------------------------------

def test_expired_deadline_is_refused_before_inference(triton, exported, fmnist_test_images, count):
    async def run(remaining):
        service = EncoderService(triton.grpc_url)
        try:
            await service.registry.refresh()
            request = vitserve_pb2.EmbedRequest(images=to_proto_images(fmnist_test_images[:4]))
            return await service.embed(request, remaining)
        finally:
            await service.close()

    before = count()
    with pytest.raises(RequestError) as e:
        asyncio.run(run(lambda: -0.25))  # the deadline passed 250 ms ago (e.g. while decoding)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "before inference" in e.value.message
    assert count() == before
    assert asyncio.run(run(lambda: 30.0)).embeddings.shape == [4, exported.spec.embed_dim]
    # Triton counts a request when it releases it, which can come just after the response reached
    # the client: give the statistics a moment to catch up (the check above is the one that matters).
    settle = time.monotonic() + 5.0
    while count() != before + 1 and time.monotonic() < settle:
        time.sleep(0.05)
    assert count() == before + 1


def test_deadline_travels_to_triton(triton, fmnist_test_images):
    async def run():
        service = EncoderService(triton.grpc_url)
        try:
            await service.registry.refresh()
            request = vitserve_pb2.FeaturesRequest(images=to_proto_images(fmnist_test_images[:512]))
            return await service.features(request, lambda: 1e-6)  # 1 us: no Triton call fits in it
        finally:
            await service.close()

    with pytest.raises(RequestError) as e:
        asyncio.run(run())
    # Triton's client_timeout fired: the gateway maps Triton's status, not a generic INTERNAL.
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and e.value.message.startswith("triton:")


def test_timed_out_call_gives_its_in_flight_slot_back(guarded, fmnist_test_images):
    image = fmnist_test_images[0]

    async def run():
        async with AsyncVitServeClient(guarded.target, token=TOKEN) as c:
            release = asyncio.Event()

            async def frames():
                yield 1, image
                await release.wait()  # the stream stays open, holding the one slot, until its deadline

            got = []
            with pytest.raises(VitServeError) as e:
                async for response in c.stream_features(frames(), timeout=2.0):
                    got.append(response.frame_id)
            release.set()
            return got, e.value

    got, error = asyncio.run(run())
    # The first frame was answered, so the call held the slot when its deadline passed.
    assert got == [1] and error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 30
    with VitServeClient(guarded.target, token=TOKEN) as client:
        while True:  # the server learns of the expiry a moment after the client does
            try:
                assert client.embed(image).shape[0] == 1
                break
            except VitServeError as refused:
                assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, \
                    f"the slot was still taken 30 s after the deadline: {refused}"
                time.sleep(0.05)
    assert metrics(guarded)[("vitserve_requests_in_flight", ())] == 0


# -- limits ---------------------------------------------------------------------------------------

def test_past_the_in_flight_limit_is_resource_exhausted_at_once(guarded, fmnist_test_images, count):
    image = fmnist_test_images[0]

    async def run():
        async with AsyncVitServeClient(guarded.target, token=TOKEN) as c:
            release = asyncio.Event()

            async def frames():
                yield 1, image
                await release.wait()  # keep the stream (one call in flight) open

            stream = c.stream_features(frames())
            first = await stream.__anext__()
            before = count()
            # Had the call waited for the slot it would have hit this deadline (the slot is held
            # until release), so RESOURCE_EXHAUSTED proves it was refused without waiting.
            with pytest.raises(VitServeError) as e:
                await asyncio.wait_for(c.embed(image), timeout=120)
            after = count()
            release.set()
            rest = [r async for r in stream]
            emb = await c.embed(image)  # the slot is free again
            return first, e.value, after - before, rest, emb

    first, error, inferences, rest, emb = asyncio.run(run())
    assert first.frame_id == 1 and first.features is not None and rest == []
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is 1" in error.details
    assert inferences == 0
    assert emb.shape[0] == 1


def test_oversized_message_is_resource_exhausted(guarded, count):
    big = np.zeros((2, 1024, 1024, 1), np.uint8)  # 2 MiB of raw pixels > the 1 MiB limit
    before = count()
    with VitServeClient(guarded.target, token=TOKEN) as client:
        with pytest.raises(VitServeError) as e:
            client.embed(big)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in e.value.details
    assert count() == before


def test_decompression_bomb_is_refused_before_decoding(gateway, count):
    bomb = png_declaring(60000, 60000)  # 3.6 G pixels declared in ~100 bytes
    before = count()
    with VitServeClient(gateway.target) as client:
        with pytest.raises(VitServeError) as e:
            client.embed(bomb)
    # The message names the declared size, read from the header: nothing was decoded.
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "3600000000 pixels" in e.value.details and "decompression bomb" in e.value.details
    assert count() == before


# -- authentication -------------------------------------------------------------------------------

@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_is_unauthenticated_without_inference(guarded, fmnist_test_images, count, token):
    before = count()
    with VitServeClient(guarded.target, token=token) as client:
        for call in (lambda: client.embed(fmnist_test_images[:1]), client.list_models,
                     lambda: list(client.stream_features([(1, fmnist_test_images[:1])]))):
            with pytest.raises(VitServeError) as e:
                call()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert ("missing credentials" if token is None else "invalid bearer token") in e.value.details
    assert count() == before


def test_right_token_is_served(guarded, exported, fmnist_test_images):
    with VitServeClient(guarded.target, token=TOKEN) as client:
        assert client.embed(fmnist_test_images[:2]).shape == (2, exported.spec.embed_dim)
        assert [m.name for m in client.list_models()] == [exported.name]


def test_health_and_reflection_need_no_token(guarded):
    with grpc.insecure_channel(guarded.target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
        (listed,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
    assert "vitserve.v1.VisionEncoder" in {s.name for s in listed.list_services_response.service}


# -- metrics --------------------------------------------------------------------------------------

def test_metrics_count_requests_errors_latency_and_batches(guarded, exported, fmnist_test_images):
    name = exported.name
    ok = ("vitserve_requests_total", (("code", "OK"), ("model", name), ("rpc", "Embed")))
    nf = ("vitserve_requests_total", (("code", "NOT_FOUND"), ("model", "unknown"), ("rpc", "Embed")))
    nf_err = ("vitserve_request_errors_total", nf[1])
    unauth = ("vitserve_requests_total", (("code", "UNAUTHENTICATED"), ("model", name), ("rpc", "Embed")))
    latency = ("vitserve_request_latency_seconds_count", (("model", name), ("rpc", "Embed")))
    batches = ("vitserve_triton_batch_size_count", (("model", name),))
    batch_sum = ("vitserve_triton_batch_size_sum", (("model", name),))
    stream_ok = ("vitserve_requests_total", (("code", "OK"), ("model", name), ("rpc", "StreamFeatures")))
    before = metrics(guarded)
    with VitServeClient(guarded.target, token=TOKEN) as client:
        client.embed(fmnist_test_images[:20])  # 2 Triton calls: 16 + 4 images
        client.embed(fmnist_test_images[:3])
        with pytest.raises(VitServeError):
            client.embed(fmnist_test_images[:1], model="nope")
        list(client.stream_features([(1, fmnist_test_images[:2]), (2, b"not an image"),
                                     (3, fmnist_test_images[2:4])]))
    with VitServeClient(guarded.target) as client, pytest.raises(VitServeError):
        client.embed(fmnist_test_images[:1])
    after = metrics(guarded)

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert (delta(ok), delta(nf), delta(nf_err), delta(unauth), delta(stream_ok)) == (2, 1, 1, 1, 1)
    assert delta(latency) == 3  # the two served and the unauthenticated one (NOT_FOUND is model "unknown")
    assert delta(("vitserve_request_latency_seconds_count", (("model", "unknown"), ("rpc", "Embed")))) == 1
    assert (delta(batches), delta(batch_sum)) == (5, 20 + 3 + 2 + 2)
    assert after[("vitserve_requests_in_flight", ())] == 0
    frames = {o: delta(("vitserve_stream_frames_total", (("model", name), ("outcome", o))))
              for o in ("ran", "error")}
    assert frames == {"ran": 2, "error": 1}


# -- TLS ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tls_and_mutual_tls(triton, exported, fmnist_test_images, certificates, mutual):
    c = certificates
    options = ServerOptions.from_files(tls_cert_file=c.server_cert, tls_key_file=c.server_key,
                                       tls_client_ca_file=c.ca if mutual else None)
    with BackgroundGateway(triton.grpc_url, options=options) as gw:
        with_cert = channel_credentials(c.ca, c.client_cert, c.client_key)
        with VitServeClient(gw.target, tls=with_cert) as client:
            assert client.embed(fmnist_test_images[:2]).shape == (2, exported.spec.embed_dim)
        without_cert = channel_credentials(c.ca)
        with VitServeClient(gw.target, tls=without_cert, timeout=5) as client:
            if mutual:  # the handshake fails: no client certificate
                with pytest.raises(VitServeError) as e:
                    client.embed(fmnist_test_images[:1])
                assert e.value.code == grpc.StatusCode.UNAVAILABLE
            else:
                assert client.embed(fmnist_test_images[:1]).shape[0] == 1
        with VitServeClient(gw.target, timeout=5) as plaintext, pytest.raises(VitServeError) as e:
            plaintext.embed(fmnist_test_images[:1])
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        untrusted = channel_credentials()  # system roots do not know the test CA
        with VitServeClient(gw.target, tls=untrusted, timeout=5) as client, pytest.raises(VitServeError) as e:
            client.embed(fmnist_test_images[:1])
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
