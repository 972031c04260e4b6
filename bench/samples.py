"""The images a benchmark sends: real images (a folder of JPEG/PNG, or Fashion-MNIST's test split),
resized once to the model's input size, as raw uint8 frames (what a robot sends) or PNG bytes (what a
VLM pipeline sends; decoding is then part of every timed request, in the service and in-process)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INPUT_KINDS = ("raw", "encoded")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class SampleError(ValueError):
    """The images cannot be read (no folder, no images in it, Fashion-MNIST not installed)."""


@dataclass(frozen=True)
class SampleSet:
    """``frames`` uint8 ``[N, H, W, C]`` at the model's input size; ``encoded``: their PNG bytes."""

    frames: np.ndarray
    encoded: tuple[bytes, ...] | None
    kind: str
    source: str

    def __len__(self) -> int:
        return len(self.frames)

    def request_images(self, idx: np.ndarray) -> np.ndarray | list[bytes]:
        """What one request carries for samples ``idx``: a uint8 batch, or a list of encoded images."""
        if self.kind == "encoded":
            assert self.encoded is not None
            return [self.encoded[i] for i in idx]
        return self.frames[idx]


def _fit(img, size: tuple[int, int], channels: int) -> np.ndarray:
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def load_source_images(folder: str | Path | None, n: int) -> tuple[list, str]:
    """Up to ``n`` PIL images from ``folder`` (sorted names) or Fashion-MNIST's test split; and a label."""
    from PIL import Image

    if folder is None:
        from training.data import DataError, load_fashion_mnist
        try:
            images = load_fashion_mnist("test").images[:n]
        except DataError as e:
            raise SampleError(f"Fashion-MNIST is not installed ({e}); pass --images DIR") from None
        return [Image.fromarray(im[..., 0]) for im in images], f"Fashion-MNIST test[:{len(images)}]"
    folder = Path(folder)
    if not folder.is_dir():
        raise SampleError(f"--images {folder}: not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    if not files:
        raise SampleError(f"--images {folder}: no {'/'.join(IMAGE_SUFFIXES)} files")
    out = []
    for p in files:
        with Image.open(p) as im:
            im.load()
            out.append(im.copy())
    return out, f"{folder} ({len(out)} files)"


def make_samples(images: list, label: str, size: tuple[int, int], channels: int, kind: str = "raw") -> SampleSet:
    """Resize ``images`` to ``size`` (H, W) with ``channels``; ``kind="encoded"`` also keeps PNG bytes of them."""
    if kind not in INPUT_KINDS:
        raise SampleError(f"input kind must be one of {INPUT_KINDS}, got {kind!r}")
    frames = np.stack([_fit(im, size, channels) for im in images])
    encoded = tuple(encode_png(f) for f in frames) if kind == "encoded" else None
    return SampleSet(frames, encoded, kind, label)


def encode_png(frame: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W, C]`` frame (lossless, so decoding gives the frame back)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """uint8 ``[H, W, C]`` of PNG/JPEG bytes (the in-process systems' decoding; pillow, as the gateway)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr
