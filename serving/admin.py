"""Model management: load, unload and reload Triton models, and list its repository (``--enable-admin``).

Off by default (every call UNIMPLEMENTED): loading and unloading needs Triton under explicit model
control, which ``vitserve serve --enable-admin`` starts it with. After each call the model list is
re-read and the models Triton has loaded are reported (``on_models_loaded``: the launcher's restart set).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import grpc

from protos import vitserve_pb2
from serving.errors import RequestError
from serving.registry import ModelRegistry

log = logging.getLogger(__name__)

UNLOAD_WAIT_S = 60.0  # how long a call waits for Triton to finish (un)loading before answering
ADMIN_DISABLED = ("model management is off on this server; start it with `vitserve serve --enable-admin` "
                  "(Triton then runs with explicit model control)")
OnModelsLoaded = Callable[[list[str]], None]


class ModelAdmin:
    """The admin RPCs over one Triton server; every method raises ``RequestError``."""

    def __init__(self, registry: ModelRegistry, *, enabled: bool = False,
                 on_models_loaded: OnModelsLoaded | None = None) -> None:
        self.registry = registry
        self.backend = registry.backend
        self.enabled = enabled
        self.on_models_loaded = on_models_loaded

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise RequestError(grpc.StatusCode.UNIMPLEMENTED, ADMIN_DISABLED)

    async def load(self, name: str) -> vitserve_pb2.ModelControlResponse:
        """Load model ``name`` (every version its policy selects) and answer once it is READY."""
        return await self._control(name, "load")

    async def unload(self, name: str) -> vitserve_pb2.ModelControlResponse:
        """Unload model ``name``; Triton finishes its calls in flight first."""
        return await self._control(name, "unload")

    async def reload(self, name: str) -> vitserve_pb2.ModelControlResponse:
        """Load a loaded model ``name`` again (new files or versions); FAILED_PRECONDITION if it is not loaded."""
        return await self._control(name, "reload")

    async def list_repository(self) -> vitserve_pb2.ListRepositoryResponse:
        """Every model version in Triton's repository with its state (loaded or not)."""
        self._check_enabled()
        index = await self.backend.repository_index()
        return vitserve_pb2.ListRepositoryResponse(models=[
            vitserve_pb2.RepositoryModel(name=str(m.get("name", "")), version=str(m.get("version", "")),
                                         state=str(m.get("state", "")), reason=str(m.get("reason", "")))
            for m in sorted(index, key=lambda m: (str(m.get("name")), str(m.get("version"))))])

    async def _repository_entry(self, name: str) -> dict[str, Any]:
        """The repository index entry of ``name``; NOT_FOUND if the repository has no such model."""
        if not name:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "set `model` to the model's name")
        index = await self.backend.repository_index()
        entries = [m for m in index if m.get("name") == name]
        if not entries:
            known = ", ".join(sorted({str(m.get("name")) for m in index})) or "none"
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"no model {name!r} in Triton's model repository (it has: {known})")
        return max(entries, key=lambda m: int(m.get("version") or 0))

    async def _control(self, name: str, action: str) -> vitserve_pb2.ModelControlResponse:
        self._check_enabled()
        t0 = time.perf_counter()
        entry = await self._repository_entry(name)
        if action == "reload" and entry.get("state") != "READY":
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model {name!r} is not loaded (state {entry.get('state') or 'never loaded'}); "
                               f"use LoadModel")
        try:
            await self.backend.control(name, action)
        except RequestError:
            await self._refresh_quietly()
            raise
        state = (await self._repository_entry(name)).get("state", "")
        deadline = time.monotonic() + UNLOAD_WAIT_S
        while state in ("UNLOADING", "LOADING") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # Triton unloads in the background once in-flight calls finish
            state = (await self._repository_entry(name)).get("state", "")
        await self._refresh_quietly()
        log.info("admin: %s %s done in %.0f ms (state %s)", action, name, 1e3 * (time.perf_counter() - t0), state)
        models = self.registry.models
        response = vitserve_pb2.ModelControlResponse(
            model=name, state=state, elapsed_ms=1e3 * (time.perf_counter() - t0), served_models=sorted(models))
        if name in models:
            response.info.CopyFrom(self.registry.info(models[name]))
        return response

    async def _refresh_quietly(self) -> None:
        try:
            await self.registry.refresh()
            if self.on_models_loaded is not None:
                self.on_models_loaded(self.registry.ready_names)
        except RequestError as e:
            log.warning("could not refresh the model list after a model control call: %s", e.message)
