"""Child processes that die with this process, SIGKILL of it included: the kernel's parent-death signal.

``popen_tied(cmd)`` starts ``cmd`` through a three-line exec wrapper (this interpreter, ``-I -S``) that
sets ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on itself, checks that its parent is still the process that
spawned it (a parent that died before the ``prctl`` would never send the signal) and then ``exec``\\ s
``cmd``: same pid, and the setting survives ``exec``. No Python runs in the forked child before
``exec`` (``preexec_fn`` is documented as unsafe in a process with threads, as the gateway is).

The kernel sends the signal when the *thread* that forked the child ends, not the process, so every
tied child is forked by one long-lived daemon thread (``_Spawner``): a supervisor thread that
respawns Triton and then returns must not take that Triton with it. The signal is cleared in the
child's own children (Triton's Python-backend stubs watch their parent themselves).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Any, Sequence

__all__ = ["popen_tied", "tied_command"]

PR_SET_PDEATHSIG = 1
PARENT_GONE_EXIT = 75  # the wrapper's exit code when its parent died before the prctl took effect

_WRAPPER = (
    "import ctypes, os, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(%d, int(sys.argv[1]), 0, 0, 0) != 0:\n"
    "    sys.exit('vitserve: prctl(PR_SET_PDEATHSIG) failed: ' + os.strerror(ctypes.get_errno()))\n"
    "if os.getppid() != int(sys.argv[2]):\n"
    "    sys.exit(%d)\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
) % (PR_SET_PDEATHSIG, PARENT_GONE_EXIT)


def tied_command(cmd: Sequence[str], sig: int = signal.SIGKILL, parent_pid: int | None = None) -> list[str]:
    """``cmd`` behind the exec wrapper: it gets ``sig`` when ``parent_pid`` (default: this process) dies."""
    parent = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-I", "-S", "-c", _WRAPPER, str(int(sig)), str(parent), *map(str, cmd)]


class _Spawner:
    """One daemon thread that forks every tied child and lives as long as the process."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[subprocess.Popen[Any]], list[str], dict[str, Any]]] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def popen(self, cmd: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[Any]:
        with self._lock:
            if self._thread is None or self._pid != os.getpid():  # a forked copy of us has no such thread
                self._jobs, self._pid = queue.SimpleQueue(), os.getpid()
                self._thread = threading.Thread(target=self._run, name="vitserve-tied-spawner", daemon=True)
                self._thread.start()
        done: Future[subprocess.Popen[Any]] = Future()
        self._jobs.put((done, cmd, kwargs))
        return done.result()

    def _run(self) -> None:
        while True:
            done, cmd, kwargs = self._jobs.get()
            try:
                done.set_result(subprocess.Popen(cmd, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                done.set_exception(e)


_SPAWNER = _Spawner()


def popen_tied(cmd: Sequence[str], *, sig: int = signal.SIGKILL, **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(cmd, **kwargs)`` whose process gets ``sig`` (default SIGKILL) when this process
    dies, however it dies. ``Popen.pid`` is ``cmd``'s own pid (the wrapper ``exec``\\ s it); the wrapper
    exits with ``PARENT_GONE_EXIT`` instead of running ``cmd`` if this process is already gone."""
    if not sys.platform.startswith("linux"):
        return subprocess.Popen(list(cmd), **kwargs)  # PR_SET_PDEATHSIG is Linux's
    return _SPAWNER.popen(tied_command(cmd, sig), kwargs)
