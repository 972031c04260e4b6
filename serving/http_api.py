"""The gateway's HTTP API (aiohttp, on the gRPC server's event loop): OpenAI-style embeddings, features,
models, health, and the static page.

Every handler calls the same request layer as the gRPC servicer (``serving.service.EncoderService``)
with the same protobuf requests, built from JSON by ``serving.http_json``; its ``RequestError`` becomes
an HTTP status with an OpenAI-style error body. The bearer token, the in-flight limit (the same
counter as gRPC's, so the drain on shutdown waits for HTTP calls too), TLS and the message size limit
are the gRPC server's; health reads the gRPC health service's status.

    POST /v1/embeddings    {"model", "input": [data URL | base64, ...], "encoding_format", "pooling", ...}
    POST /v1/features      FeaturesRequest fields as JSON, images in "input"
    GET  /v1/models, /v1/models/{name}, /health/live, /health/ready, /  (the page, serving/static/)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2

from serving.errors import Remaining, RequestError
from serving.http_json import (BODY_TOO_LARGE, HttpError, Json, bad_request, embed_request, embed_response,
                               error_body, features_request, features_response, http_status, model_json,
                               models_json, parse_body)
from serving.interceptors import InFlightLimit
from serving.metrics import GatewayMetrics
from serving.service import EncoderService

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
TIMEOUT_HEADER = "X-Request-Timeout"  # seconds the caller waits (the gRPC deadline's counterpart)
_THREAD_BYTES = 256 * 1024  # bodies and answers larger than this are (de)serialised off the event loop
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class HttpContext:
    """What the handlers and middlewares share: the request layer and the gRPC server's guards."""

    service: EncoderService
    health: grpc_health.aio.HealthServicer
    limit: InFlightLimit
    max_body_bytes: int
    auth_token: str | None = None
    metrics: GatewayMetrics | None = None


@dataclass
class HttpServer:
    """A started HTTP server: its runner (stopped by ``stop``), bound port and scheme."""

    runner: web.AppRunner
    port: int
    scheme: str

    async def stop(self) -> None:
        await self.runner.cleanup()


CONTEXT = web.AppKey("vitserve", HttpContext)


def json_response(body: Json, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, content_type="application/json")


def _error_response(e: HttpError) -> web.Response:
    return json_response(e.body(), e.status)


async def _off_loop(big: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, in a thread when the payload is large (JSON and base64 of MBs would stall the loop)."""
    return await asyncio.to_thread(fn, *args) if big else fn(*args)


def _remaining(request: web.Request) -> Remaining:
    """Seconds left of the caller's ``X-Request-Timeout`` (None: no deadline)."""
    text = request.headers.get(TIMEOUT_HEADER)
    if text is None:
        return lambda: None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise bad_request(f"the {TIMEOUT_HEADER} header must be a positive number of seconds, got {text!r}")
    deadline = time.monotonic() + seconds
    return lambda: deadline - time.monotonic()


def _too_large(size: str, limit: int) -> HttpError:
    return HttpError(BODY_TOO_LARGE, f"the request body ({size} bytes) is over the limit of {limit} bytes "
                     f"(vitserve serve --max-message-mb); send fewer or smaller images per request",
                     "request_too_large", "RESOURCE_EXHAUSTED")


async def _read_json(request: web.Request, ctx: HttpContext) -> tuple[Json, bool]:
    """The body as a JSON object and whether it is large; 413 over the message size limit."""
    limit = ctx.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(str(request.content_length), limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(f"more than {limit}", limit) from None
    big = len(raw) > _THREAD_BYTES
    content_type = request.content_type if "Content-Type" in request.headers else ""
    return await _off_loop(big, parse_body, raw, content_type), big


# -- handlers -------------------------------------------------------------------------------------

async def embeddings(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body, big = await _read_json(request, ctx)
    pb, encoding = await _off_loop(big, embed_request, body)
    response = await ctx.service.embed(pb, _remaining(request))
    model = ctx.service.registry.models.get(response.model.name)
    tokens = model.grid[0] * model.grid[1] + model.num_prefix_tokens if model is not None else 0
    text = await _off_loop(big or len(pb.images) > 64, embed_response, response, encoding, tokens)
    return web.Response(text=text, content_type="application/json")


async def features(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body, big = await _read_json(request, ctx)
    pb = await _off_loop(big, features_request, body)
    response = await ctx.service.features(pb, _remaining(request))
    return json_response(await _off_loop(response.ByteSize() > _THREAD_BYTES, features_response, response))


async def list_models(request: web.Request) -> web.Response:
    return json_response(models_json(await request.app[CONTEXT].service.list_models()))


async def get_model(request: web.Request) -> web.Response:
    return json_response(model_json(await request.app[CONTEXT].service.get_model(request.match_info["name"])))


async def live(request: web.Request) -> web.Response:
    return json_response({"status": "live"})


async def ready(request: web.Request) -> web.Response:
    """200 while the gRPC health service says SERVING, else 503 (Triton down, or draining)."""
    ctx = request.app[CONTEXT]
    # Check touches its context only to abort for a service it does not know; "" is always known.
    answer = await ctx.health.Check(health_pb2.HealthCheckRequest(service=""), None)  # type: ignore[arg-type]
    if answer.status == health_pb2.HealthCheckResponse.SERVING and not ctx.limit.draining:
        return json_response({"status": "SERVING"})
    return json_response({"status": "NOT_SERVING", **error_body("the gateway is not ready: Triton is down or the "
                                                         "gateway is shutting down", "service_unavailable_error",
                                                         "UNAVAILABLE")}, 503)


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


# -- middlewares (outermost first: metrics, errors, auth, in-flight limit) ----------------------

def _route(request: web.Request) -> str:
    info = request.match_info
    return info.route.resource.canonical if info.route.resource is not None else "unmatched"


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/v1/")


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    t0 = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        if ctx.metrics is not None:
            ctx.metrics.observe_http(_route(request), request.method, status, time.perf_counter() - t0)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal as an OpenAI-style JSON error: RequestError by its gRPC status, HttpError as it is,
    aiohttp's own (404 route, 405 method) with their status."""
    try:
        return await handler(request)
    except HttpError as e:
        return _error_response(e)
    except RequestError as e:
        status, type_ = http_status(e.code)
        return _error_response(HttpError(status, e.message, type_, e.code.name))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = f"no route {request.method} {request.path}" if e.status in (404, 405) else e.reason
        if e.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        return _error_response(HttpError(e.status, message, "invalid_request_error",
                                         "NOT_FOUND" if e.status == 404 else "INVALID_ARGUMENT"))
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        return _error_response(HttpError(500, "internal error in the gateway (see its log)", "server_error",
                                         "INTERNAL"))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``Authorization: Bearer <token>`` on /v1/ (health and the page stay open, as gRPC health does)."""
    token = request.app[CONTEXT].auth_token
    if token is not None and _is_api(request):
        value = request.headers.get("Authorization", "")
        if not value:
            raise HttpError(401, "missing credentials: send the header 'Authorization: Bearer <token>'",
                            "authentication_error", "UNAUTHENTICATED")
        scheme, _, given = value.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HttpError(401, "invalid bearer token", "authentication_error", "UNAUTHENTICATED")
    return await handler(request)


@web.middleware
async def in_flight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The gRPC server's in-flight limit and drain, on /v1/ calls: one count for both transports."""
    limit = request.app[CONTEXT].limit
    if not _is_api(request):
        return await handler(request)
    if limit.draining:
        raise HttpError(503, "the server is shutting down and takes no new calls; retry against another "
                        "replica or once it is back", "service_unavailable_error", "UNAVAILABLE")
    if limit.in_flight >= limit.limit:
        raise HttpError(429, f"{limit.in_flight} requests are in flight, the limit is {limit.limit}; retry "
                        f"later with backoff", "rate_limit_error", "RESOURCE_EXHAUSTED")
    limit.in_flight += 1
    try:
        return await handler(request)
    finally:
        limit.in_flight -= 1


def create_app(ctx: HttpContext) -> web.Application:
    """The aiohttp application of the HTTP API (not yet bound)."""
    app = web.Application(middlewares=[metrics_middleware, errors_middleware, auth_middleware,
                                       in_flight_middleware], client_max_size=ctx.max_body_bytes)
    app[CONTEXT] = ctx
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/features", features)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{name}", get_model)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/", page)
    app.router.add_static("/static", STATIC_DIR)
    return app


async def start_http(ctx: HttpContext, host: str, port: int, tls: ssl.SSLContext | None = None,
                     shutdown_timeout: float = 1.0) -> HttpServer:
    """Bind and start the HTTP API on the running event loop (``port`` 0: a free one)."""
    runner = web.AppRunner(create_app(ctx), access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(f"cannot serve HTTP on {host}:{port}: {e}") from e
    bound = runner.addresses[0][1]
    return HttpServer(runner, int(bound), "https" if tls is not None else "http")
