"""The precision the losses compute in: float32 under bf16/fp16 autocast, float64 kept as is."""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or in its own dtype when that is wider (float64); softmax, centring and
    losses never run in bf16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
