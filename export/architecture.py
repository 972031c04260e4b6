"""What an exported timm ViT's token sequence means: prefix tokens, norms and pooling, read off the model.

The encoder spec (training/backbone.py) says *how many* prefix tokens a model has; consumers of a
served model also need to know *which* ones (CLS, DeiT's distillation token, DINOv2's registers) and
whether the tokens they receive went through a final norm. The latter differs between families:
timm ViTs built with ``global_pool='avg'`` (MAE fine-tuning style) replace the final ``norm`` by an
``fc_norm`` applied *after* pooling, so their ``forward_features`` tokens are not normalised; CLIP
ViTs add a ``norm_pre`` before the blocks; DINOv2 blocks carry LayerScale.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from export.errors import ExportUsageError
from training.backbone import EncoderSpec


def _is_real(module: Any) -> bool:
    """True for a module that does something (not ``None`` and not ``nn.Identity``)."""
    return isinstance(module, nn.Module) and not isinstance(module, nn.Identity)


def prefix_token_names(model: nn.Module, spec: EncoderSpec) -> list[str]:
    """Names of the prefix tokens in sequence order, e.g. ``["cls", "reg0", ...]`` or ``["cls", "dist"]``.

    timm concatenates ``[cls_token, reg_token]`` (VisionTransformer) or ``[cls_token, dist_token]``
    (VisionTransformerDistilled) in front of the patches. Raises when the count disagrees with
    ``spec.num_prefix_tokens`` (a model family this function does not understand yet).
    """
    names = ["cls"] if getattr(model, "cls_token", None) is not None else []
    names += [f"reg{i}" for i in range(int(getattr(model, "num_reg_tokens", 0) or 0))]
    if getattr(model, "dist_token", None) is not None:
        names.append("dist")
    if len(names) != spec.num_prefix_tokens:
        raise ExportUsageError(
            f"{spec.model_name}: found prefix tokens {names} on the model but the encoder spec says "
            f"{spec.num_prefix_tokens}; this timm model family is not supported by the exporter yet")
    return names


def describe_architecture(model: nn.Module, spec: EncoderSpec) -> dict[str, Any]:
    """The manifest's ``architecture`` entry: timm class, prefix tokens, norms, pooling, LayerScale."""
    blocks = list(getattr(model, "blocks", []))
    layer_scale = any(_is_real(getattr(b, "ls1", None)) for b in blocks)
    return {
        "timm_class": type(model).__name__,
        "prefix_tokens": prefix_token_names(model, spec),
        "final_norm": _is_real(getattr(model, "norm", None)),
        "pre_norm": _is_real(getattr(model, "norm_pre", None)),
        "fc_norm": _is_real(getattr(model, "fc_norm", None)),
        "global_pool": str(getattr(model, "global_pool", "") or ""),
        "layer_scale": layer_scale,
        "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False)),
    }


def output_descriptions(spec: EncoderSpec, arch: dict[str, Any]) -> tuple[str, str]:
    """Human-readable descriptions of the ``cls`` and ``patch_tokens`` outputs for the manifest."""
    norm = ("after the final norm" if arch["final_norm"] else
            "WITHOUT a final norm (this model has none: it normalises after pooling, fc_norm="
            f"{arch['fc_norm']}, global_pool={arch['global_pool']!r})")
    if spec.has_cls_token:
        cls_what = f"CLS token {norm}"
    else:
        cls_what = f"mean of the patch tokens {norm} (the model has no CLS token)"
    gh, gw = spec.grid_size
    prefix = ", ".join(arch["prefix_tokens"]) or "none"
    patch_what = (f"patch tokens {norm}, row-major {gh}x{gw} grid, {spec.num_prefix_tokens} prefix "
                  f"token(s) removed ({prefix})")
    return cls_what, patch_what
