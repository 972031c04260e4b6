"""Turn request images (encoded files or raw uint8 frames) into the model's uint8 ``[N, H, W, C]`` batch.

Pure functions: no I/O beyond the bytes handed in. Every error a caller can cause is an
``ImageError`` whose message starts with the image's index, so the gateway can return it verbatim as
INVALID_ARGUMENT.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from protos import vitserve_pb2

# Formats PIL may open: anything else (TIFF, PSD, EPS, ...) widens the attack surface for no use.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
FORMAT_NAMES = "PNG/JPEG/WebP/BMP"
# Refuse images whose *declared* size exceeds this many pixels before decoding a single row
# (a 100 kB PNG can declare 50k x 50k pixels and expand to gigabytes).
DEFAULT_MAX_PIXELS = 8192 * 8192
# Magic bytes, so an error can say what a refused file *is* rather than only what it is not.
_ACCEPTED_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"))
_REFUSED_MAGIC = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                  (b"8BPS", "PSD"), (b"%PDF", "PDF"), (b"%!PS", "PostScript"), (b"\x00\x00\x01\x00", "ICO"),
                  (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
                  (b"qoif", "QOI"), (b"\x76\x2f\x31\x01", "OpenEXR"))
MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}  # PIL mode of a model input with this many channels


class ImageError(ValueError):
    """A request image is malformed or unusable; the message names its index and the problem."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(f"image {index}: {problem}")
        self.index = index
        self.problem = problem


@dataclass(frozen=True)
class InputGeometry:
    """The model's input: height, width and channels (1 grey or 3 RGB)."""

    height: int
    width: int
    channels: int


@dataclass(frozen=True)
class PreparedImage:
    """One image at the model's geometry, ``[H, W, C]`` uint8, and what was done to it."""

    pixels: np.ndarray
    resized: bool
    converted: bool


@dataclass(frozen=True)
class PreparedBatch:
    """The model's input batch ``[N, H, W, C]`` uint8 and how many images were resized/converted."""

    pixels: np.ndarray
    resized: int
    converted: int


def _check_pixels(index: int, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(index, f"empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(index, f"{width}x{height} = {width * height} pixels is over the limit of "
                                f"{max_pixels} pixels (refused as a possible decompression bomb); "
                                f"send a smaller image")


def _to_8bit(index: int, img: Image.Image) -> Image.Image:
    """16-bit grey (common for depth and medical PNGs) -> 8-bit by keeping the high byte."""
    if img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.uint16)
        return Image.fromarray((arr >> 8).astype(np.uint8), mode="L")
    if img.mode in ("I", "F"):
        raise ImageError(index, f"32-bit {img.mode!r} images are not supported; send 8-bit grey or RGB")
    return img


def _to_geometry(index: int, img: Image.Image, geometry: InputGeometry) -> PreparedImage:
    """Convert channels (PIL's rules: RGB->L by ITU-R 601-2 luma, L->RGB by repetition) and resize."""
    target_mode = MODE_FOR_CHANNELS[geometry.channels]
    img = _to_8bit(index, img)
    converted = img.mode != target_mode
    if converted:
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Composite onto black rather than keep whatever colour hides under transparent pixels.
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert(target_mode)
    resized = img.size != (geometry.width, geometry.height)
    if resized:
        img = img.resize((geometry.width, geometry.height), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return PreparedImage(arr, resized, converted)


def sniff_format(data: bytes) -> tuple[str | None, bool]:
    """``(format, accepted)`` from a file's magic bytes; ``(None, False)`` when none is recognised."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP", True
    if data[4:8] == b"ftyp":  # ISO base media: AVIF, HEIC
        return "AVIF/HEIC", False
    for magic, name in _ACCEPTED_MAGIC:
        if data.startswith(magic):
            return name, True
    for magic, name in _REFUSED_MAGIC:
        if data.startswith(magic):
            return name, False
    return None, False


def _unidentified(index: int, data: bytes) -> ImageError:
    """Why PIL could not even read the header: an unaccepted format, a broken header, or no image."""
    name, accepted = sniff_format(data)
    if name == "PNG" and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        if width == 0 or height == 0:  # PIL refuses these as "not a PNG"; say what is wrong
            return ImageError(index, f"empty image ({width}x{height} declared in the PNG header)")
    if name is not None and accepted:
        return ImageError(index, f"cannot decode (corrupt or truncated {name} header: the file starts like a "
                                 f"{name} but its header cannot be read; {len(data)} bytes)")
    if name is not None:
        return ImageError(index, f"cannot decode (not a {FORMAT_NAMES} file): it is a {name} file, which is "
                                 f"not accepted; convert it to PNG or JPEG")
    return ImageError(index, f"cannot decode (not a {FORMAT_NAMES} file): unrecognised header "
                             f"{data[:8]!r} ({len(data)} bytes)")


_PIL_BOMB = re.compile(r"Image size \((\d+) pixels\)")


def _allow_in_pil(max_pixels: int) -> None:
    """Let PIL open what the configured limit allows: its own bomb guard (``Image.MAX_IMAGE_PIXELS``,
    about 89M pixels, an error past twice that) would otherwise refuse images under a larger
    ``--max-pixels``. Only ever raised, never lowered; the limit applied is ``_check_pixels``'."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def decode_encoded(index: int, data: bytes, geometry: InputGeometry,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Decode a PNG/JPEG/WebP/BMP file and bring it to the model's geometry.

    The declared size is checked against ``max_pixels`` after reading the header and before
    decoding a single row.
    """
    if not data:
        raise ImageError(index, "empty image bytes")
    _allow_in_pil(max_pixels)
    try:
        with warnings.catch_warnings():
            # PIL's warning threshold may lie below max_pixels; _check_pixels decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # lazy: header only
            _check_pixels(index, img.width, img.height, max_pixels)
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # over twice PIL's limit, which is >= max_pixels
        m = _PIL_BOMB.search(str(e))
        declared = f"{int(m.group(1))} pixels" if m else "its declared size"
        raise ImageError(index, f"{declared} is over the limit of {max_pixels} pixels (refused as a possible "
                                f"decompression bomb); send a smaller image") from e
    except Image.UnidentifiedImageError as e:
        raise _unidentified(index, data) from e
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt after a valid header
        raise ImageError(index, f"cannot decode ({type(e).__name__}: corrupt or truncated file): {e}") from e
    return _to_geometry(index, img, geometry)


def decode_raw(index: int, data: bytes, height: int, width: int, channels: int,
               geometry: InputGeometry, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Interpret a row-major HWC uint8 frame and bring it to the model's geometry."""
    if channels not in MODE_FOR_CHANNELS:
        raise ImageError(index, f"raw frame has {channels} channels; use 1 (grey) or 3 (RGB)")
    _check_pixels(index, width, height, max_pixels)
    expected = height * width * channels
    if len(data) != expected:
        raise ImageError(index, f"raw frame data is {len(data)} bytes but {height}x{width}x{channels} "
                                f"needs {expected}")
    arr = np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    if channels == geometry.channels and (height, width) == (geometry.height, geometry.width):
        return PreparedImage(arr, resized=False, converted=False)  # the fast path: no copy
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=MODE_FOR_CHANNELS[channels])
    return _to_geometry(index, img, geometry)


def prepare_image(index: int, image: vitserve_pb2.Image, geometry: InputGeometry,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """One request ``Image`` (encoded or raw) at the model's geometry."""
    source = image.WhichOneof("source")
    if source == "encoded":
        return decode_encoded(index, image.encoded, geometry, max_pixels)
    if source == "raw":
        raw = image.raw
        return decode_raw(index, raw.data, raw.height, raw.width, raw.channels, geometry, max_pixels)
    raise ImageError(index, "no image data (set `encoded` or `raw`)")


def prepare_batch(images: Sequence[vitserve_pb2.Image], geometry: InputGeometry,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedBatch:
    """All request images as one ``[N, H, W, C]`` uint8 batch; raises ``ImageError`` on the first bad one."""
    if geometry.channels not in MODE_FOR_CHANNELS:
        raise ValueError(f"model input has {geometry.channels} channels; only 1 or 3 are supported")
    prepared = [prepare_image(i, im, geometry, max_pixels) for i, im in enumerate(images)]
    batch = np.stack([p.pixels for p in prepared]) if prepared else np.zeros(
        (0, geometry.height, geometry.width, geometry.channels), np.uint8)
    return PreparedBatch(batch, sum(p.resized for p in prepared), sum(p.converted for p in prepared))
