"""The request layer of the gateway, independent of the transport: Embed, Features, ListModels, GetModel.

``EncoderService`` validates a request, picks the model entry that runs it (``serving.registry``),
decodes and prepares its images, calls Triton (``serving.triton_backend``) and builds the response
(``serving.responses``). Every refusal is a ``serving.errors.RequestError``; the gRPC servicer and the
HTTP API turn it into their own statuses.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Sequence

import grpc

from protos import vitserve_pb2
from serving.catalog import ServedModel
from serving.errors import Remaining, RequestError
from serving.images import DEFAULT_MAX_PIXELS, ImageError
from serving.pooling import POOLING, check_enums, pooling_outputs
from serving.preprocess import PreparedBatch, prepare_batch, resolve_op
from serving.registry import ModelRegistry
from serving.responses import embed_response, features_outputs, features_response, layer_outputs
from serving.triton_backend import OnBatch, TritonBackend

DEFAULT_MAX_IMAGES = 1024
_INLINE_DECODE_IMAGES = 8  # raw frames up to this many are prepared on the event loop (no thread hop)


@dataclass(frozen=True)
class ServiceOptions:
    """What the request layer enforces and reports (``vitserve serve`` flags)."""

    max_images: int = DEFAULT_MAX_IMAGES  # images per request; more: INVALID_ARGUMENT
    max_pixels: int = DEFAULT_MAX_PIXELS  # pixels per image, checked on the declared size before decoding
    on_batch: OnBatch | None = None  # told (model, images) of every Triton call (the metrics)


class EncoderService:
    """Serves every ready vitserve model of one Triton server."""

    def __init__(self, triton_url: str, options: ServiceOptions | None = None) -> None:
        self.options = options or ServiceOptions()
        self.backend = TritonBackend(triton_url, on_batch=self.options.on_batch)
        self.registry = ModelRegistry(self.backend)

    @property
    def triton_url(self) -> str:
        return self.backend.url

    async def connect(self, timeout: float = 30.0) -> list[ServedModel]:
        """Wait for Triton and learn its models (``GatewayError`` if none are ready in time)."""
        return await self.registry.connect(timeout)

    async def close(self) -> None:
        await self.backend.close()

    async def embed(self, request: vitserve_pb2.EmbedRequest, remaining: Remaining,
                    arrived: float | None = None) -> vitserve_pb2.EmbedResponse:
        """Global vectors ``[N, D]`` (or ``[N, 2D]``) of the request's images."""
        t0 = time.perf_counter()
        arrived = t0 if arrived is None else arrived
        check_enums(request.dtype, pooling=request.pooling, lane=request.lane)
        pooling = request.pooling or POOLING.CLS
        model = await self.registry.resolve_request(request)
        batch = await self._decode(request.images, model, request.resize_op)
        t1 = time.perf_counter()
        out = await self.backend.infer(model, batch.pixels, pooling_outputs(pooling), remaining)
        t2 = time.perf_counter()
        return embed_response(model, batch, out, request, pooling, (arrived, t0, t1, t2))

    async def features(self, request: vitserve_pb2.FeaturesRequest, remaining: Remaining,
                       arrived: float | None = None, stream: bool = False) -> vitserve_pb2.FeaturesResponse:
        """Patch features of the request's images (``stream``: a StreamFeatures frame, which prefers
        the latency lane)."""
        t0 = time.perf_counter()
        arrived = t0 if arrived is None else arrived
        check_enums(request.dtype, request.layout, lane=request.lane)
        model = await self.registry.resolve_request(request, stream=stream)
        batch = await self._decode(request.images, model, request.resize_op)
        t1 = time.perf_counter()
        layers = layer_outputs(model, request)
        out = await self.backend.infer(model, batch.pixels, features_outputs(layers, request), remaining)
        t2 = time.perf_counter()
        return features_response(model, batch, out, request, layers, (arrived, t0, t1, t2))

    async def list_models(self) -> vitserve_pb2.ListModelsResponse:
        """Every served model (the model list re-read from Triton first)."""
        await self.registry.refresh()
        return vitserve_pb2.ListModelsResponse(
            models=[self.registry.info(m) for _, m in sorted(self.registry.models.items())])

    async def get_model(self, name: str) -> vitserve_pb2.ModelInfo:
        """The description of model ``name`` (empty: the only one served)."""
        return self.registry.info(await self.registry.resolve(name))

    async def _decode(self, images: Sequence[vitserve_pb2.Image], model: ServedModel,
                      resize_op: int = 0) -> PreparedBatch:
        """The request's images as the model's ``[N, H, W, C]`` uint8 input (INVALID_ARGUMENT if not)."""
        try:
            op = resolve_op(resize_op, model.preprocess)
        except ValueError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        if not images:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "no images in the request")
        if len(images) > self.options.max_images:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{len(images)} images is over the limit of {self.options.max_images} per request; "
                               f"split the request")
        try:
            args = (images, model.geometry, model.preprocess, op, self.options.max_pixels)
            if all(im.WhichOneof("source") == "raw" for im in images) and len(images) <= _INLINE_DECODE_IMAGES:
                return prepare_batch(*args)  # cheap: no thread hop
            return await asyncio.to_thread(prepare_batch, *args)
        except ImageError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
