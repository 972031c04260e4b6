"""JSON bodies of the HTTP API <-> the request layer's protobuf messages (pure functions).

Requests are parsed into the same ``vitserve_pb2`` requests the gRPC servicer receives (protobuf's
``json_format`` does the field work: names, enums, types), with the images taken from ``input`` (data
URLs or bare base64, as OpenAI-style embedding servers take them). Responses are the gRPC responses
rendered as JSON, tensors as ``{"data": base64 of the raw little-endian bytes, "shape", "dtype"}``.
Every problem is an ``HttpError`` naming it; the gRPC status of a ``RequestError`` maps to an HTTP
status in ``http_status``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from contract.tensors import tensor_to_numpy
from protos import vitserve_pb2

Json = dict[str, Any]

# gRPC status -> (HTTP status, OpenAI-style error type)
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
BODY_TOO_LARGE = 413

_POOLING = {"cls": vitserve_pb2.EmbedRequest.CLS, "mean": vitserve_pb2.EmbedRequest.MEAN_PATCH,
            "both": vitserve_pb2.EmbedRequest.CLS_AND_MEAN_PATCH}
_POOLING_NAMES = {v: k for k, v in _POOLING.items()}
# Fields of the embeddings body passed to EmbedRequest as they are (json_format checks their values).
_EMBED_PASSTHROUGH = ("lane", "resize_op", "bucket", "version")
_OPENAI_IGNORED = ("user",)  # accepted and ignored, as OpenAI-compatible servers do
_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.DOTALL)


class HttpError(Exception):
    """A request the HTTP API refuses: HTTP ``status``, a ``message``, the error ``type`` and ``code``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.type, self.code = status, message, type_, code

    def body(self) -> Json:
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type_: str, code: str) -> Json:
    """The OpenAI-style error body ``{"error": {"message", "type", "code"}}``."""
    return {"error": {"message": message, "type": type_, "code": code}}


def http_status(code: grpc.StatusCode) -> tuple[int, str]:
    """The HTTP status and error type of a gRPC status (500 ``server_error`` for the rest)."""
    return HTTP_STATUS.get(code, (500, "server_error"))


def bad_request(message: str) -> HttpError:
    return HttpError(400, message)


def parse_body(raw: bytes, content_type: str) -> Json:
    """A request body as a JSON object (400 naming the problem if it is not one)."""
    if content_type != "application/json":
        raise bad_request(f"the content type is {content_type or 'missing'!r}; send the body as "
                          f"'Content-Type: application/json'")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as e:
        raise bad_request(f"the body is not UTF-8 JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise bad_request(f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def decode_image(item: Any, index: int) -> vitserve_pb2.Image:
    """One ``input`` entry (a ``data:image/...;base64,`` URL or bare base64 of the file) as an Image."""
    where = f"input[{index}]"
    if not isinstance(item, str):
        raise bad_request(f"{where} must be a string (a data URL or base64 of an image file), "
                          f"got {type(item).__name__}")
    payload = item
    if item.startswith("data:"):
        match = _DATA_URL.match(item)
        if match is None:
            raise bad_request(f"{where} is not a valid data URL (expected 'data:image/<type>;base64,<data>')")
        media, params = match.group(1).strip().lower(), match.group(2).lower()
        if not media.startswith("image/"):
            raise bad_request(f"{where} is a data URL of type {media or 'text/plain'!r}, not an image "
                              f"(expected 'data:image/<type>;base64,...')")
        if ";base64" not in params:
            raise bad_request(f"{where} is a data URL without ';base64'; send the image base64-encoded")
        payload = match.group(3)
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{where} is not base64 (nor a data URL): {e}") from None
    return vitserve_pb2.Image(encoded=data)  # empty or undecodable bytes: the request layer says so


def decode_inputs(value: Any) -> list[vitserve_pb2.Image]:
    """``input``: one string or a list of strings, each an image."""
    if value is None:
        raise bad_request("the body has no 'input': give a data URL or base64 image, or a list of them")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise bad_request(f"'input' must be a string or a list of strings, got {type(value).__name__}")
    if not items:
        raise bad_request("'input' is empty: give at least one image")
    return [decode_image(item, i) for i, item in enumerate(items)]


def _enum_case(value: Any) -> Any:
    """Enum values may be given in any case ("grid", "GRID")."""
    return value.upper() if isinstance(value, str) else value


def _parse_into(fields: Json, message: Message, what: str) -> None:
    try:
        json_format.ParseDict(fields, message)
    except json_format.ParseError as e:
        raise bad_request(f"invalid {what} request: {e}") from None


def embed_request(body: Json) -> tuple[vitserve_pb2.EmbedRequest, str]:
    """An OpenAI-style embeddings body as an ``EmbedRequest`` and its ``encoding_format``."""
    known = {"model", "input", "encoding_format", "pooling", "l2_normalize", *_EMBED_PASSTHROUGH, *_OPENAI_IGNORED}
    unknown = sorted(set(body) - known)
    if unknown:
        hint = " (vitserve returns the model's full width; 'dimensions' is not supported)" \
            if "dimensions" in unknown else ""
        raise bad_request(f"unknown field(s) {', '.join(map(repr, unknown))}{hint}; "
                          f"known: {', '.join(sorted(known))}")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}")
    pooling = body.get("pooling", "cls")
    if pooling not in _POOLING:
        raise bad_request(f"'pooling' must be one of {', '.join(map(repr, _POOLING))}, got {pooling!r}")
    l2 = body.get("l2_normalize", False)
    if not isinstance(l2, bool):
        raise bad_request(f"'l2_normalize' must be true or false, got {l2!r}")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise bad_request(f"'model' must be a string, got {type(model).__name__}")
    request = vitserve_pb2.EmbedRequest(model=model, pooling=_POOLING[pooling], l2_normalize=l2,
                                        dtype=vitserve_pb2.FLOAT32)
    _parse_into({k: _enum_case(body[k]) if k != "version" else body[k] for k in _EMBED_PASSTHROUGH if k in body},
                request, "embeddings")
    request.images.extend(decode_inputs(body.get("input")))
    return request, encoding


def features_request(body: Json) -> vitserve_pb2.FeaturesRequest:
    """A features body: the gRPC ``FeaturesRequest`` fields as JSON, the images in ``input`` (strings)
    or in ``images`` (the proto's JSON: ``{"encoded": base64}`` or ``{"raw": {...}}``)."""
    fields = dict(body)
    inputs = fields.pop("input", None)
    for enum_field in ("layout", "dtype", "lane", "resize_op", "resizeOp", "bucket"):
        if enum_field in fields:
            fields[enum_field] = _enum_case(fields[enum_field])
    request = vitserve_pb2.FeaturesRequest()
    _parse_into(fields, request, "features")
    if inputs is not None:
        if request.images:
            raise bad_request("give the images in 'input' or in 'images', not both")
        request.images.extend(decode_inputs(inputs))
    elif not request.images:
        raise bad_request("the body has no 'input': give a data URL or base64 image, or a list of them")
    return request


# -- responses ------------------------------------------------------------------------------------

def _tensor_json(tensor: vitserve_pb2.Tensor) -> Json:
    dtype = "float16" if tensor.dtype == vitserve_pb2.FLOAT16 else "float32"
    return {"data": base64.b64encode(tensor.data).decode("ascii"), "shape": [int(d) for d in tensor.shape],
            "dtype": dtype}


def message_json(message: Message) -> Json:
    """A response message as JSON (proto field names, every field present), tensors as base64 + shape."""
    out = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    _tensors_as_base64(message, out)
    return out


def _tensors_as_base64(message: Message, out: Json) -> None:
    """Replace, in ``out`` (``message`` as JSON), every Tensor by ``{"data", "shape", "dtype"}``."""
    for field, value in message.ListFields():
        kind = field.message_type
        if kind is None or kind.GetOptions().map_entry:
            continue
        if kind is vitserve_pb2.Tensor.DESCRIPTOR:
            out[field.name] = _tensor_json(value)
        elif field.is_repeated:
            for item, item_out in zip(value, out[field.name]):
                _tensors_as_base64(item, item_out)
        else:
            _tensors_as_base64(value, out[field.name])


def _float_array(row: np.ndarray) -> str:
    """A float32 vector as a JSON array of each value's shortest decimal that reads back as the same
    float32 (numpy's unique repr: half the bytes of Python's float64 repr, and half the time)."""
    if not np.isfinite(row).all():  # nan/inf are no JSON numbers; json.dumps writes NaN / Infinity
        return json.dumps(row.tolist())
    return "[" + ",".join(row.astype(str).tolist()) + "]"


def embed_response(response: vitserve_pb2.EmbedResponse, encoding: str, tokens_per_image: int) -> str:
    """The OpenAI-style embeddings response (JSON text), with the identity of what ran in ``vitserve``."""
    vectors = tensor_to_numpy(response.embeddings).astype("<f4", copy=False)
    if encoding == "base64":
        items = [json.dumps(base64.b64encode(row.tobytes()).decode("ascii")) for row in vectors]
    else:
        items = [_float_array(row) for row in vectors]
    data = ", ".join(f'{{"object": "embedding", "index": {i}, "embedding": {item}}}' for i, item in enumerate(items))
    tokens = tokens_per_image * len(vectors)
    meta = message_json(response)
    meta.pop("embeddings", None)
    meta["pooling"] = _POOLING_NAMES.get(response.pooling, "cls")
    rest = json.dumps({"model": response.model.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                       "vitserve": meta})
    return f'{{"object": "list", "data": [{data}], {rest[1:]}'


def features_response(response: vitserve_pb2.FeaturesResponse) -> Json:
    """The gRPC FeaturesResponse as JSON (``layout`` as "GRID"/"TOKENS", tensors as base64)."""
    return {"object": "features", **message_json(response)}


def model_json(info: vitserve_pb2.ModelInfo) -> Json:
    """One model, OpenAI-style (``id``, ``object``, ``owned_by``) plus its full ``ModelInfo``; the
    encoder spec and manifest as JSON objects rather than strings."""
    entry = message_json(info)
    entry["encoder_spec"] = json.loads(entry.pop("encoder_spec_json") or "{}")
    entry["manifest"] = json.loads(entry.pop("manifest_json") or "{}")
    return {"id": info.model.name, "object": "model", "created": 0, "owned_by": "vitserve", **entry}


def models_json(response: vitserve_pb2.ListModelsResponse) -> Json:
    return {"object": "list", "data": [model_json(m) for m in response.models]}


def vectors_from_json(data: list[Json]) -> np.ndarray:
    """The ``[N, D]`` float32 embeddings of an embeddings response (float lists or base64)."""
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if isinstance(d["embedding"], str)
            else np.asarray(d["embedding"], np.float32) for d in sorted(data, key=lambda d: d["index"])]
    return np.stack(rows)


def tensor_from_json(tensor: Json) -> np.ndarray:
    """The array of a response tensor ``{"data", "shape", "dtype"}``."""
    dtype = np.dtype("<f2" if tensor["dtype"] == "float16" else "<f4")
    return np.frombuffer(base64.b64decode(tensor["data"]), dtype).reshape(tensor["shape"])
