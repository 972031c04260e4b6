"""IDX reader, Fashion-MNIST loader and image-folder loader on files made in tmp_path."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (
    FASHION_MNIST_FILES, DataError, LabelledImages, fashion_mnist_dir, load_fashion_mnist,
    load_image_folder, read_idx, to_float_nchw,
)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array: np.ndarray, type_code: int = 0x08) -> None:
    data = idx_bytes(array, type_code)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_read_idx_round_trip_gz_and_plain(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / "x.gz", images)
    write_idx(tmp_path / "x", images)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "x"), images)


def test_read_idx_big_endian_ints(tmp_path):
    values = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    write_idx(tmp_path / "i.gz", values, type_code=0x0C)
    got = read_idx(tmp_path / "i.gz")
    assert got.tolist() == values.tolist() and got.dtype.byteorder in ("=", "<", "|")


def test_truncated_and_malformed_idx_raise_data_error(tmp_path):
    data = idx_bytes(np.zeros((4, 2, 2), dtype=np.uint8))
    with gzip.open(tmp_path / "t.gz", "wb") as f:
        f.write(data[:-3])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "t.gz")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx(tmp_path / "short")
    (tmp_path / "notgz.gz").write_bytes(b"plain")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "notgz.gz")


def test_fashion_mnist_from_a_directory(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        img_name, lbl_name = FASHION_MNIST_FILES[split]
        write_idx(tmp_path / img_name, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / lbl_name, rng.integers(0, 10, (n,), dtype=np.uint8))
    train = load_fashion_mnist("train", tmp_path)
    assert train.images.shape == (6, 28, 28, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and len(train.classes) == 10
    assert len(load_fashion_mnist("test", tmp_path)) == 3
    sub = train.subset(4, seed=1)
    assert len(sub) == 4 and np.array_equal(sub.images, train.subset(4, seed=1).images)
    with pytest.raises(DataError, match="unknown Fashion-MNIST split"):
        load_fashion_mnist("val", tmp_path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_dir(tmp_path)


def test_image_folder_with_classes(tmp_path):
    for c, value in (("cat", 10), ("dog", 200)):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (12, 8), (value, value, value)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path, size=(6, 10), channels=3)
    assert isinstance(data, LabelledImages)
    assert data.images.shape == (4, 6, 10, 3) and data.images.dtype == np.uint8
    assert data.classes == ("cat", "dog") and data.labels.tolist() == [0, 0, 1, 1]
    assert data.images[0].max() == 10 and data.images[3].min() == 200
    grey = load_image_folder(tmp_path, size=(4, 4), channels=1)
    assert grey.images.shape == (4, 4, 4, 1)


def test_flat_image_folder_is_unlabelled_and_errors_are_clear(tmp_path):
    Image.new("L", (5, 5), 7).save(tmp_path / "a.png")
    flat = load_image_folder(tmp_path, size=(5, 5), channels=1)
    assert flat.labels.tolist() == [-1] and flat.classes == ()
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode image"):
        load_image_folder(tmp_path, size=(5, 5), channels=1)
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing", size=(5, 5))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "empty", size=(5, 5))


def test_to_float_nchw_normalises():
    images = np.full((2, 3, 4, 1), 255, dtype=np.uint8)
    x = to_float_nchw(images, (0.5,), (0.25,))
    assert x.shape == (2, 1, 3, 4) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, 2.0))
