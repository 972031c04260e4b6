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
from typing import Any, AsyncIterator, Callable, NoReturn, Sequence

import grpc
import numpy as np
import tritonclient.grpc.aio as tritonaio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from contract.tensors import NUMPY_DTYPES, to_tensor
from protos import vitserve_pb2, vitserve_pb2_grpc
from serving.catalog import CLS_OUTPUT, INPUT_NAME, PATCH_OUTPUT, CatalogError, ServedModel, model_from_config
from serving.errors import GatewayError, RequestError
from serving.images import DEFAULT_MAX_PIXELS, ImageError
from serving.preprocess import PreparedBatch, prepare_batch, resolve_op
from serving.routing import choose_bucket, image_sizes, version_key
from serving.streaming import Remaining, stream_features

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGES = 1024
_TRITON_CODES = {"UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
                 "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
                 "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED}
# tritonclient's defaults plus a short reconnect backoff: after Triton restarts (the launcher's
# supervisor brings it back on the same port) the channel reconnects within a second instead of
# gRPC's default backoff of up to two minutes.
_TRITON_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.keepalive_time_ms", 2**31 - 1), ("grpc.keepalive_timeout_ms", 20000),
    ("grpc.keepalive_permit_without_calls", False), ("grpc.http2.max_pings_without_data", 2),
    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000)]
REGISTERS_OUTPUT = "registers"
_PATCH_SOURCE = "patch tokens of the last block after the final norm"
_POOLING = vitserve_pb2.EmbedRequest.Pooling
_POOLING_SOURCE = {_POOLING.CLS: "cls", _POOLING.MEAN_PATCH: "mean_patch",
                   _POOLING.CLS_AND_MEAN_PATCH: "cls+mean_patch"}
_LANE_NAMES = {vitserve_pb2.THROUGHPUT: "throughput", vitserve_pb2.LATENCY: "latency"}
UNLOAD_WAIT_S = 60.0  # how long UnloadModel waits for Triton to finish unloading before answering
ADMIN_DISABLED = ("model management is off on this server; start it with `vitserve serve --enable-admin` "
                  "(Triton then runs with explicit model control)")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``[N, D]`` scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps)


def pool_embeddings(cls: np.ndarray | None, patches: np.ndarray | None, pooling: int,
                    normalize: bool) -> tuple[np.ndarray, str]:
    """Global vectors from CLS ``[N, D]`` and patch tokens ``[N, h*w, D]``: ``([N, D or 2D], source)``.

    ``CLS_AND_MEAN_PATCH`` concatenates ``[CLS | mean]``; with ``normalize`` each half is unit-norm.
    """
    parts: list[np.ndarray] = []
    if pooling in (_POOLING.CLS, _POOLING.CLS_AND_MEAN_PATCH):
        assert cls is not None
        parts.append(cls.astype(np.float32, copy=False))
    if pooling in (_POOLING.MEAN_PATCH, _POOLING.CLS_AND_MEAN_PATCH):
        assert patches is not None
        parts.append(patches.astype(np.float32, copy=False).mean(axis=1))
    if normalize:
        parts = [l2_normalize(p) for p in parts]
    return np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0], _POOLING_SOURCE[pooling]


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


def _triton_status(e: InferenceServerException) -> grpc.StatusCode:
    status = str(e.status() or "")
    return next((code for name, code in _TRITON_CODES.items() if name in status), grpc.StatusCode.INTERNAL)


def _check_enums(dtype: int, layout: int = 0, pooling: int = 0, lane: int = 0) -> None:
    # proto3 enums are open: a newer client may send values this gateway does not know.
    if lane not in vitserve_pb2.Lane.values():
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown lane {lane}; use THROUGHPUT or LATENCY")
    if dtype not in NUMPY_DTYPES:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown dtype {dtype}; use FLOAT32 or FLOAT16")
    if layout not in vitserve_pb2.FeaturesRequest.Layout.values():
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown layout {layout}; use GRID or TOKENS")
    if pooling not in _POOLING.values():
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"unknown pooling {pooling}; use CLS, MEAN_PATCH or CLS_AND_MEAN_PATCH")


class VisionEncoderGateway(vitserve_pb2_grpc.VisionEncoderServicer):
    """Serves every ready vitserve model of one Triton server."""

    def __init__(self, triton_url: str, *, max_images: int = DEFAULT_MAX_IMAGES,
                 max_pixels: int = DEFAULT_MAX_PIXELS, enable_admin: bool = False) -> None:
        self.triton_url = triton_url
        self.max_images = max_images
        self.max_pixels = max_pixels
        self.enable_admin = enable_admin
        self.in_flight_limit: Any = None  # serving.interceptors.InFlightLimit, set by create_server
        self.models: dict[str, ServedModel] = {}
        self.versions: dict[str, dict[str, ServedModel]] = {}  # name -> version -> model (all ready)
        self.ready_names: list[str] = []  # every model Triton has READY at the last refresh (served or not)
        self._client: tritonaio.InferenceServerClient | None = None
        self._last_refresh = 0.0
        self.on_batch: Callable[[str, int], None] | None = None  # (model, images) per Triton call
        self.on_frame: Callable[[str, str], None] | None = None  # (model, "ran"|"skipped"|"error")
        # Told the models Triton has loaded after each admin load/unload/reload (the launcher's restart set).
        self.on_models_loaded: Callable[[list[str]], None] | None = None

    @property
    def client(self) -> tritonaio.InferenceServerClient:
        if self._client is None:
            self._client = tritonaio.InferenceServerClient(self.triton_url, channel_args=_TRITON_CHANNEL_ARGS)
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
        """Re-read the repository index and the config of every ready model (every ready version).

        ``models`` maps each name to its newest ready version (what a request without a version
        gets); ``versions`` maps each name to all its ready versions.
        """
        self._last_refresh = time.monotonic()
        index = await self.client.get_model_repository_index(as_json=True)
        ready: dict[str, list[str]] = {}
        for entry in index.get("models", []):
            if entry.get("state") == "READY":
                ready.setdefault(entry["name"], []).append(str(entry.get("version", "")))
        models: dict[str, ServedModel] = {}
        versions: dict[str, dict[str, ServedModel]] = {}
        for name, vers in ready.items():
            vers = sorted(set(vers), key=version_key)
            # One config serves every version of a model; it is read once, at the newest.
            response = await self.client.get_model_config(name, vers[-1], as_json=True)
            try:
                versions[name] = {v: model_from_config(response["config"], v) for v in vers}
            except CatalogError as e:
                log.warning("not serving %s: %s", name, e)
                continue
            models[name] = versions[name][vers[-1]]
        if sorted(models) != sorted(self.models):
            log.info("serving models: %s", ", ".join(sorted(models)) or "(none)")
        self.models, self.versions, self.ready_names = models, versions, sorted(ready)
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

    # -- request handling (raises RequestError) ----------------------------------------------

    async def resolve(self, name: str) -> ServedModel:
        """The served model called ``name`` (empty: the only one)."""
        if not name:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            if not self.models:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "no models are loaded")
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"several models are served ({', '.join(sorted(self.models))}); set `model`")
        if name not in self.models and time.monotonic() - self._last_refresh > 1.0:
            try:  # a model may have been loaded since the last look
                await self.refresh()
            except InferenceServerException as e:
                log.warning("could not refresh the model list: %s", e)
        if name not in self.models:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"unknown model {name!r}; available: {', '.join(sorted(self.models)) or 'none'}")
        return self.models[name]

    async def resolve_lane(self, name: str, lane: int, stream: bool = False) -> ServedModel:
        """The model that runs a request for ``name`` on ``lane``.

        ``LANE_UNSPECIFIED`` is the named model itself, except on a stream, which goes to the
        latency lane when the model declares one. A lane the model does not declare is
        INVALID_ARGUMENT; a declared lane whose model is not loaded is UNAVAILABLE.
        """
        model = await self.resolve(name)
        if lane == vitserve_pb2.LANE_UNSPECIFIED:
            # A stream prefers the latency lane, but falls back to the model itself when that
            # lane's model is not loaded (the caller did not ask for a lane).
            target = model.lanes.get("latency", model.name) if stream else model.name
            return self.models.get(target, model)
        lane_name = _LANE_NAMES[lane]
        target = model.lanes.get(lane_name)
        if target is None:
            declared = ", ".join(f"{k}: {v}" for k, v in sorted(model.lanes.items())) or "none"
            hint = " (`vitserve export --lanes` writes both lanes)"
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"model {model.name!r} declares no {lane_name} lane (its lanes: {declared}){hint}; "
                               f"leave `lane` unset to use the model itself")
        if target == model.name:
            return model
        try:
            return await self.resolve(target)
        except RequestError as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"the {lane_name} lane of {model.name!r} is model {target!r}, which is not "
                               f"loaded ({e.message})") from e

    async def resolve_request(self, request: vitserve_pb2.EmbedRequest | vitserve_pb2.FeaturesRequest,
                              stream: bool = False) -> ServedModel:
        """The model entry and version that run an Embed/Features request: its lane, resolution
        bucket (``bucket``) and ``version``."""
        bucket = request.bucket
        if not bucket:  # the common case first: one int test on the hot path
            model = await self.resolve_lane(request.model, request.lane, stream)
        elif bucket == vitserve_pb2.BUCKET_AUTO:
            model = await self._resolve_bucket(request.model, request.lane, request.images, stream)
        else:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"unknown bucket {bucket}; use BUCKET_UNSPECIFIED or BUCKET_AUTO")
        return await self.resolve_version(model, request.version) if request.version else model

    async def _resolve_bucket(self, name: str, lane: int, images: Sequence[vitserve_pb2.Image],
                              stream: bool) -> ServedModel:
        named = await self.resolve(name)
        buckets = named.buckets
        if not buckets:
            return await self.resolve_lane(name, lane, stream)  # one size: the model itself
        chosen = choose_bucket(buckets, image_sizes(images))
        if lane == vitserve_pb2.LANE_UNSPECIFIED and named.lane and not stream:
            lane = vitserve_pb2.LATENCY if named.lane == "latency" else vitserve_pb2.THROUGHPUT
        try:
            return await self.resolve_lane(chosen.model, lane, stream)
        except RequestError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"the {chosen.height}x{chosen.width} bucket of {named.name!r} is model "
                               f"{chosen.model!r}, which is not loaded ({e.message})") from e

    async def resolve_version(self, model: ServedModel, version: str) -> ServedModel:
        """``model`` at ``version`` if Triton has that version loaded (NOT_FOUND otherwise)."""
        if not version.isdigit() or int(version) < 1:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"version {version!r} is not a version number (an integer >= 1, e.g. \"2\")")
        version = str(int(version))
        found = self.versions.get(model.name, {}).get(version)
        if found is None and time.monotonic() - self._last_refresh > 1.0:
            try:  # a version may have been loaded since the last look
                await self.refresh()
            except InferenceServerException as e:
                log.warning("could not refresh the model list: %s", e)
            found = self.versions.get(model.name, {}).get(version)
        if found is None:
            loaded = ", ".join(self.versions.get(model.name, {})) or "none"
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model {model.name!r} has no version {version} loaded (loaded versions: {loaded}; "
                               f"Triton's version_policy decides which versions load: export --version-policy)")
        return found

    def versions_of(self, name: str) -> list[str]:
        """The loaded versions of ``name``, oldest first."""
        return list(self.versions.get(name, {})) or ([self.models[name].version] if name in self.models else [])

    def variants_of(self, name: str) -> list[str]:
        """Served precision variants whose manifest names ``name`` as their base model."""
        return sorted(m.name for m in self.models.values() if m.base_model == name)

    def calls_in_flight(self) -> int:
        return int(getattr(self.in_flight_limit, "in_flight", 0))

    def model_label(self, name: str) -> str:
        """The model a request names, as metrics label it (empty: the only one served, if one)."""
        if not name and len(self.models) == 1:
            return next(iter(self.models))
        return name if name in self.models else ("" if not name else "unknown")

    async def _decode(self, images: Sequence[vitserve_pb2.Image], model: ServedModel,
                      resize_op: int = 0) -> PreparedBatch:
        try:
            op = resolve_op(resize_op, model.preprocess)
        except ValueError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        if not images:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "no images in the request")
        if len(images) > self.max_images:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{len(images)} images is over the limit of {self.max_images} per request; "
                               f"split the request")
        try:
            args = (images, model.geometry, model.preprocess, op, self.max_pixels)
            if all(im.WhichOneof("source") == "raw" for im in images) and len(images) <= 8:
                return prepare_batch(*args)  # cheap: no thread hop
            return await asyncio.to_thread(prepare_batch, *args)
        except ImageError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e

    async def _infer(self, model: ServedModel, pixels: np.ndarray, outputs: Sequence[str],
                     remaining: Remaining) -> dict[str, np.ndarray]:
        """Run ``pixels`` ``[N, H, W, C]`` through Triton in chunks of ``max_batch_size``.

        The caller's deadline travels to Triton as ``client_timeout``; a request whose deadline has
        already passed (e.g. while it was decoded) is refused here and costs no inference.
        """
        left = remaining()
        if left is not None and left <= 0:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"the deadline passed {-left * 1e3:.0f} ms before inference; not run")
        chunks = [pixels[i:i + model.max_batch_size] for i in range(0, len(pixels), model.max_batch_size)]
        if self.on_batch is not None:
            for c in chunks:
                self.on_batch(model.name, len(c))

        async def one(chunk: np.ndarray) -> Any:
            inp = InferInput(INPUT_NAME, list(chunk.shape), "UINT8")
            inp.set_data_from_numpy(np.ascontiguousarray(chunk))
            return await self.client.infer(
                model.name, [inp], model_version=model.version,
                outputs=[InferRequestedOutput(o) for o in outputs], client_timeout=left)

        try:
            if len(chunks) == 1:  # the common case: no task to create and schedule
                only = await one(chunks[0])
                return {o: only.as_numpy(o) for o in outputs}
            results = await asyncio.gather(*(one(c) for c in chunks))
        except InferenceServerException as e:
            code = _triton_status(e)
            log.warning("triton call for %s failed (%s): %s", model.name, code.name, e.message())
            raise RequestError(code, f"triton: {e.message()}") from e
        return {o: np.concatenate([r.as_numpy(o) for r in results]) for o in outputs}

    def _preprocessing(self, model: ServedModel, batch: PreparedBatch) -> vitserve_pb2.Preprocessing:
        g = model.geometry
        return vitserve_pb2.Preprocessing(height=g.height, width=g.width, channels=g.channels,
                                          resized=batch.resized, converted=batch.converted,
                                          resize_mode=model.preprocess.interpolation,
                                          normalization=model.normalization, resize_op=batch.resize_op,
                                          images=batch.images, crop_pct=model.preprocess.crop_pct)

    @staticmethod
    def _timing(arrived: float, t0: float, t1: float, t2: float) -> vitserve_pb2.Timing:
        return vitserve_pb2.Timing(queue_ms=1e3 * (t0 - arrived), decode_ms=1e3 * (t1 - t0),
                                   inference_ms=1e3 * (t2 - t1), total_ms=1e3 * (time.perf_counter() - arrived))

    @staticmethod
    def _layer_outputs(model: ServedModel, request: vitserve_pb2.FeaturesRequest) -> list[str]:
        """The patch-token outputs a Features request asks for (INVALID_ARGUMENT if not exported)."""
        wanted = list(dict.fromkeys(request.outputs)) or [PATCH_OUTPUT]
        available = model.token_outputs
        unknown = [o for o in wanted if o not in available]
        if unknown:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"model {model.name!r} exports no patch-token output {', '.join(map(repr, unknown))}; "
                               f"it has {', '.join(available)} (export with --layers to add layers)")
        if request.include_registers and REGISTERS_OUTPUT not in model.outputs:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"model {model.name!r} exports no register tokens (export it with --registers; "
                               f"it has {model.num_prefix_tokens} prefix token(s))")
        return wanted

    async def embed(self, request: vitserve_pb2.EmbedRequest, remaining: Remaining,
                    arrived: float | None = None) -> vitserve_pb2.EmbedResponse:
        t0 = time.perf_counter()
        arrived = t0 if arrived is None else arrived
        _check_enums(request.dtype, pooling=request.pooling, lane=request.lane)
        pooling = request.pooling or _POOLING.CLS
        model = await self.resolve_request(request)
        batch = await self._decode(request.images, model, request.resize_op)
        t1 = time.perf_counter()
        names = [CLS_OUTPUT] if pooling == _POOLING.CLS else (
            [PATCH_OUTPUT] if pooling == _POOLING.MEAN_PATCH else [CLS_OUTPUT, PATCH_OUTPUT])
        out = await self._infer(model, batch.pixels, names, remaining)
        t2 = time.perf_counter()
        emb, source = pool_embeddings(out.get(CLS_OUTPUT), out.get(PATCH_OUTPUT), pooling, request.l2_normalize)
        return vitserve_pb2.EmbedResponse(
            embeddings=to_tensor(emb, request.dtype), model=model.ref(),
            preprocessing=self._preprocessing(model, batch), source=source, pooling=pooling,
            l2_normalized=request.l2_normalize, timing=self._timing(arrived, t0, t1, t2))

    async def features(self, request: vitserve_pb2.FeaturesRequest, remaining: Remaining,
                       arrived: float | None = None, stream: bool = False) -> vitserve_pb2.FeaturesResponse:
        t0 = time.perf_counter()
        arrived = t0 if arrived is None else arrived
        _check_enums(request.dtype, request.layout, lane=request.lane)
        model = await self.resolve_request(request, stream=stream)
        batch = await self._decode(request.images, model, request.resize_op)
        t1 = time.perf_counter()
        layers = self._layer_outputs(model, request)
        names = list(layers)
        if request.include_cls:
            names.append(CLS_OUTPUT)
        if request.include_registers:
            names.append(REGISTERS_OUTPUT)
        out = await self._infer(model, batch.pixels, names, remaining)
        t2 = time.perf_counter()
        layout = request.layout or vitserve_pb2.FeaturesRequest.GRID
        tensors = []
        for name in layers:
            tokens = out[name]  # [N, h*w, D]
            if layout == vitserve_pb2.FeaturesRequest.GRID:
                tokens = tokens.reshape(len(tokens), model.grid[0], model.grid[1], model.embed_dim)
            tensors.append(to_tensor(tokens, request.dtype))
        first = model.output_entry(layers[0]).get("description")
        response = vitserve_pb2.FeaturesResponse(
            features=tensors[0], grid_height=model.grid[0],
            grid_width=model.grid[1], patch_size=model.patch_size,
            num_prefix_tokens=model.num_prefix_tokens, layout=layout, model=model.ref(),
            preprocessing=self._preprocessing(model, batch),
            source=first or (_PATCH_SOURCE if layers[0] == PATCH_OUTPUT else layers[0]))
        for name, tensor in zip(layers, tensors):
            entry = model.output_entry(name)
            response.layers.add(name=name, block=int(entry.get("block", -1)),
                                final_norm=bool(entry.get("final_norm", name == PATCH_OUTPUT)),
                                description=str(entry.get("description", "")), features=tensor)
        if request.include_cls:
            response.cls.CopyFrom(to_tensor(out[CLS_OUTPUT], request.dtype))
        if request.include_registers:
            response.registers.CopyFrom(to_tensor(out[REGISTERS_OUTPUT], request.dtype))
        response.timing.CopyFrom(self._timing(arrived, t0, t1, t2))
        return response

    # -- RPCs ---------------------------------------------------------------------------------

    async def Embed(self, request: vitserve_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> vitserve_pb2.EmbedResponse:
        try:
            return await self.embed(request, context.time_remaining)
        except RequestError as e:
            await _abort(context, e.code, e.message)

    async def Features(self, request: vitserve_pb2.FeaturesRequest,
                       context: grpc.aio.ServicerContext) -> vitserve_pb2.FeaturesResponse:
        try:
            return await self.features(request, context.time_remaining)
        except RequestError as e:
            await _abort(context, e.code, e.message)

    async def ListModels(self, request: vitserve_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> vitserve_pb2.ListModelsResponse:
        try:
            await self.refresh()
        except InferenceServerException as e:
            await _abort(context, _triton_status(e), f"triton: {e.message()}")
        return vitserve_pb2.ListModelsResponse(
            models=[m.info(ready=True, variants=self.variants_of(n), versions=self.versions_of(n))
                    for n, m in sorted(self.models.items())])

    async def StreamFeatures(
            self, request_iterator: AsyncIterator[vitserve_pb2.StreamFeaturesRequest],
            context: grpc.aio.ServicerContext) -> AsyncIterator[vitserve_pb2.StreamFeaturesResponse]:
        async def run(request: vitserve_pb2.FeaturesRequest, remaining: Remaining,
                      arrived: float) -> vitserve_pb2.FeaturesResponse:
            return await self.features(request, remaining, arrived=arrived, stream=True)

        async for response in stream_features(run, request_iterator, context, self._frame_outcome):
            yield response

    async def GetModel(self, request: vitserve_pb2.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> vitserve_pb2.ModelInfo:
        try:
            model = await self.resolve(request.model)
        except RequestError as e:
            await _abort(context, e.code, e.message)
        return model.info(ready=True, variants=self.variants_of(model.name), versions=self.versions_of(model.name))

    # -- model management (admin) ---------------------------------------------------------------

    async def _admin_allowed(self, context: grpc.aio.ServicerContext) -> None:
        if not self.enable_admin:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED, ADMIN_DISABLED)

    async def repository_index(self) -> list[dict[str, Any]]:
        return list((await self.client.get_model_repository_index(as_json=True)).get("models", []))

    async def _repository_entry(self, name: str) -> dict[str, Any]:
        """The repository index entry of ``name``; NOT_FOUND if the repository has no such model."""
        if not name:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "set `model` to the model's name")
        index = await self.repository_index()
        entries = [m for m in index if m.get("name") == name]
        if not entries:
            known = ", ".join(sorted({str(m.get("name")) for m in index})) or "none"
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"no model {name!r} in Triton's model repository (it has: {known})")
        return max(entries, key=lambda m: int(m.get("version") or 0))

    async def _control(self, name: str, action: str) -> vitserve_pb2.ModelControlResponse:
        t0 = time.perf_counter()
        entry = await self._repository_entry(name)
        if action == "reload" and entry.get("state") != "READY":
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model {name!r} is not loaded (state {entry.get('state') or 'never loaded'}); "
                               f"use LoadModel")
        try:
            if action == "unload":
                await self.client.unload_model(name)
            else:
                await self.client.load_model(name)
        except InferenceServerException as e:
            message = e.message() or str(e)
            code = _triton_status(e)
            if "explicit model load / unload is not allowed" in message or "polling is enabled" in message:
                code = grpc.StatusCode.FAILED_PRECONDITION
                message += " (Triton must run with --model-control-mode=explicit; `vitserve serve " \
                           "--enable-admin` starts it so)"
            elif code == grpc.StatusCode.INTERNAL and action != "unload":
                code = grpc.StatusCode.FAILED_PRECONDITION  # the model's files do not load
            log.warning("admin %s of %s failed: %s", action, name, message)
            await self._refresh_quietly()
            raise RequestError(code, f"triton could not {action} {name!r}: {message}") from e
        state = (await self._repository_entry(name)).get("state", "")
        deadline = time.monotonic() + UNLOAD_WAIT_S
        while state in ("UNLOADING", "LOADING") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # Triton unloads in the background once in-flight calls finish
            state = (await self._repository_entry(name)).get("state", "")
        await self._refresh_quietly()
        log.info("admin: %s %s done in %.0f ms (state %s)", action, name, 1e3 * (time.perf_counter() - t0), state)
        response = vitserve_pb2.ModelControlResponse(
            model=name, state=state, elapsed_ms=1e3 * (time.perf_counter() - t0),
            served_models=sorted(self.models))
        if name in self.models:
            response.info.CopyFrom(self.models[name].info(True, self.variants_of(name), self.versions_of(name)))
        return response

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
            if self.on_models_loaded is not None:
                self.on_models_loaded(self.ready_names)
        except InferenceServerException as e:
            log.warning("could not refresh the model list after a model control call: %s", e)

    async def _admin(self, name: str, action: str,
                     context: grpc.aio.ServicerContext) -> vitserve_pb2.ModelControlResponse:
        await self._admin_allowed(context)
        try:
            return await self._control(name, action)
        except RequestError as e:
            await _abort(context, e.code, e.message)
        except InferenceServerException as e:
            await _abort(context, _triton_status(e), f"triton: {e.message()}")

    async def LoadModel(self, request: vitserve_pb2.ModelControlRequest,
                        context: grpc.aio.ServicerContext) -> vitserve_pb2.ModelControlResponse:
        return await self._admin(request.model, "load", context)

    async def UnloadModel(self, request: vitserve_pb2.ModelControlRequest,
                          context: grpc.aio.ServicerContext) -> vitserve_pb2.ModelControlResponse:
        return await self._admin(request.model, "unload", context)

    async def ReloadModel(self, request: vitserve_pb2.ModelControlRequest,
                          context: grpc.aio.ServicerContext) -> vitserve_pb2.ModelControlResponse:
        return await self._admin(request.model, "reload", context)

    async def ListRepository(self, request: vitserve_pb2.ListRepositoryRequest,
                             context: grpc.aio.ServicerContext) -> vitserve_pb2.ListRepositoryResponse:
        await self._admin_allowed(context)
        try:
            index = await self.repository_index()
        except InferenceServerException as e:
            await _abort(context, _triton_status(e), f"triton: {e.message()}")
        return vitserve_pb2.ListRepositoryResponse(models=[
            vitserve_pb2.RepositoryModel(name=str(m.get("name", "")), version=str(m.get("version", "")),
                                         state=str(m.get("state", "")), reason=str(m.get("reason", "")))
            for m in sorted(index, key=lambda m: (str(m.get("name")), str(m.get("version"))))])

    def _frame_outcome(self, frame: vitserve_pb2.StreamFeaturesRequest, outcome: str) -> None:
        if self.on_frame is not None:
            self.on_frame(self.model_label(frame.request.model), outcome)


__all__ = ["GatewayError", "RequestError", "VisionEncoderGateway", "l2_normalize", "pool_embeddings",
           "to_tensor"]
