"""OUTDIR: the job's identity, its shard plan, and the atomic commit of each shard's output.

```
OUTDIR/embeddings/shard-000012.parquet   id, embedding [, patch_features]; metadata: model, version, ...
OUTDIR/errors/shard-000012.parquet       id, error (only shards with errors)
OUTDIR/_state/job.json                   model, options and source of the run (a rerun must match)
OUTDIR/_state/plan.parquet               the shards, fixed at the first run
OUTDIR/_state/done/000012.json           the commit record of shard 12: written last
```

Exactly once: every input belongs to one shard; a shard's rows are written to temporary names and
renamed into place (``os.replace`` is atomic), then its ``done`` record is renamed into place. A run
redoes every shard without a record and overwrites whatever an interrupted commit left, so after a
completed run each id is in exactly one file, once. An flock on ``_state/lock`` keeps a second
driver off the same OUTDIR; the kernel drops it when a driver dies, even by SIGKILL.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, IO

import numpy as np

from embed_dataset.options import UsageError
from embed_dataset.sources import Shard

FORMAT_VERSION = 1
STATE = "_state"
EMBEDDINGS = "embeddings"
ERRORS = "errors"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then fsync and rename onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old vs new`` for every flattened key whose value differs."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k)!r} (in OUTDIR) vs {b.get(k)!r} (this run)" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _plan_table(shards: tuple[Shard, ...]) -> Any:
    import pyarrow as pa

    return pa.table({"index": pa.array([s.index for s in shards], pa.int64()),
                     "path": pa.array([s.path for s in shards], pa.string()),
                     "row_group": pa.array([s.row_group for s in shards], pa.int64()),
                     "row_offset": pa.array([s.row_offset for s in shards], pa.int64()),
                     "items": pa.array([list(s.items) for s in shards], pa.list_(pa.string()))})


class OutputDir:
    """One job's OUTDIR; nothing is written until ``prepare``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.state = self.root / STATE
        self.embeddings = self.root / EMBEDDINGS
        self.errors = self.root / ERRORS
        self.done_dir = self.state / "done"
        self._lock: IO[str] | None = None

    def _read_plan(self) -> tuple[Shard, ...]:
        import pyarrow.parquet as pq

        t = pq.read_table(self.state / "plan.parquet").to_pydict()
        return tuple(Shard(i, p, g, o, tuple(items)) for i, p, g, o, items in
                     zip(t["index"], t["path"], t["row_group"], t["row_offset"], t["items"]))

    def check(self, identity: dict[str, Any], shards: tuple[Shard, ...]) -> bool:
        """``True`` when OUTDIR holds this job already (resume), ``False`` when it is new or empty;
        ``UsageError`` when it holds something else. Reads only."""
        if not self.root.exists():
            return False
        if not self.root.is_dir():
            raise UsageError(f"--out {self.root} exists and is not a directory")
        job = self.state / "job.json"
        if not job.is_file():
            foreign = [p.name for p in self.root.iterdir() if p.name != STATE]
            if foreign:
                raise UsageError(f"--out {self.root} is not empty and holds no embed-dataset job "
                                 f"({', '.join(sorted(foreign)[:5])}); choose a new or empty directory")
            return False
        stored = json.loads(job.read_text())
        diff = differences(stored, identity)
        if diff:
            raise UsageError(f"--out {self.root} holds a job with another model, options or source; use "
                             f"another OUTDIR (or the same options) to resume:\n  " + "\n  ".join(diff))
        stored_shards = self._read_plan()
        if stored_shards != shards:
            before = {i for s in stored_shards for i in (s.items or (f"{s.path}#{s.row_group}",))}
            now = {i for s in shards for i in (s.items or (f"{s.path}#{s.row_group}",))}
            added, removed = sorted(now - before), sorted(before - now)
            raise UsageError(f"the source changed since the job in {self.root} started ({len(added)} added, "
                             f"{len(removed)} removed, e.g. {(added or removed or ['reordered'])[0]}); "
                             f"embed it into a new OUTDIR")
        return True

    def prepare(self, identity: dict[str, Any], shards: tuple[Shard, ...], resume: bool) -> None:
        """Create the layout (fresh) or sweep an interrupted run's temporaries (resume); take the lock."""
        import pyarrow.parquet as pq

        for d in (self.embeddings, self.errors, self.done_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = (self.state / "lock").open("w")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise UsageError(f"another embed-dataset run is writing {self.root}; wait for it to end") from e
        for d in (self.embeddings, self.errors, self.done_dir, self.state):
            for tmp in d.glob(".*.tmp-*"):
                tmp.unlink()
        if not resume:
            _atomic_write(self.state / "plan.parquet", lambda p: pq.write_table(_plan_table(shards), p))
            _atomic_write(self.state / "job.json", lambda p: p.write_text(json.dumps(identity, indent=1) + "\n"))
            _fsync_dir(self.state)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def done(self) -> dict[int, dict[str, Any]]:
        """The commit records of the shards already done, by shard index."""
        if not self.done_dir.is_dir():
            return {}
        return {int(p.stem): json.loads(p.read_text()) for p in self.done_dir.glob("[0-9]*.json")}

    def commit(self, index: int, embeddings: Any, errors: Any | None) -> None:
        """Write one shard's tables (pyarrow) atomically, then its ``done`` record."""
        import pyarrow.parquet as pq

        name = shard_name(index)
        if errors is not None:
            _atomic_write(self.errors / name, lambda p: pq.write_table(errors, p))
        elif (self.errors / name).exists():  # left by an interrupted commit of this shard
            (self.errors / name).unlink()
        _atomic_write(self.embeddings / name, lambda p: pq.write_table(embeddings, p))
        _fsync_dir(self.errors)
        _fsync_dir(self.embeddings)
        record = {"shard": index, "embedded": embeddings.num_rows, "errors": 0 if errors is None else errors.num_rows,
                  "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _atomic_write(self.done_dir / f"{index:06d}.json", lambda p: p.write_text(json.dumps(record) + "\n"))
        _fsync_dir(self.done_dir)


@dataclass
class ShardBuffer:
    """The rows of one shard received so far (deduplicated by position) and its expected count."""

    parts: list[dict[str, np.ndarray]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    count: int | None = None

    def add(self, rows: dict[str, np.ndarray]) -> None:
        marker = rows["seq"] < 0
        if marker.any():
            self.count = int(rows["count"][marker][0])
        keep = ~marker & ~np.isin(rows["seq"], list(self.seen))
        if keep.any():
            part = {k: v[keep] for k, v in rows.items()}
            self.parts.append(part)
            self.seen.update(int(s) for s in part["seq"])

    @property
    def complete(self) -> bool:
        return self.count is not None and len(self.seen) == self.count

    def rows(self, empty: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All rows in shard order, each once (``empty``, zero-length columns, for a shard without inputs)."""
        if not self.parts:
            return empty
        joined = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        _, first = np.unique(joined["seq"], return_index=True)  # sorted by seq, each once
        return {k: v[first] for k, v in joined.items()}


def _fixed_lists(values: np.ndarray) -> Any:
    """``[n, a]`` -> fixed_size_list<a>; ``[n, a, b]`` -> fixed_size_list<fixed_size_list<b>, a>."""
    import pyarrow as pa

    arr = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):  # children named "element", as Parquet reads them back
        arr = pa.FixedSizeListArray.from_arrays(arr, type=pa.list_(pa.field("element", arr.type), int(size)))
    return arr


def shard_tables(rows: dict[str, np.ndarray], metadata: dict[str, str], features: bool) -> tuple[Any, Any | None]:
    """``(embeddings table, errors table or None)`` of one shard's rows (``id``, ``error``, ``embedding``
    ``[n, E]`` and with ``features`` ``patch_features`` ``[n, h*w, D]``)."""
    import pyarrow as pa

    meta = {k.encode(): v.encode() for k, v in metadata.items()}
    errors = np.asarray(rows["error"], dtype=object)
    ok = errors == ""
    columns = {"id": pa.array([str(i) for i in rows["id"][ok]], pa.string()),
               "embedding": _fixed_lists(rows["embedding"][ok])}
    if features:
        columns["patch_features"] = _fixed_lists(rows["patch_features"][ok])
    embeddings = pa.table(columns).replace_schema_metadata(meta)
    if ok.all():
        return embeddings, None
    bad = pa.table({"id": pa.array([str(i) for i in rows["id"][~ok]], pa.string()),
                    "error": pa.array([str(e) for e in errors[~ok]], pa.string())}).replace_schema_metadata(meta)
    return embeddings, bad
