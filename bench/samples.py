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

    def input_frames(self, idx: np.ndarray) -> np.ndarray:
        """The uint8 batch an in-process system computes on for samples ``idx``: the frames, or, for
        encoded samples, their bytes decoded in this call by the gateway's own decoder
        (``serving.images.decode_encoded``), so decoding is timed on both sides alike."""
        if self.kind != "encoded":
            return self.frames[idx]
        from serving.images import InputGeometry, decode_encoded

        assert self.encoded is not None
        geometry = InputGeometry(*self.frames.shape[1:])
        return np.stack([decode_encoded(int(i), self.encoded[i], geometry).pixels for i in idx])


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
