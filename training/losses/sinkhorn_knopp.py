"""Sinkhorn-Knopp centring of the teacher (Caron et al., SwAV, NeurIPS 2020, arXiv:2006.09882,
Algorithm 1; used by DINOv2, Oquab et al. 2024, §4, ``SinkhornKnopp`` in ``dinov2/loss/dino_clstoken_loss.py``).

Instead of subtracting a running centre, the teacher's ``B x K`` matrix of ``exp(logits / tau)``
is rescaled in turn along prototypes and along samples so that every prototype receives the same
total mass (``B / K`` of the batch) and every sample's row is a distribution (sums to 1): an
equipartition that rules out the collapse onto a few prototypes without a running statistic.
Under ``torchrun`` the prototype sums and the sample count are all-reduced, so the result is the
one a single process computes on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from training.distributed import is_distributed
from training.losses.precision import at_least_fp32


def _all_reduce(x: torch.Tensor, op: "dist.ReduceOp.RedOpType | None" = None) -> torch.Tensor:
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=op if op is not None else dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets ``[B, K]`` from logits ``[B, K]``: rows sum to 1, columns (approximately, exactly
    as ``n_iterations`` grows) to ``B_global / K``; float32 (float64 stays), no gradient.

    ``B_global`` is the sample count over all ranks. The logits are shifted by their global maximum
    first (a constant factor of ``Q``, removed by the first normalisation) so ``exp`` cannot overflow.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp takes logits [B, K], got {tuple(teacher_logits.shape)}")
    logits = at_least_fp32(teacher_logits.detach())
    k = logits.shape[1]
    local_max = logits.max() if logits.numel() else torch.tensor(float("-inf"), dtype=logits.dtype)
    shift = _all_reduce(local_max.reshape(1).clone(), dist.ReduceOp.MAX if is_distributed() else None)
    q = torch.exp((logits - shift) / teacher_temp).T  # [K, B]
    b = _all_reduce(torch.tensor([float(q.shape[1])], dtype=q.dtype))  # samples over all ranks
    q /= _all_reduce(q.sum().reshape(1))
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # each prototype: total mass 1/K ...
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # ... each sample: total mass 1/B
        q /= b
    return (q * b).T  # [B, K], rows are distributions
