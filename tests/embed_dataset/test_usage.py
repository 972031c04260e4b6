"""Usage errors: exit 2 with a message naming the problem, before any work, OUTDIR untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embed_dataset.cli import main
from tests.embed_dataset.datasets import png, write_folder, write_parquet


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "src", {"a.png": png(np.zeros((28, 28, 1), np.uint8))})


def _argv(source: Path | str, exported, out: Path, *extra: str) -> list[str]:
    return [str(source), "--model-repository", str(exported.repository), "--model", exported.name,
            "--out", str(out), "--no-progress", *extra]


def _refused(argv: list[str], capsys, out: Path, *messages: str, existing: dict | None = None) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(m in err for m in messages), err
    if existing is None:
        assert not out.exists(), "a refused run created OUTDIR"
    else:
        assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == existing


def test_missing_repository_or_model(exported, folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(folder), "--model-repository", str(tmp_path / "nowhere"), "--model", exported.name,
            "--out", str(out)]
    _refused(argv, capsys, out, "model repository")
    argv = [str(folder), "--model-repository", str(exported.repository), "--model", "nope", "--out", str(out)]
    _refused(argv, capsys, out, f"no model 'nope' in {exported.repository}", f"it holds: {exported.name}")


def test_unreadable_or_ambiguous_sources(exported, folder, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(_argv(tmp_path / "missing", exported, out), capsys, out, "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(_argv(empty, exported, out), capsys, out, "holds no image")
    write_parquet(folder / "t.parquet", {"b.png": png(np.zeros((28, 28, 1), np.uint8))})
    _refused(_argv(folder, exported, out), capsys, out, "mixes kinds")
    not_parquet = tmp_path / "fake" / "x.parquet"
    not_parquet.parent.mkdir()
    not_parquet.write_bytes(b"not parquet")
    _refused(_argv(not_parquet.parent, exported, out), capsys, out, "no PAR1 magic")
    _refused(_argv(str(tmp_path / "wds" / "*.tar"), exported, out), capsys, out, "matches no files")


def test_parquet_columns_are_checked(exported, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    source = write_parquet(tmp_path / "t.parquet", {"b.png": b"x"})
    _refused(_argv(source, exported, out, "--image-column", "pixels"), capsys, out, "has no column 'pixels'")
    _refused(_argv(source, exported, out, "--id-column", "uid"), capsys, out, "has no column 'uid'")
    two = tmp_path / "two.parquet"
    pq.write_table(pa.table({"a": pa.array([b"x"]), "b": pa.array([b"y"])}), two)
    _refused(_argv(two, exported, out), capsys, out, "cannot tell which column")
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"image": pa.array([1])}), numbers)
    _refused(_argv(numbers, exported, out, "--image-column", "image"), capsys, out, "must hold image bytes")


def test_wrong_options(exported, folder, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(_argv(folder, exported, out, "--batch-size", "0"), capsys, out, "must be >= 1")
    _refused(_argv(folder, exported, out, "--pooling", "max"), capsys, out, "invalid choice")
    _refused(_argv(folder, exported, out, "--service", "nohost"), capsys, out, "is not HOST:PORT")
    _refused(_argv(folder, exported, out, "--image-column", "image"), capsys, out, "apply to Parquet sources")
    argv = [str(folder), "--model", "m", "--out", str(out)]
    _refused(argv, capsys, out, "give --model-repository DIR")


def test_an_outdir_that_holds_something_else_is_refused(exported, folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_bytes(b"keep me")
    _refused(_argv(folder, exported, out), capsys, out, "holds no embed-dataset job", existing={"mine.txt": b"keep me"})


def test_an_unreachable_gateway_is_a_usage_error(exported, folder, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    argv = [str(folder), "--model", exported.name, "--out", str(out), "--service", f"127.0.0.1:{port}"]
    _refused(argv, capsys, out, f"gateway 127.0.0.1:{port}: UNAVAILABLE")
