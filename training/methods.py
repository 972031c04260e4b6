"""The registry of pre-training methods: how each builds its module, makes its views and which
schedules it takes.

A method module's ``forward(*views, **schedules)`` returns ``{"loss": ..., parts}`` and never
calls ``backward``; ``after_step(out, **schedules)`` (when present) does what follows the optimiser
step (teacher EMA, DINO centre, MoCo queue).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from training import augment as aug
from training.backbone import EncoderSpec, create_encoder
from training.config import ConfigError, TrainConfig
from training.contrastive import MoCo, SimCLR
from training.block_masking import ibot_masks
from training.dino import DINO
from training.dinov2 import DINOv2
from training.mae import MaskedAutoencoder
from training.pretrained import init_encoder
from training.schedules import momentum_schedule, warmup_schedule, weight_decay_schedule

Views = list[torch.Tensor]


def _build_mae(cfg: TrainConfig, encoder: nn.Module, spec: EncoderSpec) -> nn.Module:
    return MaskedAutoencoder(encoder, spec, decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                             decoder_heads=cfg.decoder_heads, mask_ratio=cfg.mask_ratio,
                             norm_pix_loss=cfg.norm_pix_loss)


def _build_dino(cfg: TrainConfig, encoder: nn.Module, spec: EncoderSpec) -> nn.Module:
    return DINO(encoder, spec, out_dim=cfg.dino_out_dim, hidden_dim=cfg.head_hidden_dim,
                bottleneck_dim=cfg.head_bottleneck_dim, n_local_crops=cfg.n_local_crops,
                student_temp=cfg.student_temp, center_momentum=cfg.center_momentum)


def _build_dinov2(cfg: TrainConfig, encoder: nn.Module, spec: EncoderSpec) -> nn.Module:
    return DINOv2(encoder, spec, out_dim=cfg.dino_out_dim, hidden_dim=cfg.head_hidden_dim,
                  bottleneck_dim=cfg.head_bottleneck_dim, n_local_crops=cfg.n_local_crops,
                  student_temp=cfg.student_temp, center_momentum=cfg.center_momentum, centering=cfg.centering,
                  sinkhorn_iterations=cfg.sinkhorn_iterations, ibot_separate_head=cfg.ibot_separate_head,
                  ibot_weight=cfg.ibot_loss_weight, koleo_weight=cfg.koleo_loss_weight)


def _build_simclr(cfg: TrainConfig, encoder: nn.Module, spec: EncoderSpec) -> nn.Module:
    return SimCLR(encoder, spec, proj_dim=cfg.proj_dim, hidden_dim=cfg.head_hidden_dim,
                  temperature=cfg.temperature)


def _build_moco(cfg: TrainConfig, encoder: nn.Module, spec: EncoderSpec) -> nn.Module:
    return MoCo(encoder, spec, queue_size=cfg.queue_size, proj_dim=cfg.proj_dim,
                hidden_dim=cfg.head_hidden_dim, temperature=cfg.temperature, v3=cfg.moco_v3,
                freeze_patch_embed=cfg.moco_v3_freeze_patch_embed)


def _flip_views(cfg: TrainConfig, x01: torch.Tensor, spec: EncoderSpec, gen: torch.Generator) -> Views:
    return [aug.normalize(aug.mae_flip(x01, gen, cfg.hflip), spec.mean, spec.std)]


def _two_views(cfg: TrainConfig, x01: torch.Tensor, spec: EncoderSpec, gen: torch.Generator) -> Views:
    view = aug.ViewConfig(spec.img_size[0], cfg.global_crop_scale)
    return [aug.normalize(aug.augmented_view(x01, view, gen), spec.mean, spec.std) for _ in range(2)]


def _multi_crop_views(cfg: TrainConfig, x01: torch.Tensor, spec: EncoderSpec, gen: torch.Generator) -> Views:
    crops = aug.multi_crop(x01, gen, 2, cfg.n_local_crops,
                           aug.ViewConfig(spec.img_size[0], cfg.global_crop_scale),
                           aug.ViewConfig(cfg.local_crop_size, cfg.local_crop_scale))
    return [aug.normalize(c, spec.mean, spec.std) for c in crops]


def _masked_multi_crop_views(cfg: TrainConfig, x01: torch.Tensor, spec: EncoderSpec,
                             gen: torch.Generator) -> Views:
    """DINO's crops, then one block mask ``[N, L]`` per global crop (drawn over the 2N global crops
    together, as DINOv2's collate). Masks are views of the batch, so torchrun shards them with it."""
    crops = _multi_crop_views(cfg, x01, spec, gen)
    n = x01.shape[0]
    masks = ibot_masks(2 * n, spec.grid_size, gen, cfg.ibot_mask_ratio, cfg.ibot_mask_probability)
    return crops + list(masks.view(2, n, -1).unbind(0))


@dataclass(frozen=True)
class Method:
    """How a method builds its module and its views of a batch ``[N, C, H, W]`` in [0, 1]."""

    build: Callable[[TrainConfig, nn.Module, EncoderSpec], nn.Module]
    views: Callable[[TrainConfig, torch.Tensor, EncoderSpec, torch.Generator], Views]
    schedules: tuple[str, ...] = ()  # names of the schedules_at values its forward/after_step take


METHOD_REGISTRY: dict[str, Method] = {
    "mae": Method(_build_mae, _flip_views),
    "dino": Method(_build_dino, _multi_crop_views, ("momentum", "teacher_temp")),
    "dinov2": Method(_build_dinov2, _masked_multi_crop_views, ("momentum", "teacher_temp")),
    "simclr": Method(_build_simclr, _two_views),
    "moco": Method(_build_moco, _two_views, ("momentum",)),
}


def schedules_at(cfg: TrainConfig, progress: float, total: float) -> dict[str, float]:
    """The per-step values the methods take: EMA ``momentum`` (cosine to 1 when
    ``momentum_cosine``) and DINO's ``teacher_temp`` (linear warm-up)."""
    momentum = momentum_schedule(progress, total, cfg.momentum) if cfg.momentum_cosine else cfg.momentum
    temp = warmup_schedule(progress, cfg.teacher_temp_warmup * total, cfg.teacher_temp_start, cfg.teacher_temp)
    return {"momentum": momentum, "teacher_temp": temp}


def weight_decay_at(cfg: TrainConfig, progress: float, total: float) -> float:
    """Weight decay of the decayed parameter group: constant, or DINO's cosine from
    ``weight_decay`` to ``weight_decay_end`` when that is set."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    return weight_decay_schedule(progress, total, cfg.weight_decay, cfg.weight_decay_end)


def build_model(cfg: TrainConfig, init: bool = True) -> tuple[nn.Module, EncoderSpec]:
    """The method module and encoder spec a config describes (timm's mean/std). The encoder starts
    from ``cfg.init_from`` when set and ``init`` (a resume passes False: its checkpoint has the
    weights), before the method copies it into a teacher / key encoder; random otherwise."""
    if cfg.method not in METHOD_REGISTRY:
        raise ConfigError(f"method {cfg.method!r} is not available; choose one of {sorted(METHOD_REGISTRY)}")
    patch = int(cfg.overrides.get("patch_size", 16))
    if cfg.method in ("dino", "dinov2") and cfg.local_crop_size % patch and cfg.n_local_crops:
        raise ConfigError(f"local_crop_size={cfg.local_crop_size} must be a multiple of the patch size")
    encoder, spec = create_encoder(cfg.model_name, cfg.overrides)
    if init and cfg.init_from:
        init_encoder(encoder, cfg.init_from, cfg.model_name, cfg.overrides)
    model = METHOD_REGISTRY[cfg.method].build(cfg, encoder, spec)
    for m in model.modules():
        if hasattr(m, "fused_attn"):  # timm Attention; not part of the state_dict
            m.fused_attn = cfg.fused_attn
    return model, spec
