"""The ``vitserve.v1.VisionEncoder`` gRPC service in front of Triton (``grpc.aio``).

The gateway validates and decodes images, calls Triton through ``tritonclient.grpc.aio`` and answers
with typed, self-describing tensors. Requests larger than a model's ``max_batch_size`` are split
into several Triton calls (sent concurrently, so Triton's dynamic batcher can interleave them) and
the results concatenated; only requests over ``max_images`` are refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NoReturn, Sequence

import grpc
import numpy as np
import tritonclient.grpc.aio as tritonaio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from protos import vitserve_pb2, vitserve_pb2_grpc
from serving.catalog import CLS_OUTPUT, INPUT_NAME, PATCH_OUTPUT, CatalogError, ServedModel, model_from_config
from serving.images import DEFAULT_MAX_PIXELS, RESIZE_MODE, ImageError, PreparedBatch, prepare_batch

log = logging.getLogger(__name__)

SERVICE_NAME = vitserve_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name
DEFAULT_MAX_IMAGES = 1024
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_NP_DTYPES = {vitserve_pb2.FLOAT32: "<f4", vitserve_pb2.FLOAT16: "<f2",
              vitserve_pb2.DTYPE_UNSPECIFIED: "<f4"}
_TRITON_CODES = {"UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
                 "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
                 "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED}
_PATCH_SOURCE = "patch tokens of the last block after the final norm"


class GatewayError(RuntimeError):
    """The gateway cannot start: Triton unreachable, no models, or a model it cannot serve."""


def to_tensor(array: np.ndarray, dtype: int) -> vitserve_pb2.Tensor:
    """A float array as a little-endian ``Tensor`` in the requested dtype (fp32 or fp16)."""
    np_dtype = _NP_DTYPES.get(dtype)
    if np_dtype is None:
        raise ValueError(f"unknown dtype {dtype}")
    out = np.ascontiguousarray(array, dtype=np_dtype)
    return vitserve_pb2.Tensor(data=out.tobytes(), shape=list(out.shape),
                               dtype=dtype or vitserve_pb2.FLOAT32)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``[N, D]`` scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


def _triton_status(e: InferenceServerException) -> grpc.StatusCode:
    status = str(e.status() or "")
    return next((code for name, code in _TRITON_CODES.items() if name in status), grpc.StatusCode.INTERNAL)


class VisionEncoderGateway(vitserve_pb2_grpc.VisionEncoderServicer):
    """Serves every ready vitserve model of one Triton server."""

    def __init__(self, triton_url: str, *, max_images: int = DEFAULT_MAX_IMAGES,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.triton_url = triton_url
        self.max_images = max_images
        self.max_pixels = max_pixels
        self.models: dict[str, ServedModel] = {}
        self._client: tritonaio.InferenceServerClient | None = None
        self._last_refresh = 0.0

    @property
    def client(self) -> tritonaio.InferenceServerClient:
        if self._client is None:
            self._client = tritonaio.InferenceServerClient(self.triton_url)
        return self._client

    async def connect(self, timeout: float = 30.0) -> list[ServedModel]:
        """Wait for Triton to be ready and learn its models; raises ``GatewayError`` if none."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if await self.client.is_server_ready():
                    models = await self.refresh()
                    if not models:
                        raise GatewayError(f"Triton at {self.triton_url} has no ready models")
                    return models
            except InferenceServerException as e:
                last = e
            await asyncio.sleep(0.2)
        raise GatewayError(f"Triton at {self.triton_url} was not ready within {timeout:.0f}s ({last})")

    async def refresh(self) -> list[ServedModel]:
        """Re-read the repository index and the config of every ready model."""
        self._last_refresh = time.monotonic()
        index = await self.client.get_model_repository_index(as_json=True)
        models: dict[str, ServedModel] = {}
        for entry in index.get("models", []):
            if entry.get("state") != "READY":
                continue
            name, ver = entry["name"], str(entry.get("version", ""))
            response = await self.client.get_model_config(name, ver, as_json=True)
            try:
                models[name] = model_from_config(response["config"], ver)
            except CatalogError as e:
                log.warning("not serving %s: %s", name, e)
        if sorted(models) != sorted(self.models):
            log.info("serving models: %s", ", ".join(sorted(models)) or "(none)")
        self.models = models
        return list(models.values())

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def is_triton_ready(self) -> bool:
        try:
            return bool(await self.client.is_server_ready(client_timeout=2.0))
        except InferenceServerException:
            return False

    # -- request handling -------------------------------------------------------------------

    async def _resolve(self, name: str, context: grpc.aio.ServicerContext) -> ServedModel:
        if not name:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            if not self.models:
                await _abort(context, grpc.StatusCode.UNAVAILABLE, "no models are loaded")
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"several models are served ({', '.join(sorted(self.models))}); set `model`")
        if name not in self.models and time.monotonic() - self._last_refresh > 1.0:
            try:  # a model may have been loaded since the last look
                await self.refresh()
            except InferenceServerException as e:
                log.warning("could not refresh the model list: %s", e)
        if name not in self.models:
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                         f"unknown model {name!r}; available: {', '.join(sorted(self.models)) or 'none'}")
        return self.models[name]

    async def _check_enums(self, context: grpc.aio.ServicerContext, dtype: int, layout: int = 0) -> None:
        # proto3 enums are open: a newer client may send values this gateway does not know.
        if dtype not in _NP_DTYPES:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"unknown dtype {dtype}; use FLOAT32 or FLOAT16")
        if layout not in vitserve_pb2.FeaturesRequest.Layout.values():
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"unknown layout {layout}; use GRID or TOKENS")

    async def _decode(self, images: Sequence[vitserve_pb2.Image], model: ServedModel,
                      context: grpc.aio.ServicerContext) -> PreparedBatch:
        if not images:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "no images in the request")
        if len(images) > self.max_images:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"{len(images)} images is over the limit of {self.max_images} per request; "
                         f"split the request")
        try:
            if all(im.WhichOneof("source") == "raw" for im in images) and len(images) <= 8:
                return prepare_batch(images, model.geometry, self.max_pixels)  # cheap: no thread hop
            return await asyncio.to_thread(prepare_batch, images, model.geometry, self.max_pixels)
        except ImageError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def _infer(self, model: ServedModel, pixels: np.ndarray, outputs: Sequence[str],
                     context: grpc.aio.ServicerContext) -> dict[str, np.ndarray]:
        """Run ``pixels`` ``[N, H, W, C]`` through Triton in chunks of ``max_batch_size``."""
        remaining = context.time_remaining()
        chunks = [pixels[i:i + model.max_batch_size] for i in range(0, len(pixels), model.max_batch_size)]

        async def one(chunk: np.ndarray) -> Any:
            inp = InferInput(INPUT_NAME, list(chunk.shape), "UINT8")
            inp.set_data_from_numpy(np.ascontiguousarray(chunk))
            return await self.client.infer(
                model.name, [inp], model_version=model.version,
                outputs=[InferRequestedOutput(o) for o in outputs], client_timeout=remaining)

        try:
            results = await asyncio.gather(*(one(c) for c in chunks))
        except InferenceServerException as e:
            code = _triton_status(e)
            log.warning("triton call for %s failed (%s): %s", model.name, code.name, e.message())
            await _abort(context, code, f"triton: {e.message()}")
        return {o: np.concatenate([r.as_numpy(o) for r in results]) for o in outputs}

    def _preprocessing(self, model: ServedModel, batch: PreparedBatch) -> vitserve_pb2.Preprocessing:
        g = model.geometry
        return vitserve_pb2.Preprocessing(height=g.height, width=g.width, channels=g.channels,
                                          resized=batch.resized, converted=batch.converted,
                                          resize_mode=RESIZE_MODE, normalization=model.normalization)

    async def Embed(self, request: vitserve_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> vitserve_pb2.EmbedResponse:
        t0 = time.perf_counter()
        await self._check_enums(context, request.dtype)
        model = await self._resolve(request.model, context)
        batch = await self._decode(request.images, model, context)
        t1 = time.perf_counter()
        out = await self._infer(model, batch.pixels, [CLS_OUTPUT], context)
        t2 = time.perf_counter()
        emb = out[CLS_OUTPUT].astype(np.float32, copy=False)
        if request.l2_normalize:
            emb = l2_normalize(emb)
        return vitserve_pb2.EmbedResponse(
            embeddings=to_tensor(emb, request.dtype), model=model.ref(),
            preprocessing=self._preprocessing(model, batch), source="cls",
            timing=vitserve_pb2.Timing(decode_ms=1e3 * (t1 - t0), inference_ms=1e3 * (t2 - t1),
                                       total_ms=1e3 * (time.perf_counter() - t0)))

    async def Features(self, request: vitserve_pb2.FeaturesRequest,
                       context: grpc.aio.ServicerContext) -> vitserve_pb2.FeaturesResponse:
        t0 = time.perf_counter()
        await self._check_enums(context, request.dtype, request.layout)
        model = await self._resolve(request.model, context)
        batch = await self._decode(request.images, model, context)
        t1 = time.perf_counter()
        names = [PATCH_OUTPUT, CLS_OUTPUT] if request.include_cls else [PATCH_OUTPUT]
        out = await self._infer(model, batch.pixels, names, context)
        t2 = time.perf_counter()
        tokens = out[PATCH_OUTPUT]  # [N, h*w, D]
        layout = request.layout or vitserve_pb2.FeaturesRequest.GRID
        if layout == vitserve_pb2.FeaturesRequest.GRID:
            tokens = tokens.reshape(len(tokens), model.grid[0], model.grid[1], model.embed_dim)
        described = model.manifest.get("outputs", {}).get(PATCH_OUTPUT, {}).get("description")
        response = vitserve_pb2.FeaturesResponse(
            features=to_tensor(tokens, request.dtype), grid_height=model.grid[0],
            grid_width=model.grid[1], patch_size=model.patch_size,
            num_prefix_tokens=model.num_prefix_tokens, layout=layout, model=model.ref(),
            preprocessing=self._preprocessing(model, batch), source=described or _PATCH_SOURCE)
        if request.include_cls:
            response.cls.CopyFrom(to_tensor(out[CLS_OUTPUT], request.dtype))
        response.timing.CopyFrom(vitserve_pb2.Timing(
            decode_ms=1e3 * (t1 - t0), inference_ms=1e3 * (t2 - t1),
            total_ms=1e3 * (time.perf_counter() - t0)))
        return response

    async def ListModels(self, request: vitserve_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> vitserve_pb2.ListModelsResponse:
        try:
            await self.refresh()
        except InferenceServerException as e:
            await _abort(context, _triton_status(e), f"triton: {e.message()}")
        return vitserve_pb2.ListModelsResponse(
            models=[m.info(ready=True) for _, m in sorted(self.models.items())])


async def watch_triton(gateway: VisionEncoderGateway, health_servicer: health.aio.HealthServicer,
                       interval: float = 2.0) -> None:
    """Keep the health status in step with Triton's readiness (NOT_SERVING while it is down)."""
    serving = True
    while True:
        await asyncio.sleep(interval)
        ready = await gateway.is_triton_ready()
        if ready != serving:
            serving = ready
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            log.warning("triton at %s is %s", gateway.triton_url, "ready again" if ready else "not ready")
            for service in ("", SERVICE_NAME):
                await health_servicer.set(service, status)


def create_server(gateway: VisionEncoderGateway, host: str = "127.0.0.1",
                  port: int = 0) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A ``grpc.aio`` server with the gateway, health (NOT_SERVING until set) and reflection."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    vitserve_pb2_grpc.add_VisionEncoderServicer_to_server(gateway, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise GatewayError(f"cannot bind the gateway to {address}")
    return server, health_servicer, bound


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool = True) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, status)
