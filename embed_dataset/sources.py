"""Inputs of a job: detect the kind of source, split it into shards, and read one shard's images.

Three kinds: a directory of image files (recursive), Parquet (a file or a directory of them) with a
column of image bytes or paths, and WebDataset ``.tar`` shards (a glob, ``{000..009}`` ranges too).
The kind is decided from file contents (Parquet's ``PAR1`` magic, a tar header), never from a name
alone, so a Parquet file is never read as WebDataset; ``--source-kind`` forces it.

A shard is the unit of commit: a folder's files in sorted order, ``shard_size`` at a time; one row
group of a Parquet file; one tar file. ``read_shard`` yields every input of a shard as an ``Item``
with its id; an input that cannot even be read becomes an item with an error, never a crash.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from embed_dataset.options import EmbedOptions, UsageError

# What the gateway decodes, then image formats it refuses: the latter still become inputs, so that each
# one lands in `errors` with the decoder's reason instead of being skipped without a word.
DECODED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFUSED_EXTENSIONS = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jp2", ".ico", ".psd", ".qoi", ".exr")
IMAGE_EXTENSIONS = DECODED_EXTENSIONS + REFUSED_EXTENSIONS
WDS_IMAGE_KEYS = tuple(e[1:] for e in IMAGE_EXTENSIONS)
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "png", "image_bytes", "bytes", "image_path", "path")
_BINARY = ("binary", "large_binary")
_STRING = ("string", "large_string")


@dataclass(frozen=True)
class Shard:
    """One unit of commit: a folder's ``items``, a Parquet ``row_group`` of ``path``, or a tar ``path``."""

    index: int
    path: str = ""
    row_group: int = -1
    row_offset: int = 0
    items: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "path": self.path, "row_group": self.row_group,
                           "row_offset": self.row_offset, "items": list(self.items)})

    @classmethod
    def from_json(cls, text: str) -> "Shard":
        d = json.loads(text)
        return cls(int(d["index"]), d["path"], int(d["row_group"]), int(d["row_offset"]), tuple(d["items"]))


@dataclass(frozen=True)
class SourcePlan:
    """The detected source: its kind, the root ids are relative to, and its shards in order."""

    kind: str
    root: Path
    source: str
    image_column: str | None = None
    id_column: str | None = None
    shards: tuple[Shard, ...] = field(default=(), repr=False)

    def identity(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "image_column": self.image_column,
                "id_column": self.id_column}


@dataclass(frozen=True)
class Item:
    """One input of a shard: its position, its id, and its encoded bytes or why there are none."""

    seq: int
    id: str
    data: bytes | None
    error: str = ""


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b`` -> ``a00b a01b a02b`` and ``{x,y}`` -> ``x y`` (WebDataset's shard notation)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for opt in options for p in expand_braces(head + opt + tail)]


def is_parquet(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _walk(root: Path) -> list[Path]:
    """Every file under ``root``, sorted by relative path (the order of a folder's shards)."""
    files = [Path(d) / name for d, _, names in os.walk(root) for name in names]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _readable_dir(path: Path) -> None:
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"source directory {path} is not readable")


def _folder_shards(root: Path, files: list[Path], shard_size: int) -> tuple[Shard, ...]:
    rel = [f.relative_to(root).as_posix() for f in files]
    return tuple(Shard(i, items=tuple(rel[s:s + shard_size]))
                 for i, s in enumerate(range(0, len(rel), shard_size)))


def _column_kind(field_type: Any) -> str | None:
    """``bytes``, ``path`` or ``struct`` for a column that can hold images, else ``None``."""
    import pyarrow as pa

    text = str(field_type)
    if text in _BINARY:
        return "bytes"
    if text in _STRING:
        return "path"
    if pa.types.is_struct(field_type) and any(field_type.field(i).name in ("bytes", "path")
                                              for i in range(field_type.num_fields)):
        return "struct"
    return None


def _pick_image_column(schema: Any, path: Path) -> str:
    kinds = {name: _column_kind(schema.field(name).type) for name in schema.names}
    for name in IMAGE_COLUMN_NAMES:
        if kinds.get(name):
            return name
    candidates = [n for n, k in kinds.items() if k in ("bytes", "struct")]
    if len(candidates) == 1:
        return candidates[0]
    columns = ", ".join(f"{n} ({schema.field(n).type})" for n in schema.names)
    raise UsageError(f"cannot tell which column of {path} holds the images; name it with --image-column "
                     f"(columns: {columns})")


def _parquet_shards(root: Path, files: list[Path], image_column: str | None,
                    id_column: str | None) -> tuple[tuple[Shard, ...], str]:
    import pyarrow.parquet as pq

    shards: list[Shard] = []
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
            raise UsageError(f"cannot read Parquet file {path}: {e}") from e
        schema = pf.schema_arrow
        column = image_column or _pick_image_column(schema, path)
        if column not in schema.names:
            raise UsageError(f"{path} has no column {column!r} (--image-column); it has {', '.join(schema.names)}")
        if _column_kind(schema.field(column).type) is None:
            raise UsageError(f"column {column!r} of {path} is {schema.field(column).type}; it must hold image "
                             f"bytes (binary), paths (string) or {{bytes, path}} structs")
        if id_column is not None and id_column not in schema.names:
            raise UsageError(f"{path} has no column {id_column!r} (--id-column); it has {', '.join(schema.names)}")
        image_column = column
        offset = 0
        rel = path.relative_to(root).as_posix()
        for g in range(pf.metadata.num_row_groups):
            shards.append(Shard(len(shards), rel, g, offset))
            offset += pf.metadata.row_group(g).num_rows
    assert image_column is not None
    return tuple(shards), image_column


def _source_files(source: str) -> tuple[Path, list[Path]] | None:
    """``(root, files)`` for a glob or brace pattern, else ``None``."""
    if not re.search(r"[*?\[{]", source):
        return None
    files = sorted({Path(p) for pat in expand_braces(source) for p in glob.glob(pat, recursive=True)
                    if Path(p).is_file()})
    if not files:
        raise UsageError(f"source pattern {source!r} matches no files")
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return root, files


def _kind_of_files(files: list[Path], what: str) -> str:
    parquet = [f for f in files if is_parquet(f)]
    if len(parquet) == len(files):
        return "parquet"
    tars = [f for f in files if is_tar(f)]
    if len(tars) == len(files):
        return "webdataset"
    other = next(f for f in files if f not in parquet and f not in tars)
    raise UsageError(f"{what}: {other} is neither a Parquet file (no PAR1 magic) nor a tar file; "
                     f"point at one kind of source or force it with --source-kind")


def _detect(source: str, forced: str) -> tuple[str, Path, list[Path]]:
    """``(kind, root, files)``: a folder's image files, or the Parquet / tar files of the source."""
    matched = _source_files(source)
    if matched is not None:
        root, files = matched
        return (forced if forced != "auto" else _kind_of_files(files, f"source {source!r}")), root, files
    path = Path(source)
    if not path.exists():
        raise UsageError(f"source {source} does not exist")
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise UsageError(f"source file {path} is not readable")
        kind = forced if forced != "auto" else _kind_of_files([path], f"source {source}")
        return kind, path.parent, [path]
    _readable_dir(path)
    all_files = _walk(path)
    images = [f for f in all_files if f.suffix.lower() in IMAGE_EXTENSIONS]
    parquet = [f for f in all_files if f.suffix.lower() in (".parquet", ".pq") or (
        forced == "parquet" and is_parquet(f))]
    tars = [f for f in all_files if f.suffix.lower() == ".tar" or (forced == "webdataset" and is_tar(f))]
    chosen = {"folder": images, "parquet": parquet, "webdataset": tars}
    if forced != "auto":
        return forced, path, chosen[forced]
    present = [k for k, v in chosen.items() if v]
    if len(present) == 1:
        kind = present[0]
        if kind != "folder":  # the contents decide: a Parquet file named .tar is still Parquet
            kind = _kind_of_files(chosen[kind], f"source {source}")
        return kind, path, chosen[present[0]]
    counts = ", ".join(f"{len(v)} {k} file(s)" for k, v in chosen.items() if v)
    if not present:
        raise UsageError(f"source {path} holds no image ({'/'.join(IMAGE_EXTENSIONS[:5])}...), Parquet or tar files")
    raise UsageError(f"source {path} mixes kinds ({counts}); choose one with --source-kind")


def scan_source(options: EmbedOptions) -> SourcePlan:
    """Detect the source and split it into shards; ``UsageError`` for anything unreadable or ambiguous."""
    kind, root, files = _detect(options.source, options.source_kind)
    if not files:
        raise UsageError(f"source {options.source} holds no {kind} inputs")
    if kind != "parquet" and (options.image_column or options.id_column):
        raise UsageError(f"--image-column and --id-column apply to Parquet sources; {options.source} is {kind}")
    source = os.path.abspath(options.source)
    if kind == "folder":
        return SourcePlan(kind, root.resolve(), source, shards=_folder_shards(root, files, options.shard_size))
    if kind == "parquet":
        shards, column = _parquet_shards(root, files, options.image_column, options.id_column)
        return SourcePlan(kind, root.resolve(), source, column, options.id_column, shards)
    bad = [f for f in files if not is_tar(f)]
    if bad:
        raise UsageError(f"{bad[0]} is not a tar file (WebDataset shards are .tar files)")
    rel = [f.relative_to(root).as_posix() for f in files]
    return SourcePlan(kind, root.resolve(), source, shards=tuple(Shard(i, p) for i, p in enumerate(rel)))


# -- reading one shard (runs in Ray tasks) -----------------------------------------------------


def _read_file(seq: int, item_id: str, path: Path) -> Item:
    try:
        return Item(seq, item_id, path.read_bytes())
    except OSError as e:
        return Item(seq, item_id, None, f"cannot read file {path}: {e.strerror or e}")


def _folder_items(plan: SourcePlan, shard: Shard) -> Iterator[Item]:
    for seq, rel in enumerate(shard.items):
        yield _read_file(seq, rel, plan.root / rel)


def _parquet_value(value: Any, base: Path, seq: int, item_id: str) -> Item:
    if isinstance(value, dict):  # {bytes, path} (Hugging Face's Image feature)
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None:
        return Item(seq, item_id, None, "no image (null in the image column)")
    if isinstance(value, (bytes, bytearray)):
        return Item(seq, item_id, bytes(value))
    path = Path(str(value))
    return _read_file(seq, item_id, path if path.is_absolute() else base / path)


def _parquet_items(plan: SourcePlan, shard: Shard) -> Iterator[Item]:
    import pyarrow.parquet as pq

    path = plan.root / shard.path
    columns = [plan.image_column] + ([plan.id_column] if plan.id_column else [])
    try:
        table = pq.ParquetFile(path).read_row_group(shard.row_group, columns=columns)
    except Exception as e:  # noqa: BLE001 - a corrupt row group is one error row, not a failed job
        yield Item(0, f"{shard.path}:row_group{shard.row_group}", None,
                   f"cannot read row group {shard.row_group} of {path}: {e}")
        return
    images = table.column(plan.image_column).to_pylist()
    ids = table.column(plan.id_column).to_pylist() if plan.id_column else [None] * len(images)
    for seq, (value, given) in enumerate(zip(images, ids)):
        item_id = f"{shard.path}:{shard.row_offset + seq}"
        if plan.id_column and given is None:
            yield Item(seq, item_id, None, f"null id in column {plan.id_column!r}")
            continue
        yield _parquet_value(value, path.parent, seq, item_id if given is None else str(given))


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _sample_item(seq: int, key: str, members: dict[str, bytes]) -> Item:
    for ext in WDS_IMAGE_KEYS:
        if ext in members:
            return Item(seq, key, members[ext])
    return Item(seq, key, None, f"no image member (.{'/.'.join(WDS_IMAGE_KEYS[:5])}) in the sample; "
                                f"it has {', '.join('.' + e for e in sorted(members)) or 'no files'}")


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError)


def _tar_groups(path: Path) -> Iterator[tuple[str, dict[str, bytes], str, str]]:
    """``(key, {ext: bytes}, first member, why it is cut short or "")`` for each run of consecutive members
    with one key; raises when the tar is corrupt or truncated, after the groups read intact.

    Image members are read, others only noted. Python's tarfile takes a header cut short for the end
    of the archive, so an uncompressed tar must end in a zero block, or it is reported as truncated.
    """
    key, members, first = None, {}, ""
    try:
        with path.open("rb") as raw:
            compressed = raw.read(6).startswith(_COMPRESSED_MAGIC)
            raw.seek(0)
            with tarfile.open(fileobj=raw, mode="r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = _split_member(member.name)
                    if k != key:
                        if key is not None:
                            yield key, members, first, ""
                        key, members, first = k, {}, member.name
                    if ext in WDS_IMAGE_KEYS:
                        f = tar.extractfile(member)
                        members[ext] = f.read() if f is not None else b""
                    else:
                        members.setdefault(ext, b"")
                if not compressed:
                    raw.seek(tar.offset)
                    tail = raw.read(512)
                    if len(tail) < 512 or tail.strip(b"\0"):
                        raise tarfile.ReadError(f"truncated: the archive stops at byte {tar.offset + len(tail)} "
                                                f"without its end-of-archive block")
    except _TAR_ERRORS as e:
        if key is not None:
            intact = any(ext in members for ext in WDS_IMAGE_KEYS)
            yield key, members, first, "" if intact else f"the tar breaks inside this sample: {e}"
        raise
    if key is not None:
        yield key, members, first, ""


def _webdataset_items(plan: SourcePlan, shard: Shard) -> Iterator[Item]:
    seq = itertools.count()
    seen: set[str] = set()
    try:
        for key, members, first, cut in _tar_groups(plan.root / shard.path):
            if key in seen:  # the files of one sample must be consecutive (WebDataset's rule)
                yield Item(next(seq), f"{key}@{first}", None, f"sample key {key!r} appears again at {first} in "
                                                             f"{shard.path}; a sample's files must be consecutive")
                continue
            seen.add(key)
            yield Item(next(seq), key, None, cut) if cut else _sample_item(next(seq), key, members)
    except _TAR_ERRORS as e:
        yield Item(next(seq), f"{shard.path}:unreadable", None,
                   f"tar shard {shard.path} cannot be read past its first {len(seen)} sample(s): {e}")


def read_shard(plan: SourcePlan, shard: Shard) -> Iterator[Item]:
    """Every input of ``shard`` in order, as ``Item``s (bytes, or the reason there are none)."""
    readers = {"folder": _folder_items, "parquet": _parquet_items, "webdataset": _webdataset_items}
    return readers[plan.kind](plan, shard)
