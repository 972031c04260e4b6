"""Schedules and the momentum (EMA) update as pure functions.

DINO (Caron et al. 2021, ``utils.cosine_scheduler``): the teacher momentum follows a half-cosine from
its base value to 1 and the teacher temperature warms up linearly. MoCo v3 uses the same momentum
cosine. Steps may be fractional (time-budgeted runs pass wall-clock progress in step units).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_schedule(step: float, total: float, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total`` (clamped past the end)."""
    if total <= 0:
        return end
    t = min(max(step / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def momentum_schedule(step: float, total: float, base: float) -> float:
    """Teacher momentum: ``base`` at the start, cosine-increased to 1 at ``total`` (DINO, MoCo v3)."""
    return cosine_schedule(step, total, base, 1.0)


def weight_decay_schedule(step: float, total: float, start: float = 0.04, end: float = 0.4) -> float:
    """DINO's weight decay: half-cosine from ``start`` (0.04) at step 0 to ``end`` (0.4) at ``total``."""
    return cosine_schedule(step, total, start, end)


def warmup_schedule(step: float, warmup_steps: float, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then ``end`` (DINO's teacher temperature)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * max(step, 0.0) / warmup_steps


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- m * theta_t + (1 - m) * theta_s`` for every parameter (buffers are copied)."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)
