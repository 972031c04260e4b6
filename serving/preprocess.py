"""Bring request images of any size to the model's input by the model's preprocessing spec.

Decoding, the pixel-count guard and channel conversion are ``serving.images``' (they run at the
image's own size); this module adds the geometric step and records what it did per image:

- ``resize``: stretch to the input size (aspect ratio not kept);
- ``center_crop``: scale so the shorter side covers the input divided by ``crop_pct``, then take the
  centre (timm's and DINO's evaluation transform: ``Resize(int(size / crop_pct))`` +
  ``CenterCrop(size)``, done here as one resampling of the source box);
- ``letterbox``: scale so the longer side fits, centre it and pad with the model's mean colour (which
  the in-graph normalisation maps to zero).

The model's default comes from its manifest's ``preprocessing`` dict (``resize_op``, ``crop_pct``,
``interpolation``); a model without one is stretched with bilinear resampling, as before this module.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

from contract.preprocess import INTERPOLATIONS, OP_NAMES, PreprocessSpec, ResizeOp
from protos import vitserve_pb2
from serving.images import (ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, ImageError, InputGeometry, decode_encoded,
                            decode_raw)

_RESAMPLING = {name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}  # every name the spec accepts
_MODE_CHANNELS = {"1": 1, "L": 1, "P": 3, "LA": 2, "PA": 4, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3,
                  "I;16": 1, "I;16B": 1, "I;16L": 1, "I": 1, "F": 1}
_MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class Placement:
    """Where an image of ``size`` goes in the model input: source box, target box and scales."""

    source_box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels
    target_box: tuple[int, int, int, int]          # x0, y0, x1, y1 in model-input pixels
    scale_x: float
    scale_y: float


def placement(op: int, width: int, height: int, geometry: InputGeometry, crop_pct: float = 1.0) -> Placement:
    """The geometry of ``op`` for a ``width x height`` image and the model's input."""
    W, H = geometry.width, geometry.height
    if op == ResizeOp.RESIZE:
        return Placement((0.0, 0.0, float(width), float(height)), (0, 0, W, H), W / width, H / height)
    if op == ResizeOp.CENTER_CROP:
        scale = max(W / width, H / height) / crop_pct
        src_w, src_h = W / scale, H / scale
        x0, y0 = (width - src_w) / 2, (height - src_h) / 2
        return Placement((x0, y0, x0 + src_w, y0 + src_h), (0, 0, W, H), scale, scale)
    if op == ResizeOp.LETTERBOX:
        scale = min(W / width, H / height)
        new_w, new_h = max(1, min(W, round(width * scale))), max(1, min(H, round(height * scale)))
        x0, y0 = (W - new_w) // 2, (H - new_h) // 2
        return Placement((0.0, 0.0, float(width), float(height)), (x0, y0, x0 + new_w, y0 + new_h),
                         new_w / width, new_h / height)
    raise ValueError(f"unknown resize op {op}")


def _box(b: Sequence[float]) -> vitserve_pb2.Box:
    return vitserve_pb2.Box(x0=b[0], y0=b[1], x1=b[2], y1=b[3])


def apply(pixels: np.ndarray, op: int, geometry: InputGeometry, spec: PreprocessSpec) -> tuple[np.ndarray, Placement]:
    """``pixels`` ``[h, w, C]`` uint8 (already at the model's channel count) at the model's input size."""
    height, width = pixels.shape[:2]
    place = placement(op, width, height, geometry, spec.crop_pct)
    mode = _MODE_FOR_CHANNELS[geometry.channels]
    img = Image.fromarray(pixels[..., 0] if geometry.channels == 1 else pixels, mode=mode)
    resample = _RESAMPLING[spec.interpolation]
    tx0, ty0, tx1, ty1 = place.target_box
    sx0, sy0, sx1, sy1 = place.source_box
    size = (tx1 - tx0, ty1 - ty0)
    if (sx1 - sx0, sy1 - sy0) == size and all(float(v).is_integer() for v in place.source_box):
        out = img.crop((int(sx0), int(sy0), int(sx1), int(sy1)))  # same size: a plain crop, no resampling
    else:
        out = img.resize(size, resample, box=place.source_box)
    if op == ResizeOp.LETTERBOX:
        fill: int | tuple[int, ...] = spec.pad_value[0] if geometry.channels == 1 else spec.pad_value
        canvas = Image.new(mode, (geometry.width, geometry.height), fill)
        canvas.paste(out, (tx0, ty0))
        out = canvas
    arr = np.asarray(out, dtype=np.uint8)
    return (arr[..., None] if arr.ndim == 2 else arr), place


@dataclass
class PreparedBatch:
    """The model's input batch ``[N, H, W, C]`` uint8 and what was done to each image."""

    pixels: np.ndarray
    images: list[vitserve_pb2.ImagePreprocessing] = field(default_factory=list)
    resize_op: int = ResizeOp.RESIZE

    @property
    def resized(self) -> int:
        return sum(1 for r in self.images if r.op != ResizeOp.RESIZE_OP_UNSPECIFIED)

    @property
    def converted(self) -> int:
        return sum(1 for r in self.images if r.conversion)


def read_header(data: bytes) -> tuple[int, int, str] | None:
    """``(width, height, mode)`` from an encoded file's header, or ``None`` if it does not parse
    (``serving.images`` then produces the precise error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                return img.width, img.height, img.mode
    except Exception:  # noqa: BLE001 - any failure is reported by the real decoder below
        return None


def prepare_image(index: int, image: vitserve_pb2.Image, geometry: InputGeometry, spec: PreprocessSpec,
                  op: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, vitserve_pb2.ImagePreprocessing]:
    """One request image at the model's input and its record; raises ``ImageError``."""
    source = image.WhichOneof("source")
    target_mode = _MODE_FOR_CHANNELS[geometry.channels]
    if source == "encoded":
        header = read_header(image.encoded)
        if header is None:  # decode at the model's size: the decoder raises the precise error
            decode_encoded(index, image.encoded, geometry, max_pixels)
            raise ImageError(index, "cannot read the image header")  # pragma: no cover - decoder raised
        width, height, mode = header
        channels = _MODE_CHANNELS.get(mode, 3)
        own = InputGeometry(height, width, geometry.channels)
        # Channel conversion (and every decoding guard) at the image's own size: no resampling yet.
        prepared = decode_encoded(index, image.encoded, own, max_pixels)
        conversion = "" if mode == target_mode else f"{mode}->{target_mode}"
    elif source == "raw":
        raw = image.raw
        width, height, channels = raw.width, raw.height, raw.channels
        own = InputGeometry(height, width, geometry.channels) if width and height else geometry
        prepared = decode_raw(index, raw.data, raw.height, raw.width, raw.channels, own, max_pixels)
        mode = _MODE_FOR_CHANNELS.get(channels, "?")
        conversion = "" if channels == geometry.channels else f"{mode}->{target_mode}"
    else:
        raise ImageError(index, "no image data (set `encoded` or `raw`)")
    pixels = prepared.pixels
    record = vitserve_pb2.ImagePreprocessing(
        original_height=height, original_width=width, original_channels=channels, conversion=conversion)
    if (height, width) == (geometry.height, geometry.width):
        record.scale_x = record.scale_y = 1.0
        record.source_box.CopyFrom(_box((0, 0, width, height)))
        record.target_box.CopyFrom(_box((0, 0, width, height)))
        return pixels, record
    pixels, place = apply(pixels, op, geometry, spec)
    record.op = op
    record.scale_x, record.scale_y = place.scale_x, place.scale_y
    record.source_box.CopyFrom(_box(place.source_box))
    record.target_box.CopyFrom(_box(place.target_box))
    return pixels, record


def resolve_op(requested: int, spec: PreprocessSpec) -> int:
    """The op a request asked for, or the model's default; ``ValueError`` for an unknown value."""
    if requested == ResizeOp.RESIZE_OP_UNSPECIFIED:
        return spec.resize_op
    if requested not in OP_NAMES:
        raise ValueError(f"unknown resize_op {requested}; use RESIZE, CENTER_CROP or LETTERBOX")
    return requested


def prepare_batch(images: Sequence[vitserve_pb2.Image], geometry: InputGeometry, spec: PreprocessSpec,
                  op: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedBatch:
    """All request images as one ``[N, H, W, C]`` uint8 batch; raises ``ImageError`` on the first bad one."""
    if geometry.channels not in _MODE_FOR_CHANNELS:
        raise ValueError(f"model input has {geometry.channels} channels; only 1 or 3 are supported")
    arrays, records = [], []
    for i, im in enumerate(images):
        arr, rec = prepare_image(i, im, geometry, spec, op, max_pixels)
        arrays.append(arr)
        records.append(rec)
    batch = np.stack(arrays) if arrays else np.zeros((0, geometry.height, geometry.width, geometry.channels),
                                                     np.uint8)
    return PreparedBatch(batch, records, op)
