"""Layer-wise lr decay and the patch-embedding lr scale (DINOv2's param groups)."""

from __future__ import annotations

import pytest
import torch

from training.config import TrainConfig
from training.methods import build_model
from training.param_groups import layer_id, lr_scale, param_groups
from training.train import train_step

TINY = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 16, "depth": 2, "num_heads": 2}


def test_layer_ids_and_scales():
    assert [layer_id(n, 2) for n in ("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight",
                                     "patch_mask_token", "module.encoder.blocks.0.attn.qkv.weight",
                                     "encoder.blocks.1.mlp.fc1.bias", "encoder.norm.weight", "head.last_weight",
                                     "mask_token")] == [0, 0, 0, 0, 1, 2, 3, 3, 3]  # MAE's decoder mask token: a head
    assert lr_scale("encoder.blocks.0.norm1.weight", 2, 0.5) == pytest.approx(0.25)  # 0.5 ** (3 - 1)
    assert lr_scale("encoder.patch_embed.proj.weight", 2, 0.5, 0.2) == pytest.approx(0.5 ** 3 * 0.2)
    assert lr_scale("head.mlp.0.weight", 2, 0.5, 0.2) == 1.0


def test_groups_two_when_off_and_train_step_scales_the_lr():
    cfg = TrainConfig.for_method("dino", overrides=dict(TINY), dino_out_dim=8, head_hidden_dim=8,
                                 head_bottleneck_dim=4, n_local_crops=0)
    model, _ = build_model(cfg)
    plain = param_groups(model, 0.04)
    assert [(g["weight_decay"], g["lr_scale"]) for g in plain] == [(0.04, 1.0), (0.0, 1.0)]
    groups = param_groups(model, 0.04, layer_decay=0.5, patch_embed_lr_scale=0.2)
    assert groups[0]["lr_scale"] == 1.0 and groups[0]["weight_decay"] == 0.04  # decayed, full-lr group first
    named = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            assert g["lr_scale"] == pytest.approx(lr_scale(named[id(p)], 2, 0.5, 0.2))
            assert (g["weight_decay"] == 0) == (p.ndim <= 1 or named[id(p)].endswith(("token", "pos_embed")))
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    opt = torch.optim.AdamW(groups)
    x = torch.rand(4, 1, 28, 28)
    train_step(model, opt, [x, x.flip(-1)], 1e-3, False, {"momentum": 0.9, "teacher_temp": 0.04})
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx(sorted({1e-3 * g["lr_scale"] for g in groups}))
