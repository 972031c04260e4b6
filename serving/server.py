"""``vitserve serve``: Triton (launched here, or an external one by URL) plus the gRPC gateway.

Prints exactly one line to stdout when everything is ready::

    vitserve ready: gateway 127.0.0.1:PORT, triton grpc 127.0.0.1:P, models: a, b

(with ``--http-port``: ``gateway 127.0.0.1:PORT, http http://127.0.0.1:HP, triton grpc ...``)

(with ``--health-port``: ``gateway 127.0.0.1:PORT, health 127.0.0.1:HP, triton grpc ...``) and on
SIGTERM turns health NOT_SERVING, serves on for ``--drain-seconds`` (so balancers stop sending; a
second SIGTERM or a SIGINT skips it), stops the gateway (letting in-flight calls finish) and then
Triton, exit 0. ``--replicas N`` runs N such servers (``serving.replicas``) and prints one line
``vitserve ready: replicas 127.0.0.1:P1,127.0.0.1:P2,...`` (the client target of all of them).
An embedded Triton that dies is restarted on the same ports (``--triton-max-restarts``); while it is
down health reports NOT_SERVING and calls end UNAVAILABLE. Exit code 1 once restarts are exhausted.
``run_gateway`` and ``BackgroundGateway`` (``serving.gateway``) run the gateway itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator

from serving.embedded import RestartOptions, launch_embedded
from serving.errors import GatewayError, TritonLaunchError
from serving.gateway import STOP_GRACE_S, run_gateway
from serving.grpc_server import DEFAULT_MAX_IN_FLIGHT, MAX_CONNECTION_AGE_GRACE_S, ServerOptions
from serving.images import DEFAULT_MAX_PIXELS
from serving.service import DEFAULT_MAX_IMAGES
from serving.triton_launcher import TritonLauncher

log = logging.getLogger(__name__)

DEFAULT_PORT = 50051
DEFAULT_DRAIN_S = 0.0


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
                       connect_timeout: float, options: ServerOptions, grace: float = STOP_GRACE_S,
                       drain_seconds: float = 0.0) -> int:
    loop = asyncio.get_running_loop()
    stop, skip_drain = asyncio.Event(), asyncio.Event()

    def on_sigterm() -> None:  # a second SIGTERM cuts the drain period short
        if stop.is_set():
            skip_drain.set()
        stop.set()

    def on_sigint() -> None:  # Ctrl-C at a terminal: no drain period, only calls in flight finish
        skip_drain.set()
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    exit_code = 0

    def ready(bound: int, models: list[str], http_port: int | None, health_port: int | None = None) -> None:
        scheme = "https" if options.http_tls is not None else "http"
        http = f", http {scheme}://{host}:{http_port}" if http_port is not None else ""
        health = f", health {host}:{health_port}" if health_port is not None else ""
        print(f"vitserve ready: gateway {host}:{bound}{http}{health}, triton grpc {triton_url}, "
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
                          connect_timeout=connect_timeout, options=options, grace=grace,
                          drain_seconds=drain_seconds, skip_drain=skip_drain)
    finally:
        watcher.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return exit_code


def serve(model_repository: str | Path | None = None, port: int = DEFAULT_PORT,
          triton_url: str | None = None, host: str = "127.0.0.1", *,
          triton_timeout: float = 300.0, log_verbose: int = 0, options: ServerOptions | None = None,
          restart: RestartOptions | None = None, shutdown_grace: float = STOP_GRACE_S,
          drain_seconds: float = 0.0) -> int:
    """Run Triton (unless ``triton_url`` names a running one) and the gateway until SIGINT/SIGTERM.

    An embedded Triton that dies is restarted on the same ports by ``restart`` (see
    ``serving.embedded``). Returns the process exit code: 0 after a signal, 1 if Triton died and
    was not (or could no longer be) restarted.
    """
    if (model_repository is None) == (triton_url is None):
        raise ValueError("give exactly one of model_repository and triton_url")
    options = options or ServerOptions()
    launcher: TritonLauncher | None = None
    try:
        if model_repository is not None:
            with _terminate_as_exit():
                launcher, options = launch_embedded(model_repository, options, timeout=triton_timeout,
                                                    log_verbose=log_verbose, restart=restart)
            triton_url = launcher.grpc_url
        assert triton_url is not None
        return asyncio.run(_serve_async(triton_url, host, port, launcher, triton_timeout, options,
                                        shutdown_grace, drain_seconds))
    finally:
        if launcher is not None:
            launcher.stop()


# -- command line ---------------------------------------------------------------------------------

def _flag_error(message: str) -> argparse.ArgumentError:
    # Without an action argparse prints the message as it is; each message names its flag itself.
    return argparse.ArgumentError(None, message)


def _number(flag: str, kind: type[int] | type[float], *, minimum: float, inclusive: bool = True
            ) -> Callable[[str], int | float]:
    """A ``type=`` converter for ``flag``: a ``kind`` that is >= (or >) ``minimum``."""
    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise _flag_error(f"{flag} {text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < minimum or (value == minimum and not inclusive):
            raise _flag_error(f"{flag} must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        return value
    return convert


def _port(flag: str) -> Callable[[str], int]:
    """A ``type=`` converter for ``flag``: 0 (a free port) to 65535."""
    def convert(text: str) -> int:
        try:
            port = int(text)
        except ValueError:
            port = -1
        if not 0 <= port <= 65535:
            raise _flag_error(f"{flag} {text} is not a port number (0-65535)")
        return port
    return convert


parse_port = _port("--port")


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


def _max_pixels(text: str) -> int:
    try:
        return parse_pixels(text)
    except ValueError as e:
        raise _flag_error(f"--max-pixels: {e}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(  # no abbreviations: --replicas rewrites the port flags by their full names
        prog="vitserve serve", description="Start Triton (or use a running one) and the vitserve gRPC gateway.",
        allow_abbrev=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-repository", type=Path, help="Triton model repository to serve "
                     "(starts the embedded tritonserver)")
    src.add_argument("--triton-url", help="HOST:PORT of a running Triton's gRPC endpoint to use instead")
    p.add_argument("--port", type=parse_port, default=DEFAULT_PORT, help=f"gateway port (0: pick a free one; "
                   f"default {DEFAULT_PORT})")
    p.add_argument("--http-port", type=_port("--http-port"), metavar="PORT",
                   help="also serve the HTTP API (OpenAI-style /v1/embeddings, /v1/features, /v1/models, "
                        "/health/*, the page at /) on this port of --host (0: a free one), with the same "
                        "TLS, token, limits and metrics as gRPC")
    p.add_argument("--host", default="127.0.0.1", help="gateway bind address (default 127.0.0.1)")
    p.add_argument("--triton-timeout", type=float, default=300.0,
                   help="seconds to wait for Triton and its models to be ready (default 300)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    p.add_argument("--triton-max-restarts", type=_number("--triton-max-restarts", int, minimum=0),
                   default=RestartOptions.max_restarts,
                   help=f"restart an embedded tritonserver that died, at most this many times within "
                        f"--triton-restart-window (0: exit 1 instead; default {RestartOptions.max_restarts})")
    p.add_argument("--triton-restart-window", type=_number("--triton-restart-window", float, minimum=0,
                                                           inclusive=False),
                   default=RestartOptions.window,
                   help=f"seconds over which restarts are counted (default {RestartOptions.window:.0f})")
    p.add_argument("--triton-restart-backoff", type=_number("--triton-restart-backoff", float, minimum=0),
                   default=RestartOptions.backoff,
                   help=f"seconds before the first restart attempt, doubling per failed attempt "
                        f"(default {RestartOptions.backoff})")
    p.add_argument("--max-in-flight", type=_number("--max-in-flight", int, minimum=1), default=DEFAULT_MAX_IN_FLIGHT,
                   help=f"RPCs handled at once (a stream counts once); past it RESOURCE_EXHAUSTED "
                        f"(default {DEFAULT_MAX_IN_FLIGHT})")
    p.add_argument("--max-message-mb", type=_number("--max-message-mb", float, minimum=0, inclusive=False),
                   default=256.0, help="largest request message accepted, in MiB (default 256)")
    p.add_argument("--max-images-per-request", type=_number("--max-images-per-request", int, minimum=1),
                   default=DEFAULT_MAX_IMAGES, metavar="N",
                   help=f"images one Embed/Features request (or stream frame) may carry; more: "
                        f"INVALID_ARGUMENT (default {DEFAULT_MAX_IMAGES})")
    p.add_argument("--max-pixels", type=_max_pixels, default=DEFAULT_MAX_PIXELS, metavar="N|WxH",
                   help=f"pixels one image may have (e.g. 16777216 or 4096x4096), checked on the declared "
                        f"size before decoding (a decompression bomb is refused); default {DEFAULT_MAX_PIXELS} "
                        f"(8192x8192)")
    p.add_argument("--auth-token-file", type=Path,
                   help="require 'authorization: Bearer <token>' with the token in this file "
                        "(health and reflection stay open)")
    p.add_argument("--shutdown-grace", type=_number("--shutdown-grace", float, minimum=0), default=STOP_GRACE_S,
                   help=f"on SIGINT/SIGTERM, seconds calls in flight get to finish while new ones are "
                        f"refused (default {STOP_GRACE_S:.0f})")
    p.add_argument("--drain-seconds", type=_number("--drain-seconds", float, minimum=0), default=DEFAULT_DRAIN_S,
                   help=f"on SIGTERM, seconds health reports NOT_SERVING while calls are still served, so that "
                        f"load balancers and clients stop sending before the gateway refuses calls; then "
                        f"--shutdown-grace for calls in flight (default {DEFAULT_DRAIN_S:.0f}: stop at once, as a "
                        f"process at a terminal should; behind a balancer use a few seconds, e.g. 10 on "
                        f"Kubernetes; SIGINT never waits)")
    p.add_argument("--health-port", type=_port("--health-port"), metavar="PORT",
                   help="also serve the gRPC health service (grpc.health.v1) alone, in plaintext and without "
                        "the token, on this port of --host (0: a free one), for probes that can do neither "
                        "TLS nor tokens (Kubernetes); NOT_SERVING while Triton or its models are not ready "
                        "and while draining")
    p.add_argument("--max-connection-age", type=_number("--max-connection-age", float, minimum=0, inclusive=False),
                   metavar="SECONDS",
                   help="close each client connection after this many seconds (calls in flight get "
                        f"{MAX_CONNECTION_AGE_GRACE_S:.0f} s more), so that clients re-resolve the replicas and "
                        "spread over new ones (default: never)")
    p.add_argument("--replicas", type=_number("--replicas", int, minimum=1), default=1, metavar="N",
                   help="run N gateway + embedded Triton pairs on this host (needs --model-repository); "
                        "--port, --http-port, --health-port and --metrics-port are the first replica's, the "
                        "others get the next ports (0: each a free one); prints the client target of all")
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


def _is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the gateway reachable from this machine only."""
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
    if args.replicas > 1:
        if args.model_repository is None:
            print("vitserve serve: --replicas starts one embedded Triton per replica; give --model-repository "
                  "(against --triton-url run one gateway per Triton instead)", file=sys.stderr)
            return 2
        from serving.replicas import serve_replicas
        return serve_replicas(args.replicas, list(argv if argv is not None else sys.argv[1:]), args)
    if args.enable_admin and args.auth_token_file is None and not _is_loopback(args.host):
        print(f"vitserve serve: --enable-admin on --host {args.host} (reachable from other machines) needs "
              "--auth-token-file, so that only token holders can load and unload models", file=sys.stderr)
        return 2
    try:
        options = ServerOptions.from_files(
            auth_token_file=args.auth_token_file, max_in_flight=args.max_in_flight,
            max_message_bytes=int(args.max_message_mb * 1024 * 1024), metrics_port=args.metrics_port,
            enable_admin=args.enable_admin, http_port=args.http_port, max_images=args.max_images_per_request,
            max_pixels=args.max_pixels, health_port=args.health_port,
            max_connection_age_s=args.max_connection_age,
            tls_cert_file=args.tls_cert, tls_key_file=args.tls_key, tls_client_ca_file=args.tls_client_ca)
    except (OSError, ValueError) as e:
        print(f"vitserve serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    restart = RestartOptions(args.triton_max_restarts, args.triton_restart_window, args.triton_restart_backoff)
    try:
        return serve(args.model_repository, args.port, args.triton_url, args.host,
                     triton_timeout=args.triton_timeout, log_verbose=args.log_verbose, options=options,
                     restart=restart, shutdown_grace=args.shutdown_grace, drain_seconds=args.drain_seconds)
    except (TritonLaunchError, GatewayError) as e:
        print(f"vitserve serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
