"""``vitserve serve``: Triton (launched here, or an external one by URL) plus the gRPC gateway.

Prints exactly one line to stdout when everything is ready::

    vitserve ready: gateway 127.0.0.1:PORT, triton grpc 127.0.0.1:P, models: a, b

and on SIGINT/SIGTERM stops the gateway (letting in-flight calls finish) and then Triton, exit 0.
An embedded Triton that dies is restarted on the same ports (``--triton-max-restarts``); while it is
down health reports NOT_SERVING and calls end UNAVAILABLE. Exit code 1 once restarts are exhausted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from serving.errors import GatewayError
from serving.gateway import DEFAULT_MAX_IMAGES, VisionEncoderGateway
from serving.grpc_server import (DEFAULT_MAX_IN_FLIGHT, ServerOptions, TritonEvents, create_server, set_serving,
                                 watch_triton)
from serving.images import DEFAULT_MAX_PIXELS
from serving.triton_launcher import TritonLaunchError, TritonLauncher

log = logging.getLogger(__name__)

DEFAULT_PORT = 50051
STOP_GRACE_S = 5.0
DRAIN_LINGER_S = 0.25
DEFAULT_MAX_RESTARTS = 5
DEFAULT_RESTART_WINDOW_S = 600.0
DEFAULT_RESTART_BACKOFF_S = 1.0

ReadyCallback = Callable[[int, list[str]], None]


async def run_gateway(triton_url: str, stop: asyncio.Event, *, host: str = "127.0.0.1", port: int = 0,
                      on_ready: ReadyCallback | None = None, connect_timeout: float = 60.0,
                      grace: float = STOP_GRACE_S, gateway: VisionEncoderGateway | None = None,
                      options: ServerOptions | None = None) -> None:
    """Serve the gateway until ``stop`` is set; ``on_ready(port, model_names)`` once it is serving.

    A ``gateway`` that already knows its models (tests inject them) skips the wait for Triton.
    """
    gateway = gateway or VisionEncoderGateway(triton_url)
    options = options or ServerOptions()
    try:
        models = list(gateway.models.values()) or await gateway.connect(connect_timeout)
        server, health_servicer, bound = create_server(gateway, host, port, options)
        if options.metrics is not None and options.metrics_port is not None:
            try:
                options.metrics.serve_http(options.metrics_port, host)
            except OSError as e:
                raise GatewayError(f"cannot serve metrics on {host}:{options.metrics_port}: {e}") from e
        await server.start()
        await set_serving(health_servicer)
        watcher = asyncio.create_task(watch_triton(gateway, health_servicer, options.health_interval,
                                                   options.triton_events))
        try:
            if on_ready:
                on_ready(bound, sorted(m.name for m in models))
            await stop.wait()
        finally:
            watcher.cancel()
            await set_serving(health_servicer, False)
            # Drain: new calls are refused UNAVAILABLE at once (by the in-flight guard, so no call
            # that reaches the server is left unanswered); calls in flight get `grace` seconds to
            # finish before the server stops and cancels what is left. Triton stays up until then.
            t0 = time.monotonic()
            if gateway.in_flight_limit is not None:
                gateway.in_flight_limit.draining = True
            log.info("stopping the gateway: draining %d call(s) in flight, refusing new ones (grace %.0fs)",
                     gateway.calls_in_flight(), grace)
            while gateway.calls_in_flight() > 0 and time.monotonic() - t0 < grace:
                await asyncio.sleep(0.02)
            # Keep answering refusals a moment longer: gRPC cancels (CANCELLED, not retryable) calls
            # that reach it while it shuts down, and a client that just got its answer may be sending
            # its next call now.
            await asyncio.sleep(min(DRAIN_LINGER_S, max(0.0, grace - (time.monotonic() - t0))))
            await server.stop(max(0.0, grace - (time.monotonic() - t0)))
            log.info("gateway stopped after %.2fs; %d call(s) were still in flight",
                     time.monotonic() - t0, gateway.calls_in_flight())
    finally:
        if options.metrics is not None:
            options.metrics.close()
        await gateway.close()


class BackgroundGateway:
    """The gateway on its own event loop in a daemon thread (for tests and embedding in sync code)."""

    def __init__(self, triton_url: str, host: str = "127.0.0.1", port: int = 0,
                 gateway: VisionEncoderGateway | None = None, options: ServerOptions | None = None) -> None:
        self.triton_url, self.host, self.port = triton_url, host, port
        self._gateway = gateway
        self.options = options or ServerOptions()
        self.models: list[str] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="vitserve-gateway", daemon=True)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def _on_ready(self, port: int, models: list[str]) -> None:
        self.port, self.models = port, models
        self._ready.set()

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await run_gateway(self.triton_url, self._stop, host=self.host, port=self.port,
                              on_ready=self._on_ready, grace=1.0, gateway=self._gateway,
                              options=self.options)
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
def _terminate_as_exit() -> Iterator[None]:
    """While Triton starts (sync code), turn SIGTERM into SystemExit so `finally` still stops it."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


async def _serve_async(triton_url: str, host: str, port: int, launcher: TritonLauncher | None,
                       connect_timeout: float, options: ServerOptions, grace: float = STOP_GRACE_S) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    exit_code = 0

    def ready(bound: int, models: list[str]) -> None:
        print(f"vitserve ready: gateway {host}:{bound}, triton grpc {triton_url}, "
              f"models: {', '.join(models)}", flush=True)

    def triton_lost() -> bool:
        assert launcher is not None
        # Supervised: only a supervisor that gave up ends the service; it restarts everything else.
        return launcher.gave_up or (not launcher.supervised and launcher.poll() is not None)

    async def watch_process() -> None:
        nonlocal exit_code
        while launcher is not None and not triton_lost():
            await asyncio.sleep(0.5)
        if launcher is not None:
            log.error("tritonserver is down for good (code %s, %d restarts); stopping. Log tail:\n%s",
                      launcher.poll(), launcher.restarts, launcher.log_tail(20))
            exit_code = 1
            stop.set()

    watcher = asyncio.create_task(watch_process())
    try:
        await run_gateway(triton_url, stop, host=host, port=port, on_ready=ready,
                          connect_timeout=connect_timeout, options=options, grace=grace)
    finally:
        watcher.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return exit_code


def supervise_embedded(launcher: TritonLauncher, options: ServerOptions, *, max_restarts: int = DEFAULT_MAX_RESTARTS,
                       restart_window: float = DEFAULT_RESTART_WINDOW_S,
                       backoff: float = DEFAULT_RESTART_BACKOFF_S, ready_timeout: float = 300.0) -> None:
    """Start ``launcher``'s supervisor, wired to the gateway that ``options`` will configure.

    Its events reach health at once (``options.triton_events``) and the metrics; with admin on,
    the gateway reports every load/unload to the launcher so a restart loads what was loaded.
    """
    events = options.triton_events = options.triton_events or TritonEvents()
    metrics = options.metrics
    if options.enable_admin:
        options.on_models_loaded = launcher.set_loaded_models

    def on_event(event: str) -> None:
        if metrics is not None:
            metrics.observe_triton_event(event)
        events(event)

    launcher.supervise(max_restarts=max_restarts, restart_window=restart_window, backoff_initial=backoff,
                       backoff_max=max(30.0, backoff), ready_timeout=ready_timeout, on_event=on_event)


def serve(model_repository: str | Path | None = None, port: int = DEFAULT_PORT,
          triton_url: str | None = None, host: str = "127.0.0.1", *,
          triton_timeout: float = 300.0, log_verbose: int = 0, options: ServerOptions | None = None,
          triton_max_restarts: int = DEFAULT_MAX_RESTARTS,
          triton_restart_window: float = DEFAULT_RESTART_WINDOW_S,
          triton_restart_backoff: float = DEFAULT_RESTART_BACKOFF_S, shutdown_grace: float = STOP_GRACE_S) -> int:
    """Run Triton (unless ``triton_url`` names a running one) and the gateway until SIGINT/SIGTERM.

    An embedded Triton that dies is restarted on the same ports, with backoff starting at
    ``triton_restart_backoff`` seconds, at most ``triton_max_restarts`` times within
    ``triton_restart_window`` seconds (0: never). Returns the process exit code: 0 after a
    signal, 1 if Triton died and was not (or could no longer be) restarted.
    """
    if (model_repository is None) == (triton_url is None):
        raise ValueError("give exactly one of model_repository and triton_url")
    options = options or ServerOptions()
    launcher: TritonLauncher | None = None
    try:
        with _terminate_as_exit():
            if model_repository is not None:
                launcher = TritonLauncher(model_repository, log_verbose=log_verbose,
                                          explicit_model_control=options.enable_admin)
                models = launcher.start(timeout=triton_timeout)
                if not models:
                    raise TritonLaunchError(f"the model repository {launcher.model_repository} holds no "
                                            f"models; put one there with `vitserve export`")
                log.info("tritonserver ready with %s (log: %s)", ", ".join(models), launcher.log_path)
                triton_url = launcher.grpc_url
                metrics = options.metrics
                if metrics is not None:
                    metrics.triton_up.set(1)
                if triton_max_restarts > 0:
                    supervise_embedded(launcher, options, max_restarts=triton_max_restarts,
                                       restart_window=triton_restart_window, backoff=triton_restart_backoff,
                                       ready_timeout=triton_timeout)
        assert triton_url is not None
        return asyncio.run(_serve_async(triton_url, host, port, launcher, triton_timeout, options,
                                        shutdown_grace))
    finally:
        if launcher is not None:
            launcher.stop()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitserve serve", description="Start Triton (or use a running one) and the vitserve gRPC gateway.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-repository", type=Path, help="Triton model repository to serve "
                     "(starts the embedded tritonserver)")
    src.add_argument("--triton-url", help="HOST:PORT of a running Triton's gRPC endpoint to use instead")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"gateway port (0: pick a free one; "
                   f"default {DEFAULT_PORT})")
    p.add_argument("--host", default="127.0.0.1", help="gateway bind address (default 127.0.0.1)")
    p.add_argument("--triton-timeout", type=float, default=300.0,
                   help="seconds to wait for Triton and its models to be ready (default 300)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    p.add_argument("--triton-max-restarts", type=int, default=DEFAULT_MAX_RESTARTS,
                   help=f"restart an embedded tritonserver that died, at most this many times within "
                        f"--triton-restart-window (0: exit 1 instead; default {DEFAULT_MAX_RESTARTS})")
    p.add_argument("--triton-restart-window", type=float, default=DEFAULT_RESTART_WINDOW_S,
                   help=f"seconds over which restarts are counted (default {DEFAULT_RESTART_WINDOW_S:.0f})")
    p.add_argument("--triton-restart-backoff", type=float, default=DEFAULT_RESTART_BACKOFF_S,
                   help=f"seconds before the first restart attempt, doubling per failed attempt "
                        f"(default {DEFAULT_RESTART_BACKOFF_S})")
    p.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT,
                   help=f"RPCs handled at once (a stream counts once); past it RESOURCE_EXHAUSTED "
                        f"(default {DEFAULT_MAX_IN_FLIGHT})")
    p.add_argument("--max-message-mb", type=float, default=256.0,
                   help="largest request message accepted, in MiB (default 256)")
    p.add_argument("--max-images-per-request", type=int, default=DEFAULT_MAX_IMAGES, metavar="N",
                   help=f"images one Embed/Features request (or stream frame) may carry; more: "
                        f"INVALID_ARGUMENT (default {DEFAULT_MAX_IMAGES})")
    p.add_argument("--max-pixels", default=str(DEFAULT_MAX_PIXELS), metavar="N|WxH",
                   help=f"pixels one image may have (e.g. 16777216 or 4096x4096), checked on the declared "
                        f"size before decoding (a decompression bomb is refused); default {DEFAULT_MAX_PIXELS} "
                        f"(8192x8192)")
    p.add_argument("--auth-token-file", type=Path,
                   help="require 'authorization: Bearer <token>' with the token in this file "
                        "(health and reflection stay open)")
    p.add_argument("--shutdown-grace", type=float, default=STOP_GRACE_S,
                   help=f"on SIGINT/SIGTERM, seconds calls in flight get to finish while new ones are "
                        f"refused (default {STOP_GRACE_S:.0f})")
    p.add_argument("--enable-admin", action="store_true",
                   help="enable the model management RPCs (LoadModel, UnloadModel, ReloadModel, "
                        "ListRepository; behind --auth-token-file when given); the embedded Triton then "
                        "runs with explicit model control, every model loaded at start, and a restart "
                        "after a crash loads the models that were loaded when it died")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: a free one)")
    p.add_argument("--tls-cert", type=Path, help="serve TLS with this PEM certificate (chain)")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path,
                   help="mutual TLS: require client certificates signed by this PEM CA")
    return p


def parse_pixels(text: str) -> int:
    """``--max-pixels``: a count (``16777216``) or a size (``4096x4096``); ``ValueError`` unless >= 1."""
    value = text.strip().lower()
    try:
        if "x" in value:
            w, h = value.split("x", 1)
            pixels = int(w) * int(h)
            if int(w) < 1 or int(h) < 1:
                raise ValueError
        else:
            pixels = int(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a pixel count (e.g. 16777216) or a size (e.g. 4096x4096)") from None
    if pixels < 1:
        raise ValueError(f"{text!r} must be at least 1 pixel")
    return pixels


def _is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the gateway reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    if not 0 <= args.port <= 65535:
        print(f"vitserve serve: --port {args.port} is not a port number (0-65535)", file=sys.stderr)
        return 2
    if args.max_in_flight < 1 or args.max_message_mb <= 0:
        print("vitserve serve: --max-in-flight must be >= 1 and --max-message-mb > 0", file=sys.stderr)
        return 2
    if args.max_images_per_request < 1:
        print(f"vitserve serve: --max-images-per-request must be >= 1, got {args.max_images_per_request}",
              file=sys.stderr)
        return 2
    try:
        max_pixels = parse_pixels(args.max_pixels)
    except ValueError as e:
        print(f"vitserve serve: --max-pixels: {e}", file=sys.stderr)
        return 2
    if args.shutdown_grace < 0:
        print("vitserve serve: --shutdown-grace must be >= 0", file=sys.stderr)
        return 2
    if args.triton_max_restarts < 0 or args.triton_restart_window <= 0 or args.triton_restart_backoff < 0:
        print("vitserve serve: --triton-max-restarts must be >= 0, --triton-restart-window > 0 and "
              "--triton-restart-backoff >= 0", file=sys.stderr)
        return 2
    if args.enable_admin and args.auth_token_file is None and not _is_loopback(args.host):
        print(f"vitserve serve: --enable-admin on --host {args.host} (reachable from other machines) needs "
              "--auth-token-file, so that only token holders can load and unload models", file=sys.stderr)
        return 2
    try:
        options = ServerOptions.from_files(
            auth_token_file=args.auth_token_file, max_in_flight=args.max_in_flight,
            max_message_bytes=int(args.max_message_mb * 1024 * 1024), metrics_port=args.metrics_port,
            enable_admin=args.enable_admin, max_images=args.max_images_per_request, max_pixels=max_pixels,
            tls_cert_file=args.tls_cert, tls_key_file=args.tls_key, tls_client_ca_file=args.tls_client_ca)
    except (OSError, ValueError) as e:
        print(f"vitserve serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return serve(args.model_repository, args.port, args.triton_url, args.host,
                     triton_timeout=args.triton_timeout, log_verbose=args.log_verbose, options=options,
                     triton_max_restarts=args.triton_max_restarts,
                     triton_restart_window=args.triton_restart_window,
                     triton_restart_backoff=args.triton_restart_backoff, shutdown_grace=args.shutdown_grace)
    except (TritonLaunchError, GatewayError) as e:
        print(f"vitserve serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
