"""The gateway's calls to Triton (``tritonclient.grpc.aio``), with Triton's errors as ``RequestError``.

Inference of a request larger than a model's ``max_batch_size`` is split into several Triton calls,
sent concurrently so Triton's dynamic batcher can interleave them, and the results concatenated.
The only module of the request path that talks to Triton; everything above it sees ``RequestError``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Sequence

import grpc
import numpy as np
import tritonclient.grpc.aio as tritonaio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from contract.names import INPUT_NAME
from serving.catalog import ServedModel
from serving.errors import Remaining, RequestError

log = logging.getLogger(__name__)

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
_EXPLICIT_CONTROL_NEEDED = ("explicit model load / unload is not allowed", "polling is enabled")

OnBatch = Callable[[str, int], None]  # (model, images) per Triton inference call


def triton_status(e: InferenceServerException) -> grpc.StatusCode:
    """The gRPC status a Triton error is answered with (INTERNAL unless it is one a client can act on)."""
    status = str(e.status() or "")
    return next((code for name, code in _TRITON_CODES.items() if name in status), grpc.StatusCode.INTERNAL)


def triton_error(e: InferenceServerException) -> RequestError:
    """A failed Triton call as the request error its caller answers with."""
    return RequestError(triton_status(e), f"triton: {e.message()}")


class TritonBackend:
    """One Triton server's gRPC endpoint: readiness, repository index, configs, inference, load/unload."""

    def __init__(self, url: str, on_batch: OnBatch | None = None) -> None:
        self.url = url
        self.on_batch = on_batch
        self._client: tritonaio.InferenceServerClient | None = None

    @property
    def client(self) -> tritonaio.InferenceServerClient:
        if self._client is None:
            self._client = tritonaio.InferenceServerClient(self.url, channel_args=_TRITON_CHANNEL_ARGS)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def server_ready(self, timeout: float | None = None) -> bool:
        """Whether the server answers ready (``RequestError`` when it cannot be reached)."""
        try:
            return bool(await self.client.is_server_ready(client_timeout=timeout))
        except InferenceServerException as e:
            raise triton_error(e) from e

    async def is_ready(self, timeout: float | None = 2.0) -> bool:
        """Whether the server answers ready (False when it cannot be reached)."""
        try:
            return await self.server_ready(timeout)
        except RequestError:
            return False

    async def repository_index(self) -> list[dict[str, Any]]:
        """Triton's repository index: one ``{"name", "version", "state", "reason"}`` per model version."""
        try:
            return list((await self.client.get_model_repository_index(as_json=True)).get("models", []))
        except InferenceServerException as e:
            raise triton_error(e) from e

    async def model_config(self, name: str, version: str) -> dict[str, Any]:
        """The JSON model config of ``name`` at ``version`` (the ``config`` object)."""
        try:
            return dict((await self.client.get_model_config(name, version, as_json=True))["config"])
        except InferenceServerException as e:
            raise triton_error(e) from e

    async def infer(self, model: ServedModel, pixels: np.ndarray, outputs: Sequence[str],
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
            error = triton_error(e)
            log.warning("triton call for %s failed (%s): %s", model.name, error.code.name, e.message())
            raise error from e
        return {o: np.concatenate([r.as_numpy(o) for r in results]) for o in outputs}

    async def control(self, name: str, action: str) -> None:
        """Ask Triton to ``load`` (also a reload) or ``unload`` model ``name``.

        Refusals a client can fix are FAILED_PRECONDITION: a server without explicit model control,
        or model files that do not load.
        """
        try:
            if action == "unload":
                await self.client.unload_model(name)
            else:
                await self.client.load_model(name)
        except InferenceServerException as e:
            message = e.message() or str(e)
            code = triton_status(e)
            if any(text in message for text in _EXPLICIT_CONTROL_NEEDED):
                code = grpc.StatusCode.FAILED_PRECONDITION
                message += " (Triton must run with --model-control-mode=explicit; `vitserve serve " \
                           "--enable-admin` starts it so)"
            elif code == grpc.StatusCode.INTERNAL and action != "unload":
                code = grpc.StatusCode.FAILED_PRECONDITION  # the model's files do not load
            log.warning("admin %s of %s failed: %s", action, name, message)
            raise RequestError(code, f"triton could not {action} {name!r}: {message}") from e
