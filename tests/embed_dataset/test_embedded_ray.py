"""The command as a user runs it, with its own local Ray: SIGKILL mid-job, rerun, rerun again.

The driver starts Ray itself here (no --address), so killing it takes the Ray it started with it; the
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

from tests.embed_dataset.datasets import native_images, png, read_outputs, write_folder

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


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert sorted(ray_processes.values()) == ["gcs_server", "raylet"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in ray_processes):
        time.sleep(0.2)
    assert not any(_alive(p) for p in ray_processes), "the killed driver's Ray outlived it"
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
