"""DINO's self-distillation loss with centring and sharpening (Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021, arXiv:2104.14294, Algorithm 1 and ``main_dino.py``).

Schedules (teacher temperature, centre momentum) are passed in, never computed here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.distributed import all_reduce_mean
from training.losses.precision import at_least_fp32


def teacher_probs(teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Centred, sharpened teacher distribution ``softmax((t - c) / tau_t)``, detached; same shape as ``t``."""
    return F.softmax((at_least_fp32(teacher_out.detach()) - center) / teacher_temp, dim=-1)


def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """Mean cross-entropy ``-p_t log p_s`` over every (teacher global crop, student crop) pair but
    the same-view ones.

    ``student_out [V, N, K]`` holds the logits of all V crops (the G global crops first),
    ``teacher_out [G, N, K]`` the teacher logits of the global crops, ``center [K]`` (or ``[1, K]``).
    The teacher side is stop-gradient. Computed in float32 (float64 inputs stay float64).
    """
    if student_out.ndim != 3 or teacher_out.ndim != 3:
        raise ValueError("dino_loss takes student_out [V, N, K] and teacher_out [G, N, K]")
    v, g = student_out.shape[0], teacher_out.shape[0]
    if g > v or student_out.shape[1:] != teacher_out.shape[1:]:
        raise ValueError(f"shapes do not pair up: student {tuple(student_out.shape)}, "
                         f"teacher {tuple(teacher_out.shape)}")
    p_t = teacher_probs(teacher_out, center.reshape(1, 1, -1), teacher_temp)  # [G, N, K]
    return dino_cross_entropy(student_out, p_t, student_temp)


def dino_cross_entropy(student_out: torch.Tensor, targets: torch.Tensor, student_temp: float = 0.1) -> torch.Tensor:
    """:func:`dino_loss` given the teacher's target distributions ``[G, N, K]`` (centred and sharpened,
    or Sinkhorn-Knopp normalised as DINOv2) instead of its logits; stop-gradient on the targets."""
    g, v = targets.shape[0], student_out.shape[0]
    p_t = at_least_fp32(targets.detach())
    log_p_s = F.log_softmax(at_least_fp32(student_out) / student_temp, dim=-1)  # [V, N, K]
    ce = -(p_t.unsqueeze(1) * log_p_s.unsqueeze(0)).sum(-1).mean(-1)  # [G, V]: mean over images
    pairs = ~torch.eye(g, v, dtype=torch.bool, device=ce.device)  # teacher crop i vs student crop i: skip
    return ce[pairs].mean()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """New centre ``m * c + (1 - m) * mean(teacher logits over all crops and images)``, shape of ``c``."""
    batch_center = at_least_fp32(teacher_out.detach()).reshape(-1, teacher_out.shape[-1]).mean(0)
    batch_center = all_reduce_mean(batch_center)  # under torchrun: the mean over every rank's batch
    return center * momentum + batch_center.reshape(center.shape) * (1 - momentum)


@torch.no_grad()
def teacher_entropy(teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> float:
    """Mean entropy (nats) of the teacher distribution: a collapse signal (0 = one-hot collapse,
    log K = uniform collapse); healthy training sits in between."""
    p = teacher_probs(teacher_out, center.reshape(*([1] * (teacher_out.ndim - 1)), -1), teacher_temp)
    return mean_entropy(p)


@torch.no_grad()
def mean_entropy(probs: torch.Tensor) -> float:
    """Mean entropy (nats) of the distributions along the last axis of ``probs [..., K]``."""
    return float(-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean())
