"""OUTDIR bookkeeping (no Ray): per-shard gathering, the commit, and what a rerun may find there."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from embed_dataset.options import UsageError
from embed_dataset.output import OutputDir, ShardBuffer, differences, shard_tables
from embed_dataset.sources import Shard


def rows(seq, errors=None, count=-1):
    seq = np.asarray(seq, np.int64)
    n = len(seq)
    return {"seq": seq, "id": np.asarray([f"id{s}" for s in seq], object),
            "error": np.asarray(errors or [""] * n, object), "count": np.full(n, count, np.int64),
            "embedding": np.tile(seq[:, None].astype(np.float32), (1, 3))}


def test_a_shard_is_complete_once_every_position_and_the_marker_arrived():
    buffer = ShardBuffer()
    buffer.add(rows([2, 0]))
    buffer.add(rows([0]))                        # a retried task sends a row again: kept once
    assert not buffer.complete
    marker = rows([-1], count=4)
    buffer.add({k: np.concatenate([v, marker[k]]) for k, v in rows([3]).items()})
    assert not buffer.complete                   # position 1 still missing
    buffer.add(rows([1], errors=["broken"]))
    assert buffer.complete
    got = buffer.rows({})
    assert got["seq"].tolist() == [0, 1, 2, 3] and got["error"].tolist() == ["", "broken", "", ""]


def test_tables_split_embeddings_and_errors_and_carry_metadata():
    emb, err = shard_tables(rows([0, 1, 2], errors=["", "bad", ""]), {"model": "m"}, features=False)
    assert emb["id"].to_pylist() == ["id0", "id2"] and emb.schema.metadata == {b"model": b"m"}
    assert str(emb.schema.field("embedding").type) == "fixed_size_list<element: float>[3]"
    assert err.to_pydict() == {"id": ["id1"], "error": ["bad"]}
    _, none = shard_tables(rows([0]), {}, features=False)
    assert none is None


def test_a_recommit_without_errors_removes_the_old_errors_file(tmp_path):
    out = OutputDir(tmp_path / "out")
    identity = {"model": {"name": "m"}}
    shards = (Shard(0, items=("a.png",)),)
    assert out.check(identity, shards) is False
    out.prepare(identity, shards, resume=False)
    out.commit(0, *shard_tables(rows([0, 1], errors=["", "bad"]), {}, False))
    assert (out.errors / "shard-000000.parquet").exists()
    out.commit(0, *shard_tables(rows([0, 1]), {}, False))
    assert not (out.errors / "shard-000000.parquet").exists()
    assert pq.read_table(out.embeddings / "shard-000000.parquet").num_rows == 2
    assert out.done() == {0: out.done()[0]} and out.done()[0]["embedded"] == 2
    with pytest.raises(UsageError, match="another embed-dataset run is writing"):
        OutputDir(tmp_path / "out").prepare(identity, shards, resume=True)  # the first still holds the lock
    out.release()


def test_a_changed_source_or_identity_is_refused(tmp_path):
    out = OutputDir(tmp_path / "out")
    identity = {"model": {"name": "m", "version": "1"}}
    shards = (Shard(0, items=("a.png", "b.png")),)
    out.prepare(identity, shards, resume=False)
    out.release()
    assert out.check(identity, shards) is True
    with pytest.raises(UsageError, match=r"source changed .*1 added, 0 removed, e.g. c.png"):
        out.check(identity, (Shard(0, items=("a.png", "b.png")), Shard(1, items=("c.png",))))
    with pytest.raises(UsageError, match=r"model.version: '1' \(in OUTDIR\) vs '2' \(this run\)"):
        out.check({"model": {"name": "m", "version": "2"}}, shards)
    assert differences({"a": {"b": 1}}, {"a": {"b": 1}, "c": 2}) == ["c: None (in OUTDIR) vs 2 (this run)"]
