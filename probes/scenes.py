"""A deterministic dense-labelled scene set built from Fashion-MNIST (which has no dense labels).

A scene is a square canvas of ``tiles x tiles`` encoder inputs (default 2 x 2 tiles of 28 px = 56 px)
on a black background with ``items_min..items_max`` Fashion-MNIST items pasted at uniformly random
pixel positions (the whole 28 px item inside the canvas, so items straddle tile borders). Items are
pasted in order, later ones on top: an item's pixels brighter than ``fg_threshold`` overwrite the
canvas and the pixel labels (its fainter pixels are not pasted, so that image and labels agree).

Each patch of the canvas (the encoder's patch size, 4 px for the default encoder, so a 14 x 14 grid
on a 56 px canvas) is labelled with the label covering most of its pixels: one of the 10 classes or
background (``BACKGROUND`` = 10). A tie goes to the lower label, so an item beats background.

The encoder takes 28 x 28 only, so a canvas is encoded tile by tile (``tile_canvases``) and the
tiles' patch grids are put back together into one canvas grid (``untile_grid``): each tile is seen
without its neighbours' context, the same for every encoder and the raw-pixel baseline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

NUM_ITEM_CLASSES = 10
BACKGROUND = NUM_ITEM_CLASSES
NUM_DENSE_CLASSES = NUM_ITEM_CLASSES + 1


@dataclass(frozen=True)
class SceneSpec:
    """How scenes are drawn; recorded verbatim in ``probes.json``."""

    tiles: int = 2           # canvas side in tiles
    tile_size: int = 28      # the encoder's input side
    patch_size: int = 4      # the encoder's patch side
    items_min: int = 2
    items_max: int = 4
    fg_threshold: int = 16   # item pixels > this are pasted and labelled

    def __post_init__(self) -> None:
        if self.tiles < 1 or self.tile_size < 1 or self.patch_size < 1:
            raise ValueError(f"tiles, tile_size and patch_size must be positive: {self}")
        if self.tile_size % self.patch_size:
            raise ValueError(f"tile size {self.tile_size} is not a multiple of the patch size {self.patch_size}")
        if not 1 <= self.items_min <= self.items_max:
            raise ValueError(f"need 1 <= items_min <= items_max, got {self.items_min}..{self.items_max}")

    @property
    def canvas_size(self) -> int:
        return self.tiles * self.tile_size

    @property
    def grid(self) -> int:
        """Patches per canvas side."""
        return self.canvas_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "canvas_size": self.canvas_size, "grid": self.grid,
                "background_label": BACKGROUND, "num_classes": NUM_DENSE_CLASSES}


@dataclass(frozen=True)
class Scenes:
    """``canvases [N, S, S, C]`` uint8, ``pixel_labels [N, S, S]`` and ``patch_labels [N, g, g]`` int64."""

    canvases: np.ndarray
    pixel_labels: np.ndarray
    patch_labels: np.ndarray
    spec: SceneSpec

    def __len__(self) -> int:
        return len(self.canvases)


def paste(canvas: np.ndarray, labels: np.ndarray, item: np.ndarray, label: int, y: int, x: int,
          fg_threshold: int) -> None:
    """Paste ``item [h, w, C]`` at ``(y, x)`` into ``canvas [S, S, C]`` and ``labels [S, S]`` in place."""
    h, w = item.shape[:2]
    mask = item.max(axis=-1) > fg_threshold                              # [h, w]
    region = canvas[y:y + h, x:x + w]
    region[mask] = item[mask]
    labels[y:y + h, x:x + w][mask] = label


def patch_labels_of(pixel_labels: np.ndarray, patch_size: int, num_classes: int = NUM_DENSE_CLASSES) -> np.ndarray:
    """Majority label of each ``patch_size`` square of ``pixel_labels [N, S, S]`` -> ``[N, S/p, S/p]``
    (ties to the lower label)."""
    n, s, _ = pixel_labels.shape
    g = s // patch_size
    blocks = pixel_labels.reshape(n, g, patch_size, g, patch_size).transpose(0, 1, 3, 2, 4).reshape(n, g, g, -1)
    counts = np.stack([(blocks == k).sum(axis=-1) for k in range(num_classes)], axis=-1)  # [N, g, g, classes]
    return counts.argmax(axis=-1).astype(np.int64)                      # argmax takes the first maximum


def make_scenes(images: np.ndarray, labels: np.ndarray, n: int, spec: SceneSpec = SceneSpec(),
                seed: int = 0) -> Scenes:
    """``n`` scenes drawn from ``images [M, t, t, C]`` (uint8, ``t = spec.tile_size``) with ``labels [M]``.

    Deterministic: the same inputs and ``seed`` give the same scenes.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:3] != (spec.tile_size, spec.tile_size):
        raise ValueError(f"scene items must be uint8 [M, {spec.tile_size}, {spec.tile_size}, C], "
                         f"got {images.dtype} {list(images.shape)}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as (a positive number of) images: {len(images)} vs {len(labels)}")
    rng = np.random.default_rng(seed)
    s, t, c = spec.canvas_size, spec.tile_size, images.shape[-1]
    canvases = np.zeros((n, s, s, c), dtype=np.uint8)
    pixel_labels = np.full((n, s, s), BACKGROUND, dtype=np.int64)
    for i in range(n):
        k = int(rng.integers(spec.items_min, spec.items_max + 1))
        picks = rng.integers(0, len(images), size=k)
        pos = rng.integers(0, s - t + 1, size=(k, 2))
        for j, (y, x) in zip(picks, pos):
            paste(canvases[i], pixel_labels[i], images[j], int(labels[j]), int(y), int(x), spec.fg_threshold)
    return Scenes(canvases, pixel_labels, patch_labels_of(pixel_labels, spec.patch_size), spec)


def tile_canvases(canvases: np.ndarray, tile: int) -> np.ndarray:
    """``[N, S, S, C]`` -> ``[N * T * T, tile, tile, C]`` (``T = S / tile``), tiles row-major per canvas."""
    n, s, _, c = canvases.shape
    if s % tile:
        raise ValueError(f"canvas side {s} is not a multiple of the tile side {tile}")
    t = s // tile
    return canvases.reshape(n, t, tile, t, tile, c).transpose(0, 1, 3, 2, 4, 5).reshape(n * t * t, tile, tile, c)


def untile_grid(tokens: np.ndarray, tiles: int, grid: tuple[int, int]) -> np.ndarray:
    """Tiles' patch tokens ``[N * T * T, h*w, D]`` (order of ``tile_canvases``) -> canvas grids ``[N, T*h, T*w, D]``."""
    h, w = grid
    d = tokens.shape[-1]
    n = len(tokens) // (tiles * tiles)
    return (tokens.reshape(n, tiles, tiles, h, w, d).transpose(0, 1, 3, 2, 4, 5)
            .reshape(n, tiles * h, tiles * w, d))
