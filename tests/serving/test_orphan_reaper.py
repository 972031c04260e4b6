"""``serving.orphan_reaper``'s sweep: a process under the watched prefix whose process group lost its
leader (a Triton stub whose tritonserver died before the reaper's last look) is found and killed; one
whose leader lives (a healthy stub under its running tritonserver) is left alone. Real processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from serving.orphan_reaper import leaderless, watch


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait(predicate, what: str, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.02)


def test_sweep_kills_a_leaderless_helper_and_spares_one_with_a_leader(tmp_path):
    prefix = tmp_path / "tree"
    (prefix / "bin").mkdir(parents=True)
    sleeper = prefix / "bin" / "sleep"
    shutil.copy2(shutil.which("sleep"), sleeper)
    pidfile = tmp_path / "orphan.pid"
    # A group leader (sh) that starts a helper under the prefix and exits: the helper's leader is gone.
    subprocess.run(["sh", "-c", f"{sleeper} 120 & echo $! > {pidfile}"], start_new_session=True, check=True)
    orphan = int(pidfile.read_text())
    # A helper whose group leader lives (the leader is this Popen'ed sh, waiting on it).
    kept = subprocess.Popen(["sh", "-c", f"{sleeper} 120; true"], start_new_session=True)
    try:
        _wait(lambda: orphan in leaderless(f"{prefix}{os.sep}"), "the orphan is found")
        helpers = [p for p in leaderless(f"{prefix}{os.sep}")]
        assert helpers == [orphan]  # not the helper whose leader lives
        assert all(_alive(p) for p in helpers)
        # PID 1's start ticks never match: watch() sees its parent gone at once and sweeps.
        killed = watch(1, -1, f"{prefix}{os.sep}", 0.05, sweep=True)
        assert killed >= 1
        _wait(lambda: not _alive(orphan), "the orphan is killed")
        assert kept.poll() is None  # its leader lives: left alone
        assert not leaderless(f"{prefix}{os.sep}")
    finally:
        if _alive(orphan):
            os.kill(orphan, signal.SIGKILL)
        os.killpg(kept.pid, signal.SIGKILL)
        kept.wait(10)
