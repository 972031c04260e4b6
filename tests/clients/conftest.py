"""A fake VisionEncoder service (plain grpcio, no Triton) for client and CLI tests."""

from __future__ import annotations

import json
from concurrent import futures
from typing import Iterator

import grpc
import numpy as np
import pytest

from protos import vitserve_pb2, vitserve_pb2_grpc

EMBED_DIM, GRID = 4, (2, 3)


def tensor(array: np.ndarray, dtype: int) -> vitserve_pb2.Tensor:
    np_dtype = "<f2" if dtype == vitserve_pb2.FLOAT16 else "<f4"
    out = np.ascontiguousarray(array, dtype=np_dtype)
    return vitserve_pb2.Tensor(data=out.tobytes(), shape=list(out.shape), dtype=dtype or vitserve_pb2.FLOAT32)


def image_means(images) -> np.ndarray:
    """Each image's mean pixel value (raw frames only; encoded images count as their byte length)."""
    return np.array([np.frombuffer(im.raw.data, np.uint8).mean() if im.HasField("raw") else len(im.encoded)
                     for im in images], np.float32)


class FakeEncoder(vitserve_pb2_grpc.VisionEncoderServicer):
    """Answers with tensors derived from the request so tests can check what was sent."""

    def __init__(self) -> None:
        self.requests: list = []
        self.metadata: list[dict] = []

    def Embed(self, request, context):
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if request.model == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown model 'missing'; available: fake")
        emb = np.repeat(image_means(request.images)[:, None], EMBED_DIM, axis=1)
        if request.l2_normalize:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return vitserve_pb2.EmbedResponse(embeddings=tensor(emb, request.dtype),
                                          model=vitserve_pb2.ModelRef(name="fake", version="1"), source="cls")

    def Features(self, request, context):
        self.requests.append(request)
        if any(im.HasField("encoded") and im.encoded.startswith(b"bad") for im in request.images):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image 0: cannot decode (not a PNG/JPEG/WebP/BMP file)")
        n = len(request.images)
        tokens = np.arange(n * GRID[0] * GRID[1] * EMBED_DIM, dtype=np.float32).reshape(n, -1, EMBED_DIM)
        if request.layout != vitserve_pb2.FeaturesRequest.TOKENS:
            tokens = tokens.reshape(n, GRID[0], GRID[1], EMBED_DIM)
        response = vitserve_pb2.FeaturesResponse(
            features=tensor(tokens, request.dtype), grid_height=GRID[0], grid_width=GRID[1], patch_size=4,
            num_prefix_tokens=1, layout=request.layout or vitserve_pb2.FeaturesRequest.GRID,
            model=vitserve_pb2.ModelRef(name="fake", version="1", weights_sha256="f" * 64),
            preprocessing=vitserve_pb2.Preprocessing(height=28, width=28, channels=1, resize_mode="bilinear"),
            timing=vitserve_pb2.Timing(decode_ms=0.5, inference_ms=1.0, total_ms=2.0), source="patch tokens")
        if request.include_cls:
            response.cls.CopyFrom(tensor(np.ones((n, EMBED_DIM)), request.dtype))
        return response

    def ListModels(self, request, context):
        info = vitserve_pb2.ModelInfo(
            model=vitserve_pb2.ModelRef(name="fake", version="1"), ready=True, input_height=28,
            input_width=28, input_channels=1, embed_dim=EMBED_DIM, grid_height=GRID[0], grid_width=GRID[1],
            patch_size=4, num_prefix_tokens=1, encoder_spec_json=json.dumps({"embed_dim": EMBED_DIM}),
            manifest_json=json.dumps({"format_version": 1}))
        return vitserve_pb2.ListModelsResponse(models=[info])

    def _control(self, request, context, state: str):
        self.requests.append(request)
        if request.model == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no model 'missing' in the repository")
        return vitserve_pb2.ModelControlResponse(model=request.model, state=state, elapsed_ms=1.5,
                                                 served_models=["fake"] if state == "READY" else [])

    def LoadModel(self, request, context):
        return self._control(request, context, "READY")

    def UnloadModel(self, request, context):
        return self._control(request, context, "UNAVAILABLE")

    def ReloadModel(self, request, context):
        return self._control(request, context, "READY")

    def ListRepository(self, request, context):
        return vitserve_pb2.ListRepositoryResponse(models=[
            vitserve_pb2.RepositoryModel(name="fake", version="1", state="READY"),
            vitserve_pb2.RepositoryModel(name="other", state="UNAVAILABLE", reason="unloaded")])


@pytest.fixture(scope="module")
def fake_service() -> Iterator[tuple[str, FakeEncoder]]:
    """``(target, servicer)`` of a fake service on a free loopback port; always stopped."""
    servicer = FakeEncoder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    vitserve_pb2_grpc.add_VisionEncoderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)
