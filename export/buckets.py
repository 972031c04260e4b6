"""Resolution buckets: one fixed-size model entry per input size, position embeddings resampled at export.

Dynamic-size position-embedding interpolation does not export cleanly, so each size is its own graph:
the first size listed is the entry ``<name>``, every other one ``<name>_r<H>`` (``<name>_r<H>x<W>``
when not square). The encoder for a size is a copy of the model after timm's own
``VisionTransformer.set_input_size``, which resamples the absolute position embedding with
``timm.layers.resample_abs_pos_embed`` (bicubic, prefix tokens kept) - the same rule timm applies
when loading a checkpoint at another size and at run time with ``dynamic_img_size=True``.
Every entry's manifest lists all buckets (``size``, ``grid``, ``model``) so a gateway can route an
image to the entry of its size.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from torch import nn

from export.errors import ExportUsageError
from training.backbone import EncoderSpec, spec_of

_SIZE = re.compile(r"^(\d+)(?:x(\d+))?$")


def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """``"224,336"`` -> ``[(224, 224), (336, 336)]``; ``"224x320"`` is H x W. Duplicates are refused."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _SIZE.match(part)
        if not m:
            raise ExportUsageError(f"--resolutions takes sizes like 224,336 or 224x320; got {part!r}")
        h = int(m.group(1))
        sizes.append((h, int(m.group(2) or h)))
    if not sizes:
        raise ExportUsageError("--resolutions lists no size")
    if len(set(sizes)) != len(sizes):
        raise ExportUsageError(f"--resolutions lists a size twice: {text!r}")
    return sizes


def bucket_suffix(size: tuple[int, int]) -> str:
    """``(336, 336)`` -> ``_r336``; ``(224, 320)`` -> ``_r224x320``."""
    h, w = size
    return f"_r{h}" if h == w else f"_r{h}x{w}"


def bucket_names(name: str, sizes: list[tuple[int, int]]) -> list[str]:
    """Entry names: the first size is ``name`` itself, the others ``name`` plus ``bucket_suffix``."""
    return [name if i == 0 else name + bucket_suffix(s) for i, s in enumerate(sizes)]


def resize_encoder(model: nn.Module, spec: EncoderSpec, size: tuple[int, int]) -> tuple[nn.Module, EncoderSpec]:
    """A copy of ``model`` for input ``size`` (position embedding resampled) and its spec.

    The original model is left untouched; the spec's ``overrides`` get the new ``img_size`` so that
    ``build_from_spec`` rebuilds the same architecture.
    """
    size = (int(size[0]), int(size[1]))
    ph, pw = spec.patch_size
    if size[0] % ph or size[1] % pw or min(size) <= 0:
        raise ExportUsageError(f"resolution {size[0]}x{size[1]} is not a positive multiple of the patch "
                               f"size {ph}x{pw} of {spec.model_name}")
    if size == tuple(spec.img_size):
        return model, spec
    if not hasattr(model, "set_input_size"):
        raise ExportUsageError(f"{type(model).__name__} cannot change its input size (no set_input_size)")
    resized = copy.deepcopy(model)
    resized.set_input_size(img_size=size)
    overrides: dict[str, Any] = {**spec.overrides, "img_size": size[0] if size[0] == size[1] else list(size)}
    new_spec = spec_of(resized, spec.model_name, overrides, spec.mean, spec.std)
    return resized.eval(), new_spec


def bucket_table(names: list[str], specs: list[EncoderSpec]) -> list[dict[str, Any]]:
    """The manifest's ``buckets``: ``[{"size": [H, W], "grid": [h, w], "model": name}, ...]``."""
    return [{"size": list(s.img_size), "grid": list(s.grid_size), "model": n} for n, s in zip(names, specs)]
