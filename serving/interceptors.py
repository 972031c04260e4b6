"""Cross-cutting concerns of the gateway as ``grpc.aio`` server interceptors.

Each interceptor wraps the behaviour of every ``vitserve.v1.VisionEncoder`` RPC (unary and
streaming) in an async context manager, ``guard``; the health and reflection services pass through
untouched, so probes and ``grpcurl`` work without a token and are never limited. Order them
outermost first: metrics (sees every outcome), authentication, then the in-flight limit.
"""

from __future__ import annotations

import asyncio
import abc
import contextlib
import hmac
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import grpc

from protos import vitserve_pb2
from serving.errors import UndecodableRequest
from serving.metrics import GatewayMetrics

SERVICE_NAME = vitserve_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name


@dataclass(frozen=True)
class Call:
    """One RPC as an interceptor sees it; ``request`` is ``None`` for a client stream."""

    rpc: str
    metadata: dict[str, str]
    request: Any
    context: grpc.aio.ServicerContext


# A guard may yield a stand-in for the call's context, which the inner handlers then use (the
# metrics interceptor does, to count an aborted call before its status goes out); ``None`` keeps it.
Guard = Callable[[Call], contextlib.AbstractAsyncContextManager[Any]]


def _metadata(items: Sequence[Any] | None) -> dict[str, str]:
    return {str(k).lower(): v if isinstance(v, str) else repr(v) for k, v in (items or ())}


def wrap_handler(handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails,
                 guard: Guard) -> grpc.RpcMethodHandler:
    """``handler`` with each call run inside ``guard(call)`` (unary-unary and stream-stream)."""
    rpc = details.method.rsplit("/", 1)[-1]
    metadata = _metadata(details.invocation_metadata)
    if handler.unary_unary is not None:
        unary_inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(Call(rpc, metadata, request, context)) as inner_context:
                return await unary_inner(request, inner_context or context)

        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
    if handler.stream_stream is not None:
        stream_inner = handler.stream_stream

        async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with guard(Call(rpc, metadata, None, context)) as inner_context:
                async for response in stream_inner(requests, inner_context or context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer,
                                                     response_serializer=handler.response_serializer)
    return handler  # the service has no unary-stream or stream-unary RPCs


@dataclass(frozen=True)
class _Undecodable:
    """What the tolerant deserializer returns for bytes that do not parse; the handler refuses it."""

    message: str


class RequestDecodeCheck(grpc.aio.ServerInterceptor):
    """Bytes that are not the RPC's message get INVALID_ARGUMENT naming the problem.

    ``grpc.aio`` answers a request its deserializer cannot parse with UNKNOWN ("Unexpected
    DecodeError"), and on a stream it ends the call without saying why. This interceptor swaps in
    a deserializer that returns a marker instead of raising, and the handler refuses the marker:
    unary calls abort INVALID_ARGUMENT; a stream answers the frames before the bad one and then
    ends INVALID_ARGUMENT. Put it innermost, so authentication and the in-flight limit still come
    first.
    """

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if (handler is None or handler.request_deserializer is None
                or not details.method.startswith(f"/{SERVICE_NAME}/")):
            return handler
        rpc = details.method.rsplit("/", 1)[-1]
        parse = handler.request_deserializer

        def tolerant(raw: bytes) -> Any:
            try:
                return parse(raw)
            except Exception as e:  # protobuf's DecodeError, or anything a parser raises on garbage
                return _Undecodable(f"the {rpc} request ({len(raw)} bytes) is not a valid "
                                    f"{SERVICE_NAME}.{rpc} message: {e}")

        if handler.unary_unary is not None:
            unary_inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                return await unary_inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=tolerant,
                                                       response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            stream_inner = handler.stream_stream

            async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
                async for request in requests:
                    if isinstance(request, _Undecodable):
                        raise UndecodableRequest(request.message)
                    yield request

            async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for response in stream_inner(checked(requests), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream, request_deserializer=tolerant,
                                                         response_serializer=handler.response_serializer)
        return handler


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Base: applies ``self.guard`` to the vitserve service's RPCs only."""

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        return wrap_handler(handler, details, self.guard)

    @abc.abstractmethod
    def guard(self, call: Call) -> contextlib.AbstractAsyncContextManager[Any]:
        """The context each guarded call runs in (refuse by aborting before yielding); it may yield
        a stand-in for the servicer context that the inner handlers get, or ``None``."""


def read_token(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped); refuses an empty file."""
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"the auth token file {path} is empty; put the shared token in it")
    return token


class BearerTokenAuth(GuardInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` metadata (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty bearer token would accept anyone; give a non-empty token")
        self._token = token.encode()

    @contextlib.asynccontextmanager
    async def guard(self, call: Call) -> AsyncIterator[None]:
        value = call.metadata.get("authorization", "")
        if not value:
            await call.context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                     "missing credentials: send metadata 'authorization: Bearer <token>'")
        scheme, _, given = value.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            await call.context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        yield


class InFlightLimit(GuardInterceptor):
    """At most ``limit`` RPCs at once (a stream counts once); past it RESOURCE_EXHAUSTED at once.

    Also answers DEADLINE_EXCEEDED to a call whose deadline passed before it was handled.
    The count needs no lock: every guard runs on the server's one event loop.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight limit must be at least 1, got {limit}")
        self.limit = limit
        self.in_flight = 0
        # Set when the server starts shutting down: new calls are refused UNAVAILABLE (retryable
        # elsewhere) while those in flight finish.
        self.draining = False

    @contextlib.asynccontextmanager
    async def guard(self, call: Call) -> AsyncIterator[None]:
        if self.draining:
            await call.context.abort(grpc.StatusCode.UNAVAILABLE,
                                     "the server is shutting down and takes no new calls; retry against "
                                     "another replica or once it is back")
        if self.in_flight >= self.limit:
            await call.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"{self.in_flight} requests are in flight, the limit is {self.limit}; "
                                     f"retry later with backoff")
        left = call.context.time_remaining()
        if left is not None and left <= 0:
            await call.context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                     "the deadline had passed before the request was handled")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def _code_name(context: grpc.aio.ServicerContext) -> str:
    return _status_name(context.code())


class _AbortObserver:
    """The servicer context with ``abort`` first calling ``before_abort(code)``.

    ``context.abort`` sends the status to the client before it raises, so whatever is recorded
    after it (in an interceptor's ``finally``) can reach a scrape later than the client learnt the
    outcome. Every abort of an inner interceptor or the servicer goes through this stand-in.
    """

    def __init__(self, context: grpc.aio.ServicerContext, before_abort: Callable[[Any], None]) -> None:
        self._context = context
        self._before_abort = before_abort

    async def abort(self, code: grpc.StatusCode, *args: Any, **kwargs: Any) -> None:
        self._before_abort(code)
        await self._context.abort(code, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _status_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "UNKNOWN"


class MetricsInterceptor(GuardInterceptor):
    """Counts, times and sizes every call; ``model_label(name)`` resolves an empty model name.

    A call is counted when its status is known and before it goes out: an aborted call in
    ``abort`` itself (through ``_AbortObserver``), any other when the handler has returned or
    raised (grpc sends the status after that). So a scrape right after a reply always sees it.
    """

    def __init__(self, metrics: GatewayMetrics, model_label: Callable[[str], str]) -> None:
        self.metrics = metrics
        self.model_label = model_label

    @contextlib.asynccontextmanager
    async def guard(self, call: Call) -> AsyncIterator[Any]:
        t0 = time.perf_counter()
        model = self.model_label(getattr(call.request, "model", ""))
        images = getattr(call.request, "images", None)
        if images is not None:
            self.metrics.request_images.labels(call.rpc, model).observe(len(images))
        self.metrics.in_flight.inc()
        recorded = False

        def record(code: str) -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                self.metrics.in_flight.dec()
                self.metrics.observe_call(call.rpc, model, code, time.perf_counter() - t0)

        code = "OK"
        try:
            yield _AbortObserver(call.context, lambda c: record(_status_name(c)))
        except BaseException as e:
            cancelled = isinstance(e, (GeneratorExit, asyncio.CancelledError))
            code = "CANCELLED" if cancelled else _code_name(call.context)
            raise
        finally:
            record(code)
