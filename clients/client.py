"""Thin Python client for the vitserve gRPC API, sync and ``grpc.aio`` (grpcio, numpy, protobuf; no torch).

>>> with VitServeClient("127.0.0.1:50051") as client:
...     emb = client.embed(images)                      # [N, D] float32 (CLS)
...     both = client.embed(images, pooling="both")     # [N, 2D] = [CLS | mean of patch tokens]
...     res = client.features(images, layout="grid")    # res.features: [N, h, w, D]
...     for r in client.stream_features(frames, latest_only=True):  # frames: (frame_id, images)
...         r.frame_id, r.skipped, r.features
...     res = client.features(photos, resize_op="center_crop", lane="latency")
...     res.preprocessing["images"][0]["source_box"]     # what was done to each image
...     client.get_model("m").probe_scores               # {"knn_cls_top1": ..., ...}
...     client.unload_model("m"); client.load_model("m")  # server started with --enable-admin

Images are what ``clients.messages`` takes: uint8 arrays, encoded bytes or file paths, one or a list.

The target may name several replicas (``"10.0.0.1:50051,10.0.0.2:50051"``, ``"dns:///vitserve:50051"``):
calls are balanced over them with gRPC's ``round_robin`` and ``UNAVAILABLE`` is retried on another
one (``clients.targets``); ``retries=False`` leaves retrying to the caller.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence

import time

import grpc
import numpy as np

from contract.tensors import tensor_to_numpy
from clients.messages import (EmbedResult, FeaturesResult, Frame, Images, ModelControlResult, ModelDescription,
                              StreamResult, VitServeError, control_result, embed_request, embed_result,
                              features_request, features_result, model_description, repository_models, stream_request,
                              stream_result, to_proto_images)
from clients.stream_failover import RECONNECT_ATTEMPTS, AsyncFrameFeed, FrameFeed, backoff_s, lost_frame
from clients.targets import MAX_MESSAGE_BYTES, Target, TargetError, channel_options, parse_target
from protos import vitserve_pb2, vitserve_pb2_grpc


def channel_credentials(tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                        tls_key: str | Path | None = None) -> grpc.ChannelCredentials:
    """TLS credentials: trust ``tls_ca`` (default: the system roots); ``tls_cert``/``tls_key`` for mTLS."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs its key: give both tls_cert and tls_key")

    def read(p: str | Path | None) -> bytes | None:
        return Path(p).read_bytes() if p is not None else None
    return grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _error(e: grpc.RpcError) -> VitServeError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return VitServeError(code, details or "")


class VitServeClient:
    """Blocking client; ``timeout`` (seconds) is each call's deadline, ``token`` a bearer token,
    ``tls`` (from ``channel_credentials``) makes the channel TLS.

    ``target``: one address, a comma list, ``ipv4:``/``ipv6:`` or ``dns:///NAME:PORT`` (see
    ``clients.targets``; ``TargetError`` when it names no address). ``retries``: retry
    ``UNAVAILABLE`` on another replica and re-open a broken ``stream_features`` stream (False: every
    failure reaches the caller). ``retry_buffer_bytes``: the largest request gRPC may retry (default:
    the largest the gateway accepts)."""

    def __init__(self, target: str, timeout: float = 60.0, token: str | None = None,
                 tls: grpc.ChannelCredentials | None = None, retries: bool = True,
                 retry_buffer_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.target, self.timeout, self.retries = target, timeout, retries
        self.parsed: Target = parse_target(target)
        self._metadata = _auth_metadata(token)
        options = channel_options(retries, retry_buffer_bytes)
        self._channel = (grpc.secure_channel(self.parsed.uri, tls, options=options) if tls is not None
                         else grpc.insecure_channel(self.parsed.uri, options=options))
        self._stub = vitserve_pb2_grpc.VisionEncoderStub(self._channel)

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    def embed(self, images: Images, model: str = "", l2_normalize: bool = False,
              dtype: str = "float32", pooling: str = "cls", lane: str = "", resize_op: str = "",
              bucket: str = "", version: str | int = "") -> np.ndarray:
        """Global embeddings: CLS ``[N, D]`` (default), ``"mean"`` of patch tokens ``[N, D]``, or
        ``"both"`` ``[N, 2D]`` = ``[CLS | mean]`` (with ``l2_normalize`` each half is unit-norm).

        ``lane``: "throughput" / "latency" (the model's declared lanes; "" the model itself);
        ``resize_op``: "resize" / "center_crop" / "letterbox" ("" the model's default);
        ``bucket``: "auto" routes to the resolution bucket that fits the images ("" the model itself);
        ``version``: a loaded version, e.g. 2 ("" the newest)."""
        request = embed_request(images, model, l2_normalize, dtype, pooling, lane, resize_op, bucket, version)
        return tensor_to_numpy(self._call(self._stub.Embed, request).embeddings)  # no metadata dicts to build

    def embed_result(self, images: Images, model: str = "", l2_normalize: bool = False, dtype: str = "float32",
                     pooling: str = "cls", lane: str = "", resize_op: str = "", bucket: str = "",
                     version: str | int = "") -> EmbedResult:
        """As ``embed``, with the model (name, version, bucket), preprocessing (per image) and timings."""
        request = embed_request(images, model, l2_normalize, dtype, pooling, lane, resize_op, bucket, version)
        return embed_result(self._call(self._stub.Embed, request))

    def stream_features(self, frames: Iterable[Frame], model: str = "", layout: str = "grid",
                        include_cls: bool = False, dtype: str = "float32", latest_only: bool = False,
                        timeout: float | None = None, lane: str = "",
                        resize_op: str = "", bucket: str = "", version: str | int = "") -> Iterator[StreamResult]:
        """One ``StreamResult`` per ``(frame_id, images)`` sent, in order, over one stream.

        With ``latest_only`` a frame still waiting when a newer one has arrived comes back
        ``skipped``. ``timeout`` bounds the whole stream (default: none, for a control loop).
        Without ``lane`` the server uses the model's latency lane when it declares one.

        When the replica serving the stream dies (the stream ends ``UNAVAILABLE``), a new stream is
        opened on the channel, so on another replica, after a back-off (0.1 s doubling to 2 s), and the
        loop goes on with the next frame. Frames the dead replica had and did not answer come back as
        results with an ``UNAVAILABLE`` ``error`` (not re-sent, never silently dropped). After
        ``RECONNECT_ATTEMPTS`` streams in a row that fail before any answer, or with ``retries=False``,
        the error is raised.
        """
        feed = FrameFeed(frames, lambda f: stream_request(f, model, layout, include_cls, dtype, latest_only, lane,
                                                          resize_op, bucket, version))
        deadline = time.monotonic() + timeout if timeout is not None else None
        failures = 0
        while True:
            left = max(0.0, deadline - time.monotonic()) if deadline is not None else None
            call = self._stub.StreamFeatures(feed.requests(feed.generation), timeout=left, metadata=self._metadata)
            try:
                for response in call:
                    failures = 0
                    result = stream_result(response)
                    feed.answered(result.frame_id)
                    yield result
                return
            except grpc.RpcError as e:
                failures += 1
                if not self.retries or e.code() != grpc.StatusCode.UNAVAILABLE or failures > RECONNECT_ATTEMPTS:
                    raise _error(e) from None
                for frame_id in feed.fail_over():
                    yield lost_frame(frame_id, e.details() or "UNAVAILABLE")
                time.sleep(backoff_s(failures))
            finally:
                call.cancel()

    def features(self, images: Images, model: str = "", layout: str = "grid", include_cls: bool = False,
                 dtype: str = "float32", lane: str = "", resize_op: str = "", outputs: Sequence[str] = (),
                 include_registers: bool = False, bucket: str = "", version: str | int = "") -> FeaturesResult:
        """Patch features ``[N, h, w, D]`` (grid) or ``[N, h*w, D]`` (tokens), optionally CLS ``[N, D]``.

        ``outputs`` names the patch-token outputs to return (e.g. ``["patch_tokens_l-2"]`` for a model
        exported with ``--layers -2``; default the last block's); each is in ``result.layers``;
        ``"cls_attention"`` among them (a model exported with ``--attention``) fills
        ``result.cls_attention [N, heads, h*w]``."""
        request = features_request(images, model, layout, include_cls, dtype, lane, resize_op, outputs,
                                   include_registers, bucket, version)
        return features_result(self._call(self._stub.Features, request))

    def list_models(self) -> list[ModelDescription]:
        """Every model the gateway serves."""
        response = self._call(self._stub.ListModels, vitserve_pb2.ListModelsRequest())
        return [model_description(m) for m in response.models]

    def get_model(self, model: str = "") -> ModelDescription:
        """One served model ("" when only one is served)."""
        return model_description(self._call(self._stub.GetModel, vitserve_pb2.GetModelRequest(model=model)))

    # Model management: the server must run with `vitserve serve --enable-admin`.
    def load_model(self, model: str) -> ModelControlResult:
        """Load a model of Triton's repository and serve it."""
        return control_result(self._call(self._stub.LoadModel, vitserve_pb2.ModelControlRequest(model=model)))

    def unload_model(self, model: str) -> ModelControlResult:
        """Stop serving a model and unload it from Triton."""
        return control_result(self._call(self._stub.UnloadModel, vitserve_pb2.ModelControlRequest(model=model)))

    def reload_model(self, model: str) -> ModelControlResult:
        """Load a model again from the repository (a new version, a changed config)."""
        return control_result(self._call(self._stub.ReloadModel, vitserve_pb2.ModelControlRequest(model=model)))

    def list_repository(self) -> list[dict[str, str]]:
        """Every model in Triton's repository: ``{"name", "version", "state", "reason"}``."""
        return repository_models(self._call(self._stub.ListRepository, vitserve_pb2.ListRepositoryRequest()))

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> "VitServeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVitServeClient:
    """``grpc.aio`` client with the same methods as ``VitServeClient`` (await them)."""

    def __init__(self, target: str, timeout: float = 60.0, token: str | None = None,
                 tls: grpc.ChannelCredentials | None = None, retries: bool = True,
                 retry_buffer_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.target, self.timeout, self.retries = target, timeout, retries
        self.parsed: Target = parse_target(target)
        self._metadata = _auth_metadata(token)
        options = channel_options(retries, retry_buffer_bytes)
        self._channel = (grpc.aio.secure_channel(self.parsed.uri, tls, options=options) if tls is not None
                         else grpc.aio.insecure_channel(self.parsed.uri, options=options))
        self._stub = vitserve_pb2_grpc.VisionEncoderStub(self._channel)

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    async def embed(self, images: Images, model: str = "", l2_normalize: bool = False,
                    dtype: str = "float32", pooling: str = "cls", lane: str = "",
                    resize_op: str = "", bucket: str = "", version: str | int = "") -> np.ndarray:
        """As ``VitServeClient.embed``."""
        request = embed_request(images, model, l2_normalize, dtype, pooling, lane, resize_op, bucket, version)
        return tensor_to_numpy((await self._call(self._stub.Embed, request)).embeddings)

    async def embed_result(self, images: Images, model: str = "", l2_normalize: bool = False,
                           dtype: str = "float32", pooling: str = "cls", lane: str = "",
                           resize_op: str = "", bucket: str = "", version: str | int = "") -> EmbedResult:
        """As ``VitServeClient.embed_result``."""
        request = embed_request(images, model, l2_normalize, dtype, pooling, lane, resize_op, bucket, version)
        return embed_result(await self._call(self._stub.Embed, request))

    async def stream_features(
            self, frames: Iterable[Frame] | AsyncIterable[Frame], model: str = "", layout: str = "grid",
            include_cls: bool = False, dtype: str = "float32", latest_only: bool = False,
            timeout: float | None = None, lane: str = "", resize_op: str = "", bucket: str = "",
            version: str | int = "") -> AsyncIterator[StreamResult]:
        """As ``VitServeClient.stream_features`` (a dead replica's stream is re-opened on another one,
        its unanswered frames come back as ``UNAVAILABLE`` errors); ``frames`` may be an async iterable
        (a camera loop)."""
        feed = AsyncFrameFeed(frames, lambda f: stream_request(f, model, layout, include_cls, dtype, latest_only,
                                                               lane, resize_op, bucket, version))
        deadline = time.monotonic() + timeout if timeout is not None else None
        failures = 0
        try:
            while True:
                left = max(0.0, deadline - time.monotonic()) if deadline is not None else None
                call = self._stub.StreamFeatures(feed.requests(feed.generation), timeout=left,
                                                 metadata=self._metadata)
                try:
                    async for response in call:
                        failures = 0
                        result = stream_result(response)
                        feed.answered(result.frame_id)
                        yield result
                    return
                except grpc.RpcError as e:
                    failures += 1
                    if (not self.retries or e.code() != grpc.StatusCode.UNAVAILABLE
                            or failures > RECONNECT_ATTEMPTS):
                        raise _error(e) from None
                    for frame_id in feed.fail_over():
                        yield lost_frame(frame_id, e.details() or "UNAVAILABLE")
                    await asyncio.sleep(backoff_s(failures))
                finally:
                    call.cancel()
        finally:
            await feed.close()

    async def features(self, images: Images, model: str = "", layout: str = "grid",
                       include_cls: bool = False, dtype: str = "float32", lane: str = "",
                       resize_op: str = "", outputs: Sequence[str] = (),
                       include_registers: bool = False, bucket: str = "",
                       version: str | int = "") -> FeaturesResult:
        """As ``VitServeClient.features``."""
        request = features_request(images, model, layout, include_cls, dtype, lane, resize_op, outputs,
                                   include_registers, bucket, version)
        return features_result(await self._call(self._stub.Features, request))

    async def list_models(self) -> list[ModelDescription]:
        """Every model the gateway serves."""
        response = await self._call(self._stub.ListModels, vitserve_pb2.ListModelsRequest())
        return [model_description(m) for m in response.models]

    async def get_model(self, model: str = "") -> ModelDescription:
        """One served model ("" when only one is served)."""
        return model_description(await self._call(self._stub.GetModel, vitserve_pb2.GetModelRequest(model=model)))

    # Model management: the server must run with `vitserve serve --enable-admin`.
    async def load_model(self, model: str) -> ModelControlResult:
        """Load a model of Triton's repository and serve it."""
        request = vitserve_pb2.ModelControlRequest(model=model)
        return control_result(await self._call(self._stub.LoadModel, request))

    async def unload_model(self, model: str) -> ModelControlResult:
        """Stop serving a model and unload it from Triton."""
        request = vitserve_pb2.ModelControlRequest(model=model)
        return control_result(await self._call(self._stub.UnloadModel, request))

    async def reload_model(self, model: str) -> ModelControlResult:
        """Load a model again from the repository (a new version, a changed config)."""
        request = vitserve_pb2.ModelControlRequest(model=model)
        return control_result(await self._call(self._stub.ReloadModel, request))

    async def list_repository(self) -> list[dict[str, str]]:
        """Every model in Triton's repository: ``{"name", "version", "state", "reason"}``."""
        return repository_models(await self._call(self._stub.ListRepository, vitserve_pb2.ListRepositoryRequest()))

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> "AsyncVitServeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["VitServeClient", "AsyncVitServeClient", "VitServeError", "TargetError", "parse_target", "MAX_MESSAGE_BYTES", "EmbedResult", "FeaturesResult",
           "ModelControlResult", "ModelDescription", "StreamResult", "channel_credentials", "tensor_to_numpy", "to_proto_images"]
