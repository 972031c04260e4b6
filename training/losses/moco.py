"""MoCo's contrastive losses: v2 with a queue of negatives (He et al., CVPR 2020, arXiv:1911.05722;
Chen et al. 2020, arXiv:2003.04297) and v3's symmetric in-batch loss (Chen, Xie & He, "An Empirical
Study of Training Self-Supervised Vision Transformers", ICCV 2021, arXiv:2104.02057, Algorithm 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.losses.precision import at_least_fp32


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE of queries ``q [N, D]`` against their keys ``k [N, D]`` (positives, stop-grad) and
    the queued keys ``queue [K, D]`` (negatives); inputs are L2-normalised here. Float32."""
    q = F.normalize(at_least_fp32(q), dim=1)
    k = F.normalize(at_least_fp32(k.detach()), dim=1)
    neg = F.normalize(at_least_fp32(queue.detach()), dim=1)
    l_pos = (q * k).sum(1, keepdim=True)  # [N, 1]
    l_neg = q @ neg.T  # [N, K]
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def moco_v3_contrastive(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2,
                        offset: int = 0) -> torch.Tensor:
    """MoCo v3's ``ctr(q, k)``: in-batch InfoNCE (keys of the other images are the negatives),
    scaled by ``2 * T`` as in the paper's pseudo-code.

    ``q [n, D]``, ``k [M, D]`` with ``M >= n``: under data parallelism ``k`` holds every rank's keys
    and query ``i``'s positive is key ``offset + i`` (``offset = rank * n``, as the reference's
    ``labels = arange(N) + N * rank``); single-process ``M == n`` and ``offset == 0``.
    """
    q = F.normalize(at_least_fp32(q), dim=1)
    k = F.normalize(at_least_fp32(k.detach()), dim=1)
    if offset + len(q) > len(k):
        raise ValueError(f"queries {offset}..{offset + len(q)} have no positives among {len(k)} keys")
    logits = q @ k.T / temperature  # [n, M]
    labels = torch.arange(len(q), device=q.device) + offset
    return F.cross_entropy(logits, labels) * 2 * temperature


def moco_v3_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                 temperature: float = 0.2, offset: int = 0) -> torch.Tensor:
    """Symmetric MoCo v3 loss ``ctr(q1, k2) + ctr(q2, k1)`` (queries come from the predictor;
    ``k1``, ``k2`` may be the keys of every rank, see :func:`moco_v3_contrastive`)."""
    return moco_v3_contrastive(q1, k2, temperature, offset) + moco_v3_contrastive(q2, k1, temperature, offset)
