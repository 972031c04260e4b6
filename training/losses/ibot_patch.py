"""iBOT's masked-patch self-distillation loss (Zhou et al., "iBOT: Image BERT Pre-Training with
Online Tokenizer", ICLR 2022, arXiv:2111.07832, eq. 2; DINOv2, Oquab et al. 2024, §4,
``iBOTPatchLoss.forward_masked`` in ``dinov2/loss/ibot_patch_loss.py``).

The student sees a global crop with some patches replaced by a mask token; at every *masked*
position it predicts the teacher's distribution for the same patch of the unmasked crop:
``L = -1/B sum_b 1/|M_b| sum_{i in M_b} sum_k P_t[b, i, k] log P_s[b, i, k]``, where ``B`` counts
every image of the batch (also those with no masked patch, which add nothing), as the reference.
Unmasked positions never enter the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.distributed import is_distributed
from training.losses.precision import at_least_fp32


def ibot_patch_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Masked-patch cross-entropy (formula above).

    ``student_patch_logits [B, L, K]`` and ``teacher_patch_probs [B, L, K]`` (already centred /
    Sinkhorn-normalised and sharpened; stop-gradient here) on the full patch grid, ``masks [B, L]``
    bool (True = masked). Only the masked rows are read. Float32 (float64 stays).
    """
    if student_patch_logits.ndim != 3 or student_patch_logits.shape != teacher_patch_probs.shape:
        raise ValueError(f"ibot_patch_loss takes student and teacher [B, L, K] of one shape, got "
                         f"{tuple(student_patch_logits.shape)} and {tuple(teacher_patch_probs.shape)}")
    if masks.shape != student_patch_logits.shape[:2] or masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool {tuple(student_patch_logits.shape[:2])}, got "
                         f"{masks.dtype} {tuple(masks.shape)}")
    s = at_least_fp32(student_patch_logits[masks])  # [M, K]
    t = at_least_fp32(teacher_patch_probs[masks].detach())  # [M, K]
    ce = -(t * F.log_softmax(s / student_temp, dim=-1)).sum(-1)  # [M]
    per_image = masks.sum(-1).clamp_min(1).to(ce.dtype)  # |M_b| (1 where nothing is masked)
    weights = (1.0 / per_image).unsqueeze(1).expand_as(masks)[masks]  # [M]: 1/|M_b| for each row
    return (ce * weights).sum() / masks.shape[0]


@torch.no_grad()
def update_patch_center(center: torch.Tensor, masked_teacher_logits: torch.Tensor,
                        momentum: float = 0.9) -> torch.Tensor:
    """iBOT's running centre of the teacher's patch logits: ``m * c + (1 - m) * mean`` over the masked
    rows ``[M, K]`` of every rank (sum and count all-reduced: ranks may mask different counts)."""
    logits = at_least_fp32(masked_teacher_logits.detach()).reshape(-1, center.shape[-1])
    total = torch.cat([logits.sum(0), torch.tensor([float(len(logits))], dtype=logits.dtype)])
    if is_distributed():
        import torch.distributed as dist

        if dist.get_world_size() > 1:
            dist.all_reduce(total)
    if total[-1] == 0:  # nothing masked anywhere this step: the centre stays
        return center
    return center * momentum + (total[:-1] / total[-1]).reshape(center.shape) * (1 - momentum)
