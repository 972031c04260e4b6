"""DINO self-distillation around a timm ViT encoder (Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021, arXiv:2104.14294; ``main_dino.py``, ``vision_transformer.DINOHead``).

The student (encoder + head) sees every crop; the teacher, an EMA copy without gradients, sees the
global crops only. The loss (``training.losses.dino_loss``) matches the student's distribution on
each crop to the centred, sharpened teacher distribution of every *other* global crop. The teacher
momentum, temperature and the centre update are applied by the training loop through
:meth:`DINO.after_step`, with schedules it passes in.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from training.backbone import EncoderSpec, cls_features
from training.losses.dino import dino_loss, teacher_entropy, update_center
from training.schedules import ema_update


class DINOHead(nn.Module):
    """MLP (GELU) -> L2-normalised bottleneck -> weight-normalised linear layer to K prototypes.

    ``norm_last_layer=True`` in DINO fixes weight norm's gain g to 1, i.e. the last layer is
    ``x @ (V / ||V||_row).T``; that is written out directly here instead of ``weight_norm``.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 n_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_weight = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, in_dim]`` -> prototype logits ``[N, out_dim]``."""
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_weight, dim=1))


class DINO(nn.Module):
    """Student encoder + head, EMA teacher and the centre; ``forward(*crops)`` returns the loss.

    ``out_dim`` is the number of prototypes K: 65536 for ImageNet in the paper. For 60k 28 px grey
    images of 10 classes, and batches of ~64, we use 1024: K should exceed the number of natural
    clusters by far, but a K close to the batch count makes the centre (a running mean over K)
    and the teacher statistics noisy, and a 65536-wide head would cost more than this 2.7M-param ViT.
    """

    def __init__(self, encoder: nn.Module, spec: EncoderSpec, out_dim: int = 1024, hidden_dim: int = 512,
                 bottleneck_dim: int = 128, n_global_crops: int = 2, n_local_crops: int = 4,
                 student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.encoder = encoder
        self.spec = spec
        self.head = DINOHead(spec.embed_dim, out_dim, hidden_dim, bottleneck_dim)
        self.teacher_encoder = copy.deepcopy(encoder)
        self.teacher_head = copy.deepcopy(self.head)
        for p in (*self.teacher_encoder.parameters(), *self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.n_global, self.n_local = n_global_crops, n_local_crops
        self.student_temp, self.center_momentum = student_temp, center_momentum

    def student(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Student logits ``[V, N, K]``; crops of one size go through the encoder together."""
        out: list[torch.Tensor] = []
        n = crops[0].shape[0]
        i = 0
        while i < len(crops):  # group consecutive same-size crops, as DINO's MultiCropWrapper
            j = i
            while j < len(crops) and crops[j].shape == crops[i].shape:
                j += 1
            feats = cls_features(self.encoder, torch.cat(crops[i:j]))  # [(j-i)*N, D]
            out.append(self.head(feats).view(j - i, n, -1))
            i = j
        return torch.cat(out)

    @torch.no_grad()
    def teacher(self, global_crops: list[torch.Tensor]) -> torch.Tensor:
        """Teacher logits ``[G, N, K]`` of the global crops (no gradients)."""
        n = global_crops[0].shape[0]
        feats = cls_features(self.teacher_encoder, torch.cat(global_crops))
        return self.teacher_head(feats).view(len(global_crops), n, -1)

    def forward(self, *crops: torch.Tensor, teacher_temp: float = 0.04, **_: float) -> dict[str, torch.Tensor]:
        """``crops``: G global ``[N, C, H, W]`` then local ``[N, C, h, w]`` views ->
        ``{"loss", "teacher_out" [G, N, K], "teacher_entropy"}``."""
        if len(crops) != self.n_global + self.n_local:
            raise ValueError(f"DINO expects {self.n_global} global + {self.n_local} local crops, got {len(crops)}")
        t_out = self.teacher(list(crops[: self.n_global]))
        s_out = self.student(list(crops))
        loss = dino_loss(s_out, t_out, self.center, self.student_temp, teacher_temp)
        entropy = torch.tensor(teacher_entropy(t_out, self.center, teacher_temp))
        return {"loss": loss, "teacher_out": t_out, "teacher_entropy": entropy}

    def last_layer_params(self) -> list[nn.Parameter]:
        """The head's prototype layer, whose gradient DINO cancels for the first epoch(s)
        (``utils.cancel_gradients_last_layer``): the paper finds it stabilises the start of training."""
        return [self.head.last_weight]

    @property
    def export_encoder(self) -> nn.Module:
        """The encoder a run directory stores: the teacher, which DINO evaluates and releases
        (``eval_knn.py --checkpoint_key teacher``); it is the better of the two in the paper (§5.2)."""
        return self.teacher_encoder

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher, student) module pairs the EMA updates."""
        return [(self.teacher_encoder, self.encoder), (self.teacher_head, self.head)]

    @torch.no_grad()
    def after_step(self, out: dict[str, torch.Tensor], momentum: float = 0.996, **_: float) -> None:
        """After the optimiser step: EMA the teacher with ``momentum`` and update the centre."""
        for teacher, student in self.ema_pairs():
            ema_update(teacher, student, momentum)
        self.center.copy_(update_center(self.center, out["teacher_out"], self.center_momentum))
