"""The process table as ``/proc`` shows it: a process named across pid reuse, its descendants, and
a bounded wait until a set of processes is gone (SIGKILL for what outlives it)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.02


@dataclass(frozen=True)
class ProcessInfo:
    """One live process."""

    pid: int
    ppid: int
    start_ticks: int  # field 22 of /proc/PID/stat: with the pid, names a process across pid reuse
    cmdline: tuple[str, ...]


def process_info(pid: int) -> ProcessInfo | None:
    """``pid`` as ``/proc`` shows it now; ``None`` when there is no such process, or only its zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return ProcessInfo(pid, int(fields[1]), int(fields[19]),
                       tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a))


def all_processes() -> list[ProcessInfo]:
    """Every live process."""
    found = (process_info(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [p for p in found if p is not None]


def descendants(root: int) -> list[ProcessInfo]:
    """Every live process below ``root`` (children, their children, ...), parents before children."""
    children: dict[int, list[ProcessInfo]] = {}
    for p in all_processes():
        children.setdefault(p.ppid, []).append(p)
    found: list[ProcessInfo] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child.pid)
    return found


def alive(p: ProcessInfo) -> bool:
    """Whether the very process ``p`` (not a later one with its pid) still runs."""
    now = process_info(p.pid)
    return now is not None and now.start_ticks == p.start_ticks


@dataclass
class Gone:
    """Seconds from ``t0`` until each process of a set was seen gone; ``survivors`` if the wait ran out."""

    seconds: dict[int, float]
    survivors: list[ProcessInfo]

    @property
    def all_gone_s(self) -> float:
        return max(self.seconds.values(), default=0.0)


def wait_gone(procs: list[ProcessInfo], t0: float, timeout: float) -> Gone:
    """Poll every 20 ms, until ``timeout`` s after ``t0`` (``time.monotonic()``), until none of ``procs`` runs."""
    seconds: dict[int, float] = {}
    left = list(procs)
    while True:
        now = time.monotonic()
        still = [p for p in left if alive(p)]
        seconds.update((p.pid, now - t0) for p in left if p not in still)
        left = still
        if not left or now - t0 > timeout:
            return Gone(seconds, left)
        time.sleep(POLL_S)


def end_survivors(procs: list[ProcessInfo], timeout: float) -> list[ProcessInfo]:
    """Give ``procs`` ``timeout`` s to exit on their own, then SIGKILL those left; returns those killed."""
    survivors = wait_gone(procs, time.monotonic(), timeout).survivors
    for p in survivors:
        if alive(p):
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return survivors
