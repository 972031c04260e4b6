"""The job on a local Ray (2 CPUs, one per module): rows of every source kind, errors, resume, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.embed_dataset.datasets import (Exported, bad_images, native_images, ort_tokens, png, read_outputs, write_folder,
                      write_parquet, write_webdataset)

pytest.importorskip("ray")

from embed_dataset.cli import main  # noqa: E402
from embed_dataset.job import block_rows, embed_dataset, pool_sizing  # noqa: E402
from embed_dataset.options import EmbedOptions, JobError, UsageError  # noqa: E402

pytestmark = pytest.mark.slow  # about ten jobs on one local Ray: a minute or more on 2 shared CPUs
ROOT = Path(__file__).resolve().parents[2]
NATIVE = native_images(40)


def options(exported: Exported, source: Path | str, out: Path, **kw) -> EmbedOptions:
    kw.setdefault("shard_size", 8)
    kw.setdefault("batch_size", 8)
    kw.setdefault("stall_timeout_s", 120.0)
    return EmbedOptions(source=str(source), out=out, model=exported.name, model_repository=exported.repository,
                        progress=False, **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 native images in two subdirectories, plus the bad inputs and a file that is not an image."""
    root = tmp_path_factory.mktemp("folder")
    files = {f"{'ab'[i % 2]}/{name}.png": png(a) for i, (name, a) in enumerate(NATIVE.items())}
    files.update({f"bad/{name}": data for name, (data, _) in bad_images().items()})
    files["notes.txt"] = b"not an image, skipped"
    return write_folder(root, files)


@pytest.fixture(scope="module")
def folder_run(exported: Exported, folder: Path, local_ray: str, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("folder_run") / "out"
    return out, embed_dataset(options(exported, folder, out, workers=2))


def test_pool_never_takes_every_cpu():
    assert pool_sizing(2, 1) == (1.0, 1.0)
    assert pool_sizing(2, 2) == (0.5, 1.0)   # two actors of one CPU each would starve the reads (ray#44687)
    assert pool_sizing(2, 4) == (0.25, 1.0)
    assert pool_sizing(1, 1) == (0.5, 0.5)
    assert pool_sizing(16, 4) == (1.0, 1.0)


def test_blocks_hold_whole_batches_of_about_a_mebibyte_of_pixels():
    assert block_rows(64, 28 * 28) == 512          # tiny images: 8 batches a block (one actor task)
    assert block_rows(64, 224 * 224 * 3) == 64     # a batch is already over 1 MiB: one batch a block
    assert block_rows(16, 224 * 224 * 3) == 16
    assert block_rows(1000, 224 * 224 * 3) == 1000  # never less than a batch


def test_folder_embeddings_are_onnx_runtimes_and_bad_inputs_are_errors(exported, folder_run):
    out, result = folder_run
    assert (result.embedded, result.errors) == (40, len(bad_images()))
    embeddings, errors, ids = read_outputs(out)
    assert len(ids) == len(set(ids)) == 40 + len(bad_images())
    names = list(NATIVE)
    cls, _ = ort_tokens(exported, np.stack([NATIVE[n] for n in names]))
    for i, name in enumerate(names):
        got = embeddings[f"{'ab'[i % 2]}/{name}.png"]  # ids: paths relative to the source directory
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, cls[i], rtol=0, atol=1e-5)
    for name, (_, reason) in bad_images().items():
        assert reason in errors[f"bad/{name}"], (name, errors[f"bad/{name}"])
    assert "notes.txt" not in ids
    assert result.actor_peak_rss_mb and all(mb > 10 for mb in result.actor_peak_rss_mb.values())
    assert "embedded 40 images, 5 errors" in result.summary()


def test_outputs_name_the_model_and_options(exported, folder_run):
    import pyarrow.parquet as pq

    out, _ = folder_run
    schema = pq.read_schema(next((out / "embeddings").glob("*.parquet")))
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    manifest = json.loads((exported.repository / exported.name / "manifest.json").read_text())
    assert meta["model"] == exported.name and meta["version"] == "1"
    assert meta["weights_sha256"] == manifest["weights_sha256"]
    assert (meta["pooling"], meta["dtype"]) == ("cls", "float32")
    assert json.loads(meta["preprocessing"])["resize_op"] == "resize"
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[192]"
    errors = pq.read_schema(next((out / "errors").glob("*.parquet")))
    assert errors.names == ["id", "error"]


def test_parquet_and_webdataset_give_the_folder_rows(exported, local_ray, tmp_path):
    files = {f"{name}.png": png(a) for name, a in NATIVE.items()}
    files["bad_truncated.png"] = bad_images()["bad_truncated.png"][0]
    folder = write_folder(tmp_path / "folder", files)
    write_parquet(tmp_path / "pq" / "part-0.parquet", dict(list(files.items())[:20]))
    write_parquet(tmp_path / "pq" / "part-1.parquet", dict(list(files.items())[20:]))
    write_webdataset(tmp_path / "wds", files, per_shard=12)
    runs = {}
    for kind, source, extra in (("folder", folder, {}), ("parquet", tmp_path / "pq", {"id_column": "key"}),
                                ("webdataset", str(tmp_path / "wds" / "shard-{0000..0003}.tar"), {})):
        result = embed_dataset(options(exported, source, tmp_path / f"out_{kind}", **extra))
        embeddings, errors, ids = read_outputs(tmp_path / f"out_{kind}")
        assert len(ids) == len(set(ids)) == len(files), kind
        # ids: the relative path (folder), the id column (Parquet), the sample key (WebDataset)
        runs[kind] = ({k.split(".")[0]: v for k, v in embeddings.items()},
                      {k.split(".")[0]: v for k, v in errors.items()})
        assert (result.embedded, result.errors) == (40, 1), kind
    base_emb, base_err = runs["folder"]
    for kind, (emb, err) in runs.items():
        assert sorted(emb) == sorted(base_emb) and sorted(err) == sorted(base_err) == ["bad_truncated"], kind
        for key in base_emb:
            np.testing.assert_allclose(emb[key], base_emb[key], rtol=0, atol=1e-5)
    # without an id column, Parquet ids are <file>:<row>
    embed_dataset(options(exported, tmp_path / "pq" / "part-1.parquet", tmp_path / "out_rows"))
    _, _, ids = read_outputs(tmp_path / "out_rows")
    assert sorted(ids, key=lambda i: int(i.split(":")[1])) == [f"part-1.parquet:{r}" for r in range(21)]


def test_features_float16_both_pooling_and_l2(exported, local_ray, tmp_path):
    import pyarrow.parquet as pq

    names = list(NATIVE)[:12]
    folder = write_folder(tmp_path / "src", {f"{n}.png": png(NATIVE[n]) for n in names})
    out = tmp_path / "out"
    embed_dataset(options(exported, folder, out, pooling="both", l2_normalize=True, features=True, dtype="float16"))
    table = pq.read_table(out / "embeddings")
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: halffloat>[384]"
    assert str(table.schema.field("patch_features").type) == (
        "fixed_size_list<element: fixed_size_list<element: halffloat>[192]>[49]")
    meta = table.schema.metadata
    assert json.loads(meta[b"grid"]) == [7, 7] and meta[b"dtype"] == b"float16" and meta[b"pooling"] == b"both"
    order = [names.index(i.removesuffix(".png")) for i in table["id"].to_pylist()]
    cls, patches = ort_tokens(exported, np.stack([NATIVE[n] for n in names]))
    mean = patches.mean(axis=1)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    want = np.concatenate([unit(cls), unit(mean)], axis=1)[order]
    got = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    feats = np.stack([np.stack(r) for r in table["patch_features"].to_pylist()]).astype(np.float32)
    np.testing.assert_allclose(feats, patches[order], rtol=0, atol=1e-2 * np.abs(patches).max())


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_rerun_does_nothing_and_another_model_or_option_is_refused(exported, folder, folder_run, capsys):
    out, first = folder_run
    before = _snapshot(out)
    again = embed_dataset(options(exported, folder, out, workers=2))
    assert (again.shards_committed, again.shards_already_done, again.embedded) == (0, len(list(
        (out / "_state" / "done").glob("*.json"))), 0)
    assert (again.total_embedded, again.total_errors) == (first.embedded, first.errors)
    assert _snapshot(out) == before
    with pytest.raises(UsageError, match="pooling: 'cls' .*'mean'"):
        embed_dataset(options(exported, folder, out, pooling="mean"))
    argv = [str(folder), "--model-repository", str(exported.repository), "--model", exported.name,
            "--out", str(out), "--shard-size", "8", "--dtype", "float16", "--no-progress"]
    assert main(argv) == 2
    assert "dtype: 'float32' (in OUTDIR) vs 'float16' (this run)" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_an_interrupted_commit_is_redone_and_each_id_stays_once(exported, local_ray, tmp_path):
    folder = write_folder(tmp_path / "src", {f"{n}.png": png(a) for n, a in list(NATIVE.items())[:24]}
                          | {"bad_empty.png": b""})
    out = tmp_path / "out"
    embed_dataset(options(exported, folder, out))
    # as if the driver died inside shard 1's commit: its files renamed, its done record not yet
    (out / "_state" / "done" / "000001.json").unlink()
    (out / "embeddings" / ".shard-000001.parquet.tmp-999999").write_bytes(b"partial")
    again = embed_dataset(options(exported, folder, out))
    assert again.shards_committed == 1 and again.shards_already_done == 3
    embeddings, errors, ids = read_outputs(out)
    assert len(ids) == len(set(ids)) == 25 and list(errors) == ["bad_empty.png"]
    assert not list((out / "embeddings").glob(".*tmp*"))


def test_a_stall_fails_with_a_clear_message(exported, local_ray, tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    fifo = folder / "never.png"
    os.mkfifo(fifo)  # reading it blocks until a writer opens it: a read task that never finishes
    try:
        with pytest.raises(JobError, match=r"no progress for 5 s \(--stall-timeout\)"):
            embed_dataset(options(exported, folder, tmp_path / "out", stall_timeout_s=5.0))
    finally:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # release the blocked Ray worker
        os.close(fd)


def test_sigkill_of_the_driver_mid_job_then_rerun_gives_every_id_once(exported, local_ray, tmp_path):
    files = {f"{n}.png": png(a) for n, a in native_images(240, seed=7).items()}
    files |= {"bad_empty.png": b"", "bad_garbage.jpg": b"garbage" * 10}
    folder = write_folder(tmp_path / "src", files)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "embed_dataset.cli", str(folder), "--model-repository", str(exported.repository),
            "--model", exported.name, "--out", str(out), "--shard-size", "4", "--batch-size", "2",
            "--address", local_ray, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = out / "_state" / "done"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if done.is_dir() and len(list(done.glob("*.json"))) >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    committed = len(list(done.glob("*.json")))
    assert 3 <= committed < 61
    result = embed_dataset(options(exported, folder, out, shard_size=4, batch_size=2))
    assert result.shards_already_done == committed and result.shards_committed == 61 - committed
    embeddings, errors, ids = read_outputs(out)
    assert len(ids) == len(set(ids)) == len(files)
    assert set(ids) == set(files) and set(errors) == {"bad_empty.png", "bad_garbage.jpg"}
