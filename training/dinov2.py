"""DINOv2 self-distillation: DINO's CLS loss plus iBOT's masked-patch loss, the KoLeo regulariser
and Sinkhorn-Knopp teacher centring (Oquab et al., "DINOv2: Learning Robust Visual Features without
Supervision", TMLR 2024, arXiv:2304.07193, §4; ``dinov2/train/ssl_meta_arch.py``).

Built on :class:`training.dino.DINO` (student / EMA teacher / head / centre, multi-crop, last-layer
freeze), with:

- a learnable mask token (``patch_mask_token``) that replaces the student's patch embeddings at the
  block-masked positions of its global crops (``training.block_masking``); the teacher sees the
  crops unmasked. timm's ViT has no mask token, so it belongs to this module, and the encoder the
  run stores (the teacher) is a plain timm ViT that export reads as any other;
- iBOT: at the masked positions the student's patch tokens, through the DINO head or a separate
  patch head (``ibot_separate_head``), predict the teacher's patch distributions of the same crop
  (``training.losses.ibot_patch``);
- KoLeo on the student's CLS features of each global crop, gathered over ranks so the nearest
  neighbours are those of the global batch (the reference uses each GPU's batch);
- teacher centring by Sinkhorn-Knopp (``centering="sinkhorn_knopp"``, row and column sums
  all-reduced) or by running centres of the CLS and of the patch logits (``"centre"``).

Loss: ``dino + ibot_weight * ibot + koleo_weight * sum_over_global_crops(koleo)`` (the reference's
weights 1, 1, 0.1).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from training.backbone import EncoderSpec, encoder_tokens
from training.dino import DINO, DINOHead
from training.distributed import gather_with_grad
from training.losses.dino import dino_cross_entropy, mean_entropy, teacher_probs, update_center
from training.losses.ibot_patch import ibot_patch_loss, update_patch_center
from training.losses.koleo import koleo_loss
from training.losses.sinkhorn_knopp import sinkhorn_knopp
from training.schedules import ema_update

CENTERINGS = ("sinkhorn_knopp", "centre")


class DINOv2(DINO):
    """DINO + iBOT + KoLeo; ``forward(*crops, *masks)`` returns the loss and its parts."""

    def __init__(self, encoder: nn.Module, spec: EncoderSpec, out_dim: int = 1024, hidden_dim: int = 512,
                 bottleneck_dim: int = 128, n_global_crops: int = 2, n_local_crops: int = 4,
                 student_temp: float = 0.1, center_momentum: float = 0.9, centering: str = "sinkhorn_knopp",
                 sinkhorn_iterations: int = 3, ibot_separate_head: bool = False, ibot_weight: float = 1.0,
                 koleo_weight: float = 0.1) -> None:
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        super().__init__(encoder, spec, out_dim, hidden_dim, bottleneck_dim, n_global_crops, n_local_crops,
                         student_temp, center_momentum)
        self.patch_mask_token = nn.Parameter(torch.zeros(spec.embed_dim))  # zeros, as the reference
        self.ibot_head = DINOHead(spec.embed_dim, out_dim, hidden_dim, bottleneck_dim) if ibot_separate_head else None
        self.teacher_ibot_head = copy.deepcopy(self.ibot_head) if ibot_separate_head else None
        if self.teacher_ibot_head is not None:
            for p in self.teacher_ibot_head.parameters():
                p.requires_grad_(False)
        self.register_buffer("patch_center", torch.zeros(1, out_dim))
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.ibot_weight, self.koleo_weight = ibot_weight, koleo_weight

    def _targets(self, logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher targets ``[R, K]`` from logits ``[R, K]``: Sinkhorn-Knopp or centre + sharpen."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, teacher_temp, self.sinkhorn_iterations)
        return teacher_probs(logits, center, teacher_temp)

    def forward(self, *views: torch.Tensor, teacher_temp: float = 0.04, **_: float) -> dict[str, torch.Tensor]:
        """``views``: G global crops ``[N, C, H, W]``, the local crops ``[N, C, h, w]``, then G masks
        ``[N, L]`` (bool, True = masked) of the global crops -> ``{"loss", "dino_loss", "ibot_loss",
        "koleo_loss", "teacher_entropy", "ibot_teacher_entropy", "teacher_out" [G, N, K],
        "teacher_patch_out" [M, K]}`` (M masked patches)."""
        g, n_crops = self.n_global, self.n_global + self.n_local
        if len(views) != n_crops + g:
            raise ValueError(f"DINOv2 expects {self.n_global} global + {self.n_local} local crops and "
                             f"{self.n_global} masks, got {len(views)} views")
        globals_, locals_, masks = list(views[:g]), list(views[g:n_crops]), torch.cat(views[n_crops:])
        n = globals_[0].shape[0]
        prefix = self.spec.num_prefix_tokens
        student_patch_head = self.ibot_head if self.ibot_head is not None else self.head
        teacher_patch_head = self.teacher_ibot_head if self.teacher_ibot_head is not None else self.teacher_head

        with torch.no_grad():  # teacher: unmasked global crops
            t_tokens = self.teacher_encoder.forward_features(torch.cat(globals_))  # [G*N, P+L, D]
            t_cls = self.teacher_head(self.teacher_encoder.forward_head(t_tokens, pre_logits=True))  # [G*N, K]
            t_patch = teacher_patch_head(t_tokens[:, prefix:][masks])  # [M, K]
            t_cls_targets = self._targets(t_cls, self.center, teacher_temp).view(g, n, -1)
            t_patch_targets = self._targets(t_patch, self.patch_center, teacher_temp)

        s_tokens = encoder_tokens(self.encoder, torch.cat(globals_), masks, self.patch_mask_token)
        s_cls_features = self.encoder.forward_head(s_tokens, pre_logits=True)  # [G*N, D]
        s_out = self.head(s_cls_features).view(g, n, -1)
        if locals_:
            s_out = torch.cat([s_out, self.student(locals_)])  # [V, N, K]
        s_patch = student_patch_head(s_tokens[:, prefix:][masks])  # [M, K]

        dino = dino_cross_entropy(s_out, t_cls_targets, self.student_temp)
        grid = masks.shape + (s_patch.shape[-1],)
        ibot = ibot_patch_loss(s_patch.new_zeros(grid).index_put((masks,), s_patch),
                               t_patch_targets.new_zeros(grid).index_put((masks,), t_patch_targets),
                               masks, self.student_temp)
        koleo = sum(koleo_loss(gather_with_grad(f)) for f in s_cls_features.view(g, n, -1))
        out = {"loss": dino + self.ibot_weight * ibot + self.koleo_weight * koleo,
               "dino_loss": dino.detach(), "ibot_loss": ibot.detach(), "koleo_loss": koleo.detach(),
               "teacher_entropy": torch.tensor(mean_entropy(t_cls_targets)),
               "masked_share": masks.float().mean(),
               "teacher_out": t_cls.view(g, n, -1), "teacher_patch_out": t_patch}
        if len(t_patch_targets):
            out["ibot_teacher_entropy"] = torch.tensor(mean_entropy(t_patch_targets))
        return out

    def last_layer_params(self) -> list[nn.Parameter]:
        """The prototype layers of the DINO head and of the patch head (when separate)."""
        return super().last_layer_params() + ([self.ibot_head.last_weight] if self.ibot_head is not None else [])

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = super().ema_pairs()
        return pairs + ([(self.teacher_ibot_head, self.ibot_head)] if self.ibot_head is not None else [])

    @torch.no_grad()
    def after_step(self, out: dict[str, torch.Tensor], momentum: float = 0.996, **_: float) -> None:
        """EMA the teacher (encoder and heads); with running-centre centring, update both centres."""
        for teacher, student in self.ema_pairs():
            ema_update(teacher, student, momentum)
        if self.centering == "centre":
            self.center.copy_(update_center(self.center, out["teacher_out"], self.center_momentum))
            self.patch_center.copy_(update_patch_center(self.patch_center, out["teacher_patch_out"],
                                                        self.center_momentum))
