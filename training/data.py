"""Image data: Fashion-MNIST from IDX files and a generic image folder for users' own data.

Images are kept as uint8 arrays ``[N, H, W, C]`` (the same layout the exported model takes), so the
training, probing and serving paths all start from identical pixels.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FASHION_MNIST_ENV = "VITSERVE_FASHION_MNIST"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# IDX type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes are used by (Fashion-)MNIST,
# the others are accepted for completeness.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(RuntimeError):
    """Data is missing or malformed; the message says what to do."""


@dataclass(frozen=True)
class LabelledImages:
    """uint8 images ``[N, H, W, C]`` and int64 labels ``[N]`` (``-1`` where unlabelled)."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n: int | None, seed: int = 0) -> "LabelledImages":
        """A deterministic class-agnostic random subset of ``n`` items (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return LabelledImages(self.images[idx], self.labels[idx], self.classes)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into an array of its declared shape and type."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{path}: header declares shape {shape} ({expected} bytes) but the file holds "
            f"{len(data) - header} bytes of data; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_dir(root: str | Path | None = None) -> Path:
    """Locate the directory of the four Fashion-MNIST IDX files, or raise a message saying how to get them."""
    candidates = [Path(root)] if root else []
    if not root and os.environ.get(FASHION_MNIST_ENV):
        candidates.append(Path(os.environ[FASHION_MNIST_ENV]))
    if not root:
        candidates.append(FASHION_MNIST_DEFAULT_DIR)
    needed = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    for c in candidates:
        if all((c / n).is_file() for n in needed):
            return c
    raise DataError(
        "Fashion-MNIST not found (looked in: " + ", ".join(str(c) for c in candidates) + ").\n"
        "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download the "
        "four IDX files (" + ", ".join(needed) + ") from https://github.com/zalandoresearch/fashion-mnist "
        f"into a directory and pass it with --data-dir DIR or set {FASHION_MNIST_ENV}=DIR.")


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> LabelledImages:
    """Fashion-MNIST ``split`` ('train': 60k, 'test': 10k) as uint8 ``[N, 28, 28, 1]`` plus labels."""
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    directory = fashion_mnist_dir(root)
    img_name, lbl_name = FASHION_MNIST_FILES[split]
    images = read_idx(directory / img_name)
    labels = read_idx(directory / lbl_name)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{directory}: images {images.shape} and labels {labels.shape} do not match")
    return LabelledImages(images[..., None].copy(), labels.astype(np.int64), FASHION_MNIST_CLASSES)


def load_image_folder(
    root: str | Path, size: tuple[int, int], channels: int = 3,
) -> LabelledImages:
    """Load a folder of images as uint8 ``[N, H, W, C]``, resized to ``size`` (H, W).

    With sub-directories, each one is a class (ImageNet layout: ``root/<class>/<img>``) and labels are
    their sorted indices; a flat folder gives unlabelled images (label -1).
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if class_dirs:
        classes = tuple(p.name for p in class_dirs)
        items = [(f, i) for i, d in enumerate(class_dirs) for f in sorted(d.rglob("*"))
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        classes = ()
        items = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"image folders load as 1 or 3 channels, not {channels}")
    h, w = size
    images = np.empty((len(items), h, w, channels), dtype=np.uint8)
    for k, (f, _) in enumerate(items):
        try:
            with Image.open(f) as im:
                im = im.convert(mode).resize((w, h), Image.Resampling.BILINEAR)
                images[k] = np.asarray(im).reshape(h, w, channels)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot decode image {f}: {e}") from e
    labels = np.array([lbl for _, lbl in items], dtype=np.int64)
    log.info("loaded %d images from %s (%d classes)", len(images), root, len(classes))
    return LabelledImages(images, labels, classes)


def to_float_nchw(images: np.ndarray | "torch.Tensor", mean, std) -> "torch.Tensor":
    """uint8 ``[N, H, W, C]`` -> normalised float32 ``[N, C, H, W]`` (the in-graph preprocessing, in torch)."""
    import torch

    x = torch.as_tensor(images)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s
