"""The KoLeo regulariser (Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019,
arXiv:1806.03198; used by DINOv2, Oquab et al. 2024, §4 and ``dinov2/loss/koleo_loss.py``).

``L_koleo = -1/n sum_i log(d_{n,i})`` with ``d_{n,i} = min_{j != i} ||x_i - x_j||`` over the
L2-normalised features of a batch: it pushes each feature away from its nearest neighbour, so the
features spread uniformly over the sphere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.losses.precision import at_least_fp32


def nearest_neighbour_distances(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Euclidean distance of each L2-normalised row of ``x [n, D]`` to its nearest other row ``[n]``.

    The neighbour is chosen without gradient (the largest cosine, as the reference); the distance to
    it is differentiable."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least two feature rows [n, D], got {tuple(x.shape)}")
    x = F.normalize(at_least_fp32(x), dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.T  # [n, n]
        sims.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
        nn_index = sims.argmax(dim=1)  # [n]
    return F.pairwise_distance(x, x[nn_index], p=2, eps=eps)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-mean_i log(d_{n,i} + eps)`` over the rows of ``x [n, D]`` (normalised here); float32."""
    return -torch.log(nearest_neighbour_distances(x, eps) + eps).mean()
