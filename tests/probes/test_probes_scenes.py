"""The dense scene set: determinism, labels on hand-built canvases, tiling round trip."""

import numpy as np
import pytest

from probes.scenes import (BACKGROUND, SceneSpec, make_scenes, paste, patch_labels_of, tile_canvases,
                           untile_grid)
from probes.sources import RawPixelSource


def _items() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 28, 28, 1), dtype=np.uint8)
    return images, np.arange(20) % 10


def test_scenes_are_deterministic_and_seeded():
    images, labels = _items()
    a, b = make_scenes(images, labels, 6, seed=3), make_scenes(images, labels, 6, seed=3)
    np.testing.assert_array_equal(a.canvases, b.canvases)
    np.testing.assert_array_equal(a.patch_labels, b.patch_labels)
    assert not np.array_equal(a.canvases, make_scenes(images, labels, 6, seed=4).canvases)
    assert a.canvases.shape == (6, 56, 56, 1) and a.patch_labels.shape == (6, 14, 14)


def test_scene_pixels_and_labels_agree(fmnist):
    train, _ = fmnist
    s = make_scenes(train.images[:100], train.labels[:100], 20, SceneSpec(fg_threshold=16), seed=0)
    fg = s.pixel_labels != BACKGROUND
    assert (s.canvases[..., 0][fg] > 16).all()       # labelled pixels are pasted item pixels
    assert (s.canvases[..., 0][~fg] == 0).all()      # background stays black
    assert 0.2 < fg.mean() < 0.9                     # several items, not an empty or full canvas


def test_hand_built_canvas_labels():
    spec = SceneSpec(tiles=1, tile_size=8, patch_size=4, fg_threshold=0)
    canvas = np.zeros((8, 8, 1), dtype=np.uint8)
    labels = np.full((8, 8), BACKGROUND, dtype=np.int64)
    item_a = np.full((4, 4, 1), 200, dtype=np.uint8)           # covers the top-left patch exactly
    paste(canvas, labels, item_a, 3, 0, 0, spec.fg_threshold)
    item_b = np.zeros((4, 4, 1), dtype=np.uint8)
    item_b[:, 1:] = 100                                        # 4x3 block: 12 px of the top-right patch
    paste(canvas, labels, item_b, 7, 0, 4, spec.fg_threshold)
    item_c = np.zeros((4, 4, 1), dtype=np.uint8)
    item_c[:2] = 50                                            # 8 px of the bottom-left patch: a tie
    paste(canvas, labels, item_c, 9, 4, 0, spec.fg_threshold)
    assert canvas[0, 5, 0] == 100 and canvas[0, 4, 0] == 0     # item_b's empty columns are not pasted
    got = patch_labels_of(labels[None], spec.patch_size)[0]
    # top-left: class 3; top-right: 12 of 16 px class 7; bottom-left: 8 vs 8, tie to the item;
    # bottom-right: background.
    np.testing.assert_array_equal(got, [[3, 7], [9, BACKGROUND]])


def test_later_items_occlude_earlier_ones():
    canvas = np.zeros((8, 8, 1), dtype=np.uint8)
    labels = np.full((8, 8), BACKGROUND, dtype=np.int64)
    paste(canvas, labels, np.full((8, 8, 1), 90, np.uint8), 1, 0, 0, 16)
    paste(canvas, labels, np.full((4, 4, 1), 250, np.uint8), 2, 2, 2, 16)
    assert labels[3, 3] == 2 and canvas[3, 3, 0] == 250 and labels[0, 0] == 1
    assert patch_labels_of(labels[None], 4)[0].tolist() == [[1, 1], [1, 1]]  # 2 covers 4 of 16 px per patch


def test_tiles_reassemble_into_the_canvas_grid():
    images, labels = _items()
    scenes = make_scenes(images, labels, 3, SceneSpec(tiles=3), seed=0)
    raw = RawPixelSource((28, 28), 1, (4, 4))
    tiles = tile_canvases(scenes.canvases, 28)
    assert tiles.shape == (27, 28, 28, 1)
    np.testing.assert_array_equal(tiles[4], scenes.canvases[0, 28:56, 28:56])  # tile (1, 1) of scene 0
    grid = untile_grid(raw.features(tiles).patch_tokens, 3, raw.grid)           # [3, 21, 21, 16]
    direct = RawPixelSource((84, 84), 1, (4, 4)).features(scenes.canvases).patch_tokens.reshape(3, 21, 21, 16)
    np.testing.assert_array_equal(grid, direct)


def test_bad_scene_specs_are_refused():
    with pytest.raises(ValueError, match="multiple of the patch"):
        SceneSpec(tile_size=30, patch_size=4)
    with pytest.raises(ValueError, match="items_min"):
        SceneSpec(items_min=3, items_max=2)
    with pytest.raises(ValueError, match="uint8"):
        make_scenes(np.zeros((2, 28, 28, 1), np.float32), np.zeros(2), 1)
