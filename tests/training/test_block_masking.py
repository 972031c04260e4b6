"""Block masking (BEiT / DINOv2's MaskingGenerator) as pure functions of a generator."""

from __future__ import annotations

import pytest
import torch

from training.block_masking import block_mask_boxes, ibot_masks


@pytest.mark.parametrize("grid", [(7, 7), (14, 14)])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_block_mask_hits_the_drawn_ratio_and_is_made_of_rectangles(grid, ratio):
    gen = torch.Generator().manual_seed(0)
    h, w = grid
    target = int(h * w * ratio)
    counts = []
    for _ in range(50):
        mask, boxes = block_mask_boxes(grid, target, gen)
        union = torch.zeros(h, w, dtype=torch.bool)
        for top, left, bh, bw in boxes:
            assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
            assert 0 < bh < h and 0 < bw < w
            union[top:top + bh, left:left + bw] = True
        assert torch.equal(mask, union)  # the mask is exactly the union of its rectangles
        assert len(boxes) < max(int(mask.sum()), 2)  # blocks, not scattered patches
        counts.append(int(mask.sum()))
    assert max(counts) <= target  # never more than drawn
    assert sum(counts) / len(counts) >= 0.9 * target  # and close to it (a round may fall short, as the reference)


def test_ibot_masks_mask_a_share_of_crops_with_ratios_spread_over_the_range():
    gen = torch.Generator().manual_seed(1)
    masks = ibot_masks(16, (7, 7), gen, ratio_range=(0.1, 0.5), mask_probability=0.5)
    assert masks.shape == (16, 49) and masks.dtype == torch.bool
    per_image = masks.sum(1)
    assert int((per_image > 0).sum()) == 8  # int(16 * 0.5) crops are masked ...
    assert not torch.equal(per_image[:8] > 0, torch.ones(8, dtype=torch.bool))  # ... in shuffled positions
    ratios = sorted((per_image[per_image > 0].float() / 49).tolist())
    # one ratio per sub-interval of [0.1, 0.5] (width 0.05): the lightest and heaviest masks differ by ~0.35
    assert 0.05 <= ratios[0] <= 0.15 and 0.4 <= ratios[-1] <= 0.5
    assert torch.equal(masks, ibot_masks(16, (7, 7), torch.Generator().manual_seed(1)))  # a pure function of the seed
    assert not ibot_masks(16, (7, 7), gen, mask_probability=0.0).any()
