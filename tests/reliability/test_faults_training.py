"""Crash safety of ``vitserve train``: SIGKILL at random moments, then resume, repeatedly.

After every kill the run directory's last checkpoint and encoder load (``load_checkpoint``,
``load_encoder``), and the run resumed from it continues exactly: every loss it logs equals the
uninterrupted run's loss at that step (within 1e-6), and its final weights equal the uninterrupted
run's. ``VITSERVE_TRAIN_KILLS`` sets the number of kills (default 2; the figure in
docs/RELIABILITY.md used more) and ``VITSERVE_KILL_SEED`` the random seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.checkpoint import load_checkpoint
from training.run_dir import load_encoder
from training.train import main as train_main

ROOT = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("VITSERVE_TRAIN_KILLS", "2"))
SEED = int(os.environ.get("VITSERVE_KILL_SEED", str(int(time.time()) % 100000)))
EPOCHS, STEPS_PER_EPOCH = 10, 4  # 64 images, batch 16: a checkpoint every 4 steps
TOTAL = EPOCHS * STEPS_PER_EPOCH
TINY = ["--method", "mae", "--epochs", str(EPOCHS), "--batch-size", "16", "num_threads=1",
        "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "log_every=1",
        "decoder_dim=16", "decoder_depth=1", "decoder_heads=2"]
RUN_FILES = {"config.json", "encoder_spec.json", "encoder.pt", "checkpoint.pt", "metrics.jsonl"}


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill_images")
    rng = np.random.default_rng(0)
    for i in range(64):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def logged(run: Path) -> list[tuple[int, float]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    # A line cut by the kill is not a record (metrics are an append-only log, not a checkpoint).
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        out.append((record["step"], record["loss"]))
    return out


def vitserve_train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vitserve.cli", "train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_at_step(proc: subprocess.Popen, run: Path, step: int, extra_s: float, skip: int,
                 timeout: float = 300) -> bool:
    """SIGKILL ``proc`` ``extra_s`` after it logs ``step`` (records past the first ``skip`` are its own);
    False if it finished first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if any(s >= step for s, _ in logged(run)[skip:]):
            time.sleep(extra_s)
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        proc.communicate()
        return False
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return True


@pytest.mark.slow
def test_sigkilled_training_resumes_exactly(tmp_path, pngs):
    rng = random.Random(SEED)
    reference = tmp_path / "reference"
    assert train_main([*TINY, "--data", str(pngs), "--out", str(reference)]) == 0
    expected = dict(logged(reference))
    assert sorted(expected) == list(range(1, TOTAL + 1))

    run = tmp_path / "killed"
    kills, resumes, restarts, checkpoints_seen, kill_steps = 0, 0, 0, [], []
    for attempt in range(4 * KILLS):
        if kills >= KILLS:
            break
        has_checkpoint = (run / "checkpoint.pt").exists()
        resume_at = load_checkpoint(run)["step"] if has_checkpoint else 0
        args = ["--resume", str(run)] if has_checkpoint else [*TINY, "--data", str(pngs), "--out", str(run)]
        if not has_checkpoint and run.exists():
            # Killed before the first checkpoint: resuming is refused with a clear message ...
            refused = subprocess.run([sys.executable, "-m", "vitserve.cli", "train", "--resume", str(run)],
                                     cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert refused.returncode == 2 and "checkpoint.pt does not exist" in refused.stderr
            restarts += 1  # ... and a fresh start in the same directory is allowed (nothing to lose)
        resumes += has_checkpoint
        # Somewhere in the next two epochs: kills spread over the run, some across a checkpoint save.
        target = rng.randint(min(resume_at + 1, TOTAL - 1), min(resume_at + 2 * STEPS_PER_EPOCH, TOTAL - 1))
        skip = len(logged(run)) if has_checkpoint else 0  # a fresh start truncates metrics.jsonl
        if kill_at_step(vitserve_train(args), run, target, rng.uniform(0.0, 0.05), skip):
            kills += 1
            kill_steps.append(target)
        if not (run / "checkpoint.pt").exists():
            continue
        # The last checkpoint always loads, and so does the encoder written with it.
        ckpt = load_checkpoint(run)
        assert ckpt["step"] % STEPS_PER_EPOCH == 0 and ckpt["batch"] == 0
        assert ckpt["step"] <= max(s for s, _ in logged(run))
        model, spec = load_encoder(run)
        assert spec.embed_dim == 32
        checkpoints_seen.append(ckpt["step"])
        leftovers = {p.name for p in run.iterdir()} - RUN_FILES
        assert all(n.startswith(".") and n.endswith(".tmp") for n in leftovers), leftovers
    assert kills == KILLS, f"only {kills} of {KILLS} kills landed before training finished"

    finished = vitserve_train(["--resume", str(run)] if (run / "checkpoint.pt").exists()
                              else [*TINY, "--data", str(pngs), "--out", str(run)])
    out, err = finished.communicate(timeout=600)
    assert finished.returncode == 0, err[-2000:]
    records = logged(run)
    # Steps after the last checkpoint are logged again by the resumed run; every record, before or
    # after a kill, must equal the uninterrupted run's loss at that step.
    assert {s for s, _ in records} == set(range(1, TOTAL + 1))
    assert records[-1][0] == TOTAL
    worst = max(abs(loss - expected[s]) for s, loss in records)
    assert worst <= 1e-6, f"resumed losses differ from the uninterrupted run by up to {worst:g}"
    final_a = torch.load(reference / "checkpoint.pt", weights_only=False)["model"]
    final_b = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.allclose(final_a[k].float(), final_b[k].float(), atol=1e-6) for k in final_a)
    tmp_left = sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))
    print(f"\ntrain kills: {kills} SIGKILLs (seed {SEED}), {resumes} resumes, {restarts} fresh restarts, "
          f"kills after steps {kill_steps}, checkpoints loaded at steps {checkpoints_seen}; {len(records)} loss "
          f"records, max |diff| "
          f"{worst:.1e}; temp files left by kills: {len(tmp_left)}")
