"""The embedded Triton of ``vitserve serve``: launched on the model repository and supervised, with the
supervisor's events wired to the gateway's health and metrics."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from serving.errors import TritonLaunchError
from serving.grpc_server import ServerOptions
from serving.triton_events import TritonEvents
from serving.triton_launcher import TritonLauncher

log = logging.getLogger(__name__)

DEFAULT_MAX_RESTARTS = 5
DEFAULT_RESTART_WINDOW_S = 600.0
DEFAULT_RESTART_BACKOFF_S = 1.0


@dataclass(frozen=True)
class RestartOptions:
    """``vitserve serve --triton-max-restarts / --triton-restart-window / --triton-restart-backoff``."""

    max_restarts: int = DEFAULT_MAX_RESTARTS  # 0: a Triton that dies ends the service
    window: float = DEFAULT_RESTART_WINDOW_S
    backoff: float = DEFAULT_RESTART_BACKOFF_S


def supervise_embedded(launcher: TritonLauncher, options: ServerOptions, *, max_restarts: int = DEFAULT_MAX_RESTARTS,
                       restart_window: float = DEFAULT_RESTART_WINDOW_S,
                       backoff: float = DEFAULT_RESTART_BACKOFF_S, ready_timeout: float = 300.0) -> ServerOptions:
    """Start ``launcher``'s supervisor; returns ``options`` wired to it, for the gateway to be built with.

    Its events reach health at once (``triton_events``) and the metrics; with admin on, the gateway
    reports every load/unload to the launcher (``on_models_loaded``) so a restart loads what was loaded.
    """
    events = options.triton_events or TritonEvents()
    metrics = options.metrics

    def on_event(event: str) -> None:
        if metrics is not None:
            metrics.observe_triton_event(event)
        events(event)

    launcher.supervise(max_restarts=max_restarts, restart_window=restart_window, backoff_initial=backoff,
                       backoff_max=max(30.0, backoff), ready_timeout=ready_timeout, on_event=on_event)
    on_models_loaded = launcher.set_loaded_models if options.enable_admin else options.on_models_loaded
    return dataclasses.replace(options, triton_events=events, on_models_loaded=on_models_loaded)


def launch_embedded(model_repository: str | Path, options: ServerOptions, *, timeout: float, log_verbose: int = 0,
                    restart: RestartOptions | None = None) -> tuple[TritonLauncher, ServerOptions]:
    """A started (and, unless ``restart.max_restarts`` is 0, supervised) Triton on ``model_repository``,
    and ``options`` wired to it. The caller stops the launcher, also when this raises."""
    restart = restart or RestartOptions()
    launcher = TritonLauncher(model_repository, log_verbose=log_verbose, explicit_model_control=options.enable_admin)
    try:
        models = launcher.start(timeout=timeout)
        if not models:
            raise TritonLaunchError(f"the model repository {launcher.model_repository} holds no "
                                    f"models; put one there with `vitserve export`")
        log.info("tritonserver ready with %s (log: %s)", ", ".join(models), launcher.log_path)
        if options.metrics is not None:
            options.metrics.triton_up.set(1)
        if restart.max_restarts > 0:
            options = supervise_embedded(launcher, options, max_restarts=restart.max_restarts,
                                         restart_window=restart.window, backoff=restart.backoff,
                                         ready_timeout=timeout)
    except BaseException:
        launcher.stop()
        raise
    return launcher, options
