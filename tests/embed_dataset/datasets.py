"""Small image sets for the embed-dataset tests, written as a folder, Parquet and WebDataset shards,
and readers of an OUTDIR and of ONNX Runtime's own outputs to compare against."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Exported:
    """A model repository holding one exported model."""

    repository: Path
    name: str

    @property
    def onnx(self) -> Path:
        return self.repository / self.name / "1" / "model.onnx"


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).save(buf, "PNG")
    return buf.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` pixels: a decompression bomb's shape."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def native_images(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` random 28x28 grey images (the model's own input size), by name."""
    rng = np.random.default_rng(seed)
    return {f"img{i:04d}": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8) for i in range(n)}


def odd_images(seed: int = 1) -> dict[str, bytes]:
    """Images the gateway must resize or convert: RGB JPEG 40x30, grey PNG 56x56, RGB PNG 20x28."""
    rng = np.random.default_rng(seed)
    return {"odd_rgb.jpg": jpeg(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)),
            "odd_big.png": png(rng.integers(0, 256, (56, 56, 1), dtype=np.uint8)),
            "odd_rgb.png": png(rng.integers(0, 256, (28, 20, 3), dtype=np.uint8))}


def bad_images() -> dict[str, tuple[bytes, str]]:
    """Inputs that must land in ``errors``, with a fragment of the reason each must give."""
    good = png(np.zeros((28, 28, 1), np.uint8))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    return {"bad_empty.png": (b"", "empty image"),
            "bad_truncated.png": (good[:50], "truncated"),
            "bad_garbage.jpg": (b"this is not an image at all" * 4, "cannot decode"),
            "bad_gif.gif": (buf.getvalue(), "GIF"),
            "bad_bomb.png": (png_declaring(60000, 60000), "decompression bomb")}


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    """``files`` (relative path -> bytes) under ``root``."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_parquet(path: Path, files: dict[str, bytes], row_group_size: int = 8, id_column: bool = True) -> Path:
    """A Parquet file with columns ``key`` (the file name, as an id) and ``image`` (bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"image": pa.array(list(files.values()), pa.binary())}
    if id_column:
        columns = {"key": pa.array(list(files), pa.string()), **columns}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_webdataset(directory: Path, files: dict[str, bytes], per_shard: int = 8) -> list[Path]:
    """Tar shards of ``per_shard`` samples: ``<key>.<ext>`` (the image) and ``<key>.cls``."""
    directory.mkdir(parents=True, exist_ok=True)
    items = list(files.items())
    shards = []
    for s in range(0, len(items), per_shard):
        path = directory / f"shard-{s // per_shard:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for name, data in items[s:s + per_shard]:
                stem, _, ext = name.partition(".")
                for member, payload in ((f"{stem}.{ext or 'png'}", data), (f"{stem}.cls", b"3")):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append(path)
    return shards


def read_outputs(out: Path) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    """``(id -> embedding, id -> error, every id in the order read)`` of an OUTDIR."""
    import pyarrow.parquet as pq

    embeddings: dict[str, np.ndarray] = {}
    errors: dict[str, str] = {}
    ids: list[str] = []
    for f in sorted((out / "embeddings").glob("*.parquet")):
        t = pq.read_table(f)
        for i, e in zip(t["id"].to_pylist(), t["embedding"].to_numpy(zero_copy_only=False)):
            embeddings[i] = np.asarray(e)
            ids.append(i)
    for f in sorted((out / "errors").glob("*.parquet")):
        t = pq.read_table(f)
        for i, e in zip(t["id"].to_pylist(), t["error"].to_pylist()):
            errors[i] = e
            ids.append(i)
    return embeddings, errors, ids


def ort_tokens(exported: Exported, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(cls [N, D], patch tokens [N, h*w, D])`` of uint8 ``[N, 28, 28, 1]`` straight from ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported.onnx), providers=["CPUExecutionProvider"])
    cls, patches = session.run(["cls", "patch_tokens"], {"images": images})
    return cls, patches


