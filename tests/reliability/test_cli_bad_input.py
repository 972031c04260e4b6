"""Bad input to the train / export / serve commands: a non-zero exit, a message naming the problem,
and no output left behind that a later step could take for a good one (no run directory holding a
checkpoint or encoder, no model in the repository, no staging directory inside it)."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export.repository import main as export_main
from serving.server import main as serve_main
from tests.export.conftest import write_run_dir
from training.train import main as train_main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--epochs", "1", "--batch-size", "8", "num_threads=1", "model.embed_dim=32", "model.depth=1",
        "model.num_heads=2", "decoder_dim=16", "decoder_depth=1", "decoder_heads=2"]


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def no_run_left(out: Path) -> None:
    """Nothing a later ``vitserve export`` or ``--resume`` could take for a trained run."""
    if out.exists():
        assert not {"checkpoint.pt", "encoder.pt", "encoder_spec.json"} & {p.name for p in out.iterdir()}


def train_fails(argv: list[str], capsys, code: int, *fragments: str) -> str:
    assert train_main(argv) == code
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


# -- vitserve train -----------------------------------------------------------------------------

def test_train_missing_data_folder(tmp_path, capsys):
    out = tmp_path / "run"
    train_fails([*TINY, "--data", str(tmp_path / "nope"), "--out", str(out)], capsys, 1,
                "image folder", "does not exist")
    no_run_left(out)


def test_train_corrupt_image_in_folder(tmp_path, folder, capsys):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out = tmp_path / "run"
    train_fails([*TINY, "--data", str(folder), "--out", str(out)], capsys, 1, "cannot decode image", "broken.png")
    no_run_left(out)


def test_train_folder_without_images(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    train_fails([*TINY, "--data", str(empty), "--out", str(tmp_path / "run")], capsys, 1, "no images")
    no_run_left(tmp_path / "run")


def test_train_truncated_fashion_mnist(tmp_path, capsys):
    data = tmp_path / "fmnist"
    data.mkdir()
    for split, n in (("train", 60000), ("t10k", 10000)):
        header = struct.pack(">BBBBIII", 0, 0, 0x08, 3, n, 28, 28)
        (data / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(1000)))  # cut short
        labels = struct.pack(">BBBBI", 0, 0, 0x08, 1, n) + bytes(n)
        (data / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    train_fails([*TINY, "--data", "fashion-mnist", "--data-dir", str(data), "--out", str(tmp_path / "run")],
                capsys, 1, "train-images-idx3-ubyte.gz", "truncated or corrupt")
    no_run_left(tmp_path / "run")


@pytest.mark.parametrize("override,fragment", [
    ("no_such_option=1", "no_such_option"),
    ("batch_size=abc", "batch_size"),
    ("model_name=vit_does_not_exist_in_timm", "vit_does_not_exist_in_timm"),
    ("model.no_such_kwarg=3", "no_such_kwarg"),
])
def test_train_bad_config(tmp_path, folder, capsys, override, fragment):
    out = tmp_path / "run"
    train_fails([*TINY, "--data", str(folder), "--out", str(out), override], capsys, 2, fragment)
    no_run_left(out)


def test_train_unparseable_yaml(tmp_path, folder, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("method: mae\nbatch_size: [unclosed\n")
    train_fails(["--config", str(config), "--data", str(folder), "--out", str(tmp_path / "run")], capsys, 2,
                "bad.yaml")
    no_run_left(tmp_path / "run")


def _trained(tmp_path: Path, folder: Path) -> Path:
    run = tmp_path / "run"
    assert train_main([*TINY, "--data", str(folder), "--out", str(run)]) == 0
    return run


def test_train_resume_from_corrupt_checkpoint(tmp_path, folder, capsys):
    run = _trained(tmp_path, folder)
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    capsys.readouterr()
    train_fails(["--resume", str(run)], capsys, 2, "checkpoint.pt")


def test_train_resume_from_incompatible_checkpoint(tmp_path, folder, capsys):
    run = _trained(tmp_path, folder)
    config = json.loads((run / "config.json").read_text())
    config["overrides"]["embed_dim"] = 64
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    train_fails(["--resume", str(run)], capsys, 2, "checkpoint")


# -- vitserve export ----------------------------------------------------------------------------

def nothing_published(repository: Path) -> None:
    if repository.exists():
        assert list(repository.iterdir()) == [], list(repository.iterdir())
    assert not [p for p in repository.parent.iterdir() if p.name.startswith(".vitserve-staging-")]


def export_fails(argv: list[str], capsys, code: int, *fragments: str) -> None:
    assert export_main(argv) == code
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err


def test_export_missing_run_dir(tmp_path, capsys):
    repo = tmp_path / "repo"
    export_fails([str(tmp_path / "nope"), "--repository", str(repo), "--name", "m"], capsys, 2, "does not exist")
    nothing_published(repo)


@pytest.mark.parametrize("damage", ["truncated-weights", "corrupt-spec", "incompatible-weights",
                                    "unknown-timm-model", "nan-weights", "missing-weights"])
def test_export_bad_run_dir(tmp_path, capsys, damage):
    run = write_run_dir(tmp_path / "run")
    weights, spec_file = run / "encoder.pt", run / "encoder_spec.json"
    if damage == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:2000])
        fragment = "encoder.pt cannot be read"
    elif damage == "corrupt-spec":
        spec_file.write_text(spec_file.read_text()[:40])
        fragment = "encoder_spec.json"
    elif damage == "incompatible-weights":
        other = write_run_dir(tmp_path / "other", seed=1)
        state = torch.load(other / "encoder.pt", weights_only=True)
        state = {k: torch.cat([v, v], dim=-1) if v.ndim >= 1 else v for k, v in state.items()}  # wider
        torch.save(state, weights)
        fragment = "does not match"
    elif damage == "unknown-timm-model":
        spec = json.loads(spec_file.read_text())
        spec["model_name"] = "vit_does_not_exist_in_timm"
        spec_file.write_text(json.dumps(spec))
        fragment = "vit_does_not_exist_in_timm"
    elif damage == "nan-weights":
        state = torch.load(weights, weights_only=True)
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = torch.full_like(state[key], float("nan"))
        torch.save(state, weights)
        fragment = "non-finite"
    else:
        weights.unlink()
        fragment = "missing encoder.pt"
    repo = tmp_path / "repo"
    export_fails([str(run), "--repository", str(repo), "--name", "m"], capsys, 2, fragment)
    nothing_published(repo)


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_export_refuses_path_like_names(tmp_path, capsys, name):
    run = write_run_dir(tmp_path / "run")
    repo = tmp_path / "repo"
    export_fails([str(run), "--repository", str(repo), "--name", name], capsys, 2, "invalid model name")
    nothing_published(repo)
    assert not (tmp_path / "escape").exists()


# -- vitserve serve -----------------------------------------------------------------------------

def test_serve_bad_arguments(tmp_path, capsys):
    assert serve_main(["--model-repository", str(tmp_path), "--auth-token-file", str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err
    assert serve_main(["--model-repository", str(tmp_path), "--tls-cert", str(tmp_path / "c.pem")]) == 2
    assert "TLS needs both" in capsys.readouterr().err
    assert serve_main(["--model-repository", str(tmp_path), "--port", "70000"]) == 2
    assert "not a port number" in capsys.readouterr().err


def test_serve_missing_repository(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vitserve.cli", "serve", "--model-repository",
                           str(tmp_path / "nope"), "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "is not a directory" in done.stderr, done.stderr[-1000:]


@pytest.mark.slow
def test_serve_repository_with_a_corrupt_model(tmp_path):
    """A model whose ONNX file was cut short: serve exits 1 naming the model, and serves nothing."""
    from export.repository import export_run

    model_dir = export_run(write_run_dir(tmp_path / "run"), tmp_path / "repo", "m")
    onnx = model_dir / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:5000])
    done = subprocess.run([sys.executable, "-m", "vitserve.cli", "serve", "--model-repository",
                           str(tmp_path / "repo"), "--port", "0", "--triton-timeout", "120"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "vitserve ready" not in done.stdout
    assert "m" in done.stderr and ("failed to load" in done.stderr or "failed" in done.stderr), done.stderr[-2000:]
    shutil.rmtree(tmp_path / "repo")
