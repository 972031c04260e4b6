"""Block masking for iBOT / DINOv2 as pure functions of a ``torch.Generator``.

BEiT's blockwise masking (Bao et al., ICLR 2022, arXiv:2106.08254, Algorithm 1) as DINOv2's
``MaskingGenerator`` (``dinov2/data/masking.py``) and ``collate_data_and_cast``: a mask is grown
from random rectangles (area >= ``min_patches``, aspect ratio log-uniform in ``(0.3, 1/0.3)``) until
it covers the drawn number of patches; only a share (``mask_probability``) of the global crops is
masked, and their ratios are spread over ``ratio_range`` (one uniform draw inside each of the
equal sub-intervals), so the batch sees light and heavy masks alike.
"""

from __future__ import annotations

import math

import torch

Box = tuple[int, int, int, int]  # top, left, height, width


def _uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(lo: int, hi: int, generator: torch.Generator) -> int:
    """An integer in ``[lo, hi]`` (both ends included, as ``random.randint``)."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def block_mask_boxes(
    grid: tuple[int, int], n_masked: int, generator: torch.Generator, min_patches: int = 4,
    max_patches: int | None = None, aspect: tuple[float, float] = (0.3, 1 / 0.3), tries: int = 10,
) -> tuple[torch.Tensor, list[Box]]:
    """A mask ``[h, w]`` (bool) of at most ``n_masked`` patches made of rectangles, and the boxes.

    Each round draws up to ``tries`` rectangles of area U(``min_patches``, remaining budget capped at
    ``max_patches``, default half the grid) and keeps the first that adds new patches without
    exceeding the budget; growing stops at the budget or when a round adds nothing (the mask then
    falls short of ``n_masked``, as the reference).
    """
    h, w = grid
    max_patches = max_patches if max_patches is not None else h * w // 2
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    mask = torch.zeros(h, w, dtype=torch.bool)
    boxes: list[Box] = []
    count = 0
    while count < n_masked:
        budget = min(n_masked - count, max_patches)
        added = 0
        for _ in range(tries):
            area = _uniform(min_patches, budget, generator)  # as random.uniform: either order of ends
            ratio = math.exp(_uniform(*log_aspect, generator))
            bh, bw = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if not (0 < bh < h and 0 < bw < w):
                continue
            top, left = _randint(0, h - bh, generator), _randint(0, w - bw, generator)
            new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
            if 0 < new <= budget:
                mask[top:top + bh, left:left + bw] = True
                boxes.append((top, left, bh, bw))
                added = new
                break
        if added == 0:
            break
        count += added
    return mask, boxes


def ibot_masks(
    n_images: int, grid: tuple[int, int], generator: torch.Generator,
    ratio_range: tuple[float, float] = (0.1, 0.5), mask_probability: float = 0.5,
) -> torch.Tensor:
    """Masks ``[n_images, h*w]`` (bool) for a batch of global crops: ``int(n_images * mask_probability)``
    of them, in random positions, get a block mask of ratio U(sub-interval i of ``ratio_range``);
    the others none (DINOv2's ``collate_data_and_cast``)."""
    h, w = grid
    n_masked_images = int(n_images * mask_probability)
    lo, hi = ratio_range
    edges = torch.linspace(lo, hi, n_masked_images + 1).tolist()
    masks = torch.zeros(n_images, h * w, dtype=torch.bool)
    for i in range(n_masked_images):
        ratio = _uniform(edges[i], edges[i + 1], generator)
        masks[i] = block_mask_boxes(grid, int(h * w * ratio), generator)[0].flatten()
    return masks[torch.randperm(n_images, generator=generator)]
