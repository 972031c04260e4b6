"""Crash safety of ``vitserve export``: SIGKILL while it writes, repeatedly.

Each kill lands at a random moment while the export's staging directory exists (the model is being
written). After every kill the model repository holds only whole models: each model directory has
its config.pbtxt, manifest.json and every file the manifest lists, with the SHA-256 it records. The
kills alternate between a first export and a ``--force`` replacement of an existing model; a later
export succeeds, and Triton loads the repository. ``VITSERVE_EXPORT_KILLS`` sets the number of kills
(default 2), ``VITSERVE_KILL_SEED`` the seed.
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

import pytest

from export.repository import sha256_file
from tests.export.conftest import write_run_dir

ROOT = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("VITSERVE_EXPORT_KILLS", "2"))
SEED = int(os.environ.get("VITSERVE_KILL_SEED", str(int(time.time()) % 100000)))
STAGING_PREFIX = ".vitserve-staging-"


def whole_models(repository: Path) -> dict[str, str]:
    """Assert every entry of ``repository`` is a complete model; return name -> manifest's export time."""
    found = {}
    for entry in sorted(repository.iterdir()):
        assert entry.is_dir() and not entry.name.startswith("."), f"stray {entry.name} in the repository"
        names = {p.name for p in entry.iterdir()}
        assert {"config.pbtxt", "manifest.json"} <= names, f"{entry.name} is missing files: {names}"
        manifest = json.loads((entry / "manifest.json").read_text())
        assert manifest["files"], f"{entry.name}: manifest lists no files"
        for rel, digest in manifest["files"].items():
            assert sha256_file(entry / rel) == digest, f"{entry.name}/{rel} does not match its manifest"
        assert f'name: "{entry.name}"' in (entry / "config.pbtxt").read_text()
        found[entry.name] = manifest["exporter"]["exported_at"]
    return found


def export_cmd(run: Path, repository: Path, force: bool) -> list[str]:
    return [sys.executable, "-m", "vitserve.cli", "export", str(run), "--repository", str(repository),
            "--name", "m", *(["--force"] if force else [])]


def kill_while_staging(cmd: list[str], parent: Path, delay: float, timeout: float = 300) -> tuple[bool, float]:
    """Run ``cmd``; SIGKILL it ``delay`` s after its staging directory appears.

    Returns ``(killed, seconds from staging to exit)``; not killed if it finished first.
    """
    before = {p.name for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX)}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    staged = time.monotonic()
    while proc.poll() is None and time.monotonic() < deadline:
        if {p.name for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX)} - before:
            staged = time.monotonic()
            end = staged + delay
            while proc.poll() is None and time.monotonic() < end:
                time.sleep(0.005)
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        out, err = proc.communicate()
        assert proc.returncode == 0, err[-2000:]
        return False, time.monotonic() - staged
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return True, 0.0


@pytest.mark.slow
def test_sigkilled_export_never_leaves_a_half_written_model(tmp_path):
    rng = random.Random(SEED)
    run = write_run_dir(tmp_path / "run")
    repository = tmp_path / "repo"
    repository.mkdir()
    kills, finished_first, states = 0, 0, []
    window = 4.0  # seconds the staging directory lives; shrunk to what an export that finished took
    for i in range(5 * KILLS):
        if kills >= KILLS:
            break
        force = (repository / "m").exists()
        if i % 2 == 1 and not force:  # make the model exist, so this kill hits a replacement
            assert subprocess.run(export_cmd(run, repository, False), cwd=ROOT, capture_output=True,
                                  timeout=600).returncode == 0
            force = True
        before = whole_models(repository)
        killed, staged_for = kill_while_staging(export_cmd(run, repository, force), tmp_path,
                                                rng.uniform(0.0, window))
        kills += killed
        finished_first += not killed
        if not killed:
            window = max(0.05, 0.9 * staged_for)
        after = whole_models(repository)
        if killed:  # the old model (or none) is still there, or the new one whole: never a mixture
            states.append("old" if after == before else "new")
    assert kills == KILLS
    final = subprocess.run(export_cmd(run, repository, True), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert list(whole_models(repository)) == ["m"]

    from serving.triton_launcher import TritonLauncher

    with TritonLauncher(repository) as triton:  # Triton loads what the kills left behind
        assert triton.models == ["m"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)]
    print(f"\nexport kills: {KILLS} SIGKILLs mid-write (seed {SEED}); repository afterwards: {states} "
          f"('old': previous model intact, 'new': replacement complete); {finished_first} exports finished "
          f"before their kill; abandoned staging directories beside the repository: {len(leftovers)}")
    assert leftovers == []  # the final export swept what the killed ones left (their pids are gone)
