"""``vitserve export --add-version``: a new version directory in existing entries, with its own record.

Every test starts from a copy of one repository holding ``m`` and ``m_latency`` (``--lanes``), version
1 of a seeded small encoder; refusals must leave that repository byte-for-byte as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import json_format

from export import publish, versions
from export.cli import main
from export.errors import ExportError, ExportUsageError
from export.layout import sha256_file
from export.options import ExportOptions, TritonOptions
from export.outputs import OutputSelection
from export.repository import export_entries
from export.sources import EncoderSource, state_dict_sha256
from export.versions import config_differences
from export.triton_config import VersionPolicy, parse_pbtxt
from serving.catalog import model_from_config
from tests.export.conftest import read_manifest

ENTRIES = ("m", "m_latency")
TRITON_FIELDS = {f.name for f in dataclasses.fields(TritonOptions)}


def tree(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``path``."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(repo: Path) -> list[str]:
    """Staging directories or temporary files left in or beside ``repo`` or its entries."""
    dirs = [repo, repo.parent, *(p for p in repo.iterdir() if p.is_dir())] if repo.is_dir() else [repo.parent]
    return [p.name for d in dirs for p in d.iterdir() if p.name.startswith(".")]


def triton_json(model_dir: Path) -> dict:
    """config.pbtxt as Triton's ``get_model_config(as_json=True)['config']`` gives it."""
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory, fmnist_images, make_encoder) -> Path:
    """A repository with ``m`` and ``m_latency``, version 1 of ``make_encoder(0)``, policy ``all``."""
    repo = tmp_path_factory.mktemp("add_version_base") / "repo"
    export_entries(EncoderSource(*make_encoder(0)), repo, "m", ExportOptions(
        lanes=True, parity_images=fmnist_images[:4], triton=TritonOptions(version_policy=VersionPolicy("all"))))
    return repo


@pytest.fixture
def repo(base, tmp_path) -> Path:
    shutil.copytree(base, tmp_path / "area" / "repo")
    return tmp_path / "area" / "repo"


def add(repo: Path, images, encoder, version: int = 2, **kwargs) -> list[Path]:
    """Add ``version`` of ``encoder`` (model, spec) to ``m``/``m_latency`` with the base's options;
    ``kwargs`` change ``ExportOptions`` or ``TritonOptions`` fields."""
    options = {"lanes": True, "version_policy": VersionPolicy("all"), "parity_images": images[:4], **kwargs}
    triton = TritonOptions(**{k: options.pop(k) for k in list(options) if k in TRITON_FIELDS})
    return export_entries(EncoderSource(*encoder), repo, "m",
                          ExportOptions(version=version, add_version=True, triton=triton, **options))


def test_add_version_to_both_lanes(repo, fmnist_images, make_encoder):
    before = tree(repo)
    old_configs = {e: (repo / e / "config.pbtxt").read_text() for e in ENTRIES}
    paths = add(repo, fmnist_images, make_encoder(1))
    assert paths == [repo / e for e in ENTRIES] and leftovers(repo) == []

    hash_1, hash_2 = (state_dict_sha256(make_encoder(seed)[0]) for seed in (0, 1))
    assert hash_1 != hash_2
    after = tree(repo)
    for entry in ENTRIES:
        assert sorted(p for p in after if p.startswith(entry + "/2/")) == [f"{entry}/2/model.onnx",
                                                                           f"{entry}/2/model.py"]
        # version 1's files are untouched, byte for byte
        assert {p: h for p, h in after.items() if p.startswith(entry + "/1/")} == {
            p: h for p, h in before.items() if p.startswith(entry + "/1/")}
        # one config for both versions: only the manifest parameter changed
        new_config = (repo / entry / "config.pbtxt").read_text()
        assert new_config != old_configs[entry] and config_differences(old_configs[entry], new_config) == []
        manifest = read_manifest(repo / entry)
        assert json.loads(parse_pbtxt(new_config).parameters["vitserve_manifest"].string_value) == manifest
        assert manifest["version"] == 2 and manifest["weights_sha256"] == hash_2
        assert {v: r["weights_sha256"] for v, r in manifest["versions"].items()} == {"1": hash_1, "2": hash_2}
        for v in ("1", "2"):
            record = manifest["versions"][v]
            assert record["files"] == {f"{v}/model.onnx": sha256_file(repo / entry / v / "model.onnx"),
                                       f"{v}/model.py": sha256_file(repo / entry / v / "model.py")}
            assert {"parity", "source", "probes", "exported_at"} <= set(record)
            assert all(e < 1e-4 for e in record["parity"]["max_abs_err"].values())
        assert manifest["files"] == {**manifest["versions"]["1"]["files"], **manifest["versions"]["2"]["files"]}
        assert manifest["lane"] == ("latency" if entry.endswith("_latency") else "throughput")
        # the gateway's reader gives each version its own weights hash
        config = triton_json(repo / entry)
        assert model_from_config(config, "1").weights_sha256 == hash_1
        assert model_from_config(config, "2").weights_sha256 == hash_2


def test_a_third_version_extends_the_map_and_force_replaces_only_its_version(repo, fmnist_images,
                                                                            make_encoder):
    add(repo, fmnist_images, make_encoder(1))
    add(repo, fmnist_images, make_encoder(2), version=3)
    versions = read_manifest(repo / "m")["versions"]
    assert sorted(versions, key=int) == ["1", "2", "3"]
    before = tree(repo)
    with pytest.raises(ExportUsageError, match=r"already has version 2 \(versions \[1, 2, 3\]\).*--version 4"):
        add(repo, fmnist_images, make_encoder(3))
    assert tree(repo) == before

    add(repo, fmnist_images, make_encoder(3), force=True)
    after = tree(repo)
    changed = sorted(p for p in after if after[p] != before.get(p))
    assert changed == [f"{e}/{f}" for e in ENTRIES for f in ("2/model.onnx", "config.pbtxt", "manifest.json")]
    assert sorted(after) == sorted(before) and leftovers(repo) == []
    manifest = read_manifest(repo / "m")
    assert manifest["versions"]["1"] == versions["1"] and manifest["versions"]["3"] == versions["3"]
    assert manifest["versions"]["2"]["weights_sha256"] == state_dict_sha256(make_encoder(3)[0])
    assert manifest["versions"]["2"]["files"]["2/model.onnx"] == sha256_file(repo / "m/2/model.onnx")


@pytest.mark.parametrize("kwargs, message", [
    ({"version": 1}, r"'m' in .* already has version 1 \(versions \[1\]\); pass --version 2"),
    ({"lanes": False, "resolutions": [(28, 28), (56, 56)]}, r"'m_r56' is not in .*export it first"),
    ({"overrides": {"embed_dim": 96}},
     r"cannot add version 2 to model 'm': .*output 'cls' dims \[192\] in the entry, \[96\] in this export"
     r".*new --name"),
    ({"overrides": {"img_size": 56}},
     r"input 'images' dims \[28, 28, 1\] in the entry, \[56, 56, 1\] in this export.*"
     r"output 'patch_tokens' dims \[49, 192\] in the entry, \[196, 192\] in this export.*"
     r"encoder_spec.grid_size \[7, 7\] in the entry, \[14, 14\] in this export"),
    ({"outputs": OutputSelection(mean_patch=True)},
     r"outputs \['cls', 'patch_tokens'\] in the entry, \['cls', 'patch_tokens', 'mean_patch'\] in this export"),
    ({"max_batch_size": 8}, r"max_batch_size: 64 in the entry, max_batch_size: 8 in this export"),
    ({"version_policy": None}, r"version_policy \{ all \{ \} \} in the entry, \(not set\) in this export"),
    ({"lanes": False}, r"dynamic_batching \{ preferred_batch_size: 8 preferred_batch_size: 16 preferred_batch_size: "
                       r"32 max_queue_delay_microseconds: 500 \} in the entry, dynamic_batching \{ "
                       r"max_queue_delay_microseconds: 500 \} in this export.*lane \"throughput\" in the entry, "
                       r"\(none\) in this export"),
])
def test_refusals_leave_the_repository_unchanged(repo, fmnist_images, make_encoder, kwargs, message):
    overrides = dict(kwargs.pop("overrides", {}))
    before = tree(repo)
    with pytest.raises(ExportUsageError, match=message):
        add(repo, fmnist_images, make_encoder(1, **overrides), **kwargs)
    assert tree(repo) == before and leftovers(repo) == []


def test_same_names_with_another_meaning_are_refused(tmp_path, fmnist_images, make_encoder):
    # patch_tokens_l-1 exists in both, same dims: only the manifest says one is normed, one not
    repo = tmp_path / "repo"
    export_entries(EncoderSource(*make_encoder(0)), repo, "m",
                   ExportOptions(outputs=OutputSelection(layers=(-1,)), parity_images=fmnist_images[:4]))
    before = tree(repo)
    with pytest.raises(ExportUsageError, match="output 'patch_tokens_l-1' final_norm True in the entry, False in this export"):
        export_entries(EncoderSource(*make_encoder(1)), repo, "m", ExportOptions(
            version=2, add_version=True, parity_images=fmnist_images[:4],
            outputs=OutputSelection(layers=(-1,), final_norm=False)))
    assert tree(repo) == before


def test_missing_entry_or_repository_is_refused(tmp_path, fmnist_images, make_encoder):
    with pytest.raises(ExportUsageError, match="model repository .* does not exist"):
        export_entries(EncoderSource(*make_encoder(0)), tmp_path / "none", "m",
                       ExportOptions(version=2, add_version=True))
    assert not (tmp_path / "none").exists()
    (tmp_path / "repo").mkdir()
    with pytest.raises(ExportUsageError, match="model 'm' is not in"):
        export_entries(EncoderSource(*make_encoder(0)), tmp_path / "repo", "m",
                       ExportOptions(version=2, add_version=True))
    assert list((tmp_path / "repo").iterdir()) == []


def test_failed_parity_gate_leaves_the_repository_unchanged(repo, fmnist_images, make_encoder):
    before = tree(repo)
    with pytest.raises(ExportError, match="beyond tolerance"):
        add(repo, fmnist_images, make_encoder(1), tol=0.0)
    assert tree(repo) == before and leftovers(repo) == []


def test_an_entry_changed_during_the_export_stops_it(repo, fmnist_images, make_encoder, monkeypatch):
    real = publish.fsync_tree
    edited = repo / "m_latency" / "manifest.json"

    def meanwhile(root: Path) -> None:  # another writer edits an entry while ours is being staged
        edited.write_text(edited.read_text() + " ")
        real(root)

    monkeypatch.setattr(publish, "fsync_tree", meanwhile)
    before = tree(repo)
    with pytest.raises(ExportUsageError, match=r"\['m_latency'\] changed while this export ran"):
        add(repo, fmnist_images, make_encoder(1))
    after = tree(repo)
    assert sorted(p for p in after if after[p] != before.get(p)) == ["m_latency/manifest.json"]  # theirs only
    assert sorted(after) == sorted(before) and leftovers(repo) == []


def test_a_version_that_appears_meanwhile_rolls_back_every_entry(repo, fmnist_images, monkeypatch,
                                                                   make_encoder):
    # another export publishes m_latency/2 between our checks and our rename
    real = versions.publish_version

    def racing(staged: Path, target: Path, force: bool):
        if target.parent.name == "m_latency":
            target.mkdir()
            (target / "model.onnx").write_bytes(b"theirs")
        return real(staged, target, force)

    monkeypatch.setattr(versions, "publish_version", racing)
    before = tree(repo)
    with pytest.raises(ExportUsageError, match="version 2 of model 'm_latency' appeared"):
        add(repo, fmnist_images, make_encoder(1))
    assert tree(repo) == {**before, "m_latency/2/model.onnx": hashlib.sha256(b"theirs").hexdigest()}
    assert not (repo / "m" / "2").exists() and leftovers(repo) == []


def test_a_crash_after_the_rename_leaves_an_undescribed_version_not_a_broken_entry(repo, fmnist_images,
                                                                                   monkeypatch, make_encoder):
    def crash(path: Path, data: bytes) -> None:
        raise OSError("killed")

    monkeypatch.setattr(versions, "replace_file", crash)
    before = tree(repo)
    with pytest.raises(OSError, match="killed"):
        add(repo, fmnist_images, make_encoder(1))
    after = tree(repo)
    assert {p: h for p, h in after.items() if "/2/" not in p} == before  # config and manifest as they were
    config = triton_json(repo / "m")
    assert model_from_config(config, "1").weights_sha256 == state_dict_sha256(make_encoder(0)[0])
    assert model_from_config(config, "2").weights_sha256 == ""  # served, its hash not claimed


def test_cli_add_version(tmp_path, make_run_dir, capsys):
    runs = [make_run_dir(tmp_path / f"run{seed}", seed=seed) for seed in (0, 1)]
    repo = str(tmp_path / "repo")
    assert main([str(runs[0]), "--repository", repo, "--name", "m"]) == 0
    before = tree(tmp_path / "repo")
    capsys.readouterr()

    assert main([str(runs[1]), "--repository", repo, "--name", "m", "--add-version"]) == 2
    err = capsys.readouterr().err
    assert "already has version 1 (versions [1]); pass --version 2" in err
    assert main([str(runs[1]), "--repository", repo, "--name", "m", "--version", "2", "--add-version",
                 "--variants", "int8-dynamic"]) == 2
    assert "--add-version cannot be combined with --variants or --tensorrt" in capsys.readouterr().err
    assert main([str(runs[1]), "--repository", repo, "--name", "m", "--version", "2", "--add-version",
                 "--tensorrt"]) == 2
    assert "--add-version cannot be combined with --variants or --tensorrt" in capsys.readouterr().err
    assert main([str(runs[1]), "--repository", repo, "--name", "m", "--version", "2", "--add-version",
                 "--max-batch-size", "8"]) == 2
    assert "max_batch_size: 64 in the entry, max_batch_size: 8 in this export" in capsys.readouterr().err
    assert tree(tmp_path / "repo") == before

    assert main([str(runs[1]), "--repository", repo, "--name", "m", "--version", "2", "--add-version"]) == 0
    out = capsys.readouterr().out
    assert "version 2" in out and "versions recorded 1, 2" in out
    manifest = read_manifest(tmp_path / "repo" / "m")
    assert manifest["versions"]["2"]["weights_sha256"] == sha256_file(runs[1] / "encoder.pt")
    assert manifest["versions"]["1"]["weights_sha256"] == sha256_file(runs[0] / "encoder.pt")
    assert manifest["versions"]["2"]["source"] == str(runs[1].resolve())


def test_force_never_leaves_the_new_directory_with_the_old_hash(repo, fmnist_images, monkeypatch, make_encoder):
    # a crash after the exchange, before the final manifests: version 1 is the new directory and is
    # described by nobody (its old record was dropped first)
    real, calls = versions.replace_file, []

    def crash_after_the_rename(path: Path, data: bytes) -> None:
        calls.append(path)
        if (repo / "m" / "1" / "model.onnx").read_bytes() != old_onnx:
            raise OSError("killed")
        real(path, data)

    old_onnx = (repo / "m" / "1" / "model.onnx").read_bytes()
    monkeypatch.setattr(versions, "replace_file", crash_after_the_rename)
    with pytest.raises(OSError, match="killed"):
        add(repo, fmnist_images, make_encoder(1), version=1, force=True)
    assert len(calls) == 5  # manifest and config of both entries without the record, then the crash
    assert (repo / "m" / "1" / "model.onnx").read_bytes() != old_onnx
    for entry in ENTRIES:
        manifest = read_manifest(repo / entry)
        assert manifest["versions"] == {} and manifest["weights_sha256"] == state_dict_sha256(make_encoder(0)[0])
        assert json.loads(parse_pbtxt((repo / entry / "config.pbtxt").read_text())
                          .parameters["vitserve_manifest"].string_value) == manifest
        assert model_from_config(triton_json(repo / entry), "1").weights_sha256 == ""
    # the next --force completes it
    monkeypatch.setattr(versions, "replace_file", real)
    add(repo, fmnist_images, make_encoder(1), version=1, force=True)
    assert read_manifest(repo / "m")["versions"]["1"]["weights_sha256"] == state_dict_sha256(make_encoder(1)[0])
    assert model_from_config(triton_json(repo / "m"), "1").weights_sha256 == state_dict_sha256(make_encoder(1)[0])


def test_force_rolls_back_every_entry_when_one_cannot_be_published(repo, fmnist_images, monkeypatch,
                                                                    make_encoder):
    real = versions.publish_version

    def fails_on_latency(staged: Path, target: Path, force: bool):
        if target.parent.name == "m_latency":
            raise OSError("No space left on device")
        return real(staged, target, force)

    monkeypatch.setattr(versions, "publish_version", fails_on_latency)
    before = tree(repo)
    with pytest.raises(OSError, match="No space left"):
        add(repo, fmnist_images, make_encoder(1), version=1, force=True)
    assert tree(repo) == before and leftovers(repo) == []
