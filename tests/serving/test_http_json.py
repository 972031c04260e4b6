"""The HTTP API's JSON conversions (pure): float embeddings read back as the same float32, tensors as
base64 of the same bytes, data URLs."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from protos import vitserve_pb2
from serving.http_json import HttpError, decode_image, embed_response, message_json, tensor_from_json


def _embed_response(vectors: np.ndarray) -> vitserve_pb2.EmbedResponse:
    response = vitserve_pb2.EmbedResponse(embeddings=vitserve_pb2.Tensor(
        data=vectors.astype("<f4").tobytes(), shape=list(vectors.shape), dtype=vitserve_pb2.FLOAT32))
    response.model.name = "m"
    return response


def test_float_embeddings_read_back_as_the_same_float32():
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.standard_normal((3, 64)), rng.standard_normal((1, 64)) * 1e30,
                              rng.standard_normal((1, 64)) * 1e-30, np.full((1, 64), 1e-45)]).astype(np.float32)
    body = json.loads(embed_response(_embed_response(vectors), "float", 5))
    back = np.asarray([d["embedding"] for d in body["data"]], np.float32)
    assert np.array_equal(back, vectors)
    assert [d["index"] for d in body["data"]] == list(range(len(vectors)))
    assert body["usage"] == {"prompt_tokens": 30, "total_tokens": 30} and body["model"] == "m"
    b64 = json.loads(embed_response(_embed_response(vectors), "base64", 5))
    assert base64.b64decode(b64["data"][2]["embedding"]) == vectors[2].astype("<f4").tobytes()


def test_non_finite_values_do_not_break_the_body():
    vectors = np.array([[1.0, np.nan, np.inf]], np.float32)
    body = json.loads(embed_response(_embed_response(vectors), "float", 1))  # Python's json reads NaN
    assert body["data"][0]["embedding"][0] == 1.0 and np.isnan(body["data"][0]["embedding"][1])


def test_nested_tensors_become_base64_with_shape():
    tokens = np.arange(24, dtype="<f2").reshape(1, 4, 6)
    tensor = vitserve_pb2.Tensor(data=tokens.tobytes(), shape=[1, 4, 6], dtype=vitserve_pb2.FLOAT16)
    response = vitserve_pb2.FeaturesResponse(features=tensor, grid_height=2, grid_width=2)
    response.layers.add(name="patch_tokens", features=tensor)
    out = message_json(response)
    assert out["features"] == {"data": base64.b64encode(tokens.tobytes()).decode(), "shape": [1, 4, 6],
                               "dtype": "float16"}
    assert np.array_equal(tensor_from_json(out["layers"][0]["features"]), tokens)
    assert out["num_prefix_tokens"] == 0 and out["layout"] == "LAYOUT_UNSPECIFIED"  # every field present


def test_data_urls():
    assert decode_image("data:image/png;base64,iVBORw==", 0).encoded == b"\x89PNG"
    assert decode_image("data:IMAGE/JPEG;charset=x;BASE64,/9g=", 0).encoded == b"\xff\xd8"
    with pytest.raises(HttpError, match=r"input\[3\] is a data URL of type 'application/pdf', not an image"):
        decode_image("data:application/pdf;base64,AAAA", 3)
    with pytest.raises(HttpError, match=r"input\[0\] is not a valid data URL"):
        decode_image("data:image/png;base64", 0)
