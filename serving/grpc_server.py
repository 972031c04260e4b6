"""The ``grpc.aio`` server around the gateway: interceptors, message limits, health and reflection."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import vitserve_pb2_grpc
from serving.errors import GatewayError
from serving.gateway import VisionEncoderGateway
from serving.interceptors import (SERVICE_NAME, BearerTokenAuth, InFlightLimit, MetricsInterceptor, RequestDecodeCheck,
                                  read_token)
from serving.metrics import GatewayMetrics

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_IN_FLIGHT = 64


@dataclass
class ServerOptions:
    """What the gateway's server enforces around the RPCs (CLI: ``vitserve serve`` flags)."""

    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    # A larger request is refused by gRPC itself with RESOURCE_EXHAUSTED ("Received message larger
    # than max") before anything is decoded.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    auth_token: str | None = None
    metrics: GatewayMetrics | None = None
    metrics_port: int | None = None  # serve /metrics here (0: a free port); None: no HTTP endpoint
    health_interval: float = 2.0  # seconds between Triton readiness checks
    tls: grpc.ServerCredentials | None = None  # None: plaintext (loopback / behind a proxy)
    # Model management RPCs (LoadModel, UnloadModel, ReloadModel, ListRepository); off: UNIMPLEMENTED.
    enable_admin: bool = False
    # The embedded Triton's supervisor events, pushed to health at once (None: health polls only).
    triton_events: "TritonEvents | None" = None
    # Told which models Triton has loaded after each admin load/unload/reload (the launcher restarts
    # a Triton that died with that set).
    on_models_loaded: "Callable[[list[str]], None] | None" = None
    # Images per request (more: INVALID_ARGUMENT) and pixels per image (checked before decoding);
    # None: the gateway's own (its constructor's, by default 1024 and 8192x8192).
    max_images: int | None = None
    max_pixels: int | None = None

    @classmethod
    def from_files(cls, *, auth_token_file: str | Path | None = None, tls_cert_file: str | Path | None = None,
                   tls_key_file: str | Path | None = None, tls_client_ca_file: str | Path | None = None,
                   **kwargs: object) -> "ServerOptions":
        """Options with the token and TLS material read from files (raises OSError / ValueError)."""
        token = read_token(auth_token_file) if auth_token_file is not None else None
        tls = None
        if tls_cert_file is not None or tls_key_file is not None or tls_client_ca_file is not None:
            if tls_cert_file is None or tls_key_file is None:
                raise ValueError("TLS needs both a certificate and its private key")
            tls = server_tls_credentials(tls_cert_file, tls_key_file, tls_client_ca_file)
        return cls(auth_token=token, tls=tls, **kwargs)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if self.metrics_port is not None and self.metrics is None:
            self.metrics = GatewayMetrics()


def server_tls_credentials(cert_file: str | Path, key_file: str | Path,
                           client_ca_file: str | Path | None = None) -> grpc.ServerCredentials:
    """TLS with the server's PEM certificate chain and key; with ``client_ca_file``, mutual TLS
    (clients must present a certificate signed by that CA)."""
    pair = (Path(key_file).read_bytes(), Path(cert_file).read_bytes())
    client_ca = Path(client_ca_file).read_bytes() if client_ca_file is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def interceptors(gateway: VisionEncoderGateway, options: ServerOptions) -> list[grpc.aio.ServerInterceptor]:
    """Outermost first: metrics (sees every outcome), authentication, in-flight limit, request decoding."""
    chain: list[grpc.aio.ServerInterceptor] = []
    if options.metrics is not None:
        chain.append(MetricsInterceptor(options.metrics, gateway.model_label))
    if options.auth_token is not None:
        chain.append(BearerTokenAuth(options.auth_token))
    limit = InFlightLimit(options.max_in_flight)
    gateway.in_flight_limit = limit  # the drain on shutdown reports how many calls it waits for
    chain.append(limit)
    chain.append(RequestDecodeCheck())
    return chain


def create_server(
        gateway: VisionEncoderGateway, host: str = "127.0.0.1", port: int = 0,
        options: ServerOptions | None = None) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A ``grpc.aio`` server with the gateway, health (NOT_SERVING until set) and reflection."""
    options = options or ServerOptions()
    gateway.enable_admin = options.enable_admin
    if options.max_images is not None:
        gateway.max_images = options.max_images
    if options.max_pixels is not None:
        gateway.max_pixels = options.max_pixels
    if options.on_models_loaded is not None:
        gateway.on_models_loaded = options.on_models_loaded
    if options.metrics is not None:
        gateway.on_batch = options.metrics.observe_triton_batch
        gateway.on_frame = options.metrics.observe_stream_frame
    server = grpc.aio.server(
        interceptors=interceptors(gateway, options),
        options=[("grpc.max_receive_message_length", options.max_message_bytes),
                 ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES)])
    vitserve_pb2_grpc.add_VisionEncoderServicer_to_server(gateway, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if options.tls is not None:
        bound = server.add_secure_port(address, options.tls)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise GatewayError(f"cannot bind the gateway to {address}")
    return server, health_servicer, bound


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool = True) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, status)


class TritonEvents:
    """The launcher's supervision events, handed from its thread to the health watcher's event loop.

    Pass the instance as ``supervise(on_event=...)`` (or call it from such a callback) and as
    ``ServerOptions.triton_events``: ``down`` turns health NOT_SERVING at once, ``restarted`` (the
    server and its models are ready again) SERVING once the gateway has re-read the model list.
    Events that arrive before the gateway's loop attaches are kept and delivered then.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[str] | None = None
        self._pending: list[str] = []

    def __call__(self, event: str) -> None:
        with self._lock:
            if self._loop is None or self._queue is None:
                self._pending.append(event)
                return
            loop, queue = self._loop, self._queue
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the gateway's loop has closed: nobody left to tell
            pass

    def attach(self) -> "asyncio.Queue[str]":
        """Start delivering to the running loop; returns the queue the watcher reads."""
        with self._lock:
            self._loop, self._queue = asyncio.get_running_loop(), asyncio.Queue()
            for event in self._pending:
                self._queue.put_nowait(event)
            self._pending.clear()
            return self._queue

    def detach(self) -> None:
        with self._lock:
            self._loop = self._queue = None


# Supervisor events (serving.triton_launcher.EVENT_*): the server died / gave up, or is back with models.
_DOWN_EVENTS = ("down", "gave_up")
_BACK_EVENT = "restarted"


BACK_CONFIRM_S = 5.0  # after the supervisor's "restarted": how long the gateway's channel may take to reconnect


async def _ready_soon(gateway: VisionEncoderGateway, within: float) -> bool:
    """Whether Triton answers ready within ``within`` seconds. The supervisor has seen it ready on its
    own connection; the gateway's channel may still be in its reconnect backoff (up to 1 s) and fail
    fast meanwhile, so look again every 50 ms rather than wait for the next poll."""
    deadline = time.monotonic() + within
    while not await gateway.is_triton_ready():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def watch_triton(gateway: VisionEncoderGateway, health_servicer: health.aio.HealthServicer,
                       interval: float = 2.0, events: TritonEvents | None = None) -> None:
    """Keep the health status in step with Triton's readiness (NOT_SERVING while it is down).

    Readiness is polled every ``interval`` seconds; with ``events`` (an embedded, supervised Triton)
    the supervisor's ``down`` turns health NOT_SERVING at once and its ``restarted`` SERVING at
    once. Between the two, polling cannot turn it SERVING: a restarting server may answer ready
    before its models are. When Triton is back, the model list is re-read before the status turns
    SERVING again.
    """
    serving = True
    restarting = False  # the supervisor said down and has not said restarted yet
    queue = events.attach() if events is not None else None
    try:
        while True:
            event = None
            if queue is None:
                await asyncio.sleep(interval)
            else:
                try:
                    event = await asyncio.wait_for(queue.get(), interval)
                except asyncio.TimeoutError:
                    pass
            if event in _DOWN_EVENTS:
                restarting = True
                ready = False
            elif event == _BACK_EVENT:
                restarting = False
                ready = await _ready_soon(gateway, BACK_CONFIRM_S)
            elif event is not None:  # e.g. restart_failed: still down, nothing changes
                continue
            else:
                ready = await gateway.is_triton_ready() and not restarting
            if ready and not serving:
                try:
                    await gateway.refresh()
                except Exception as e:  # noqa: BLE001 - not ready after all; look again next round
                    log.warning("triton is up but its models could not be listed: %s", e)
                    continue
            if ready != serving:
                serving = ready
                how = f"supervisor: {event}" if event is not None else "polled"
                log.warning("triton at %s is %s (%s)", gateway.triton_url,
                            "ready again" if ready else "not ready", how)
                await set_serving(health_servicer, ready)
    finally:
        if events is not None:
            events.detach()
