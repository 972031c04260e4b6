"""Property-based fuzzing of the gateway's HTTP API (+ real Triton), as ``test_fuzz_gateway`` fuzzes gRPC.

The same generated cases (``fuzz_cases``: hostile image files, raw frames, batches, options) go to
``POST /v1/features`` as the request's protobuf JSON (and, when every image is a file, to
``/v1/embeddings`` as base64 ``input``); each must get the HTTP status of its gRPC code and the same
message (or, when valid, features equal to the in-process PyTorch encoder's). Arbitrary JSON bodies
and field values must get a 4xx with an OpenAI-style error body, never a 500. After every case a valid
HTTP request must still return the reference features.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import re

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import vitserve_pb2
from serving.http_json import http_status, tensor_from_json
from serving.images import InputGeometry
from tests.reliability.conftest import ATOL, MAX_IMAGES, MAX_MESSAGE_BYTES, MAX_PIXELS
from tests.reliability.fuzz_cases import (EXHAUSTED, OK, Case, Decoder, batch_cases, image_cases, option_cases,
                                          raw_cases, valid_raw)
from tests.serving.http_calls import call

EXAMPLES = int(os.environ.get("VITSERVE_FUZZ_EXAMPLES", "120"))
TIMEOUT = 20.0
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)


def _statuses(codes: frozenset[str]) -> set[int]:
    out = set()
    for code in codes:
        if code == OK:
            out.add(200)
        elif code == EXHAUSTED:
            out |= {413, 429}  # a body over the size limit (413) or the in-flight limit (429)
        else:
            out.add(http_status(grpc.StatusCode[code])[0])
    return out


def _features_body(case: Case) -> dict:
    request = vitserve_pb2.FeaturesRequest(model=case.model, images=case.images, dtype=case.dtype,
                                           layout=case.layout or vitserve_pb2.FeaturesRequest.TOKENS,
                                           include_cls=True, lane=case.lane, resize_op=case.resize_op,
                                           outputs=case.outputs, include_registers=case.include_registers)
    return json_format.MessageToDict(request)


class HttpFuzzer:
    def __init__(self, url: str, reference, probe_images: np.ndarray) -> None:
        self.url = url
        self.reference = reference
        self.probe_body = {"images": _features_body(Case("probe", valid_raw(probe_images), frozenset()))["images"],
                           "layout": "TOKENS", "include_cls": True}
        self.probe_cls, self.probe_tokens = reference(probe_images)
        self.counts: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[int] = collections.Counter()

    def check(self, case: Case, route: str, answer) -> None:
        allowed = _statuses(case.codes)
        if case.suffix:  # a field this API does not define: gRPC ignores it, the JSON parser names it
            allowed, pattern = {400}, r'has no field named "x_unknown"'
        elif answer.status == 413:
            pattern = r"^the request body \(.+ bytes\) is over the limit of \d+ bytes"
        else:
            pattern = case.pattern
        assert answer.status in allowed, f"{case.kind} -> {route}: {answer.status} {answer.body}, expected {allowed}"
        if answer.status != 200:
            assert set(answer.body["error"]) == {"message", "type", "code"}
            assert pattern is not None and re.search(pattern, answer.message), \
                f"{case.kind}: message {answer.message!r} does not match {pattern!r}"
            return
        assert case.pixels is not None
        cls, tokens = self.reference(case.pixels)
        tol = 2e-2 if case.dtype == vitserve_pb2.FLOAT16 else ATOL
        if route == "embeddings":
            got = np.asarray([d["embedding"] for d in answer.body["data"]], np.float32)
            np.testing.assert_allclose(got, cls, atol=tol, rtol=tol)
        else:
            np.testing.assert_allclose(tensor_from_json(answer.body["features"]).astype(np.float32), tokens,
                                       atol=tol, rtol=tol)
            np.testing.assert_allclose(tensor_from_json(answer.body["cls"]).astype(np.float32), cls, atol=tol, rtol=tol)

    def run(self, case: Case, to_embeddings: bool) -> None:
        files = all(im.WhichOneof("source") == "encoded" for im in case.images) and case.images
        if case.pooling:
            self.counts["skipped:pooling (an int enum; the HTTP API takes names, fuzzed below)"] += 1
            return
        if to_embeddings and files and not (case.dtype or case.layout or case.outputs or case.include_registers):
            route = "embeddings"
            body = {"model": case.model, "input": [base64.b64encode(im.encoded).decode() for im in case.images]}
            if case.lane:
                body["lane"] = case.lane
            if case.resize_op:
                body["resize_op"] = case.resize_op
        else:
            route, body = "features", _features_body(case)
        if case.suffix:
            body["x_unknown"] = base64.b64encode(case.suffix).decode()
        answer = call(f"{self.url}/v1/{route}", body, timeout=TIMEOUT)
        self.check(case, route, answer)
        self.counts[f"{route}:{case.kind.split(':')[0]}"] += 1
        self.statuses[answer.status] += 1
        self.probe()

    def probe(self) -> None:
        answer = call(f"{self.url}/v1/features", self.probe_body, timeout=TIMEOUT)
        assert answer.status == 200, answer.body
        np.testing.assert_allclose(tensor_from_json(answer.body["features"]), self.probe_tokens, atol=ATOL, rtol=ATOL)
        np.testing.assert_allclose(tensor_from_json(answer.body["cls"]), self.probe_cls, atol=ATOL, rtol=ATOL)


@pytest.fixture(scope="module")
def fuzzer(rel_gateway, reference, sample_images):
    return HttpFuzzer(rel_gateway.http_url, reference, sample_images[:4])


def test_fuzz_http(fuzzer, rel_gateway, rel_triton, rel_exported, sample_images):
    manifest = json.loads((rel_exported.repository / rel_exported.name / "manifest.json").read_text())
    decoder = Decoder(InputGeometry(28, 28, 1), MAX_PIXELS, manifest)
    cases = st.one_of(image_cases(decoder), raw_cases(decoder),
                      batch_cases(decoder, MAX_IMAGES, MAX_MESSAGE_BYTES, sample_images),
                      option_cases(rel_exported.name, sample_images))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="VITSERVE_FUZZ_EXAMPLES" not in os.environ,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=cases, to_embeddings=st.booleans())
    def one(case: Case, to_embeddings: bool) -> None:
        fuzzer.run(case, to_embeddings)

    one()
    print(f"\nHTTP fuzz: {dict(sorted(fuzzer.counts.items()))}; statuses {dict(sorted(fuzzer.statuses.items()))}")
    assert sum(fuzzer.statuses.values()) >= min(EXAMPLES, 50) // 2
    assert len(fuzzer.statuses) >= 3  # several kinds of answer, not one path
    assert rel_triton.poll() is None and rel_gateway._thread.is_alive()


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(["embeddings", "features"]),
       body=st.one_of(_JSON, st.fixed_dictionaries({"input": _JSON}), st.fixed_dictionaries(
           {"input": st.just(["AAAA"])}, optional={"model": _JSON, "encoding_format": _JSON, "pooling": _JSON,
                                                   "l2_normalize": _JSON, "layout": _JSON, "dtype": _JSON,
                                                   "outputs": _JSON})),
       raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_arbitrary_json_is_a_4xx_with_an_error_body(fuzzer, route, body, raw):
    answer = call(f"{fuzzer.url}/v1/{route}", body, raw=raw, timeout=TIMEOUT)
    assert 400 <= answer.status < 500, (answer.status, answer.body)
    assert isinstance(answer.body, dict) and answer.message, answer.body
