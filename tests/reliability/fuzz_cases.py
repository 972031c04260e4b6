"""Hypothesis strategies for hostile gateway requests, each with the outcome the gateway owes it.

A ``Case`` is one request (its images, model name and options) plus what must come back: the set of
acceptable gRPC codes and, for a refusal, a regular expression the message must match (the message
names the problem). Where whether a mutated file still decodes is a matter of chance (a flipped byte
inside pixel data), the expectation comes from running the gateway's own decoder on the same bytes
in-process; where it is not (a bomb, a wrong dtype), it is fixed here.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from protos import vitserve_pb2
from serving.images import ImageError, InputGeometry, prepare_batch

OK, INVALID, NOT_FOUND, EXHAUSTED = "OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Case:
    """One hostile (or valid) request and the outcome it must get."""

    kind: str
    images: list[vitserve_pb2.Image]
    codes: frozenset[str]
    pattern: str | None = None  # the refusal message must match this (re.search)
    model: str = ""
    dtype: int = 0
    layout: int = 0
    pooling: int = 0
    suffix: bytes = b""  # bytes appended to the serialised request (unknown fields)
    lane: int = 0
    resize_op: int = 0
    outputs: tuple[str, ...] = ()  # Features only
    include_registers: bool = False  # Features only
    pixels: np.ndarray | None = field(default=None, repr=False)  # expected model input when OK


# -- image files ----------------------------------------------------------------------------------

def pil_bytes(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(array: np.ndarray, color_type: int) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit colour): ``array`` uint8 or uint16 ``[H, W, C]``.

    ``color_type``: 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA (C = 1, 3, 2, 4).
    """
    h, w = array.shape[:2]
    depth = 16 if array.dtype == np.uint16 else 8
    rows = array.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1).view(np.uint8).reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    return PNG_MAGIC + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


# (format, mode) pairs the gateway must accept; "png16-*" are 16-bit PNGs written by hand.
VALID_KINDS = ("PNG:L", "PNG:RGB", "PNG:RGBA", "PNG:LA", "PNG:P", "PNG:P+trns", "PNG:1", "PNG:I;16",
               "png16:RGB", "png16:RGBA", "png16:LA", "JPEG:L", "JPEG:RGB", "JPEG:CMYK",
               "WEBP:RGB", "WEBP:RGBA", "BMP:L", "BMP:RGB", "BMP:P", "BMP:1", "BMP:RGBA")


@st.composite
def valid_file(draw: st.DrawFn) -> tuple[str, bytes]:
    """``(kind, file bytes)`` of a small valid image in one of ``VALID_KINDS``."""
    kind = draw(st.sampled_from(VALID_KINDS))
    h, w = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fmt, mode = kind.split(":")
    if fmt == "png16":
        channels, color_type = {"RGB": (3, 2), "RGBA": (4, 6), "LA": (2, 4)}[mode]
        return kind, png_bytes(rng.integers(0, 65536, (h, w, channels), dtype=np.uint16), color_type)
    if mode == "I;16":
        return kind, pil_bytes(Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)), "PNG")
    base = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), mode="RGBA")
    if mode == "P+trns":
        return kind, pil_bytes(base.convert("RGB").convert("P"), "PNG", transparency=0)
    img = base if mode == "RGBA" else base.convert("RGB").convert(mode)
    return kind, pil_bytes(img, fmt, **({"quality": draw(st.integers(5, 95))} if fmt == "JPEG" else {}))


def set_declared_size(data: bytes, width: int, height: int) -> tuple[bytes, int, int] | None:
    """``data`` with the width/height in its header rewritten (PNG IHDR + CRC, JPEG SOF, BMP), and
    the size actually written (JPEG holds 16 bits per side); ``None`` for other formats."""
    if data.startswith(PNG_MAGIC):
        ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
        return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:], width, height
    if data.startswith(b"\xff\xd8"):
        width, height = min(width, 65535), min(height, 65535)
        for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
            at = data.find(marker)
            if at > 0:
                return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:], width, height
        return None
    if data.startswith(b"BM"):
        width, height = min(width, 2**31 - 1), min(height, 2**31 - 1)
        return data[:18] + struct.pack("<ii", width, height) + data[26:], width, height
    return None


# -- cases ----------------------------------------------------------------------------------------

def encoded(data: bytes) -> vitserve_pb2.Image:
    return vitserve_pb2.Image(encoded=data)


def raw(data: bytes, height: int, width: int, channels: int) -> vitserve_pb2.Image:
    return vitserve_pb2.Image(raw=vitserve_pb2.RawFrame(data=data, height=height, width=width, channels=channels))


class Decoder:
    """The gateway's decoding path run in-process: request images -> the model's uint8 batch.

    It is what the gateway calls (``serving.preprocess.prepare_batch`` with the model's manifest
    preprocessing, falling back to ``serving.images.prepare_batch``), so an oracle built on it says
    which mutated files must decode and to which pixels.
    """

    def __init__(self, geometry: InputGeometry, max_pixels: int, manifest: dict | None = None) -> None:
        self.geometry, self.max_pixels = geometry, max_pixels
        try:
            from serving import preprocess
        except ImportError:
            preprocess = None
        if preprocess is not None:
            spec = preprocess.PreprocessSpec.from_manifest(manifest or {}, geometry.channels)
            self._decode = lambda images, op: preprocess.prepare_batch(
                images, geometry, spec, preprocess.resolve_op(op, spec), max_pixels)
        else:
            self._decode = lambda images, op: prepare_batch(images, geometry, max_pixels)

    def __call__(self, images: list[vitserve_pb2.Image], resize_op: int = 0) -> np.ndarray:
        return self._decode(images, resize_op).pixels


def oracle(kind: str, images: list[vitserve_pb2.Image], decoder: Decoder, pattern: str | None = None,
           resize_op: int = 0) -> Case:
    """The gateway's own decoder decides OK (with the expected pixels) vs INVALID_ARGUMENT (its message)."""
    try:
        pixels = decoder(images, resize_op)
    except ImageError as e:
        # The message must name the image and the problem; ``pattern`` narrows the problem.
        return Case(kind, images, frozenset({INVALID}), pattern or rf"^{re.escape(str(e))}$", resize_op=resize_op)
    return Case(kind, images, frozenset({OK}), pixels=pixels, resize_op=resize_op)


@st.composite
def image_cases(draw: st.DrawFn, decoder: Decoder) -> Case:
    """Valid files of every mode, then truncated, bit-flipped, wrong-magic, resized-header and garbage."""
    kind, data = draw(valid_file())
    mutation = draw(st.sampled_from(["none", "truncate", "flip", "magic", "declared-size", "garbage",
                                     "empty", "prefix"]))
    label = f"{mutation}:{kind}"
    if mutation == "none":  # every resize op the API offers, on an image of any size
        case = oracle(label, [encoded(data)], decoder, resize_op=draw(st.integers(0, 3)))
        assert case.codes == {OK}, f"a valid {kind} image must decode: {case.pattern}"
        return case
    if mutation == "truncate":
        cut = draw(st.integers(0, len(data) - 1))
        return oracle(label, [encoded(data[:cut])], decoder,
                      r"^image 0: (empty image|cannot decode)" if cut < len(data) // 2 else None)
    if mutation == "flip":
        buf = bytearray(data)
        for at in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            buf[at] ^= draw(st.integers(1, 255))
        return oracle(label, [encoded(bytes(buf))], decoder)
    if mutation == "magic":
        head = draw(st.binary(min_size=4, max_size=4).filter(
            lambda b: not (b.startswith((b"BM", b"\xff\xd8", b"\x89P", b"RI")))))
        return oracle(label, [encoded(head + data[4:])], decoder,
                      r"^image 0: cannot decode \(not a PNG/JPEG/WebP/BMP file\)")
    if mutation == "declared-size":
        side = st.one_of(st.integers(0, 64), st.integers(1000, 2**17), st.just(0))
        width, height = draw(side), draw(side)
        rewritten = set_declared_size(data, width, height)
        if rewritten is None:  # WebP: no simple header rewrite; a PNG declaring that size instead
            rewritten = set_declared_size(png_bytes(np.zeros((2, 2, 1), np.uint8), 0), width, height)
        assert rewritten is not None
        changed, width, height = rewritten
        if width * height > decoder.max_pixels:
            pattern = r"^image 0: .*pixels.*(over the limit|decompression bomb)"
        elif width == 0 or height == 0:
            pattern = r"^image 0: (empty image|cannot decode)"
        else:
            pattern = None
        return oracle(label, [encoded(changed)], decoder, pattern)
    if mutation == "garbage":
        junk = draw(st.binary(min_size=1, max_size=2048))
        return oracle(label, [encoded(junk)], decoder, r"^image 0: (cannot decode|empty image)")
    if mutation == "prefix":  # a valid file with bytes in front of it is not an image any more
        junk = draw(st.binary(min_size=1, max_size=64).filter(lambda b: not b.startswith(
            (b"B", b"\xff", b"\x89", b"R"))))
        return oracle(label, [encoded(junk + data)], decoder, r"^image 0: cannot decode")
    return Case("empty-bytes", [encoded(b"")], frozenset({INVALID}), r"^image 0: empty image bytes")


@st.composite
def raw_cases(draw: st.DrawFn, decoder: Decoder) -> Case:
    """Raw frames with any shape, channel count and byte length."""
    h = draw(st.one_of(st.integers(0, 64), st.integers(2**10, 2**32 - 1)))
    w = draw(st.one_of(st.integers(0, 64), st.integers(2**10, 2**32 - 1)))
    c = draw(st.integers(0, 6))
    need = h * w * c
    if need <= 64 * 64 * 6:
        length = max(0, need + draw(st.sampled_from([0, 0, 0, -1, 1, -need, 7])))
    else:
        length = draw(st.integers(0, 4096))
    data = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, length, dtype=np.uint8).tobytes()
    if c not in (1, 3):
        pattern = rf"^image 0: raw frame has {c} channels"
    elif h == 0 or w == 0:
        pattern = rf"^image 0: empty image \({w}x{h}\)"
    elif h * w > decoder.max_pixels:
        pattern = r"^image 0: .* pixels is over the limit"
    elif length != need:
        pattern = rf"^image 0: raw frame data is {length} bytes but {h}x{w}x{c} needs {need}$"
    else:
        pattern = None
    case = oracle("raw", [raw(data, h, w, c)], decoder, pattern)
    assert (case.codes == {OK}) == (pattern is None), (case, pattern)
    return case


def valid_raw(images: np.ndarray) -> list[vitserve_pb2.Image]:
    return [raw(im.tobytes(), *im.shape) for im in images]


@st.composite
def batch_cases(draw: st.DrawFn, decoder: Decoder, max_images: int,
                max_message_bytes: int, good: np.ndarray) -> Case:
    """Empty, over-long and oversized batches, and one bad image among good ones."""
    what = draw(st.sampled_from(["empty", "too-many", "oversized", "bad-one", "no-source", "mixed"]))
    if what == "empty":
        return Case("batch:empty", [], frozenset({INVALID}), r"^no images in the request$")
    if what == "too-many":
        n = draw(st.integers(max_images + 1, max_images + 40))
        tiny = [raw(b"\x00", 1, 1, 1)] * n
        return Case("batch:too-many", tiny, frozenset({INVALID}),
                    rf"^{n} images is over the limit of {max_images} per request")
    if what == "oversized":  # refused by gRPC before anything is decoded
        extra = draw(st.integers(1, 64 * 1024))
        blob = bytes(max_message_bytes + extra)
        return Case("batch:oversized", [raw(blob, 1, len(blob), 1)], frozenset({EXHAUSTED}), r"larger than max")
    n = draw(st.integers(2, 12))
    images = valid_raw(good[np.arange(n) % len(good)])
    bad_at = draw(st.integers(0, n - 1))
    if what == "no-source":
        images[bad_at] = vitserve_pb2.Image()
        return Case("batch:no-source", images, frozenset({INVALID}), rf"^image {bad_at}: no image data")
    if what == "mixed":  # valid encoded files of every mode mixed with raw frames: all must decode
        for i in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True)):
            images[i] = encoded(draw(valid_file())[1])
        return oracle("batch:mixed", images, decoder)
    images[bad_at] = encoded(draw(st.binary(min_size=1, max_size=64)))
    return oracle("batch:bad-one", images, decoder, rf"^image {bad_at}: cannot decode")


@st.composite
def option_cases(draw: st.DrawFn, model_name: str, good: np.ndarray) -> Case:
    """Unknown models (path-like names included), out-of-range enum values, unknown fields."""
    images = valid_raw(good[:2])
    what = draw(st.sampled_from(["model", "path-model", "dtype", "layout", "pooling", "unknown-field",
                                 "fp16", "lane", "resize-op", "outputs", "registers"]))
    out_of_range = st.one_of(st.integers(-2**31, -1), st.integers(4, 2**31 - 1))
    if what in ("model", "path-model"):
        if what == "model":
            name = draw(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40))
        else:
            name = draw(st.sampled_from(["../../etc/passwd", "/etc/passwd", f"../{model_name}",
                                         f"{model_name}/../{model_name}", f"{model_name}/1/model.onnx",
                                         f"{model_name}\x00", "~", ".", "..", "%2e%2e%2fetc", "*"]))
        if name == model_name:
            return Case("model:self", images, frozenset({OK}), model=name, pixels=good[:2])
        return Case(f"{what}", images, frozenset({NOT_FOUND}), r"^unknown model .*; available: ", model=name)
    if what == "dtype":
        return Case("enum:dtype", images, frozenset({INVALID}), r"^unknown dtype -?\d+; use FLOAT32 or FLOAT16$",
                    dtype=draw(st.one_of(out_of_range, st.just(3))))
    if what == "layout":
        return Case("enum:layout", images, frozenset({INVALID}), r"^unknown layout -?\d+; use GRID or TOKENS$",
                    layout=draw(st.one_of(out_of_range, st.just(3))))
    if what == "pooling":
        return Case("enum:pooling", images, frozenset({INVALID}), r"^unknown pooling -?\d+",
                    pooling=draw(out_of_range))
    if what == "lane":
        lane = draw(st.one_of(out_of_range, st.sampled_from([1, 2])))
        if lane in (1, 2):  # a lane this model does not declare
            return Case("lane:undeclared", images, frozenset({INVALID}), r"declares no (throughput|latency) lane",
                        lane=lane)
        return Case("enum:lane", images, frozenset({INVALID}), r"^unknown lane -?\d+", lane=lane)
    if what == "resize-op":
        return Case("enum:resize_op", images, frozenset({INVALID}), r"unknown resize_op -?\d+",
                    resize_op=draw(out_of_range))
    if what == "outputs":  # layers the model was not exported with
        names = draw(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
                              .filter(lambda t: t != "patch_tokens"), min_size=1, max_size=3))
        return Case("outputs:unknown", images, frozenset({INVALID}), r"exports no patch-token output",
                    outputs=tuple(names), layout=1)
    if what == "registers":
        return Case("registers", images, frozenset({INVALID}), r"exports no register tokens",
                    include_registers=True, layout=1)
    if what == "fp16":
        return Case("dtype:fp16", images, frozenset({OK}), dtype=vitserve_pb2.FLOAT16, pixels=good[:2])
    # A field number this API does not define (a newer client's option): proto3 keeps and ignores it.
    number = draw(st.integers(100, 2**20))
    value = draw(st.binary(max_size=32))
    key = number << 3 | 2  # length-delimited
    suffix = _varint(key) + _varint(len(value)) + value
    return Case("unknown-field", images, frozenset({OK}), suffix=suffix, pixels=good[:2])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
