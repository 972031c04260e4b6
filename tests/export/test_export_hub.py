"""``--pretrained`` without a reachable hub: exit 2 at once when not cached, the cache at once when cached.

The exports run as subprocesses because huggingface_hub reads ``HF_HUB_CACHE``/``HF_ENDPOINT`` when it
is imported. ``HF_ENDPOINT`` points at a closed local port, so the hub is unreachable whether or not
the machine running the tests has a network. "Retrying" is what huggingface_hub prints for each of its
back-off retries: its absence shows that the retries (about 50 s) were skipped.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from safetensors.torch import save_file

from export.hub import unreachable_reason

ROOT = Path(__file__).resolve().parents[2]
NAME = "test_vit.r160_in1k"  # timm's smallest ViT with a hub entry (timm/test_vit.r160_in1k)
REPO = "timm/test_vit.r160_in1k"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens after the socket closes


def run_export(tmp_path: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
           "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_OFFLINE", None)
    code = "import sys; from export.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "--timm", NAME, "--pretrained", "--repository",
                           str(tmp_path / "repo"), *extra], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def fake_cache(cache: Path) -> Path:
    """A Hugging Face cache entry for ``REPO``'s model.safetensors, laid out as huggingface_hub writes it."""
    commit = "0" * 40
    entry = cache / f"models--{REPO.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    model = timm.create_model(NAME, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_unreachable_reason():
    assert "cannot connect to 127.0.0.1" in unreachable_reason(f"http://127.0.0.1:{closed_port()}")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert unreachable_reason(f"http://127.0.0.1:{server.getsockname()[1]}") is None


def test_uncached_pretrained_without_hub_exits_2_without_retries(tmp_path):
    result = run_export(tmp_path, tmp_path / "empty-cache")
    assert result.returncode == 2, result.stderr
    assert f"pretrained weights for {NAME!r} ({REPO}: model.safetensors, pytorch_model.bin)" in result.stderr
    assert f"not in the local Hugging Face cache {tmp_path / 'empty-cache'}" in result.stderr
    assert "is unreachable: cannot connect to 127.0.0.1" in result.stderr and "--checkpoint FILE" in result.stderr
    assert "Retrying" not in result.stderr
    assert not (tmp_path / "repo").exists()


@pytest.mark.slow
def test_cached_pretrained_without_hub_reads_the_cache(tmp_path):
    weights = fake_cache(tmp_path / "cache")
    result = run_export(tmp_path, tmp_path / "cache", "--name", "tv")
    assert result.returncode == 0, result.stderr
    assert "Retrying" not in result.stderr
    manifest = json.loads((tmp_path / "repo" / "tv" / "manifest.json").read_text())
    assert manifest["weights"] == {"kind": "pretrained", "tag": NAME, "hub": REPO}
    assert manifest["preprocessing"]["resize_op"] == "center_crop"
    assert manifest["preprocessing"]["crop_pct"] == pytest.approx(0.95)
    assert weights.is_file()
