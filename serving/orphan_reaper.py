"""A watchdog that kills a process's helpers when the process dies, SIGKILL included.

``python -I -S orphan_reaper.py PID START_TICKS PREFIX`` looks every ``POLL_S`` seconds at the
descendants of PID that run a program under PREFIX (and everything below those) and remembers them;
once PID is gone it SIGKILLs every remembered process still alive, then exits. Started by
``start_reaper`` for a local Ray (PREFIX: the ``ray`` package): Ray ties its head processes to the
driver with the kernel's parent-death signal and its workers follow the raylet within ~3 s, but its
dashboard and runtime-env agents spend 60 s trying to report the raylet's death to a GCS that died
with it (``publish_error(..., timeout=60)``). Standard library only: it runs with ``-I -S`` (no site,
no PYTHONPATH), so it starts in a few tens of milliseconds and imports nothing of the project.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.25


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start ticks) of a live process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else (int(fields[1]), int(fields[19]))


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def helpers(pid: int, prefix: str) -> dict[int, int]:
    """{pid: start ticks} of PID's children that run a program under ``prefix``, and all below them."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                table[int(entry.name)] = st
    found: dict[int, int] = {}
    me = os.getpid()  # the reaper's own command line names the prefix too
    roots = [p for p, (ppid, _) in table.items()
             if ppid == pid and p != me and any(a.startswith(prefix) for a in _cmdline(p))]
    while roots:
        p = roots.pop()
        found[p] = table[p][1]
        roots.extend(c for c, (ppid, _) in table.items() if ppid == p)
    return found


def watch(pid: int, start_ticks: int, prefix: str) -> int:
    """Remember PID's helpers while it lives; SIGKILL those still alive once it is gone. Returns how many."""
    seen: dict[int, int] = {}
    while (st := _stat(pid)) is not None and st[1] == start_ticks:
        seen.update(helpers(pid, prefix))
        seen = {p: t for p, t in seen.items() if (s := _stat(p)) is not None and s[1] == t}
        time.sleep(POLL_S)
    killed = 0
    for p, t in seen.items():
        s = _stat(p)
        if s is not None and s[1] == t:
            try:
                os.kill(p, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def start_reaper(prefix: str) -> subprocess.Popen[bytes]:
    """The watchdog for this process's helpers under ``prefix``; the caller kills it when it ends them itself."""
    st = _stat(os.getpid())
    assert st is not None
    # Its own session: a terminal's Ctrl-C must not end it before the driver has cleaned up.
    return subprocess.Popen([sys.executable, "-I", "-S", __file__, str(os.getpid()), str(st[1]), prefix],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)


if __name__ == "__main__":
    sys.exit(0 if watch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]) >= 0 else 1)
