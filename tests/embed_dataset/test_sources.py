"""Source detection and shard reading (no Ray): kinds from contents, ids, unreadable inputs as items."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from embed_dataset.options import EmbedOptions, UsageError
from embed_dataset.sources import expand_braces, read_shard, scan_source
from tests.embed_dataset.datasets import png, write_folder, write_parquet, write_webdataset

IMG = png(np.full((28, 28, 1), 7, np.uint8))


def scan(source: Path | str, **kw):
    return scan_source(EmbedOptions(source=str(source), out=Path("/nonexistent"), model="m",
                                    model_repository=Path("/nonexistent"), **kw))


def items(plan):
    return [item for shard in plan.shards for item in read_shard(plan, shard)]


def test_folder_is_recursive_sorted_and_sharded(tmp_path):
    write_folder(tmp_path, {"b/2.png": IMG, "a/1.JPG": IMG, "a/0.png": IMG, "c.gif": IMG, "x.txt": b"no"})
    plan = scan(tmp_path, shard_size=2)
    assert plan.kind == "folder"
    assert [s.items for s in plan.shards] == [("a/0.png", "a/1.JPG"), ("b/2.png", "c.gif")]
    assert [i.id for i in items(plan)] == ["a/0.png", "a/1.JPG", "b/2.png", "c.gif"]  # the .gif gets its error later


def test_parquet_is_never_taken_for_webdataset(tmp_path):
    # a Parquet file named like a tar shard, alone, in a directory and through a glob
    source = write_parquet(tmp_path / "d" / "data.tar", {"k0": IMG, "k1": IMG, "k2": IMG}, row_group_size=2)
    for given in (source, tmp_path / "d", str(tmp_path / "d" / "*.tar")):
        plan = scan(given)
        assert plan.kind == "parquet", given
        assert [(s.row_group, s.row_offset) for s in plan.shards] == [(0, 0), (1, 2)]
        assert plan.image_column == "image"
    assert [i.id for i in items(scan(source))] == ["data.tar:0", "data.tar:1", "data.tar:2"]
    assert [i.id for i in items(scan(source, id_column="key"))] == ["k0", "k1", "k2"]


def test_forced_kind_wins(tmp_path):
    write_parquet(tmp_path / "p" / "part", {"k": IMG})  # no extension: only the contents say Parquet
    assert scan(tmp_path / "p" / "part").kind == "parquet"
    with pytest.raises(UsageError, match="holds no folder inputs"):
        scan(tmp_path / "p", source_kind="folder")
    assert scan(tmp_path / "p", source_kind="parquet").kind == "parquet"


def test_parquet_paths_and_structs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_folder(tmp_path / "imgs", {"x.png": IMG})
    pq.write_table(pa.table({"path": ["imgs/x.png", "imgs/missing.png"]}), tmp_path / "paths.parquet")
    got = items(scan(tmp_path / "paths.parquet", image_column="path"))
    assert got[0].data == IMG and got[1].data is None and "cannot read file" in got[1].error
    struct = pa.array([{"bytes": IMG, "path": None}, {"bytes": None, "path": "imgs/x.png"}, None],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"img": struct}), tmp_path / "hf.parquet")
    got = items(scan(tmp_path / "hf.parquet"))
    assert [g.data == IMG for g in got] == [True, True, False] and "null" in got[2].error


def test_webdataset_keys_globs_and_braces(tmp_path):
    write_webdataset(tmp_path, {f"s{i}.png": IMG for i in range(5)}, per_shard=2)
    assert expand_braces(str(tmp_path / "shard-{0000..0002}.tar"))[-1].endswith("shard-0002.tar")
    for given in (str(tmp_path / "shard-{0000..0002}.tar"), str(tmp_path / "*.tar"), tmp_path):
        plan = scan(given)
        assert plan.kind == "webdataset" and len(plan.shards) == 3, given
        assert [i.id for i in items(plan)] == [f"s{i}" for i in range(5)]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_samples_without_an_image_and_broken_tars(tmp_path):
    _tar(tmp_path / "a.tar", [("d/k1.jpg", IMG), ("d/k1.json", b"{}"), ("d/k2.txt", b"caption only"),
                              ("d/k1.png", IMG)])
    got = items(scan(tmp_path / "a.tar"))
    assert [g.id for g in got[:2]] == ["d/k1", "d/k2"]
    assert got[0].data == IMG and "no image member" in got[1].error and ".txt" in got[1].error
    assert got[2].id == "d/k1@d/k1.png" and "appears again" in got[2].error  # keys must be consecutive
    whole = _tar(tmp_path / "b.tar", [(f"k{i}.png", IMG) for i in range(4)]).read_bytes()
    # members are 1024 bytes (header + one data block); cut inside the third one's header (which Python's
    # tarfile alone would take for the end of the archive), then inside its data
    for cut, ids in ((2048 + 100, ["k0", "k1"]), (2048 + 520, ["k0", "k1", "k2"])):
        (tmp_path / "b.tar").write_bytes(whole[:cut])
        got = items(scan(tmp_path / "b.tar"))
        assert [g.id for g in got] == ids + ["b.tar:unreadable"], cut
        assert "cannot be read past" in got[-1].error
    assert "breaks inside this sample" in got[2].error
