"""The models one Triton serves now, and which of them runs a request: name, lane, bucket, version.

``ModelRegistry`` learns the ready models (every ready version) from Triton's repository index and
their configs (``serving.catalog``), re-reading them when a request names a model it does not know
yet. Resolution raises ``RequestError`` with the status a client can act on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Sequence

import grpc

from contract.names import LANES
from protos import vitserve_pb2
from serving.catalog import CatalogError, ServedModel, model_from_config
from serving.errors import GatewayError, RequestError
from serving.routing import choose_bucket, image_sizes, version_key
from serving.triton_backend import TritonBackend

log = logging.getLogger(__name__)

LANE_NAMES = {vitserve_pb2.Lane.Value(lane.upper()): lane for lane in LANES}  # THROUGHPUT -> "throughput"
LANES_BY_NAME = {name: lane for lane, name in LANE_NAMES.items()}
_LATENCY = LANE_NAMES[vitserve_pb2.LATENCY]
REFRESH_AFTER_S = 1.0  # an unknown name re-reads Triton's model list at most this often


class ModelRegistry:
    """The ready models of one Triton server and the routing of requests to them."""

    def __init__(self, backend: TritonBackend) -> None:
        self.backend = backend
        self.models: dict[str, ServedModel] = {}  # name -> newest ready version (a request without a version)
        self.versions: dict[str, dict[str, ServedModel]] = {}  # name -> version -> model (all ready)
        self.ready_names: list[str] = []  # every model Triton has READY at the last refresh (served or not)
        self._last_refresh = 0.0

    async def connect(self, timeout: float = 30.0) -> list[ServedModel]:
        """Wait for Triton to be ready and learn its models; raises ``GatewayError`` if none."""
        deadline = time.monotonic() + timeout
        last: RequestError | None = None
        while time.monotonic() < deadline:
            try:
                if await self.backend.server_ready():
                    models = await self.refresh()
                    if not models:
                        raise GatewayError(f"Triton at {self.backend.url} has no ready models")
                    return models
            except RequestError as e:
                last = e
            await asyncio.sleep(0.2)
        raise GatewayError(f"Triton at {self.backend.url} was not ready within {timeout:.0f}s "
                           f"({last.message if last else None})")

    async def refresh(self) -> list[ServedModel]:
        """Re-read the repository index and the config of every ready model (every ready version)."""
        self._last_refresh = time.monotonic()
        ready: dict[str, list[str]] = {}
        for entry in await self.backend.repository_index():
            if entry.get("state") == "READY":
                ready.setdefault(entry["name"], []).append(str(entry.get("version", "")))
        models: dict[str, ServedModel] = {}
        versions: dict[str, dict[str, ServedModel]] = {}
        for name, vers in ready.items():
            vers = sorted(set(vers), key=version_key)
            # One config serves every version of a model; it is read once, at the newest.
            config = await self.backend.model_config(name, vers[-1])
            try:
                versions[name] = {v: model_from_config(config, v) for v in vers}
            except CatalogError as e:
                log.warning("not serving %s: %s", name, e)
                continue
            models[name] = versions[name][vers[-1]]
        if sorted(models) != sorted(self.models):
            log.info("serving models: %s", ", ".join(sorted(models)) or "(none)")
        self.models, self.versions, self.ready_names = models, versions, sorted(ready)
        return list(models.values())

    async def _refresh_if_stale(self) -> None:
        """Re-read the model list unless that was done within ``REFRESH_AFTER_S`` (a model or version
        may have been loaded since the last look)."""
        if time.monotonic() - self._last_refresh <= REFRESH_AFTER_S:
            return
        try:
            await self.refresh()
        except RequestError as e:
            log.warning("could not refresh the model list: %s", e.message)

    def info(self, model: ServedModel) -> vitserve_pb2.ModelInfo:
        """``model``'s description with its served variants and loaded versions."""
        return model.info(ready=True, variants=self.variants_of(model.name), versions=self.versions_of(model.name))

    def versions_of(self, name: str) -> list[str]:
        """The loaded versions of ``name``, oldest first."""
        return list(self.versions.get(name, {})) or ([self.models[name].version] if name in self.models else [])

    def variants_of(self, name: str) -> list[str]:
        """Served precision variants whose manifest names ``name`` as their base model."""
        return sorted(m.name for m in self.models.values() if m.base_model == name)

    def model_label(self, name: str) -> str:
        """The model a request names, as metrics label it (empty: the only one served, if one)."""
        if not name and len(self.models) == 1:
            return next(iter(self.models))
        return name if name in self.models else ("" if not name else "unknown")

    # -- resolution (raises RequestError) ------------------------------------------------------

    async def resolve(self, name: str) -> ServedModel:
        """The served model called ``name`` (empty: the only one)."""
        if not name:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            if not self.models:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "no models are loaded")
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"several models are served ({', '.join(sorted(self.models))}); set `model`")
        if name not in self.models:
            await self._refresh_if_stale()
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
            target = model.lanes.get(_LATENCY, model.name) if stream else model.name
            return self.models.get(target, model)
        lane_name = LANE_NAMES[lane]
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
        if not named.buckets:
            return await self.resolve_lane(name, lane, stream)  # one size: the model itself
        chosen = choose_bucket(named.buckets, image_sizes(images))
        if lane == vitserve_pb2.LANE_UNSPECIFIED and named.lane and not stream:
            lane = LANES_BY_NAME[named.lane]
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
        if version not in self.versions.get(model.name, {}):
            await self._refresh_if_stale()
        found = self.versions.get(model.name, {}).get(version)
        if found is None:
            loaded = ", ".join(self.versions.get(model.name, {})) or "none"
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model {model.name!r} has no version {version} loaded (loaded versions: {loaded}; "
                               f"Triton's version_policy decides which versions load: export --version-policy)")
        return found
