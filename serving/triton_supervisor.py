"""Keeping ``tritonserver`` up: restart a server that died, on the same ports, with backoff and a limit.

A server that dies (crash, OOM kill, ``kill -9``) is restarted after ``backoff_initial`` seconds,
doubling per failed attempt, each restart logged and counted, until more than ``max_restarts``
restarts would fall within ``restart_window`` seconds: then it is left down and reported (a crash loop
is not hidden). Each death and return is reported to ``on_event`` within 50 ms (the gateway's health
follows it). What a restart runs is the launcher's (``serving.triton_launcher``), seen here as a
``Restartable``.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from serving.errors import TritonLaunchError
from serving.triton_events import (EVENT_DOWN, EVENT_GAVE_UP, EVENT_RESTART_FAILED, EVENT_RESTARTED,
                                   SupervisionCallback)

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often the supervisor looks whether the server is still running


@dataclass(frozen=True)
class RestartPolicy:
    """How often and how soon a dead server is restarted."""

    max_restarts: int = 5
    restart_window: float = 600.0
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    ready_timeout: float = 300.0  # seconds a restarted server gets to have its models ready

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.backoff_initial < 0 or self.backoff_max < self.backoff_initial:
            raise ValueError("max_restarts >= 0 and 0 <= backoff_initial <= backoff_max are required")


class Restartable(Protocol):
    """What the supervisor needs of a launcher."""

    process: subprocess.Popen[bytes] | None
    stopping: threading.Event  # set by stop(): a server stopped on purpose is never restarted
    models: list[str]

    @property
    def grpc_url(self) -> str: ...

    def respawn(self) -> bool:
        """Start a new server on the same ports; False if the launcher is being stopped."""

    def wait_ready(self, timeout: float) -> list[str]:
        """The model names once the server and its models are ready (``TritonLaunchError`` if not)."""

    def kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL ``proc``'s process group (its Python-backend stubs) and reap it."""

    def log_tail(self, lines: int = 40) -> str: ...


class TritonSupervisor:
    """A daemon thread that restarts ``target``'s server whenever it dies, by ``policy``."""

    def __init__(self, target: Restartable, policy: RestartPolicy,
                 on_event: SupervisionCallback | None = None) -> None:
        self.target, self.policy, self.on_event = target, policy, on_event
        self.restarts = 0  # successful restarts
        self.gave_up = False  # too many restarts within the window: the server was left down
        self._thread = threading.Thread(target=self._run, name="vitserve-triton-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread is not threading.current_thread() and self._thread.ident is not None:
            self._thread.join(timeout)

    def _emit(self, event: str) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - a callback bug must not stop supervision
                log.exception("triton supervision callback failed on %r", event)

    def _run(self) -> None:
        target, stopping = self.target, self.target.stopping
        restart_times: list[float] = []
        while not stopping.is_set():
            proc = target.process
            assert proc is not None
            while proc.poll() is None and not stopping.wait(POLL_S):
                pass
            if stopping.is_set():
                return
            code = proc.returncode
            log.error("tritonserver (pid %d) died with %s; log tail:\n%s", proc.pid,
                      f"signal {-code}" if code < 0 else f"exit code {code}", target.log_tail(10))
            self._emit(EVENT_DOWN)
            target.kill_group(proc)  # Python-backend stubs of the dead server must not linger
            if not self._restart(restart_times):
                return

    def _restart(self, restart_times: list[float]) -> bool:
        """Restart until a server is ready (True) or the policy gives up / the launcher stops (False)."""
        target, policy, stopping = self.target, self.policy, self.target.stopping
        backoff = policy.backoff_initial
        while not stopping.is_set():
            now = time.monotonic()
            restart_times[:] = [t for t in restart_times if now - t < policy.restart_window]
            if len(restart_times) >= policy.max_restarts:
                log.error("tritonserver restarted %d times within %.0fs; giving up (it stays down)",
                          len(restart_times), policy.restart_window)
                self.gave_up = True
                self._emit(EVENT_GAVE_UP)
                return False
            if stopping.wait(backoff):
                return False
            restart_times.append(time.monotonic())
            log.warning("restarting tritonserver on the same ports (grpc %s), attempt %d within the window",
                        target.grpc_url, len(restart_times))
            if not target.respawn():
                return False
            try:
                target.models = target.wait_ready(policy.ready_timeout)
            except TritonLaunchError as e:
                if stopping.is_set():
                    return False
                log.error("tritonserver restart failed: %s", e)
                self._emit(EVENT_RESTART_FAILED)
                assert target.process is not None
                target.kill_group(target.process)
                backoff = min(policy.backoff_max, max(backoff * 2, 0.1))
                continue
            self.restarts += 1
            log.warning("tritonserver is back (restart %d, pid %d) with %s", self.restarts,
                        target.process.pid if target.process else -1, ", ".join(target.models))
            self._emit(EVENT_RESTARTED)
            return True
        return False
