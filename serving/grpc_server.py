"""The ``grpc.aio`` server around the request layer: its options, interceptors, health and reflection.

``ServerOptions`` (frozen) is everything ``vitserve serve``'s flags decide; ``create_server`` builds
the servicer, the admin and the interceptor chain from it, once, and binds the port.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import vitserve_pb2_grpc
from serving.admin import ModelAdmin
from serving.errors import GatewayError
from serving.health_servicer import HealthServicer
from serving.images import DEFAULT_MAX_PIXELS
from serving.interceptors import (SERVICE_NAME, BearerTokenAuth, InFlightLimit, MetricsInterceptor, RequestDecodeCheck,
                                  read_token)
from serving.metrics import GatewayMetrics
from serving.service import DEFAULT_MAX_IMAGES, EncoderService, ServiceOptions
from serving.servicer import VisionEncoderServicer
from serving.triton_events import TritonEvents

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_IN_FLIGHT = 64
MAX_CONNECTION_AGE_GRACE_S = 30.0
# Clients (clients.targets) ping a connection with calls in flight every 30 s; allow that (gRPC's
# default allows one ping per 5 minutes without data and answers more with GOAWAY "too_many_pings").
MIN_CLIENT_PING_INTERVAL_MS = 10_000


@dataclass(frozen=True)
class ServerOptions:
    """What the gateway's server enforces around the RPCs (CLI: ``vitserve serve`` flags)."""

    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    # A larger request is refused by gRPC itself with RESOURCE_EXHAUSTED ("Received message larger
    # than max") before anything is decoded.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    auth_token: str | None = None
    metrics: GatewayMetrics | None = None  # made when metrics_port is given
    metrics_port: int | None = None  # serve /metrics here (0: a free port); None: no HTTP endpoint
    health_interval: float = 2.0  # seconds between Triton readiness checks
    tls: grpc.ServerCredentials | None = None  # None: plaintext (loopback / behind a proxy)
    # Model management RPCs (LoadModel, UnloadModel, ReloadModel, ListRepository); off: UNIMPLEMENTED.
    enable_admin: bool = False
    # The embedded Triton's supervisor events, pushed to health at once (None: health polls only).
    triton_events: TritonEvents | None = None
    # Told which models Triton has loaded after each admin load/unload/reload (the launcher restarts
    # a Triton that died with that set).
    on_models_loaded: Callable[[list[str]], None] | None = None
    # Images per request (more: INVALID_ARGUMENT) and pixels per image (checked before decoding).
    max_images: int = DEFAULT_MAX_IMAGES
    max_pixels: int = DEFAULT_MAX_PIXELS
    # The HTTP API (serving.http_api) on the same host and event loop (0: a free port; None: off),
    # with the same token, limits and metrics; TLS from the same files as ``tls`` (``from_files``).
    http_port: int | None = None
    http_tls: ssl.SSLContext | None = None
    # A plaintext server with the health service only (Kubernetes' gRPC probes can do neither TLS nor
    # tokens), on this port of the same host (0: a free port; None: none).
    health_port: int | None = None
    # Close each client connection after this many seconds (GOAWAY, calls in flight get
    # MAX_CONNECTION_AGE_GRACE_S), so that clients re-resolve and spread over new replicas; None: never.
    max_connection_age_s: float | None = None

    @classmethod
    def from_files(cls, *, auth_token_file: str | Path | None = None, tls_cert_file: str | Path | None = None,
                   tls_key_file: str | Path | None = None, tls_client_ca_file: str | Path | None = None,
                   **kwargs: Any) -> "ServerOptions":
        """Options with the token and TLS material read from files (raises OSError / ValueError)."""
        token = read_token(auth_token_file) if auth_token_file is not None else None
        tls, http_tls = None, None
        if tls_cert_file is not None or tls_key_file is not None or tls_client_ca_file is not None:
            if tls_cert_file is None or tls_key_file is None:
                raise ValueError("TLS needs both a certificate and its private key")
            tls = server_tls_credentials(tls_cert_file, tls_key_file, tls_client_ca_file)
            http_tls = server_ssl_context(tls_cert_file, tls_key_file, tls_client_ca_file)
        return cls(auth_token=token, tls=tls, http_tls=http_tls, **kwargs)

    def __post_init__(self) -> None:
        if self.metrics_port is not None and self.metrics is None:
            object.__setattr__(self, "metrics", GatewayMetrics())  # frozen: set once, while being built

    def service_options(self) -> ServiceOptions:
        """The request layer's share of these options."""
        on_batch = self.metrics.observe_triton_batch if self.metrics is not None else None
        return ServiceOptions(max_images=self.max_images, max_pixels=self.max_pixels, on_batch=on_batch)


def server_tls_credentials(cert_file: str | Path, key_file: str | Path,
                           client_ca_file: str | Path | None = None) -> grpc.ServerCredentials:
    """TLS with the server's PEM certificate chain and key; with ``client_ca_file``, mutual TLS
    (clients must present a certificate signed by that CA)."""
    pair = (Path(key_file).read_bytes(), Path(cert_file).read_bytes())
    client_ca = Path(client_ca_file).read_bytes() if client_ca_file is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def server_ssl_context(cert_file: str | Path, key_file: str | Path,
                       client_ca_file: str | Path | None = None) -> ssl.SSLContext:
    """The HTTP API's TLS from the same files as ``server_tls_credentials`` (mutual with a client CA)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
        if client_ca_file is not None:
            context.load_verify_locations(str(client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as e:
        raise ValueError(f"cannot use the TLS files {cert_file}, {key_file}"
                         f"{', ' + str(client_ca_file) if client_ca_file else ''}: {e}") from e
    return context


@dataclass(frozen=True)
class GatewayServer:
    """A bound, not yet started gateway server and the parts its owner drives (health, the drain)."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    limit: InFlightLimit  # the drain on shutdown refuses new calls through it and waits for its calls
    health_server: grpc.aio.Server | None = None  # options.health_port: plaintext, health only
    health_port: int | None = None


def _bind(server: grpc.aio.Server, host: str, port: int, tls: grpc.ServerCredentials | None, what: str) -> int:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_secure_port(address, tls) if tls is not None else server.add_insecure_port(address)
    if bound == 0:
        raise GatewayError(f"cannot bind the {what} to {address}")
    return bound


def server_channel_options(options: ServerOptions) -> list[tuple[str, Any]]:
    """The gRPC server's arguments: message limits, client pings, and the connection age cap."""
    args: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", options.max_message_bytes),
        ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        # (the C-core name of GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS)
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS)]
    if options.max_connection_age_s is not None:
        args += [("grpc.max_connection_age_ms", int(options.max_connection_age_s * 1000)),
                 ("grpc.max_connection_age_grace_ms", int(MAX_CONNECTION_AGE_GRACE_S * 1000))]
    return args


def interceptors(service: EncoderService, options: ServerOptions,
                 in_flight: InFlightLimit) -> list[grpc.aio.ServerInterceptor]:
    """Outermost first: metrics (sees every outcome), authentication, in-flight limit, request decoding."""
    chain: list[grpc.aio.ServerInterceptor] = []
    if options.metrics is not None:
        chain.append(MetricsInterceptor(options.metrics, service.registry.model_label))
    if options.auth_token is not None:
        chain.append(BearerTokenAuth(options.auth_token))
    chain.append(in_flight)
    chain.append(RequestDecodeCheck())
    return chain


def create_server(service: EncoderService, host: str = "127.0.0.1", port: int = 0,
                  options: ServerOptions | None = None) -> GatewayServer:
    """A ``grpc.aio`` server with the vitserve servicer, health (NOT_SERVING until set) and reflection."""
    options = options or ServerOptions()
    admin = ModelAdmin(service.registry, enabled=options.enable_admin, on_models_loaded=options.on_models_loaded)
    on_frame = options.metrics.observe_stream_frame if options.metrics is not None else None
    in_flight = InFlightLimit(options.max_in_flight)
    if options.metrics is not None:
        options.metrics.track_in_flight(in_flight)
    server = grpc.aio.server(interceptors=interceptors(service, options, in_flight),
                             options=server_channel_options(options))
    vitserve_pb2_grpc.add_VisionEncoderServicer_to_server(VisionEncoderServicer(service, admin, on_frame), server)
    health_servicer = HealthServicer()  # grpc's own, with Watch fixed for many watchers
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    bound = _bind(server, host, port, options.tls, "gateway")
    health_server, health_port = None, None
    if options.health_port is not None:
        # The same servicer (one status) on a second, plaintext server without interceptors.
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = _bind(health_server, host, options.health_port, None, "health port")
    return GatewayServer(server, health_servicer, bound, in_flight, health_server, health_port)
