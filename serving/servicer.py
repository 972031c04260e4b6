"""The ``vitserve.v1.VisionEncoder`` gRPC servicer: thin methods over the request layer and the admin.

Each unary RPC is one call into ``serving.service.EncoderService`` or ``serving.admin.ModelAdmin``;
``aborts_on_request_error`` turns their ``RequestError`` into the call's status, in one place.
``StreamFeatures`` answers a failed frame in the stream instead (``serving.streaming``).
"""

from __future__ import annotations

import functools
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import grpc

from protos import vitserve_pb2, vitserve_pb2_grpc
from serving.admin import ModelAdmin
from serving.errors import Remaining, RequestError
from serving.service import EncoderService
from serving.streaming import stream_features

Response = TypeVar("Response")
OnFrame = Callable[[str, str], None]  # (model, "ran" | "skipped" | "error") per stream frame
Unary = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]]


def aborts_on_request_error(method: Unary[Response]) -> Unary[Response]:
    """A unary RPC method whose ``RequestError`` ends the call with its code and message."""
    @functools.wraps(method)
    async def rpc(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except RequestError as e:
            await context.abort(e.code, e.message)
            raise AssertionError("unreachable") from e  # context.abort raises
    return rpc


class VisionEncoderServicer(vitserve_pb2_grpc.VisionEncoderServicer):
    """Every RPC of ``vitserve.v1.VisionEncoder`` (see protos/vitserve.proto)."""

    def __init__(self, service: EncoderService, admin: ModelAdmin, on_frame: OnFrame | None = None) -> None:
        self.service = service
        self.admin = admin
        self.on_frame = on_frame

    @aborts_on_request_error
    async def Embed(self, request: vitserve_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> vitserve_pb2.EmbedResponse:
        return await self.service.embed(request, context.time_remaining)

    @aborts_on_request_error
    async def Features(self, request: vitserve_pb2.FeaturesRequest,
                       context: grpc.aio.ServicerContext) -> vitserve_pb2.FeaturesResponse:
        return await self.service.features(request, context.time_remaining)

    @aborts_on_request_error
    async def ListModels(self, request: vitserve_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> vitserve_pb2.ListModelsResponse:
        return await self.service.list_models()

    @aborts_on_request_error
    async def GetModel(self, request: vitserve_pb2.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> vitserve_pb2.ModelInfo:
        return await self.service.get_model(request.model)

    async def StreamFeatures(
            self, request_iterator: AsyncIterator[vitserve_pb2.StreamFeaturesRequest],
            context: grpc.aio.ServicerContext) -> AsyncIterator[vitserve_pb2.StreamFeaturesResponse]:
        async def run(request: vitserve_pb2.FeaturesRequest, remaining: Remaining,
                      arrived: float) -> vitserve_pb2.FeaturesResponse:
            return await self.service.features(request, remaining, arrived=arrived, stream=True)

        async for response in stream_features(run, request_iterator, context, self._frame_outcome):
            yield response

    def _frame_outcome(self, frame: vitserve_pb2.StreamFeaturesRequest, outcome: str) -> None:
        if self.on_frame is not None:
            self.on_frame(self.service.registry.model_label(frame.request.model), outcome)

    # -- model management (serving.admin; UNIMPLEMENTED unless --enable-admin) --------------------

    @aborts_on_request_error
    async def LoadModel(self, request: vitserve_pb2.ModelControlRequest,
                        context: grpc.aio.ServicerContext) -> vitserve_pb2.ModelControlResponse:
        return await self.admin.load(request.model)

    @aborts_on_request_error
    async def UnloadModel(self, request: vitserve_pb2.ModelControlRequest,
                          context: grpc.aio.ServicerContext) -> vitserve_pb2.ModelControlResponse:
        return await self.admin.unload(request.model)

    @aborts_on_request_error
    async def ReloadModel(self, request: vitserve_pb2.ModelControlRequest,
                          context: grpc.aio.ServicerContext) -> vitserve_pb2.ModelControlResponse:
        return await self.admin.reload(request.model)

    @aborts_on_request_error
    async def ListRepository(self, request: vitserve_pb2.ListRepositoryRequest,
                             context: grpc.aio.ServicerContext) -> vitserve_pb2.ListRepositoryResponse:
        return await self.admin.list_repository()
