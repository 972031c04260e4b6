"""The HTTP API's refusals, auth and TLS on a gateway whose Triton is not listening (no Triton needed):
every gRPC status maps to its HTTP code with an OpenAI-style body naming the problem."""

from __future__ import annotations

import base64
import ssl
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.gateway import BackgroundGateway
from serving.grpc_server import ServerOptions, server_ssl_context
from serving.service import EncoderService
from serving.triton_launcher import free_port
from tests.serving.http_calls import call, data_url, png
from tests.serving.test_gateway import served
from tests.serving.tls_certs import make_certificates

MAX_BODY = 64 * 1024
TOKEN = "http-s3cret"
IMAGE = data_url(png(np.zeros((28, 28, 1), np.uint8)))


def dead_gateway(**options: object) -> BackgroundGateway:
    """A gateway serving HTTP that believes in models "a" and "b" but whose Triton is not listening."""
    defaults = dict(http_port=0, max_message_bytes=MAX_BODY, max_images=4, metrics_port=0, health_interval=0.2)
    server_options = ServerOptions(**{**defaults, **options})
    service = EncoderService(f"127.0.0.1:{free_port()}", server_options.service_options())
    service.registry.models = {"a": served("a"), "b": served("b")}
    return BackgroundGateway(service.triton_url, service=service, options=server_options)


@pytest.fixture(scope="module")
def gw():
    with dead_gateway() as gateway:
        yield gateway


def _error(answer, status: int, code: str) -> str:
    assert answer.status == status, answer.body
    assert set(answer.body["error"]) == {"message", "type", "code"}
    assert answer.body["error"]["code"] == code
    assert answer.headers["Content-Type"].startswith("application/json")
    return answer.message


@pytest.mark.parametrize("body, expected", [
    ({"model": "a"}, "the body has no 'input'"),
    ({"model": "a", "input": []}, "'input' is empty"),
    ({"model": "a", "input": 3}, "'input' must be a string or a list of strings, got int"),
    ({"model": "a", "input": [7]}, "input[0] must be a string (a data URL or base64 of an image file), got int"),
    ({"model": "a", "input": "data:text/plain;base64,aGVsbG8="},
     "input[0] is a data URL of type 'text/plain', not an image"),
    ({"model": "a", "input": [IMAGE, "data:image/png,rawbytes"]}, "input[1] is a data URL without ';base64'"),
    ({"model": "a", "input": ["not base64!"]}, "input[0] is not base64 (nor a data URL)"),
    ({"model": "a", "input": [base64.b64encode(b"not an image").decode()]}, "image 0"),
    ({"model": "a", "input": [IMAGE], "encoding_format": "int8"},
     "'encoding_format' must be 'float' or 'base64', got 'int8'"),
    ({"model": "a", "input": [IMAGE], "pooling": "max"}, "'pooling' must be one of 'cls', 'mean', 'both', got 'max'"),
    ({"model": "a", "input": [IMAGE], "l2_normalize": "yes"}, "'l2_normalize' must be true or false"),
    ({"model": "a", "input": [IMAGE], "dimensions": 8}, "'dimensions' is not supported"),
    ({"model": "a", "input": [IMAGE], "lane": "fastest"}, "Invalid enum value FASTEST"),
    ({"input": [IMAGE]}, "several models are served (a, b); set `model`"),
    ({"model": "a", "input": [IMAGE] * 5}, "5 images is over the limit of 4 per request"),
])
def test_embeddings_bad_request_is_400_naming_the_problem(gw, body, expected):
    assert expected in _error(call(f"{gw.http_url}/v1/embeddings", body), 400, "INVALID_ARGUMENT")


@pytest.mark.parametrize("body, expected", [
    ({"model": "a", "input": [IMAGE], "layout": "cubes"}, "Invalid enum value CUBES for enum type"),
    ({"model": "a", "input": [IMAGE], "include_cls": "maybe"}, "include_cls"),
    ({"model": "a", "input": [IMAGE], "colour": 1}, 'has no field named "colour"'),
    ({"model": "a", "input": [IMAGE], "images": [{"encoded": "AA=="}]}, "in 'input' or in 'images', not both"),
    ({"model": "a", "input": [IMAGE], "outputs": ["attention_of_everything"]},
     "exports no patch-token output 'attention_of_everything'"),
])
def test_features_bad_request_is_400_naming_the_problem(gw, body, expected):
    assert expected in _error(call(f"{gw.http_url}/v1/features", body), 400, "INVALID_ARGUMENT")


def test_bad_json_and_content_type_are_400(gw):
    url = f"{gw.http_url}/v1/embeddings"
    assert "the body is not valid JSON: Expecting property name" in \
        _error(call(url, raw=b"{model: a}"), 400, "INVALID_ARGUMENT")
    assert "the body must be a JSON object, got list" in _error(call(url, raw=b"[1]"), 400, "INVALID_ARGUMENT")
    assert "the body is not UTF-8 JSON" in _error(call(url, raw=b"\xff\xfe{"), 400, "INVALID_ARGUMENT")
    message = _error(call(url, raw=b"{}", content_type="text/plain"), 400, "INVALID_ARGUMENT")
    assert message == "the content type is 'text/plain'; send the body as 'Content-Type: application/json'"


def test_unknown_model_and_route_are_404(gw):
    assert _error(call(f"{gw.http_url}/v1/embeddings", {"model": "c", "input": [IMAGE]}), 404, "NOT_FOUND") == \
        "unknown model 'c'; available: a, b"
    assert "unknown model 'c'" in _error(call(f"{gw.http_url}/v1/models/c"), 404, "NOT_FOUND")
    assert _error(call(f"{gw.http_url}/v2/embeddings"), 404, "NOT_FOUND") == "no route GET /v2/embeddings"
    assert _error(call(f"{gw.http_url}/v1/embeddings"), 405, "INVALID_ARGUMENT") == \
        "method GET is not allowed on /v1/embeddings"


def test_model_description_needs_no_triton(gw):
    answer = call(f"{gw.http_url}/v1/models/a")
    assert answer.status == 200
    assert answer.body["id"] == "a" and answer.body["object"] == "model"
    assert (answer.body["grid_height"], answer.body["patch_size"], answer.body["embed_dim"]) == (7, 4, 8)


def test_body_over_the_message_limit_is_413(gw):
    big = {"model": "a", "input": [base64.b64encode(bytes(MAX_BODY)).decode()]}
    message = _error(call(f"{gw.http_url}/v1/embeddings", big), 413, "RESOURCE_EXHAUSTED")
    assert f"is over the limit of {MAX_BODY} bytes (vitserve serve --max-message-mb)" in message
    assert call(f"{gw.http_url}/health/live").status == 200  # the server is fine after it


def test_triton_down_is_503_and_not_ready(gw):
    message = _error(call(f"{gw.http_url}/v1/embeddings", {"model": "a", "input": [IMAGE]}), 503, "UNAVAILABLE")
    assert message.startswith("triton:") and "failed to connect" in message
    deadline = time.monotonic() + 60
    while (ready := call(f"{gw.http_url}/health/ready")).status == 200 and time.monotonic() < deadline:
        time.sleep(0.1)  # the health watcher polls every 0.2 s
    assert ready.status == 503 and ready.body["status"] == "NOT_SERVING"
    assert call(f"{gw.http_url}/health/live").body == {"status": "live"}


def test_deadline_header(gw):
    url = f"{gw.http_url}/v1/embeddings"
    answer = call(url, {"model": "a", "input": [IMAGE]}, headers={"X-Request-Timeout": "0.000001"})
    assert "the deadline passed" in _error(answer, 504, "DEADLINE_EXCEEDED")
    answer = call(url, {"model": "a", "input": [IMAGE]}, headers={"X-Request-Timeout": "soon"})
    assert _error(answer, 400, "INVALID_ARGUMENT") == \
        "the X-Request-Timeout header must be a positive number of seconds, got 'soon'"


def test_http_requests_are_counted_by_route_and_status(gw):
    call(f"{gw.http_url}/v1/embeddings", raw=b"{")
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.options.metrics.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    key = ("vitserve_http_requests_total", (("method", "POST"), ("route", "/v1/embeddings"), ("status", "400")))
    assert samples[key] >= 1


def test_bearer_token_guards_the_api_not_health():
    with dead_gateway(auth_token=TOKEN) as gw:
        url = f"{gw.http_url}/v1/models/a"
        assert _error(call(url), 401, "UNAUTHENTICATED") == \
            "missing credentials: send the header 'Authorization: Bearer <token>'"
        assert _error(call(url, headers={"Authorization": "Bearer wrong"}), 401, "UNAUTHENTICATED") == \
            "invalid bearer token"
        assert _error(call(url, headers={"Authorization": f"Basic {TOKEN}"}), 401, "UNAUTHENTICATED") == \
            "invalid bearer token"
        assert call(url, headers={"Authorization": f"Bearer {TOKEN}"}).status == 200
        assert call(f"{gw.http_url}/health/live").status == 200
        assert call(f"{gw.http_url}/").status == 200  # the page itself; its calls send the token


def test_tls_and_mutual_tls_on_http(tmp_path):
    certs = make_certificates(tmp_path)
    trust = ssl.create_default_context(cafile=str(certs.ca))
    with dead_gateway(http_tls=server_ssl_context(certs.server_cert, certs.server_key)) as gw:
        assert gw.http_url.startswith("https://")
        assert call(f"{gw.http_url}/v1/models/a", context=trust).body["id"] == "a"
        with pytest.raises(urllib.error.URLError):  # a server certificate the client does not trust
            call(f"{gw.http_url}/v1/models/a", context=ssl.create_default_context())
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext to a TLS port
            call(gw.http_url.replace("https", "http") + "/v1/models/a")
    mtls = server_ssl_context(certs.server_cert, certs.server_key, certs.ca)
    with dead_gateway(http_tls=mtls) as gw:
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):  # no client certificate
            call(f"{gw.http_url}/v1/models/a", context=trust)
        trust.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        assert call(f"{gw.http_url}/v1/models/a", context=trust).status == 200


def test_options_from_files_make_both_tls_contexts(tmp_path):
    certs = make_certificates(tmp_path)
    options = ServerOptions.from_files(tls_cert_file=certs.server_cert, tls_key_file=certs.server_key, http_port=0)
    assert options.tls is not None and isinstance(options.http_tls, ssl.SSLContext)
    with pytest.raises(ValueError, match="cannot use the TLS files"):
        server_ssl_context(certs.server_key, certs.server_key)


def test_http_port_flag_is_checked(capsys):
    from serving import server

    assert server.main(["--triton-url", "127.0.0.1:1", "--http-port", "70000"]) == 2
    assert "--http-port 70000 is not a port number (0-65535)" in capsys.readouterr().err
