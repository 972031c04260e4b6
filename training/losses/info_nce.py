"""NT-Xent / InfoNCE over 2N views (Chen et al., "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020, arXiv:2002.05709, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.losses.precision import at_least_fp32


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Mean NT-Xent loss of the 2N views ``z1 [N, D]``, ``z2 [N, D]`` (row i of each = one image).

    Each of the 2N views is a (2N-1)-way softmax classification over cosine similarities / T whose
    correct class is its partner view; the other 2N-2 views of the batch are the negatives.
    Computed in float32 (float64 inputs stay float64).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"info_nce needs two [N, D] tensors of one shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(at_least_fp32(torch.cat([z1, z2])), dim=1)  # [2N, D]
    logits = z @ z.T / temperature  # [2N, 2N]
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # a view is never its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)
