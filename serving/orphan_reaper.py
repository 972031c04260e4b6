"""A watchdog that kills a process's helpers when the process dies, SIGKILL included.

``python -I -S orphan_reaper.py PID START_TICKS PREFIX POLL_S`` looks every POLL_S seconds at the
children of PID that run a program under PREFIX and everything below them, and remembers them; once
PID is gone it SIGKILLs every remembered process still alive, then exits. It covers what the kernel's
parent-death signal (``serving.tied_process``) cannot: grandchildren, which do not inherit it.

- A local Ray (PREFIX: the ``ray`` package; ``embed_dataset.job.local_ray``): Ray ties its head
  processes to the driver with the parent-death signal and its workers follow the raylet within ~3 s,
  but its dashboard and runtime-env agents spend 60 s reporting the raylet's death to a GCS that died
  with it (``publish_error(..., timeout=60)``).
- The embedded Triton (PREFIX: the server tree; ``serving.triton_launcher``): its Python-backend stub
  exits ~2 s after tritonserver dies once its model is loaded, but a stub still initialising its model
  never notices.

Standard library only: it runs with ``-I -S`` (no site, no PYTHONPATH), so it starts in a few tens of
milliseconds and imports nothing of the project.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, process group, start ticks) of a live process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else (int(fields[1]), int(fields[2]), int(fields[19]))


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def helpers(pid: int, prefix: str) -> dict[int, tuple[int, int, int]]:
    """{pid: stat} of PID's children that run a program under ``prefix``, and of all below them."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                table[int(entry.name)] = st
    me = os.getpid()  # the reaper's own command line names the prefix too
    roots = [p for p, st in table.items()
             if st[0] == pid and p != me and any(a.startswith(prefix) for a in _cmdline(p))]
    found = {}
    while roots:
        p = roots.pop()
        found[p] = table[p]
        roots.extend(c for c, st in table.items() if st[0] == p)
    return found


def _same(pid: int, st: tuple[int, int, int]) -> bool:
    now = _stat(pid)
    return now is not None and now[2] == st[2]


def _kill_if_same(pid: int, st: tuple[int, int, int]) -> int:
    """SIGKILL ``pid`` if it is still the process ``st`` was read from; 1 if it was killed."""
    if not _same(pid, st):
        return 0
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return 0
    return 1


def leaderless(prefix: str) -> dict[int, tuple[int, int, int]]:
    """{pid: stat} of live processes running a program under ``prefix`` whose process group's leader is
    gone: what a dead Triton left behind (its stubs are in its group), whoever started it. A healthy
    stub's group leader is its running tritonserver."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        p = int(entry.name)
        st = _stat(p)
        argv = _cmdline(p) if st is not None else []
        if st is not None and argv and argv[0].startswith(prefix) and st[1] != p and _stat(st[1]) is None:
            found[p] = st
    return found


def watch(pid: int, start_ticks: int, prefix: str, poll_s: float, sweep: bool = False) -> int:
    """Remember PID's helpers while it lives; once it is gone SIGKILL those still alive, and the process
    groups that one of them leads (Triton's: a stub forked since the last look is in it). With
    ``sweep``, then also (three times, 0.5 s apart) every process under ``prefix`` whose group leader is
    gone: a stub forked after the last look by a Triton that died with PID is found that way. Returns
    how many processes it killed."""
    seen: dict[int, tuple[int, int, int]] = {}
    while (st := _stat(pid)) is not None and st[2] == start_ticks:
        seen.update(helpers(pid, prefix))
        seen = {p: s for p, s in seen.items() if _same(p, s)}
        time.sleep(poll_s)
    killed = 0
    for p, s in seen.items():
        now = _stat(p)
        # A group leader: its group (a group id is not reused while the group has members), unless the
        # pid now names another process (then the old group is empty and the id is someone else's).
        if s[1] == p and (now is None or now[2] == s[2]):
            try:
                os.killpg(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        killed += _kill_if_same(p, s)
    for round_ in range(3 if sweep else 0):
        killed += sum(_kill_if_same(p, s) for p, s in leaderless(prefix).items())
        if round_ < 2:
            time.sleep(0.5)
    return killed


def start_reaper(prefix: str, poll_s: float, sweep: bool = False) -> subprocess.Popen[bytes]:
    """The watchdog for this process's helpers under ``prefix`` (``sweep``: see ``watch``). It exits by
    itself after this process; a caller that ends the helpers itself first may kill it."""
    st = _stat(os.getpid())
    assert st is not None
    # Its own session: a terminal's Ctrl-C must not end it before the driver has cleaned up.
    return subprocess.Popen([sys.executable, "-I", "-S", __file__, str(os.getpid()), str(st[2]), prefix,
                             str(poll_s), "sweep" if sweep else "no-sweep"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4]),
          sweep=len(sys.argv) > 5 and sys.argv[5] == "sweep")
