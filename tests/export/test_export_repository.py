import hashlib
import json
import os
from pathlib import Path

import pytest

from export import publish as publish_module
from export import repository
from export.cli import main
from export.errors import ExportError, ExportUsageError
from export.layout import sha256_file, validate_model_name
from export.options import ExportOptions, TritonOptions
from export.repository import export_entries, export_run
from export.sources import EncoderSource, state_dict_sha256
from export.triton_config import parse_pbtxt
from tests.export.conftest import read_manifest

CONTRACT_KEYS = {"format_version", "name", "version", "encoder_spec", "architecture", "inputs", "outputs",
                 "weights_sha256", "files", "parity", "exporter", "probes", "source", "preprocessing"}


def tree(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``path``."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(repo: Path) -> list[str]:
    """Staging or backup directories left in or beside ``repo``."""
    return [p.name for d in (repo, repo.parent) if d.is_dir() for p in d.iterdir()
            if p.name.startswith(".")]


@pytest.fixture
def repo(tmp_path) -> Path:
    return tmp_path / "area" / "repo"


def test_layout_and_config(exported):
    assert sorted(tree(exported)) == ["1/model.onnx", "1/model.py", "config.pbtxt", "manifest.json"]
    config = parse_pbtxt((exported / "config.pbtxt").read_text())
    assert config.name == "fmnist" and config.backend == "python" and config.max_batch_size == 64
    assert [(i.name, list(i.dims)) for i in config.input] == [("images", [28, 28, 1])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("cls", [192]), ("patch_tokens", [49, 192])]
    assert config.HasField("dynamic_batching")
    embedded = json.loads(config.parameters["vitserve_manifest"].string_value)
    assert embedded == read_manifest(exported)


def test_manifest_contents_and_hashes(exported, run_dir):
    manifest = read_manifest(exported)
    assert set(manifest) == CONTRACT_KEYS
    assert manifest["format_version"] == 1 and manifest["name"] == "fmnist" and manifest["version"] == 1
    assert manifest["weights_sha256"] == hashlib.sha256((run_dir / "encoder.pt").read_bytes()).hexdigest()
    assert manifest["files"] == {"1/model.onnx": sha256_file(exported / "1/model.onnx"),
                                 "1/model.py": sha256_file(exported / "1/model.py")}
    assert manifest["encoder_spec"]["grid_size"] == [7, 7] and manifest["encoder_spec"]["depth"] == 2
    assert manifest["inputs"]["images"]["shape"] == [-1, 28, 28, 1]
    assert manifest["inputs"]["images"]["dtype"] == "uint8"
    assert manifest["outputs"]["cls"]["shape"] == [-1, 192]
    assert manifest["outputs"]["patch_tokens"] == {
        "dtype": "float32", "shape": [-1, 49, 192], "description": manifest["outputs"]["patch_tokens"]["description"],
        "block": 1, "layer": -1, "final_norm": True, "tokens": [1, 50], "pooling": None}
    assert manifest["outputs"]["cls"]["tokens"] == [0, 1] and manifest["outputs"]["cls"]["pooling"] is None
    parity = manifest["parity"]
    assert parity["n_images"] == 64 and parity["tolerance"] == 1e-4
    assert parity["data"].startswith("fashion-mnist")
    assert all(e < 1e-4 for e in parity["max_abs_err"].values())
    exporter = manifest["exporter"]
    assert exporter["opset"] == 17
    assert {"torch", "timm", "onnx", "onnxruntime"} <= set(exporter["versions"])
    assert manifest["probes"] == {} and manifest["source"] == str(run_dir.resolve())


def test_refuses_to_overwrite_without_force(exported, run_dir, capsys):
    before = tree(exported)
    with pytest.raises(ExportUsageError, match="already exists.*--force"):
        export_run(run_dir, exported.parent, "fmnist")
    assert main([str(run_dir), "--repository", str(exported.parent), "--name", "fmnist"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert tree(exported) == before
    assert leftovers(exported.parent) == []


def test_force_replaces_the_model(tmp_path, repo, make_run_dir, fmnist_images):
    (first,) = export_run(make_run_dir(tmp_path / "a", seed=0), repo, "m",
                          ExportOptions(parity_images=fmnist_images[:4]))
    old = read_manifest(first)["weights_sha256"]
    (second,) = export_run(make_run_dir(tmp_path / "b", seed=1), repo, "m",
                           ExportOptions(force=True, parity_images=fmnist_images[:4]))
    assert second == first
    assert read_manifest(second)["weights_sha256"] != old
    assert read_manifest(second)["files"]["1/model.onnx"] == sha256_file(second / "1/model.onnx")
    assert sorted(p.name for p in repo.iterdir()) == ["m"] and leftovers(repo) == []


def test_force_without_atomic_exchange_falls_back_to_two_renames(tmp_path, repo, make_run_dir,
                                                                  fmnist_images, monkeypatch):
    monkeypatch.setattr(publish_module, "_renameat2", lambda src, dst, flags: False)
    run = make_run_dir(tmp_path / "a", seed=0)
    (model_dir,) = export_run(run, repo, "m", ExportOptions(parity_images=fmnist_images[:4]))
    with pytest.raises(ExportUsageError, match="already exists"):
        export_run(run, repo, "m", ExportOptions(parity_images=fmnist_images[:4]))
    export_run(run, repo, "m", ExportOptions(force=True, parity_images=fmnist_images[:4]))
    assert sorted(tree(model_dir)) == ["1/model.onnx", "1/model.py", "config.pbtxt", "manifest.json"]
    assert leftovers(repo) == []


def test_failed_parity_leaves_nothing(encoder, repo, fmnist_images):
    model, spec = encoder
    with pytest.raises(ExportError, match="beyond tolerance"):
        export_entries(EncoderSource(model, spec), repo, "m", ExportOptions(parity_images=fmnist_images[:4], tol=0.0))
    assert list(repo.iterdir()) == [] and leftovers(repo) == []


def test_exception_mid_export_leaves_nothing_and_keeps_the_old_model(encoder, repo, fmnist_images,
                                                                    monkeypatch):
    model, spec = encoder
    (model_dir,) = export_entries(EncoderSource(model, spec), repo, "m",
                                  ExportOptions(parity_images=fmnist_images[:4]))
    before = tree(model_dir)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(publish_module, "fsync_tree", boom)  # after every file is written
    with pytest.raises(OSError, match="disk full"):
        export_entries(EncoderSource(model, spec), repo, "m",
                       ExportOptions(force=True, parity_images=fmnist_images[:4]))
    with pytest.raises(OSError, match="disk full"):
        export_entries(EncoderSource(model, spec), repo, "other", ExportOptions(parity_images=fmnist_images[:4]))
    assert sorted(p.name for p in repo.iterdir()) == ["m"] and leftovers(repo) == []
    assert tree(model_dir) == before


def test_onnxruntime_backend_has_no_model_py(encoder, repo, fmnist_images):
    model, spec = encoder
    (model_dir,) = export_entries(EncoderSource(model, spec), repo, "m", ExportOptions(
        triton=TritonOptions(backend="onnxruntime", intra_op_threads=2), parity_images=fmnist_images[:4]))
    assert sorted(tree(model_dir)) == ["1/model.onnx", "config.pbtxt", "manifest.json"]
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx"
    assert config.parameters["intra_op_thread_count"].string_value == "2"
    assert read_manifest(model_dir)["weights_sha256"] == state_dict_sha256(model)


@pytest.mark.parametrize("name", ["", "a b", ".hidden", "../x", "a/b", "ü"])
def test_invalid_model_names(name):
    with pytest.raises(ExportUsageError, match="invalid model name"):
        validate_model_name(name)


@pytest.mark.parametrize("options, message", [
    (ExportOptions(version=0), "version"), (ExportOptions(triton=TritonOptions(max_batch_size=0)), "max_batch_size"),
    (ExportOptions(triton=TritonOptions(backend="tensorrt")), "backend"),
    (ExportOptions(triton=TritonOptions(instance_kind="TPU")), "instance group"),
])
def test_bad_arguments_fail_before_exporting(encoder, repo, options, message):
    model, spec = encoder
    with pytest.raises(ExportUsageError, match=message):
        export_entries(EncoderSource(model, spec), repo, "m", options)
    assert not repo.exists() or list(repo.iterdir()) == []


def test_cli_missing_run_dir_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--repository", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert "run directory" in err and "does not exist" in err
    assert not (tmp_path / "repo").exists()


def test_cli_run_dir_without_weights_exit_2(tmp_path, encoder, capsys):
    _, spec = encoder
    (tmp_path / "run").mkdir()
    spec.save(tmp_path / "run")
    assert main([str(tmp_path / "run"), "--repository", str(tmp_path / "repo")]) == 2
    assert "encoder.pt" in capsys.readouterr().err


def test_cli_usage_error_exit_2(capsys):
    assert main([]) == 2
    assert "RUN_DIR" in capsys.readouterr().err


def test_cli_exports_and_prints_one_line(tmp_path, make_run_dir, fmnist_images, capsys):
    run = make_run_dir(tmp_path / "my run", seed=3)
    assert main([str(run), "--repository", str(tmp_path / "repo"), "--max-batch-size", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    model_dir = tmp_path / "repo" / "my_run"  # default name: the run dir's, sanitised
    assert len(out) == 1 and str(model_dir) in out[0] and "cls=" in out[0] and "patch_tokens=" in out[0]
    assert parse_pbtxt((model_dir / "config.pbtxt").read_text()).max_batch_size == 8


def test_work_in_progress_is_staged_outside_the_repository(encoder, repo, fmnist_images, monkeypatch):
    # Triton tries to load every subdirectory of a repository, hidden ones too (seen with 2.51).
    model, spec = encoder
    repo.mkdir(parents=True)
    seen = []
    real_check = repository.check_parity

    def spy(model, spec, onnx_path, *args, **kwargs):
        seen.append((sorted(p.name for p in repo.iterdir()), Path(onnx_path).parent.parent.parent))
        return real_check(model, spec, onnx_path, *args, **kwargs)

    monkeypatch.setattr(repository, "check_parity", spy)
    export_entries(EncoderSource(model, spec), repo, "m", ExportOptions(parity_images=fmnist_images[:4]))
    assert seen == [([], repo.parent)]


def test_sweep_removes_only_staging_of_dead_exports(tmp_path):
    import subprocess
    import sys

    from export.publish import sweep_abandoned_staging

    repository = tmp_path / "repo"
    repository.mkdir()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)  # that process has exited
    dead = tmp_path / f".vitserve-staging-repo-m.pid{dead_pid}.abc123"
    live = tmp_path / f".vitserve-staging-repo-m.pid{os.getpid()}.def456"
    other_repo = tmp_path / f".vitserve-staging-other-m.pid{dead_pid}.ghi789"
    for d in (dead, live, other_repo):
        (d / "1").mkdir(parents=True)
    assert sweep_abandoned_staging(tmp_path, repository) == [dead]
    assert not dead.exists() and live.exists() and other_repo.exists()
