import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from protos import vitserve_pb2
from serving.images import (ImageError, InputGeometry, decode_encoded, decode_raw, prepare_batch,
                            prepare_image)

GREY28 = InputGeometry(28, 28, 1)
RGB28 = InputGeometry(28, 28, 3)


def encode(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array).save(
        buf, format=fmt, **kw)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` grey pixels (a decompression bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture
def grey() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)


def test_png_at_model_geometry_is_lossless_and_untouched(grey):
    out = decode_encoded(0, encode(grey), GREY28)
    np.testing.assert_array_equal(out.pixels, grey)
    assert (out.resized, out.converted) == (False, False)


def test_jpeg_rgb_to_grey_uses_pils_luma_rule(rgb):
    data = encode(rgb, "JPEG", quality=95)
    out = decode_encoded(0, data, GREY28)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("L"))[..., None]
    np.testing.assert_array_equal(out.pixels, expected)
    assert out.converted and not out.resized
    assert out.pixels.shape == (28, 28, 1)


def test_grey_to_rgb_repeats_the_channel(grey):
    out = decode_encoded(0, encode(grey), RGB28)
    assert out.pixels.shape == (28, 28, 3) and out.converted
    for c in range(3):
        np.testing.assert_array_equal(out.pixels[..., c], grey[..., 0])


def test_webp_and_bmp_decode(grey):
    for fmt, kw in (("WEBP", {"lossless": True}), ("BMP", {})):
        np.testing.assert_array_equal(decode_encoded(0, encode(grey, fmt, **kw), GREY28).pixels, grey)


def test_resize_is_pil_bilinear_and_counted():
    big = np.random.default_rng(2).integers(0, 256, (56, 40), dtype=np.uint8)
    out = decode_encoded(0, encode(big), GREY28)
    expected = np.asarray(Image.fromarray(big).resize((28, 28), Image.Resampling.BILINEAR))[..., None]
    np.testing.assert_array_equal(out.pixels, expected)
    assert out.resized and not out.converted


def test_raw_frame_at_model_geometry_is_zero_copy(grey):
    data = grey.tobytes()
    out = decode_raw(0, data, 28, 28, 1, GREY28)
    np.testing.assert_array_equal(out.pixels, grey)
    assert not out.pixels.flags.owndata  # a view on the request bytes


def test_raw_rgb_frame_converted_and_resized(rgb):
    out = decode_raw(0, rgb.tobytes(), 28, 28, 3, InputGeometry(14, 14, 1))
    expected = np.asarray(Image.fromarray(rgb).convert("L").resize((14, 14), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out.pixels[..., 0], expected)
    assert out.resized and out.converted


def test_raw_frame_size_mismatch_names_image_and_sizes(grey):
    with pytest.raises(ImageError, match=r"^image 2: raw frame data is 784 bytes but 28x29x1 needs 812$"):
        decode_raw(2, grey.tobytes(), 28, 29, 1, GREY28)


def test_raw_frame_bad_channels(grey):
    with pytest.raises(ImageError, match="image 0: raw frame has 4 channels; use 1 .grey. or 3 .RGB."):
        decode_raw(0, grey.tobytes(), 14, 14, 4, GREY28)


def test_corrupt_bytes_say_what_formats_are_accepted():
    with pytest.raises(ImageError, match=r"^image 3: cannot decode \(not a PNG/JPEG/WebP/BMP file\)"):
        decode_encoded(3, b"definitely not an image", GREY28)


def test_truncated_png_is_reported_as_corrupt(grey):
    data = encode(np.random.default_rng(3).integers(0, 256, (200, 200), dtype=np.uint8))
    with pytest.raises(ImageError, match=r"^image 0: cannot decode .*corrupt or truncated"):
        decode_encoded(0, data[: len(data) // 2], GREY28)


def test_disallowed_format_is_refused(grey):
    with pytest.raises(ImageError, match="not a PNG/JPEG/WebP/BMP file"):
        decode_encoded(0, encode(grey, "TIFF"), GREY28)


def test_decompression_bomb_refused_before_decoding():
    bomb = png_declaring(60000, 60000)  # 3.6 G pixels declared in ~100 bytes
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=r"^image 1: .*3600000000 pixels.*decompression bomb"):
        decode_encoded(1, bomb, GREY28)
    with pytest.raises(ImageError, match=r"^image 1: 9000x9000 = 81000000 pixels is over the limit"):
        decode_encoded(1, png_declaring(9000, 9000), GREY28)
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(ImageError, match="over the limit of 100 pixels"):
        decode_encoded(0, png_declaring(11, 10), GREY28, max_pixels=100)


def test_pixel_limit_above_pils_own_is_the_one_applied(monkeypatch):
    # PIL refuses past 2 x Image.MAX_IMAGE_PIXELS (~179M) on its own; a configured limit above that
    # must be the one that decides, in both directions, and be the one the message names.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    declared = png_declaring(15000, 12000)  # 180M pixels, a few bytes of data
    with pytest.raises(ImageError, match="cannot decode") as e:  # allowed: decoding starts (and fails)
        decode_encoded(0, declared, GREY28, max_pixels=200_000_000)
    assert "decompression bomb" not in str(e.value)
    with pytest.raises(ImageError, match=r"15000x12000 = 180000000 pixels is over the limit of 150000000 pixels"):
        decode_encoded(0, declared, GREY28, max_pixels=150_000_000)
    with pytest.raises(ImageError, match=r"3600000000 pixels is over the limit of 200000000 pixels .*bomb"):
        decode_encoded(0, png_declaring(60000, 60000), GREY28, max_pixels=200_000_000)


def test_raw_frame_over_pixel_limit_refused():
    with pytest.raises(ImageError, match="over the limit"):
        decode_raw(0, b"", 100, 100, 1, GREY28, max_pixels=1000)


def test_sixteen_bit_grey_keeps_the_high_byte():
    arr = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = decode_encoded(0, buf.getvalue(), GREY28)
    np.testing.assert_array_equal(out.pixels[..., 0], (arr >> 8).astype(np.uint8))


def test_rgba_is_composited_onto_black():
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent red
    rgba[:14, :, 3] = 255  # top half opaque
    out = decode_encoded(0, encode(rgba), RGB28)
    assert out.converted
    assert out.pixels[:14, :, 0].min() == 200 and out.pixels[14:].max() == 0


def test_empty_and_missing_sources():
    with pytest.raises(ImageError, match="image 0: empty image bytes"):
        decode_encoded(0, b"", GREY28)
    with pytest.raises(ImageError, match="image 4: no image data"):
        prepare_image(4, vitserve_pb2.Image(), GREY28)


def test_prepare_batch_mixes_sources_and_counts(grey, rgb):
    images = [
        vitserve_pb2.Image(raw=vitserve_pb2.RawFrame(data=grey.tobytes(), height=28, width=28, channels=1)),
        vitserve_pb2.Image(encoded=encode(rgb)),                        # converted
        vitserve_pb2.Image(encoded=encode(np.zeros((56, 56), np.uint8))),  # resized
    ]
    batch = prepare_batch(images, GREY28)
    assert batch.pixels.shape == (3, 28, 28, 1) and batch.pixels.dtype == np.uint8
    assert (batch.resized, batch.converted) == (1, 1)
    np.testing.assert_array_equal(batch.pixels[0], grey)


def test_prepare_batch_reports_the_first_bad_index(grey):
    good = vitserve_pb2.Image(encoded=encode(grey))
    with pytest.raises(ImageError, match=r"^image 2: cannot decode"):
        prepare_batch([good, good, vitserve_pb2.Image(encoded=b"xx")], GREY28)
