"""ViT backbones from timm and the encoder spec that travels with every run and export.

The *encoder spec* is the contract between stages: training writes it, export reads it to rebuild
the exact architecture, serving reports it to clients. It records the timm name and the keyword
overrides passed to ``timm.create_model``, plus the derived facts a consumer needs (grid, embed
dim, prefix tokens, input size and channels, normalisation).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

# A small ViT for 28x28 grey Fashion-MNIST: patch 4 -> 7x7 grid, 192-d, 6 blocks (~2.7M params).
# It trains a few hundred images per second on 2 CPU cores in bf16.
DEFAULT_MODEL_NAME = "vit_tiny_patch16_224"
DEFAULT_OVERRIDES: dict[str, Any] = {
    "img_size": 28,
    "patch_size": 4,
    "in_chans": 1,
    "embed_dim": 192,
    "depth": 6,
    "num_heads": 3,
}
# Fashion-MNIST pixel statistics over the training split (uint8 / 255).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

SPEC_FILENAME = "encoder_spec.json"


class BackboneError(ValueError):
    """A backbone cannot be built from what the user asked for."""


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder and to interpret its outputs."""

    model_name: str
    overrides: dict[str, Any]
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    in_chans: int
    embed_dim: int
    depth: int
    num_prefix_tokens: int
    num_register_tokens: int
    has_cls_token: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    timm_version: str = field(default_factory=lambda: timm.__version__)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        missing = known - set(d) - {"timm_version"}
        if missing:
            raise BackboneError(f"encoder spec is missing fields: {sorted(missing)}")
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("img_size", "patch_size", "grid_size", "mean", "std"):
            kw[k] = tuple(kw[k])
        return cls(**kw)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SPEC_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EncoderSpec":
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILENAME
        if not path.is_file():
            raise BackboneError(f"no encoder spec at {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise BackboneError(f"encoder spec {path} is not valid JSON: {e}") from e


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def create_encoder(
    model_name: str = DEFAULT_MODEL_NAME,
    overrides: dict[str, Any] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> tuple[nn.Module, EncoderSpec]:
    """Build a headless timm ViT (``num_classes=0``) and its encoder spec.

    ``overrides`` are keyword arguments for ``timm.create_model`` (img_size, patch_size, in_chans,
    embed_dim, depth, num_heads, reg_tokens, ...). Weights are random; load a state dict to restore.
    """
    overrides = dict(DEFAULT_OVERRIDES if overrides is None and model_name == DEFAULT_MODEL_NAME
                     else (overrides or {}))
    if not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name.split('_')[0]}*")[:8]
        raise BackboneError(f"unknown timm model {model_name!r}; similar names: {close}")
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **overrides)
    except TypeError as e:
        raise BackboneError(f"timm model {model_name!r} rejected overrides {overrides}: {e}") from e
    if not hasattr(model, "patch_embed") or not hasattr(model, "blocks"):
        raise BackboneError(f"{model_name!r} is not a ViT-style model (no patch_embed/blocks)")
    spec = spec_of(model, model_name, overrides, mean, std)
    return model, spec


def spec_of(
    model: nn.Module,
    model_name: str,
    overrides: dict[str, Any],
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> EncoderSpec:
    """Read the encoder spec off a built timm ViT."""
    pe = model.patch_embed
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    in_chans = int(pe.proj.in_channels)
    if mean is None:
        mean = tuple(cfg.get("mean", (0.5,) * in_chans))
    if std is None:
        std = tuple(cfg.get("std", (0.5,) * in_chans))
    if len(mean) != in_chans:  # e.g. a 3-channel default on a 1-channel override
        mean = (float(sum(mean) / len(mean)),) * in_chans
        std = (float(sum(std) / len(std)),) * in_chans
    num_reg = int(getattr(model, "num_reg_tokens", 0))
    return EncoderSpec(
        model_name=model_name,
        overrides=dict(overrides),
        img_size=_pair(pe.img_size),
        patch_size=_pair(pe.patch_size),
        grid_size=_pair(pe.grid_size),
        in_chans=in_chans,
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
        num_register_tokens=num_reg,
        has_cls_token=getattr(model, "cls_token", None) is not None,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def build_from_spec(spec: EncoderSpec) -> nn.Module:
    """Rebuild the (randomly initialised) encoder an encoder spec describes."""
    model, rebuilt = create_encoder(spec.model_name, spec.overrides, spec.mean, spec.std)
    if (rebuilt.embed_dim, rebuilt.grid_size) != (spec.embed_dim, spec.grid_size):
        raise BackboneError(
            f"spec says embed_dim={spec.embed_dim} grid={spec.grid_size} but timm "
            f"{timm.__version__} builds embed_dim={rebuilt.embed_dim} grid={rebuilt.grid_size}")
    return model


def parse_override_value(text: str) -> Any:
    """Parse ``key=value`` override values: ints, floats, bools, JSON lists, else strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def cls_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits feature ``[N, D]`` (timm's ``forward_head(pre_logits=True)``: CLS or avg)
    for input ``[N, C, H, W]`` of the encoder's size *or any other multiple of the patch size*.

    Other sizes (DINO's local crops) get timm's bicubic resampling of the absolute position
    embedding, the same as ``dynamic_img_size=True`` would do, while the encoder itself stays a
    fixed-size model, so its spec and ONNX export do not change.
    """
    if tuple(x.shape[-2:]) == tuple(model.patch_embed.img_size):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    return model.forward_head(encoder_tokens(model, x), pre_logits=True)


def encoder_tokens(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
                   mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """Final-normed tokens ``[N, prefix + h*w, D]`` of a timm ViT for input ``[N, C, H, W]`` of any
    multiple of the patch size (position embedding resampled as :func:`cls_features`).

    With ``mask [N, h*w]`` (bool, True = masked) the patch embeddings at masked positions are
    replaced by ``mask_token [D]`` before the position embedding is added and the blocks run, as
    DINOv2's / iBOT's student (``DinoVisionTransformer.prepare_tokens_with_masks``). timm's ViT has no
    mask token, so the caller owns it: the encoder's own weights and forward (what export reads) stay
    those of a plain timm ViT.
    """
    from timm.layers import resample_abs_pos_embed

    p = model.patch_embed.patch_size
    if x.shape[-2] % p[0] or x.shape[-1] % p[1]:
        raise BackboneError(f"input {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
    tokens = model.patch_embed.proj(x)  # [N, D, h, w]
    grid = tokens.shape[-2:]
    tokens = model.patch_embed.norm(tokens.flatten(2).transpose(1, 2))  # [N, h*w, D]
    if mask is not None:
        if mask_token is None or mask.shape != tokens.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} needs a mask_token and shape {tuple(tokens.shape[:2])}")
        tokens = torch.where(mask.unsqueeze(-1), mask_token.to(tokens.dtype).view(1, 1, -1), tokens)
    prefix = [t.expand(len(x), -1, -1) for t in (getattr(model, "cls_token", None),
                                                  getattr(model, "reg_token", None)) if t is not None]
    pos = getattr(model, "pos_embed", None)
    if pos is not None:
        no_embed_class = getattr(model, "no_embed_class", False)
        pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(model.patch_embed.grid_size),
                                     num_prefix_tokens=0 if no_embed_class else model.num_prefix_tokens)
        if no_embed_class:
            tokens = torch.cat(prefix + [tokens + pos], dim=1)
        else:
            tokens = torch.cat(prefix + [tokens], dim=1) + pos
    else:
        tokens = torch.cat(prefix + [tokens], dim=1)
    tokens = model.norm_pre(model.patch_drop(model.pos_drop(tokens)))
    return model.norm(model.blocks(tokens))
