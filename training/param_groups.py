"""AdamW parameter groups: weight decay on matrices only, and per-group learning-rate scales for
layer-wise lr decay and the patch-embedding lr scale (DINOv2, Oquab et al. 2024, §4 and
``dinov2/train/param_groups.py``; layer decay from BEiT / ELECTRA).

A group's ``lr_scale`` multiplies the scheduled lr (``training.train.train_step``) and its
``wd_scale`` (1 or 0) the scheduled weight decay. With ``layer_decay = 1`` and
``patch_embed_lr_scale = 1`` there are exactly two groups, decayed first, as before these options.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# The method module's own input embeddings (DINOv2's mask token) sit with the encoder's at layer 0.
INPUT_EMBEDDING_NAMES = ("patch_mask_token",)


def layer_id(name: str, depth: int) -> int:
    """Layer of a parameter of a method module for layer-wise lr decay: 0 for the input embeddings
    (patch embedding, CLS / register tokens, position embedding, mask token), ``i + 1`` for encoder
    block ``i``, ``depth + 1`` for everything after the blocks (final norm, heads, decoders)."""
    name = name.removeprefix("module.")  # DDP
    if name in INPUT_EMBEDDING_NAMES:
        return 0
    if not name.startswith("encoder."):
        return depth + 1
    rest = name[len("encoder."):]
    if rest.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed")):
        return 0
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    return depth + 1


def lr_scale(name: str, depth: int, layer_decay: float = 1.0, patch_embed_lr_scale: float = 1.0) -> float:
    """``layer_decay ** (depth + 1 - layer_id)``, times ``patch_embed_lr_scale`` for the patch embedding."""
    scale = layer_decay ** (depth + 1 - layer_id(name, depth))
    if ".patch_embed." in f".{name.removeprefix('module.')}":
        scale *= patch_embed_lr_scale
    return scale


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 patch_embed_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only (biases, norms and tokens exempt, as MAE), split
    further by lr scale; decayed groups first. Only trainable parameters (teachers are left out)."""
    core = getattr(model, "module", model)  # DDP
    depth = len(core.encoder.blocks) if hasattr(core, "encoder") else 0
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or name.endswith(("token", "pos_embed"))
        scale = lr_scale(name, depth, layer_decay, patch_embed_lr_scale)
        key = (not exempt, scale)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if exempt else weight_decay,
                           "wd_scale": 0.0 if exempt else 1.0, "lr_scale": scale}
        groups[key]["params"].append(p)
    order = sorted(groups, key=lambda k: (not k[0], -k[1]))
    return [groups[k] for k in order]
