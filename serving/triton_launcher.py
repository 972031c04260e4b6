"""Start the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel ships, on loopback ports.

The wheel's server tree is read-only inside site-packages and lacks the Python-backend stub in
``backends/python/``, so a writable copy with the stub for this interpreter is prepared once under
``~/.cache/vitserve/`` (atomically, so concurrent launches never see a half-written copy).

``TritonLauncher.supervise()`` keeps the server up: a ``tritonserver`` that dies (crash, OOM kill,
``kill -9``) is restarted on the same ports with exponential backoff, each restart logged and
counted, until too many restarts fall within a window. Under explicit model control a restart loads
the models that were loaded when the server died (``set_loaded_models``), not the whole repository.
Each death and return is reported to ``on_event`` within 50 ms (the gateway's health follows it).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Callable

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_STUB_NAME = "triton_python_backend_stub"
_PORT_IN_USE = re.compile(r"address already in use|failed to start.*(grpc|http|metrics)", re.I)
# Lines Triton writes when a model fails, e.g.
# "E0101 ... model_lifecycle.cc:654] failed to load 'm' version 1: Internal: ..."
_ERROR_LINE = re.compile(r"^E\d{4} [^\]]*\] (.*)$")
# Error lines a CPU-only machine always produces; they say nothing about the models.
_EXPECTED_NOISE = ("CudaDriverHelper", "CUDA driver", "NVML", "DCGM")


_READY_CHANNEL_ARGS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                       ("grpc.max_reconnect_backoff_ms", 200)]


class TritonLaunchError(RuntimeError):
    """Triton could not be prepared, started, or did not get its models ready."""


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def pytriton_paths() -> tuple[Path, Path, str]:
    """The wheel's ``tritonserver`` tree, its bundled shared-library directory, and its version."""
    try:
        import pytriton
    except ImportError as e:
        raise TritonLaunchError(
            "nvidia-pytriton is not installed; `pip install nvidia-pytriton` provides tritonserver") from e
    package_dir = Path(pytriton.__file__).resolve().parent
    server_dir = package_dir / "tritonserver"
    libs_dir = package_dir.parent / "nvidia_pytriton.libs"
    try:
        wheel_version = version("nvidia-pytriton")
    except PackageNotFoundError:
        wheel_version = "unknown"
    if not (server_dir / "bin" / "tritonserver").is_file():
        raise TritonLaunchError(f"no tritonserver binary in {server_dir}; reinstall nvidia-pytriton")
    return server_dir, libs_dir, wheel_version


def cache_root() -> Path:
    """``$VITSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/vitserve``, else ``~/.cache/vitserve``."""
    if os.environ.get("VITSERVE_CACHE_DIR"):
        return Path(os.environ["VITSERVE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vitserve"


def prepare_server_tree(cache_dir: Path | None = None) -> Path:
    """A writable copy of the wheel's server with this Python's backend stub, created once.

    The copy is assembled in a temporary sibling directory and renamed into place: rename is atomic,
    so a concurrent launch either sees the finished tree or builds its own and discards it.
    """
    server_dir, _, wheel_version = pytriton_paths()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    # The stub links libpython<major.minor>, so the interpreter version is part of the cache key.
    target = (cache_dir or cache_root()) / f"tritonserver-{wheel_version}-py{py}"
    if (target / "backends" / "python" / _STUB_NAME).is_file():
        return target
    stub = server_dir / "python_backend_stubs" / py / _STUB_NAME
    if not stub.is_file():
        available = sorted(p.name for p in (server_dir / "python_backend_stubs").iterdir())
        raise TritonLaunchError(
            f"nvidia-pytriton {wheel_version} has no Python-backend stub for Python {py} "
            f"(it ships {available}); run vitserve with one of those Python versions")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # not made by us (ours appear complete, by rename): rebuild it
        log.warning("replacing incomplete tritonserver copy %s", target)
        shutil.rmtree(target, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tree = tmp / "tritonserver"
        shutil.copytree(server_dir, tree, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        shutil.copy2(stub, tree / "backends" / "python" / _STUB_NAME)
        try:
            os.rename(tree, target)
            log.info("prepared tritonserver %s for Python %s in %s", wheel_version, py, target)
        except OSError:
            if not (target / "backends" / "python" / _STUB_NAME).is_file():
                raise
            log.debug("another process prepared %s first", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _server_env(libs_dir: Path) -> dict[str, str]:
    env = os.environ.copy()
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (env.get("LD_LIBRARY_PATH", ""), str(libs_dir)) if p)
    # model.py runs inside the stub's embedded interpreter: give it this venv's packages and the repo.
    site_packages = sysconfig.get_paths()["purelib"]
    platlib = sysconfig.get_paths()["platlib"]
    paths = dict.fromkeys([site_packages, platlib, str(_repo_root())])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


# Supervision events passed to ``supervise(on_event=...)``.
EVENT_DOWN = "down"            # the server exited without stop(); a restart follows unless given up
EVENT_RESTARTED = "restarted"  # a restarted server and all its models are ready again
EVENT_RESTART_FAILED = "restart_failed"  # one restart attempt did not get ready; tried again
EVENT_GAVE_UP = "gave_up"      # more than max_restarts restarts within restart_window; left down
SupervisionCallback = Callable[[str], None]


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
        self.log_path = Path(log_path) if log_path else (
            Path(tempfile.mkdtemp(prefix="vitserve-triton-")) / "tritonserver.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.models: list[str] = []
        self._log_offset = 0
        self.restarts = 0  # successful restarts by the supervisor
        self.gave_up = False  # the supervisor stopped restarting (too many restarts in the window)
        self._stopping = threading.Event()
        self._spawn_lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

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
        server_tree = prepare_server_tree()
        _, libs_dir, _ = pytriton_paths()
        auto_ports = not any(self._fixed_ports)
        self._stopping.clear()
        self.gave_up = False
        self._load_set = None  # a (re)start by hand loads the whole repository
        for attempt in range(3):
            with self._spawn_lock:
                self._spawn(server_tree, libs_dir)
            try:
                self.models = self._wait_ready(timeout)
                if self.explicit_model_control:  # a restart loads these (and what admin changes later)
                    self._load_set = tuple(self.models)
                return self.models
            except TritonLaunchError as e:
                port_clash = self.process is not None and self.process.poll() is not None and \
                    _PORT_IN_USE.search(self.log_tail())
                if not (auto_ports and port_clash and attempt < 2):
                    self.stop()
                    raise
                log.warning("tritonserver lost a port race (%s); retrying on new ports", e)
                self.grpc_port, self.http_port, self.metrics_port = self._pick_ports()
        raise AssertionError("unreachable")

    def _spawn(self, server_tree: Path, libs_dir: Path) -> None:
        cmd = self.command(server_tree)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log.info("starting tritonserver (grpc %s, log %s)", self.grpc_url, self.log_path)
        log.debug("command: %s", " ".join(cmd))
        with open(self.log_path, "ab") as log_file:
            # Own session: a terminal's Ctrl-C reaches us, and we stop Triton (and its stubs) in order.
            self.process = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=_server_env(libs_dir), cwd=server_tree, start_new_session=True)
        atexit.register(self.stop)

    def _wait_ready(self, timeout: float) -> list[str]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        assert self.process is not None
        wanted = None if self._load_set is None or not self.explicit_model_control else set(self._load_set)
        deadline = time.monotonic() + timeout
        # A short reconnect backoff: the server starts listening a moment after spawn, and gRPC's
        # default backoff (1 s, growing) would notice it seconds late.
        client = grpcclient.InferenceServerClient(self.grpc_url, channel_args=_READY_CHANNEL_ARGS)
        try:
            while True:
                if self.process.poll() is not None:
                    raise TritonLaunchError(self._failure_message(
                        f"tritonserver exited with code {self.process.returncode} during startup"))
                try:
                    if client.is_server_live() and client.is_server_ready():
                        index = client.get_model_repository_index(as_json=True).get("models", [])
                        # Under explicit control after unloads, only the models asked for are loaded.
                        expected = [m for m in index if wanted is None or m.get("name") in wanted]
                        failed = [m for m in expected if m.get("state") == "UNAVAILABLE"]
                        if failed:
                            reasons = "; ".join(f"{m['name']}: {m.get('reason', '?')}" for m in failed)
                            raise TritonLaunchError(self._failure_message(f"models failed to load: {reasons}"))
                        if all(m.get("state") == "READY" for m in expected):
                            return sorted({m["name"] for m in expected})
                except InferenceServerException:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise TritonLaunchError(self._failure_message(
                        f"tritonserver was not ready with all models within {timeout:.0f}s"))
                time.sleep(0.2)
        finally:
            client.close()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self._log_text().splitlines()[-lines:])

    def _log_text(self) -> str:
        """This launch's part of the log file (it is appended to across restarts)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def triton_errors(self) -> list[str]:
        """Triton's own error messages from this launch, first line of each, e.g.
        ``failed to load 'm' version 1: Internal: RuntimeError: ...``."""
        found: list[str] = []
        for line in self._log_text().splitlines():
            m = _ERROR_LINE.match(line)
            if not m or any(n in line for n in _EXPECTED_NOISE):
                continue
            text = m.group(1).strip().strip('"').replace("\\n", "\n")
            first = text.split("\n", 1)[0].strip()
            if first and first not in found:
                found.append(first)
        return found

    def _failure_message(self, headline: str) -> str:
        parts = [headline]
        errors = self.triton_errors()
        if errors:
            parts.append("Triton reported:\n  " + "\n  ".join(errors))
        parts.append(f"last lines of {self.log_path}:\n{self.log_tail(15)}")
        return "\n".join(parts)

    def poll(self) -> int | None:
        """The exit code if the server has exited, else ``None``."""
        return None if self.process is None else self.process.poll()

    @property
    def supervised(self) -> bool:
        return self._supervisor is not None and self._supervisor.is_alive()

    def supervise(self, *, max_restarts: int = 5, restart_window: float = 600.0,
                  backoff_initial: float = 1.0, backoff_max: float = 30.0, ready_timeout: float = 300.0,
                  on_event: SupervisionCallback | None = None) -> None:
        """Watch the running server from a daemon thread and restart it, on the same ports, if it dies.

        Restart attempts wait ``backoff_initial`` seconds, doubling per failed attempt up to
        ``backoff_max``. If more than ``max_restarts`` restarts would fall within ``restart_window``
        seconds the supervisor gives up (``gave_up``, event ``gave_up``) and leaves the server down:
        a crash loop is reported, not hidden. ``on_event`` is called from the supervisor thread.
        """
        if self.process is None or self.process.poll() is not None:
            raise TritonLaunchError("supervise() needs a running tritonserver; call start() first")
        if self.supervised:
            raise TritonLaunchError("this launcher is already supervised")
        if max_restarts < 0 or backoff_initial < 0 or backoff_max < backoff_initial:
            raise ValueError("max_restarts >= 0 and 0 <= backoff_initial <= backoff_max are required")
        self._supervisor = threading.Thread(
            target=self._supervise, name="vitserve-triton-supervisor", daemon=True,
            args=(max_restarts, restart_window, backoff_initial, backoff_max, ready_timeout, on_event))
        self._supervisor.start()

    def _supervise(self, max_restarts: int, restart_window: float, backoff_initial: float,
                   backoff_max: float, ready_timeout: float, on_event: SupervisionCallback | None) -> None:
        def emit(event: str) -> None:
            if on_event is not None:
                try:
                    on_event(event)
                except Exception:  # noqa: BLE001 - a callback bug must not stop supervision
                    log.exception("triton supervision callback failed on %r", event)

        server_tree = prepare_server_tree()
        _, libs_dir, _ = pytriton_paths()
        restart_times: list[float] = []
        while not self._stopping.is_set():
            proc = self.process
            assert proc is not None
            while proc.poll() is None and not self._stopping.wait(0.05):
                pass
            if self._stopping.is_set():
                return
            code = proc.returncode
            log.error("tritonserver (pid %d) died with %s; log tail:\n%s", proc.pid,
                      f"signal {-code}" if code < 0 else f"exit code {code}", self.log_tail(10))
            emit(EVENT_DOWN)
            self._kill_group(proc)  # Python-backend stubs of the dead server must not linger
            backoff = backoff_initial
            while not self._stopping.is_set():
                now = time.monotonic()
                restart_times = [t for t in restart_times if now - t < restart_window]
                if len(restart_times) >= max_restarts:
                    log.error("tritonserver restarted %d times within %.0fs; giving up (it stays down)",
                              len(restart_times), restart_window)
                    self.gave_up = True
                    emit(EVENT_GAVE_UP)
                    return
                if self._stopping.wait(backoff):
                    return
                restart_times.append(time.monotonic())
                with self._spawn_lock:
                    if self._stopping.is_set():
                        return
                    log.warning("restarting tritonserver on the same ports (grpc %s), attempt %d "
                                "within the window", self.grpc_url, len(restart_times))
                    self._spawn(server_tree, libs_dir)
                try:
                    self.models = self._wait_ready(ready_timeout)
                except TritonLaunchError as e:
                    if self._stopping.is_set():
                        return
                    log.error("tritonserver restart failed: %s", e)
                    emit(EVENT_RESTART_FAILED)
                    assert self.process is not None
                    self._kill_group(self.process)
                    backoff = min(backoff_max, max(backoff * 2, 0.1))
                    continue
                self.restarts += 1
                log.warning("tritonserver is back (restart %d, pid %d) with %s", self.restarts,
                            self.process.pid if self.process else -1, ", ".join(self.models))
                emit(EVENT_RESTARTED)
                break

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the whole process group after ``stop_grace`` seconds.

        Also ends supervision: a server stopped here is never restarted.
        """
        self._stopping.set()
        with self._spawn_lock:  # a restart in progress finishes spawning first, then is stopped
            proc = self.process
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            self._supervisor = None
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
        # Python-backend stubs share the process group; none may outlive the server.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = proc.wait()
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(5.0)
        return code

    def __enter__(self) -> "TritonLauncher":
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
