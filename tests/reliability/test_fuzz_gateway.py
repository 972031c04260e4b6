"""Property-based fuzzing of the real gateway (+ real Triton) with hostile requests.

Every generated case (see ``fuzz_cases``) goes to Embed, Features or StreamFeatures with a per-call
deadline. It must get its status code and a message naming the problem (or, when valid, features
equal to the in-process PyTorch encoder's); after every case a valid probe request must still return
the reference features, and at the end Triton and the gateway must still be running.

CI runs ``VITSERVE_FUZZ_EXAMPLES`` (default 120) derandomised examples; set it higher for a long,
random run. The number of cases run, by kind, is printed (``-s``) and written to
``$VITSERVE_FUZZ_REPORT`` (JSON) when that is set.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import vitserve_pb2, vitserve_pb2_grpc
from serving.images import InputGeometry
from tests.reliability.conftest import ATOL, MAX_IMAGES, MAX_MESSAGE_BYTES, MAX_PIXELS
from tests.reliability.fuzz_cases import (EXHAUSTED, OK, Case, Decoder, batch_cases, image_cases, option_cases,
                                          raw_cases, valid_raw)

EXAMPLES = int(os.environ.get("VITSERVE_FUZZ_EXAMPLES", "120"))
CALL_TIMEOUT = 20.0  # a hang shows up as DEADLINE_EXCEEDED, which no case expects
SERVICE = "/vitserve.v1.VisionEncoder/"


def _unary(channel: grpc.Channel, rpc: str) -> grpc.UnaryUnaryMultiCallable:
    """A raw-bytes call, so a case can append unknown fields to a serialised request."""
    return channel.unary_unary(SERVICE + rpc, request_serializer=None, response_deserializer=None)


def _request(case: Case, rpc: str) -> vitserve_pb2.EmbedRequest | vitserve_pb2.FeaturesRequest:
    if rpc == "Embed":
        return vitserve_pb2.EmbedRequest(model=case.model, images=case.images, dtype=case.dtype,
                                         pooling=case.pooling, lane=case.lane, resize_op=case.resize_op)
    return vitserve_pb2.FeaturesRequest(model=case.model, images=case.images, dtype=case.dtype,
                                        layout=case.layout or vitserve_pb2.FeaturesRequest.TOKENS,
                                        include_cls=True, lane=case.lane, resize_op=case.resize_op,
                                        outputs=case.outputs, include_registers=case.include_registers)


def _decode(tensor: vitserve_pb2.Tensor) -> np.ndarray:
    dtype = "<f2" if tensor.dtype == vitserve_pb2.FLOAT16 else "<f4"
    return np.frombuffer(tensor.data, dtype).reshape(tuple(tensor.shape)).astype(np.float32)


class Fuzzer:
    """Sends cases to one gateway and checks the outcomes against the in-process reference."""

    def __init__(self, target: str, reference, probe_images: np.ndarray, decoder: Decoder) -> None:
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        self.stub = vitserve_pb2_grpc.VisionEncoderStub(self.channel)
        self.reference = reference
        self.probe_images = probe_images
        self.probe_cls, self.probe_tokens = reference(probe_images)
        self.decoder = decoder
        self.counts: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()

    def check_features(self, case: Case, rpc: str, response: object) -> None:
        assert case.pixels is not None
        cls, tokens = self.reference(case.pixels)
        tol = 2e-2 if case.dtype == vitserve_pb2.FLOAT16 else ATOL
        if rpc == "Embed":
            np.testing.assert_allclose(_decode(response.embeddings), cls, atol=tol, rtol=tol)
        else:
            np.testing.assert_allclose(_decode(response.features), tokens, atol=tol, rtol=tol)
            np.testing.assert_allclose(_decode(response.cls), cls, atol=tol, rtol=tol)

    def check_refusal(self, case: Case, code: str, message: str) -> None:
        assert code in case.codes, f"{case.kind}: got {code} ({message!r}), expected {sorted(case.codes)}"
        assert case.pattern is not None and re.search(case.pattern, message), \
            f"{case.kind}: message {message!r} does not match {case.pattern!r}"

    def unary(self, case: Case, rpc: str) -> str:
        data = _request(case, rpc).SerializeToString() + case.suffix
        try:
            raw = _unary(self.channel, rpc)(data, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            self.check_refusal(case, e.code().name, e.details() or "")
            return e.code().name
        assert OK in case.codes, f"{case.kind}: {rpc} answered OK, expected {sorted(case.codes)}"
        response_type = vitserve_pb2.EmbedResponse if rpc == "Embed" else vitserve_pb2.FeaturesResponse
        self.check_features(case, rpc, response_type.FromString(raw))
        return OK

    def stream(self, case: Case) -> str:
        """The case as frame 1 of a stream, a valid probe as frame 2: frame 2 is always answered."""
        frames = [vitserve_pb2.StreamFeaturesRequest(frame_id=1, request=_request(case, "Features")),
                  vitserve_pb2.StreamFeaturesRequest(frame_id=2, request=vitserve_pb2.FeaturesRequest(
                      images=valid_raw(self.probe_images), layout=vitserve_pb2.FeaturesRequest.TOKENS))]
        try:
            first, second = list(self.stub.StreamFeatures(iter(frames), timeout=CALL_TIMEOUT))
        except grpc.RpcError as e:  # only an oversized frame ends the whole stream
            assert case.codes == {EXHAUSTED}, f"{case.kind}: stream failed with {e.code().name}: {e.details()}"
            self.check_refusal(case, e.code().name, e.details() or "")
            return e.code().name
        assert (first.frame_id, second.frame_id) == (1, 2) and not second.error_code
        np.testing.assert_allclose(_decode(second.features.features), self.probe_tokens, atol=ATOL, rtol=ATOL)
        if first.error_code:
            code = grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == first.error_code)).name
            self.check_refusal(case, code, first.error_message)
            return code
        assert OK in case.codes, f"{case.kind}: frame answered OK, expected {sorted(case.codes)}"
        self.check_features(case, "Features", first.features)
        return OK

    def probe(self) -> None:
        """A valid request after every case: the service still answers, and correctly."""
        response = self.stub.Features(vitserve_pb2.FeaturesRequest(
            images=valid_raw(self.probe_images), layout=vitserve_pb2.FeaturesRequest.TOKENS,
            include_cls=True), timeout=CALL_TIMEOUT)
        np.testing.assert_allclose(_decode(response.features), self.probe_tokens, atol=ATOL, rtol=ATOL)
        np.testing.assert_allclose(_decode(response.cls), self.probe_cls, atol=ATOL, rtol=ATOL)

    def run(self, case: Case, rpc: str) -> None:
        if case.pooling:
            rpc = "Embed"  # pooling exists only there
        elif case.layout and rpc == "Embed":
            rpc = "Features"
        code = self.stream(case) if rpc == "StreamFeatures" else self.unary(case, rpc)
        self.counts[f"{rpc}:{case.kind.split(':')[0]}"] += 1
        self.codes[code] += 1
        self.probe()


@pytest.fixture(scope="module")
def fuzzer(rel_gateway, rel_exported, reference, sample_images):
    manifest = json.loads((rel_exported.repository / rel_exported.name / "manifest.json").read_text())
    decoder = Decoder(InputGeometry(28, 28, 1), MAX_PIXELS, manifest)
    f = Fuzzer(rel_gateway.target, reference, sample_images[:4], decoder)
    yield f
    f.channel.close()


def test_fuzz_gateway(fuzzer, rel_gateway, rel_triton, rel_exported, sample_images):
    decoder = fuzzer.decoder
    cases = st.one_of(
        image_cases(decoder), image_cases(decoder), raw_cases(decoder),
        batch_cases(decoder, MAX_IMAGES, MAX_MESSAGE_BYTES, sample_images),
        option_cases(rel_exported.name, sample_images))
    random_run = "VITSERVE_FUZZ_EXAMPLES" in os.environ

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not random_run,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=cases, rpc=st.sampled_from(["Embed", "Features", "StreamFeatures"]))
    def one(case: Case, rpc: str) -> None:
        fuzzer.run(case, rpc)

    t0 = time.perf_counter()
    one()
    elapsed = time.perf_counter() - t0
    total = sum(fuzzer.counts.values())
    report = {"cases": total, "seconds": round(elapsed, 1), "by_kind": dict(sorted(fuzzer.counts.items())),
              "by_code": dict(sorted(fuzzer.codes.items())), "probes_after_cases": total}
    print(f"\nfuzz: {total} cases in {elapsed:.1f} s (each followed by a checked valid request); "
          f"codes {report['by_code']}")
    if os.environ.get("VITSERVE_FUZZ_REPORT"):
        with open(os.environ["VITSERVE_FUZZ_REPORT"], "w") as f:
            json.dump(report, f, indent=2)
    assert total >= min(EXAMPLES, 50)
    assert len(fuzzer.codes) >= 3  # the run reached refusals of several kinds, not only one path
    assert rel_triton.poll() is None  # Triton never died
    assert rel_gateway._thread.is_alive()


# -- what the fuzzer found outside serving/images.py --------------------------------------------

@pytest.mark.parametrize("rpc", ["Embed", "Features"])
def test_unparseable_request_is_invalid_argument(rel_gateway, rpc):
    with grpc.insecure_channel(rel_gateway.target) as channel:
        with pytest.raises(grpc.RpcError) as e:
            _unary(channel, rpc)(b"\xff\xff\xff", timeout=CALL_TIMEOUT)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())


def test_unparseable_request_does_not_break_the_service(fuzzer):
    with pytest.raises(grpc.RpcError) as e:
        _unary(fuzzer.channel, "Embed")(b"\x0a\x03\xff\xfe\xfd", timeout=CALL_TIMEOUT)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    assert "not a valid vitserve.v1.VisionEncoder.Embed message" in e.value.details()
    fuzzer.probe()


def test_unparseable_stream_frame_is_reported(rel_gateway, sample_images):
    good = vitserve_pb2.StreamFeaturesRequest(frame_id=1, request=vitserve_pb2.FeaturesRequest(
        images=valid_raw(sample_images[:1]))).SerializeToString()
    with grpc.insecure_channel(rel_gateway.target) as channel:
        call = channel.stream_stream(SERVICE + "StreamFeatures", request_serializer=None,
                                     response_deserializer=vitserve_pb2.StreamFeaturesResponse.FromString)
        answered = []
        with pytest.raises(grpc.RpcError) as e:
            for response in call(iter([good, b"\xff\xff", good]), timeout=CALL_TIMEOUT):
                answered.append(response)
    assert [r.frame_id for r in answered] == [1]  # the frame before the bad one is answered
    assert answered[0].HasField("features")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    assert "StreamFeatures" in e.value.details()


@pytest.mark.parametrize("rpc", ["LoadModel", "UnloadModel", "ReloadModel"])
def test_admin_rpcs_are_off_by_default(fuzzer, rel_exported, rpc):
    with pytest.raises(grpc.RpcError) as e:
        getattr(fuzzer.stub, rpc)(vitserve_pb2.ModelControlRequest(model=rel_exported.name), timeout=CALL_TIMEOUT)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "--enable-admin" in e.value.details()
    fuzzer.probe()  # the model is still served
