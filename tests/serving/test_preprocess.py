"""serving.preprocess: resize / center_crop / letterbox to the model's input, with a record per image."""

import io

import numpy as np
import pytest
from PIL import Image, features

from protos import vitserve_pb2
from serving.images import ImageError, InputGeometry
from contract.preprocess import PreprocessSpec, PreprocessSpecError, ResizeOp
from serving.preprocess import placement, prepare_batch, resolve_op

GREY28 = InputGeometry(28, 28, 1)
RGB28 = InputGeometry(28, 28, 3)
FMNIST_MANIFEST = {"encoder_spec": {"mean": [0.2860], "std": [0.3530]}}


def raw(array: np.ndarray) -> vitserve_pb2.Image:
    if array.ndim == 2:
        array = array[..., None]
    h, w, c = array.shape
    return vitserve_pb2.Image(raw=vitserve_pb2.RawFrame(data=array.tobytes(), height=h, width=w, channels=c))


def encoded(array: np.ndarray, fmt: str, **kw) -> vitserve_pb2.Image:
    buf = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array).save(
        buf, format=fmt, **kw)
    return vitserve_pb2.Image(encoded=buf.getvalue())


def box(b: vitserve_pb2.Box) -> tuple[float, float, float, float]:
    return (b.x0, b.y0, b.x1, b.y1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_placement_geometry_of_each_op():
    p = placement(ResizeOp.RESIZE, 56, 28, GREY28)
    assert (p.scale_x, p.scale_y, p.source_box, p.target_box) == (0.5, 1.0, (0, 0, 56, 28), (0, 0, 28, 28))
    p = placement(ResizeOp.CENTER_CROP, 56, 28, GREY28)  # shorter side already fits: crop the middle
    assert (p.scale_x, p.source_box, p.target_box) == (1.0, (14, 0, 42, 28), (0, 0, 28, 28))
    p = placement(ResizeOp.CENTER_CROP, 32, 32, GREY28, crop_pct=0.875)  # timm: Resize(32) + CenterCrop(28)
    assert p.source_box == (2, 2, 30, 30) and p.scale_x == 1.0
    p = placement(ResizeOp.LETTERBOX, 56, 28, GREY28)
    assert (p.scale_x, p.scale_y, p.source_box, p.target_box) == (0.5, 0.5, (0, 0, 56, 28), (0, 7, 28, 21))


def test_center_crop_takes_the_centre_exactly(rng):
    centre = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    wide = np.concatenate([rng.integers(0, 256, (28, 14), dtype=np.uint8), centre,
                           rng.integers(0, 256, (28, 14), dtype=np.uint8)], axis=1)
    batch = prepare_batch([raw(wide)], GREY28, PreprocessSpec(), ResizeOp.CENTER_CROP)
    np.testing.assert_array_equal(batch.pixels[0, ..., 0], centre)
    rec = batch.images[0]
    assert (rec.original_height, rec.original_width, rec.original_channels) == (28, 56, 1)
    assert rec.op == ResizeOp.CENTER_CROP and box(rec.source_box) == (14, 0, 42, 28)
    assert batch.resized == 1 and batch.converted == 0 and batch.resize_op == ResizeOp.CENTER_CROP

    big = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    spec = PreprocessSpec(crop_pct=0.875)
    out = prepare_batch([raw(big)], GREY28, spec, ResizeOp.CENTER_CROP).pixels[0, ..., 0]
    np.testing.assert_array_equal(out, big[2:30, 2:30])


def test_center_crop_matches_the_timm_eval_transform(rng):
    """timm/torchvision eval on a PIL image: Resize(32) (shorter side) then CenterCrop(28), in two steps."""
    img = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    resized = img.resize((48, 32), Image.Resampling.BILINEAR)  # 90x60 -> shorter side 32 = int(28 / 0.875)
    want = np.asarray(resized.crop((10, 2, 38, 30))).astype(np.float32)
    got = prepare_batch([raw(np.asarray(img))], RGB28, PreprocessSpec(crop_pct=0.875),
                        ResizeOp.CENTER_CROP).pixels[0].astype(np.float32)
    # One resampling of the source box equals resize-then-crop when the resized size is whole pixels.
    np.testing.assert_array_equal(got, want)


def test_letterbox_pads_with_the_mean_colour(rng):
    img = rng.integers(0, 256, (14, 28), dtype=np.uint8)
    spec = PreprocessSpec.from_manifest(FMNIST_MANIFEST, 1)
    assert spec.pad_value == (73,)  # round(255 * 0.286): normalises to ~0 in the graph
    batch = prepare_batch([raw(img)], GREY28, spec, ResizeOp.LETTERBOX)
    out = batch.pixels[0, ..., 0]
    np.testing.assert_array_equal(out[7:21], img)  # scale 1: pasted unchanged
    assert (out[:7] == 73).all() and (out[21:] == 73).all()
    rec = batch.images[0]
    assert rec.op == ResizeOp.LETTERBOX and box(rec.target_box) == (0, 7, 28, 21) and rec.scale_y == 1.0


def test_resize_stretches(rng):
    img = rng.integers(0, 256, (28, 56), dtype=np.uint8)
    batch = prepare_batch([raw(img)], GREY28, PreprocessSpec(), ResizeOp.RESIZE)
    want = np.asarray(Image.fromarray(img).resize((28, 28), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(batch.pixels[0, ..., 0], want)
    assert (batch.images[0].scale_x, batch.images[0].scale_y) == (0.5, 1.0)


def test_image_at_input_size_is_left_alone(rng):
    img = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    batch = prepare_batch([raw(img)], GREY28, PreprocessSpec(), ResizeOp.LETTERBOX)
    np.testing.assert_array_equal(batch.pixels[0], img)
    rec = batch.images[0]
    assert rec.op == ResizeOp.RESIZE_OP_UNSPECIFIED and rec.conversion == "" and batch.resized == 0
    assert box(rec.source_box) == box(rec.target_box) == (0, 0, 28, 28)


def test_grey_rgb_conversion_is_recorded(rng):
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    batch = prepare_batch([raw(grey), encoded(grey, "PNG")], RGB28, PreprocessSpec(), ResizeOp.RESIZE)
    for i in range(2):
        assert batch.images[i].conversion == "L->RGB"
        np.testing.assert_array_equal(batch.pixels[i], np.repeat(grey[..., None], 3, axis=-1))
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    batch = prepare_batch([raw(rgb)], GREY28, PreprocessSpec(), ResizeOp.RESIZE)
    assert batch.images[0].conversion == "RGB->L" and batch.images[0].original_channels == 3
    np.testing.assert_array_equal(batch.pixels[0, ..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    assert batch.converted == 1


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp_decodes(rng):
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    batch = prepare_batch([encoded(rgb, "WEBP", lossless=True)], RGB28, PreprocessSpec(), ResizeOp.RESIZE)
    want = np.asarray(Image.fromarray(rgb).resize((28, 28), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(batch.pixels[0], want)  # lossless: exactly the pixels sent
    rec = batch.images[0]
    assert (rec.original_height, rec.original_width, rec.original_channels) == (40, 30, 3)
    lossy = prepare_batch([encoded(rgb, "WEBP", quality=90)], GREY28, PreprocessSpec(), ResizeOp.CENTER_CROP)
    assert lossy.pixels.shape == (1, 28, 28, 1) and lossy.images[0].conversion == "RGB->L"


def test_manifest_default_and_request_override():
    spec = PreprocessSpec.from_manifest(
        {"preprocessing": {"resize_op": "center_crop", "crop_pct": 0.875, "interpolation": "bicubic"}}, 3)
    assert (spec.resize_op, spec.crop_pct, spec.interpolation) == (ResizeOp.CENTER_CROP, 0.875, "bicubic")
    assert resolve_op(ResizeOp.RESIZE_OP_UNSPECIFIED, spec) == ResizeOp.CENTER_CROP
    assert resolve_op(ResizeOp.LETTERBOX, spec) == ResizeOp.LETTERBOX
    assert PreprocessSpec.from_manifest({}, 1).resize_op == ResizeOp.RESIZE  # no entry: stretch
    with pytest.raises(ValueError, match="unknown resize_op 9"):
        resolve_op(9, spec)
    for bad, match in (({"resize_op": "squash"}, "not one of resize, center_crop, letterbox"),
                       ({"crop_pct": 0}, "crop_pct 0.0 is not in"),
                       ({"interpolation": "cubic-ish"}, "interpolation 'cubic-ish'")):
        with pytest.raises(PreprocessSpecError, match=match):
            PreprocessSpec.from_manifest({"preprocessing": bad}, 1)


def test_decoding_errors_are_the_decoders():
    with pytest.raises(ImageError, match="image 0: cannot decode"):
        prepare_batch([vitserve_pb2.Image(encoded=b"\x89PNG\r\n\x1a\n garbage")], GREY28, PreprocessSpec(),
                      ResizeOp.RESIZE)
    big = encoded(np.zeros((64, 64), np.uint8), "PNG")
    with pytest.raises(ImageError, match="over the limit of 1000 pixels"):
        prepare_batch([big], GREY28, PreprocessSpec(), ResizeOp.RESIZE, max_pixels=1000)
    with pytest.raises(ImageError, match="image 0: no image data"):
        prepare_batch([vitserve_pb2.Image()], GREY28, PreprocessSpec(), ResizeOp.RESIZE)
