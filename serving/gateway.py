"""Run the gateway: the request layer, its gRPC server, the HTTP API (when asked) and the health
watcher, on one event loop.

``run_gateway`` serves until an event is set, then drains (health NOT_SERVING at once; calls still
served for ``drain_seconds`` so that balancers and clients stop sending; then new calls refused
UNAVAILABLE, calls in flight given a grace period) and stops; ``BackgroundGateway`` runs it on its own loop in a daemon
thread (tests, and sync code that embeds the gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from serving.errors import GatewayError
from serving.grpc_server import ServerOptions, create_server
from serving.health import set_serving, watch_triton
from serving.http_api import HttpContext, HttpServer, start_http
from serving.queue_stats import poll_queue_wait
from serving.service import EncoderService

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
DRAIN_LINGER_S = 0.25

# (gRPC port, model names, HTTP port or None when the HTTP API is off, health port or None)
ReadyCallback = Callable[[int, list[str], "int | None", "int | None"], None]


async def run_gateway(triton_url: str, stop: asyncio.Event, *, host: str = "127.0.0.1", port: int = 0,
                      on_ready: ReadyCallback | None = None, connect_timeout: float = 60.0,
                      grace: float = STOP_GRACE_S, options: ServerOptions | None = None,
                      service: EncoderService | None = None, drain_seconds: float = 0.0,
                      skip_drain: asyncio.Event | None = None) -> None:
    """Serve the gateway until ``stop`` is set; ``on_ready(port, model_names, http_port, health_port)``
    once it is serving (``http_port`` None unless ``options.http_port`` asks for the HTTP API,
    ``health_port`` None unless ``options.health_port``).

    After ``stop``: health NOT_SERVING at once, calls still served for ``drain_seconds`` (cut short
    when ``skip_drain`` is set), then the drain below.

    The request layer is built from ``options``; a ``service`` given instead (tests inject one whose
    registry already knows its models, which skips the wait for Triton) brings its own options.
    """
    options = options or ServerOptions()
    service = service or EncoderService(triton_url, options.service_options())
    try:
        models = list(service.registry.models.values()) or await service.connect(connect_timeout)
        gateway = create_server(service, host, port, options)
        if options.metrics is not None and options.metrics_port is not None:
            try:
                options.metrics.serve_http(options.metrics_port, host)
            except OSError as e:
                raise GatewayError(f"cannot serve metrics on {host}:{options.metrics_port}: {e}") from e
        await gateway.server.start()
        if gateway.health_server is not None:
            await gateway.health_server.start()
        http: HttpServer | None = None
        if options.http_port is not None:
            context = HttpContext(service, gateway.health, gateway.limit, options.max_message_bytes,
                                  options.auth_token, options.metrics)
            try:
                http = await start_http(context, host, options.http_port, options.http_tls)
            except BaseException as e:
                await gateway.server.stop(0)
                if gateway.health_server is not None:
                    await gateway.health_server.stop(0)
                if isinstance(e, OSError):
                    raise GatewayError(str(e)) from e
                raise
        await set_serving(gateway.health)
        watcher = asyncio.create_task(watch_triton(service, gateway.health, options.health_interval,
                                                   options.triton_events))
        queue_poller = (asyncio.create_task(poll_queue_wait(service.backend, options.metrics))
                        if options.metrics is not None else None)
        try:
            if on_ready:
                on_ready(gateway.port, sorted(m.name for m in models), http.port if http else None,
                         gateway.health_port)
            await stop.wait()
        finally:
            watcher.cancel()
            if queue_poller is not None:
                queue_poller.cancel()
            await set_serving(gateway.health, False)
            if drain_seconds > 0 and not (skip_drain is not None and skip_drain.is_set()):
                # Still serving: balancers (Kubernetes endpoints, clients' health watches) need a
                # moment to see NOT_SERVING and stop sending; a call that arrives now is answered.
                log.info("health is NOT_SERVING; serving on for the drain period (%.1fs)", drain_seconds)
                waiter = skip_drain or asyncio.Event()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(waiter.wait(), drain_seconds)
            # Drain: new calls are refused UNAVAILABLE at once (by the in-flight guard, so no call
            # that reaches the server is left unanswered); calls in flight get `grace` seconds to
            # finish before the server stops and cancels what is left. Triton stays up until then.
            t0 = time.monotonic()
            limit = gateway.limit
            limit.draining = True
            log.info("stopping the gateway: draining %d call(s) in flight, refusing new ones (grace %.0fs)",
                     limit.in_flight, grace)
            while limit.in_flight > 0 and time.monotonic() - t0 < grace:
                await asyncio.sleep(0.02)
            # Keep answering refusals a moment longer: gRPC cancels (CANCELLED, not retryable) calls
            # that reach it while it shuts down, and a client that just got its answer may be sending
            # its next call now.
            await asyncio.sleep(min(DRAIN_LINGER_S, max(0.0, grace - (time.monotonic() - t0))))
            await gateway.server.stop(max(0.0, grace - (time.monotonic() - t0)))
            if gateway.health_server is not None:
                await gateway.health_server.stop(0)
            if http is not None:
                await http.stop()
            log.info("gateway stopped after %.2fs; %d call(s) were still in flight",
                     time.monotonic() - t0, limit.in_flight)
    finally:
        if options.metrics is not None:
            options.metrics.close()
        await service.close()


class BackgroundGateway:
    """The gateway on its own event loop in a daemon thread (for tests and embedding in sync code)."""

    def __init__(self, triton_url: str, host: str = "127.0.0.1", port: int = 0,
                 options: ServerOptions | None = None, service: EncoderService | None = None) -> None:
        self.triton_url, self.host, self.port = triton_url, host, port
        self.options = options or ServerOptions()
        self._service = service
        self.models: list[str] = []
        self.http_port: int | None = None  # bound once started, when options.http_port is set
        self.health_port: int | None = None  # bound once started, when options.health_port is set
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="vitserve-gateway", daemon=True)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        """``http(s)://host:port`` of the HTTP API (started with ``options.http_port``)."""
        if self.http_port is None:
            raise GatewayError("the gateway serves no HTTP API; give ServerOptions(http_port=0)")
        scheme = "https" if self.options.http_tls is not None else "http"
        return f"{scheme}://{self.host}:{self.http_port}"

    def _on_ready(self, port: int, models: list[str], http_port: int | None = None,
                  health_port: int | None = None) -> None:
        self.port, self.models, self.http_port, self.health_port = port, models, http_port, health_port
        self._ready.set()

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await run_gateway(self.triton_url, self._stop, host=self.host, port=self.port,
                              on_ready=self._on_ready, grace=1.0, options=self.options, service=self._service)
        try:
            asyncio.run(main())
        except BaseException as e:  # reported to start()
            self._error = e
        finally:
            self._ready.set()

    def start(self, timeout: float = 60.0) -> "BackgroundGateway":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise GatewayError(f"the gateway was not ready within {timeout:.0f}s")
        if self._error is not None:
            raise GatewayError(f"the gateway failed to start: {self._error}") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.ident is None:  # never started
            return
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundGateway":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def embedded_service(repository: str | Path, options: ServerOptions | None = None, triton_timeout: float = 180.0,
                     gateway_timeout: float = 60.0) -> Iterator[BackgroundGateway]:
    """Triton (``serving.triton_launcher``) on ``repository`` and a ``BackgroundGateway`` in front of it,
    for reports, tests and sync code: yields the started gateway; on exit stops the gateway, then Triton
    (also when the gateway failed to start)."""
    from serving.triton_launcher import TritonLauncher

    launcher = TritonLauncher(repository)
    try:
        launcher.start(timeout=triton_timeout)
        gateway = BackgroundGateway(launcher.grpc_url, options=options)
        try:
            yield gateway.start(timeout=gateway_timeout)
        finally:
            gateway.stop()
    finally:
        launcher.stop()
