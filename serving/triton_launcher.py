"""Run the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel ships, on loopback ports.

``TritonLauncher`` is the process: its ports (picked free, retried on a lost port race), its
command line, readiness (the server and every model), its log (``serving.triton_log``) and its
stop. The server tree it runs comes from ``serving.triton_tree``; ``supervise()`` hands the running
server to a ``serving.triton_supervisor.TritonSupervisor``, which restarts it on the same ports if it
dies. Under explicit model control a restart loads the models that were loaded when the server died
(``set_loaded_models``), not the whole repository.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serving.errors import TritonLaunchError
from serving.orphan_reaper import start_reaper
from serving.tied_process import popen_tied
from serving.triton_events import SupervisionCallback
from serving.triton_log import TritonLog
from serving.triton_orphans import clear_stale, forget_launch, record_launch
from serving.triton_supervisor import RestartPolicy, TritonSupervisor
from serving.triton_tree import prepare_server_tree, pytriton_paths, server_env

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_READY_CHANNEL_ARGS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                       ("grpc.max_reconnect_backoff_ms", 200)]
__all__ = ["LOOPBACK", "TritonLaunchError", "TritonLauncher", "free_port"]


REAPER_POLL_S = 1.0
_reapers: dict[str, subprocess.Popen[bytes]] = {}  # server tree -> this process's watchdog of its Tritons


def _ensure_reaper(server_tree: Path) -> None:
    """One ``serving.orphan_reaper`` per process and server tree: it kills Triton's backend stubs (which
    the parent-death signal does not reach) when this process dies."""
    prefix = str(server_tree) + os.sep
    reaper = _reapers.get(prefix)
    if reaper is None or reaper.poll() is not None:
        # sweep: a stub forked after the reaper's last look is found by its dead group leader.
        _reapers[prefix] = start_reaper(prefix, REAPER_POLL_S, sweep=True)


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TritonLauncher:
    """``tritonserver`` on a model repository as a subprocess bound to 127.0.0.1.

    Ports left as ``None`` are picked free. ``start()`` returns when the server and every model are
    ready; ``stop()`` sends SIGTERM and SIGKILLs the process group after a grace period.
    ``supervise()`` (after ``start()``) restarts a server that died, on the same ports.
    """

    def __init__(
        self,
        model_repository: str | Path,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        log_verbose: int = 0,
        log_path: str | Path | None = None,
        stop_grace: float = 15.0,
        explicit_model_control: bool = False,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self._fixed_ports = (grpc_port, http_port, metrics_port)
        self.grpc_port, self.http_port, self.metrics_port = self._pick_ports()
        self.log_verbose = log_verbose
        self.stop_grace = stop_grace
        # Explicit: every model is loaded at start (--load-model=*), and clients may load/unload.
        self.explicit_model_control = explicit_model_control
        # Explicit control: the models to load when (re)starting; None: all of the repository (the
        # first start). Then the models loaded at start, updated by the gateway after each admin
        # load/unload, so a restart brings back what was loaded (and no model added since).
        self._load_set: tuple[str, ...] | None = None
        self.log = TritonLog(Path(log_path) if log_path else (
            Path(tempfile.mkdtemp(prefix="vitserve-triton-")) / "tritonserver.log"))
        self.process: subprocess.Popen[bytes] | None = None
        self.models: list[str] = []
        self.stopping = threading.Event()
        self._spawn_lock = threading.Lock()
        self._server: tuple[Path, Path] | None = None  # (server tree, bundled libraries) once started
        self._supervisor: TritonSupervisor | None = None

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self.log.path

    def _pick_ports(self) -> tuple[int, int, int]:
        chosen: list[int] = []
        for port in self._fixed_ports:
            p = port if port else free_port()
            while p in chosen:
                p = free_port()
            chosen.append(p)
        return chosen[0], chosen[1], chosen[2]

    def command(self, server_tree: Path) -> list[str]:
        return [
            str(server_tree / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={server_tree / 'backends'}",
            f"--grpc-address={LOOPBACK}", f"--grpc-port={self.grpc_port}",
            f"--http-address={LOOPBACK}", f"--http-port={self.http_port}",
            f"--metrics-address={LOOPBACK}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            # A model that fails to load stops the server: start() reports it instead of serving less.
            "--exit-on-error=true",
            # Strict readiness makes the whole server unready while any model is not, which under
            # explicit model control includes one unloaded on purpose: readiness is then the server's
            # own, and the models' states are read from the repository index.
            f"--strict-readiness={'false' if self.explicit_model_control else 'true'}",
            *(["--model-control-mode=explicit", *(f"--load-model={m}" for m in self._models_to_load())]
              if self.explicit_model_control else ["--model-control-mode=none"]),
            f"--exit-timeout-secs={max(1, int(self.stop_grace) - 2)}",
            f"--log-verbose={self.log_verbose}",
        ]

    def set_loaded_models(self, names: list[str]) -> None:
        """Under explicit model control: the models Triton has loaded now (after a load or unload
        through the admin RPC); a restart after a crash loads exactly these. Thread-safe."""
        self._load_set = tuple(sorted(set(names)))

    @property
    def loaded_models(self) -> list[str] | None:
        """The models a restart loads under explicit model control (None: every model of the repository)."""
        return None if self._load_set is None else list(self._load_set)

    def _models_to_load(self) -> list[str]:
        """``--load-model`` values: ``*``, or the loaded set minus models no longer in the repository
        (with --exit-on-error a missing one would stop the server)."""
        load_set = self._load_set
        if load_set is None:
            return ["*"]
        missing = [m for m in load_set if not (self.model_repository / m).is_dir()]
        if missing:
            log.warning("not reloading %s: no longer in %s", ", ".join(missing), self.model_repository)
        return [m for m in load_set if m not in missing]

    def start(self, timeout: float = 120.0) -> list[str]:
        """Launch and wait until the server and all its models are ready; returns the model names."""
        if self.process is not None and self.process.poll() is None:
            raise TritonLaunchError("this launcher's tritonserver is already running")
        if not self.model_repository.is_dir():
            raise TritonLaunchError(f"model repository {self.model_repository} is not a directory")
        self._server = (prepare_server_tree(), pytriton_paths()[1])
        clear_stale(self._server[0], self.model_repository)  # a Triton orphaned by an earlier gateway
        if self._supervisor is not None and not self._supervisor.alive:
            self._supervisor = None  # a start by hand begins with no restarts and nothing given up
        auto_ports = not any(self._fixed_ports)
        self.stopping.clear()
        self._load_set = None  # a (re)start by hand loads the whole repository
        for attempt in range(3):
            with self._spawn_lock:
                self._spawn()
            try:
                self.models = self.wait_ready(timeout)
                if self.explicit_model_control:  # a restart loads these (and what admin changes later)
                    self._load_set = tuple(self.models)
                return self.models
            except TritonLaunchError as e:
                port_clash = self.process is not None and self.process.poll() is not None and self.log.port_clash()
                if not (auto_ports and port_clash and attempt < 2):
                    self.stop()
                    raise
                log.warning("tritonserver lost a port race (%s); retrying on new ports", e)
                self.grpc_port, self.http_port, self.metrics_port = self._pick_ports()
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        assert self._server is not None, "start() prepares the server tree first"
        server_tree, libs_dir = self._server
        cmd = self.command(server_tree)
        self.log.mark_launch()
        log.info("starting tritonserver (grpc %s, log %s)", self.grpc_url, self.log.path)
        log.debug("command: %s", " ".join(cmd))
        with open(self.log.path, "ab") as log_file:
            # Own session: a terminal's Ctrl-C reaches only us, and we drain and then stop Triton (and its
            # stubs, which share its process group) in order. Tied: SIGKILL when this process dies.
            self.process = popen_tied(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=server_env(libs_dir), cwd=server_tree, start_new_session=True)
        record_launch(server_tree, self.process.pid, cmd)
        _ensure_reaper(server_tree)
        atexit.register(self.stop)

    def respawn(self) -> bool:
        """A new server on the same ports (the supervisor's restart); False once stop() has begun."""
        with self._spawn_lock:
            if self.stopping.is_set():
                return False
            self._spawn()
            return True

    def wait_ready(self, timeout: float) -> list[str]:
        """The model names once the server and every model it should load are ready."""
        assert self.process is not None
        wanted = None if self._load_set is None or not self.explicit_model_control else set(self._load_set)
        deadline = time.monotonic() + timeout
        # A short reconnect backoff: the server starts listening a moment after spawn, and gRPC's
        # default backoff (1 s, growing) would notice it seconds late.
        client = grpcclient.InferenceServerClient(self.grpc_url, channel_args=_READY_CHANNEL_ARGS)
        try:
            while True:
                if self.process.poll() is not None:
                    raise TritonLaunchError(self.log.failure_message(
                        f"tritonserver exited with code {self.process.returncode} during startup"))
                try:
                    if client.is_server_live() and client.is_server_ready():
                        index = client.get_model_repository_index(as_json=True).get("models", [])
                        # Under explicit control after unloads, only the models asked for are loaded.
                        expected = [m for m in index if wanted is None or m.get("name") in wanted]
                        failed = [m for m in expected if m.get("state") == "UNAVAILABLE"]
                        if failed:
                            reasons = "; ".join(f"{m['name']}: {m.get('reason', '?')}" for m in failed)
                            raise TritonLaunchError(self.log.failure_message(f"models failed to load: {reasons}"))
                        if all(m.get("state") == "READY" for m in expected):
                            return sorted({m["name"] for m in expected})
                except InferenceServerException:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise TritonLaunchError(self.log.failure_message(
                        f"tritonserver was not ready with all models within {timeout:.0f}s"))
                time.sleep(0.2)
        finally:
            client.close()

    def log_tail(self, lines: int = 40) -> str:
        return self.log.tail(lines)

    def poll(self) -> int | None:
        """The exit code if the server has exited, else ``None``."""
        return None if self.process is None else self.process.poll()

    # -- supervision (serving.triton_supervisor) -----------------------------------------------

    @property
    def supervised(self) -> bool:
        return self._supervisor is not None and self._supervisor.alive

    @property
    def restarts(self) -> int:
        """Successful restarts by the supervisor."""
        return self._supervisor.restarts if self._supervisor is not None else 0

    @property
    def gave_up(self) -> bool:
        """Whether the supervisor stopped restarting (too many restarts in the window)."""
        return self._supervisor is not None and self._supervisor.gave_up

    def supervise(self, *, max_restarts: int = 5, restart_window: float = 600.0,
                  backoff_initial: float = 1.0, backoff_max: float = 30.0, ready_timeout: float = 300.0,
                  on_event: SupervisionCallback | None = None) -> None:
        """Watch the running server from a daemon thread and restart it, on the same ports, if it dies
        (see ``serving.triton_supervisor``); ``on_event`` is called from the supervisor thread."""
        if self.process is None or self.process.poll() is not None:
            raise TritonLaunchError("supervise() needs a running tritonserver; call start() first")
        if self.supervised:
            raise TritonLaunchError("this launcher is already supervised")
        policy = RestartPolicy(max_restarts, restart_window, backoff_initial, backoff_max, ready_timeout)
        self._supervisor = TritonSupervisor(self, policy, on_event)
        self._supervisor.start()

    def kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL ``proc``'s process group (the server and its Python-backend stubs) and reap it."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        if self._server is not None:
            forget_launch(self._server[0], proc.pid)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the whole process group after ``stop_grace`` seconds.

        Also ends supervision: a server stopped here is never restarted.
        """
        self.stopping.set()
        with self._spawn_lock:  # a restart in progress finishes spawning first, then is stopped
            proc = self.process
        if proc is None:
            return None
        atexit.unregister(self.stop)
        if proc.poll() is None:
            log.info("stopping tritonserver (pid %d)", proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver ignored SIGTERM for %.0fs; killing it", self.stop_grace)
        self.kill_group(proc)  # Python-backend stubs share the process group; none may outlive the server
        code = proc.returncode
        if self._supervisor is not None:
            self._supervisor.join(5.0)
        return code

    def __enter__(self) -> "TritonLauncher":
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
