"""Tritons left by gateways that are gone: recorded at launch, removed at start by the next gateway.

Every embedded ``tritonserver`` is tied to its gateway (``serving.tied_process``), so it should never
outlive it; this is the second line. Each launch writes ``run/<pid>.json`` in the server tree that all
gateways share (``serving.triton_tree``): the Triton's pid and command line and its gateway's pid and
start time. A gateway that starts kills every recorded Triton that is provably ours and orphaned: its
gateway is gone (dead, or the pid now names another process) and the pid still runs the recorded
command line. An unrecorded ``tritonserver`` of this tree that serves the same model repository with
no parent but init is named in a ``TritonLaunchError`` rather than silently doubled.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

from serving.errors import TritonLaunchError
from serving.process_table import all_processes, process_info

log = logging.getLogger(__name__)

RUN_DIR = "run"
KILL_WAIT_S = 10.0


def record_launch(server_tree: Path, pid: int, cmdline: list[str]) -> Path:
    """Write the record of a Triton this process just launched; returns its path."""
    me = process_info(os.getpid())
    assert me is not None
    run = server_tree / RUN_DIR
    run.mkdir(exist_ok=True)
    path = run / f"{pid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": pid, "cmdline": cmdline, "owner_pid": me.pid,
                               "owner_start_ticks": me.start_ticks}))
    tmp.rename(path)
    return path


def forget_launch(server_tree: Path, pid: int) -> None:
    (server_tree / RUN_DIR / f"{pid}.json").unlink(missing_ok=True)


def _kill_group(pid: int) -> bool:
    """SIGKILL the process group led by ``pid`` (Triton and its stubs); True once ``pid`` is gone."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + KILL_WAIT_S
    while process_info(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def clear_stale(server_tree: Path, model_repository: Path) -> list[int]:
    """Kill the orphaned Tritons recorded in ``server_tree`` and drop stale records; returns the pids
    killed. Raises ``TritonLaunchError`` naming an unrecorded orphan on ``model_repository``."""
    killed: list[int] = []
    recorded: set[int] = set()
    for path in sorted((server_tree / RUN_DIR).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
            pid, cmdline = int(rec["pid"]), tuple(rec["cmdline"])
            owner_pid, owner_start = int(rec["owner_pid"]), int(rec["owner_start_ticks"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("removing unreadable record %s", path)
            path.unlink(missing_ok=True)
            continue
        owner = process_info(owner_pid)
        if owner is not None and owner.start_ticks == owner_start:
            recorded.add(pid)
            continue  # a live gateway's Triton: not ours to touch
        proc = process_info(pid)
        if proc is not None and proc.cmdline == cmdline:
            log.warning("killing stale tritonserver pid %d (record %s): its gateway pid %d is gone",
                        pid, path, owner_pid)
            if not _kill_group(pid):
                raise TritonLaunchError(f"a stale tritonserver (pid {pid}, {cmdline[0]}) left by gateway "
                                        f"pid {owner_pid} did not die within {KILL_WAIT_S:.0f}s of SIGKILL")
            killed.append(pid)
        path.unlink(missing_ok=True)
    binary = str(server_tree / "bin" / "tritonserver")
    repo_flag = f"--model-repository={model_repository}"
    for p in all_processes():
        if p.pid not in recorded and p.ppid == 1 and p.cmdline[:1] == (binary,) and repo_flag in p.cmdline:
            raise TritonLaunchError(
                f"an orphaned tritonserver (pid {p.pid}, {binary}) not started by a live vitserve gateway "
                f"serves {model_repository} already; stop it (kill {p.pid}) before starting another")
    return killed
