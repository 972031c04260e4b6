"""The command as a user runs it, with its own local Ray: SIGKILL mid-job, rerun, rerun again.

The driver starts Ray itself here (no --address), so killing it takes the Ray it started with it (every
process of it, agents and workers included, within 15 s: issue 23); the
rerun starts a fresh one and finishes the job; a third run finds nothing to do and starts no Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.process_table import descendants, wait_gone
from tests.embed_dataset.datasets import native_images, png, read_outputs, write_folder
from tests.reliability.process_tree import describe, short_name

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # three drivers, two of them starting Ray: about a minute

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> dict[int, str]:
    """``pid -> command name`` of the processes whose parent is ``pid``."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out[int(entry.name)] = (entry / "comm").read_text().strip()
            except (OSError, IndexError, ValueError):
                continue
    return out


def test_sigkill_then_rerun_with_the_embedded_ray(exported, tmp_path):
    files = {f"{n}.png": png(a) for n, a in native_images(200, seed=11).items()} | {"bad_empty.png": b""}
    folder = write_folder(tmp_path / "src", files)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "embed_dataset.cli", str(folder), "--model-repository", str(exported.repository),
            "--model", exported.name, "--out", str(out), "--shard-size", "4", "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = out / "_state" / "done"
    ray_processes: dict[int, str] = {}
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ray_processes.update({p: c for p, c in _children(proc.pid).items() if c in ("gcs_server", "raylet")})
            if done.is_dir() and len(list(done.glob("*.json"))) >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        before = descendants(proc.pid)  # every process of its Ray: head, agents, workers (issue 23)
        os.kill(proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
    finally:
        proc.kill()
        proc.wait()
    assert sorted(ray_processes.values()) == ["gcs_server", "raylet"]
    assert any(p.cmdline[:1] == ("ray::DashboardAgent",) for p in before), describe(before)
    gone = wait_gone(before, t0, 15.0)
    print(f"\nFATE embed-dataset driver SIGKILL: {len(before)} processes before, {len(gone.survivors)} left; "
          f"gone after: " + ", ".join(f"{short_name(p)} {gone.seconds[p.pid]:.2f}s" for p in before
                                      if p.pid in gone.seconds))
    assert not gone.survivors, f"the killed driver's Ray outlived it:\n{describe(gone.survivors)}"
    committed = len(list(done.glob("*.json")))
    assert 2 <= committed < 51

    rerun = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{committed} shard(s) were already done" in rerun.stdout
    assert "OUTDIR holds 200 embeddings and 1 errors" in rerun.stdout
    embeddings, errors, ids = read_outputs(out)
    assert len(ids) == len(set(ids)) == len(files) and set(ids) == set(files)

    t0 = time.monotonic()
    third = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and "embedded 0 images" in third.stdout and "Ray start-up 0.0 s" in third.stdout
    assert time.monotonic() - t0 < 30
