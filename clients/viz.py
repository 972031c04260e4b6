"""Feature views of dense ViT features, numpy only: PCA of patch tokens as RGB, a foreground mask from
the first component, CLS attention maps, and upsampling of ``[h, w]`` maps to the image size.

- **PCA → RGB** (DINOv2 fig. 1; NVlabs RADIO ``examples/visualize_features.py``): ONE basis is fitted
  on the patch tokens of *all* images of a call (``fit_pca``), so the same colour means the same
  direction in feature space across images. The three projections are scaled to ``[0, 1]`` per
  channel robustly, as RADIO's ``get_robust_pca`` does: a value whose distance to the channel's median
  is ``m`` (2) median absolute deviations or more is an outlier; the channel's range is the min..max
  of its inliers and outliers are clipped to it (``robust_range``, ``pca_rgb``).
- **Foreground** (DINOv2's PCA notebook): the first component, min-max scaled to ``[0, 1]`` and
  thresholded (``foreground_mask``). Its basis is fitted per image by default (``per_image=True``):
  over a batch of different items, the first component of a trained encoder follows the item's class
  more than item against background (docs/FEATURE_VIEWS.md has the IoUs); ``per_image=False`` is
  DINOv2's joint fit over the batch. The min and max are the 1st and 99th percentiles
  (values beyond clipped), not RADIO's MAD rule, which would call a foreground that covers a minority
  of the patches an outlier. A component's sign is arbitrary, so it is oriented so that the patches on
  the grid's border, which on object-centred images are mostly background, score low.
- **CLS attention** (DINO ``visualize_attention.py``): ``cls_attention [N, heads, h*w]`` as maps
  ``[N, heads, h, w]`` and their mean over heads, each map min-max normalised (``attention_maps``).

Shapes: patch tokens ``[N, h, w, D]``; maps ``[N, h, w]``; RGB ``[N, h, w, 3]`` float in ``[0, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAD_INLIER = 2.0              # RADIO get_robust_pca's m: inliers are within m median absolute deviations
FOREGROUND_THRESHOLD = 0.5    # on the scaled first component, in [0, 1]
FOREGROUND_QUANTILES = (0.01, 0.99)  # the first component's range for the foreground


@dataclass(frozen=True)
class PcaBasis:
    """Mean ``[D]``, principal directions ``components [k, D]`` (rows, unit norm) and the fraction of
    variance each explains ``[k]``; each direction's sign makes its largest-magnitude loading positive."""

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray

    def project(self, tokens: np.ndarray) -> np.ndarray:
        """``[..., D]`` -> ``[..., k]`` coordinates along the components."""
        return (np.asarray(tokens, dtype=np.float64) - self.mean) @ self.components.T


def fit_pca(tokens: np.ndarray, k: int = 3) -> PcaBasis:
    """The top-``k`` principal directions of ``tokens [..., D]`` (all leading axes pooled: every patch
    of every image is one sample), by SVD of the centred samples."""
    x = np.asarray(tokens, dtype=np.float64).reshape(-1, np.shape(tokens)[-1])
    if len(x) < 2:
        raise ValueError(f"PCA needs at least 2 tokens, got {len(x)}")
    k = min(k, x.shape[1], len(x))
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    var = s ** 2
    return PcaBasis(mean, comps, var[:k] / max(float(var.sum()), 1e-300))


def robust_range(values: np.ndarray, m: float = MAD_INLIER) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(low [C], high [C])`` of ``values [..., C]``: min and max of the inliers, a value
    being an inlier when ``|v - median| < m * MAD`` (RADIO's ``get_robust_pca``; all values when the
    MAD is 0)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1, np.shape(values)[-1])
    med = np.median(v, axis=0)
    dev = np.abs(v - med)
    mad = np.median(dev, axis=0)
    low, high = np.empty(v.shape[1]), np.empty(v.shape[1])
    for c in range(v.shape[1]):
        inliers = v[:, c] if mad[c] <= 0 else v[dev[:, c] < m * mad[c], c]
        low[c], high[c] = inliers.min(), inliers.max()
    return low, high


def scale_clip(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``(values - low) / (high - low)`` clipped to ``[0, 1]`` per channel (0 where ``high == low``)."""
    span = np.where(high > low, high - low, 1.0)
    return np.clip((np.asarray(values, dtype=np.float64) - low) / span, 0.0, 1.0)


def pca_rgb(patch_grid: np.ndarray, basis: PcaBasis | None = None, m: float = MAD_INLIER
            ) -> tuple[np.ndarray, PcaBasis]:
    """``(rgb [N, h, w, 3] in [0, 1], basis)``: the first 3 components of ``patch_grid [N, h, w, D]``
    (``basis`` default: fitted on all its tokens), scaled with one robust range per channel over the
    whole batch."""
    basis = basis if basis is not None else fit_pca(patch_grid, 3)
    proj = basis.project(patch_grid)                       # [N, h, w, k]
    if proj.shape[-1] < 3:                                 # fewer than 3 dims: pad with zeros (black)
        proj = np.concatenate([proj, np.zeros((*proj.shape[:-1], 3 - proj.shape[-1]))], axis=-1)
    low, high = robust_range(proj, m)
    return scale_clip(proj, low, high).astype(np.float32), basis


def border_mask(grid: tuple[int, int]) -> np.ndarray:
    """``[h, w]`` bool, True on the outermost ring of patches."""
    h, w = grid
    ring = np.zeros((h, w), dtype=bool)
    ring[[0, -1], :] = True
    ring[:, [0, -1]] = True
    return ring


def first_component(patch_grid: np.ndarray, basis: PcaBasis | None = None,
                    quantiles: tuple[float, float] = FOREGROUND_QUANTILES) -> np.ndarray:
    """The first principal component of ``patch_grid [N, h, w, D]`` scaled to ``[0, 1]`` between its
    ``quantiles`` over the batch ``[N, h, w]``, oriented so that the border patches have the lower mean."""
    basis = basis if basis is not None else fit_pca(patch_grid, 1)
    c1 = basis.project(patch_grid)[..., 0]                 # [N, h, w]
    low, high = np.quantile(c1, quantiles)
    score = scale_clip(c1, np.asarray(low), np.asarray(high))
    ring = border_mask(score.shape[1:3])
    if (~ring).any() and score[:, ring].mean() > score[:, ~ring].mean():
        score = 1.0 - score
    return score.astype(np.float32)


def foreground_mask(patch_grid: np.ndarray, threshold: float = FOREGROUND_THRESHOLD,
                    basis: PcaBasis | None = None, per_image: bool = False) -> np.ndarray:
    """``[N, h, w]`` bool: patches whose oriented, scaled first component exceeds ``threshold``; the
    component of ``basis`` (default: fitted on the whole batch) or, with ``per_image``, of each image's own."""
    if per_image:
        return np.stack([first_component(g[None])[0] > threshold for g in np.asarray(patch_grid)])
    return first_component(patch_grid, basis) > threshold


def attention_maps(cls_attention: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [N, h, w], per_head [N, heads, h, w])`` of ``cls_attention [N, heads, h*w]``, each map
    min-max normalised to ``[0, 1]`` on its own (the mean is taken before normalising)."""
    a = np.asarray(cls_attention, dtype=np.float64)
    if a.ndim != 3 or a.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"cls_attention must be [N, heads, {grid[0] * grid[1]}] for grid {grid}, "
                         f"got {list(a.shape)}")
    heads = a.reshape(len(a), a.shape[1], *grid)
    return normalize_maps(heads.mean(axis=1)), normalize_maps(heads)


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Min-max normalise each ``[h, w]`` map of ``maps [..., h, w]`` to ``[0, 1]`` (a flat map -> 0)."""
    m = np.asarray(maps, dtype=np.float64)
    low = m.min(axis=(-2, -1), keepdims=True)
    span = m.max(axis=(-2, -1), keepdims=True) - low
    return ((m - low) / np.where(span > 0, span, 1.0)).astype(np.float32)


def upsample(maps: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """``maps [..., h, w]`` resized to ``size`` ``(H, W)``: ``"nearest"`` or ``"bilinear"`` (half-pixel
    centres, as torch's ``align_corners=False``); ``upsample_rgb`` for ``[N, h, w, 3]``."""
    m = np.asarray(maps)
    h, w = m.shape[-2:]
    H, W = size
    if mode == "nearest":
        rows = np.minimum((np.arange(H) * h) // H, h - 1)
        cols = np.minimum((np.arange(W) * w) // W, w - 1)
        return m[..., rows[:, None], cols[None, :]]
    if mode != "bilinear":
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    r0, r1, fr = axis(H, h)
    c0, c1, fc = axis(W, w)
    x = m.astype(np.float64)
    top = x[..., r0, :] * (1 - fr)[:, None] + x[..., r1, :] * fr[:, None]          # [..., H, w]
    out = top[..., c0] * (1 - fc) + top[..., c1] * fc                             # [..., H, W]
    return out.astype(np.float32)


def upsample_rgb(rgb: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """``rgb [N, h, w, C]`` resized to ``[N, H, W, C]`` (``upsample`` per channel)."""
    return np.moveaxis(upsample(np.moveaxis(np.asarray(rgb), -1, 1), size, mode), 1, -1)


@dataclass(frozen=True)
class FeatureViews:
    """The views of one model on a batch: ``pca [N, h, w, 3]``, ``foreground [N, h, w]`` (or None),
    ``attention [N, h, w]`` and ``attention_heads [N, heads, h, w]`` (None without the output)."""

    pca: np.ndarray
    basis: PcaBasis
    foreground: np.ndarray | None = None
    attention: np.ndarray | None = None
    attention_heads: np.ndarray | None = None


def feature_views(patch_grid: np.ndarray, cls_attention: np.ndarray | None = None, foreground: bool = False,
                  threshold: float = FOREGROUND_THRESHOLD, foreground_per_image: bool = True) -> FeatureViews:
    """All views of one model's patch tokens ``[N, h, w, D]`` (one PCA basis for the batch's colours;
    the foreground's per image unless ``foreground_per_image=False``) and, when given, its
    ``cls_attention [N, heads, h*w]``."""
    grid = np.asarray(patch_grid)
    if grid.ndim != 4:
        raise ValueError(f"patch tokens must be a grid [N, h, w, D], got {list(grid.shape)}")
    rgb, basis = pca_rgb(grid)
    mask = foreground_mask(grid, threshold, None, foreground_per_image) if foreground else None
    mean = heads = None
    if cls_attention is not None:
        mean, heads = attention_maps(cls_attention, grid.shape[1:3])
    return FeatureViews(rgb, basis, mask, mean, heads)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two same-shaped bool masks (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
