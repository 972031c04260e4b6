"""Which tensors an exported encoder returns: the default pair, plus outputs chosen at export time.

The default export returns ``cls [N, D]`` and ``patch_tokens [N, h*w, D]`` (final layer, final norm)
through ``forward_features``; that graph never changes. An ``OutputSelection`` adds outputs read off
timm's ``forward_intermediates`` in the same single forward pass:

- ``patch_tokens_l<i>`` ``[N, h*w, D]``: patch tokens after block ``i`` (negative counts from the
  end, so ``-2`` is the penultimate block that LLaVA-style VLMs read),
- ``registers`` ``[N, R, D]``: DINOv2 register tokens after the last block,
- ``mean_patch`` ``[N, D]``: the mean of the last block's patch tokens,
- ``cls_attention`` ``[N, heads, h*w]``: the last block's CLS-query softmax weights over the patch
  keys (``export.attention``; prefix columns dropped, so each row sums to at most 1),

the token outputs each with the model's final norm (``model.norm``, as DINOv2's ``get_intermediate_layers(norm=True)``)
or, with ``final_norm=False``, without it. ``describe_outputs`` writes the manifest entry of every
output: block index, whether a real final norm was applied, and the token range in the block's
output sequence ``[prefix tokens, patch tokens]``, so clients never have to guess;
``selection_from_manifest`` reads the selection back from an exported entry's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from contract.manifest import Manifest
from contract.names import ATTENTION_OUTPUT, DEFAULT_OUTPUTS, layer_output_name
from export.attention import cls_attention, last_block_input
from export.errors import ExportUsageError
from training.backbone import EncoderSpec


@dataclass(frozen=True)
class OutputSelection:
    """Extra outputs on top of ``cls`` and ``patch_tokens`` (which are always there, unchanged).

    ``layers`` are block indices as the user wrote them (negative from the end); ``final_norm``
    applies to the extra outputs only.
    """

    layers: tuple[int, ...] = ()
    final_norm: bool = True
    registers: bool = False
    mean_patch: bool = False
    attention: bool = False  # cls_attention [N, heads, h*w]

    @property
    def is_default(self) -> bool:
        return not (self.layers or self.registers or self.mean_patch or self.attention)

    def names(self) -> tuple[str, ...]:
        """All output names in graph order: the default pair, layers as given, registers, mean_patch,
        cls_attention."""
        return (*DEFAULT_OUTPUTS, *(layer_output_name(i) for i in self.layers),
                *(("registers",) if self.registers else ()), *(("mean_patch",) if self.mean_patch else ()),
                *((ATTENTION_OUTPUT,) if self.attention else ()))


DEFAULT_SELECTION = OutputSelection()


def parse_layers(text: str) -> tuple[int, ...]:
    """``"-1,-2"`` -> ``(-1, -2)``; raises ``ExportUsageError`` for anything but comma-separated ints."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        layers = tuple(int(p) for p in parts)
    except ValueError as e:
        raise ExportUsageError(f"--layers takes comma-separated block indices like -1,-2; got {text!r}") from e
    if len(set(layers)) != len(layers):
        raise ExportUsageError(f"--layers lists a block twice: {text!r}")
    return layers


def block_index(index: int, depth: int) -> int:
    """Absolute block index of ``index`` (negative from the end) in a ``depth``-block model."""
    if not -depth <= index < depth:
        raise ExportUsageError(f"layer {index} does not exist: the model has {depth} blocks "
                               f"(valid: {-depth}..{depth - 1}, negative counting from the end)")
    return index % depth


def register_slice(prefix_names: Sequence[str]) -> tuple[int, int]:
    """``[start, stop)`` of the register tokens in the prefix (``cls, reg0..regR-1`` -> ``(1, 1+R)``)."""
    regs = [i for i, n in enumerate(prefix_names) if n.startswith("reg")]
    if not regs:
        return 0, 0
    return regs[0], regs[-1] + 1


def validate_selection(selection: OutputSelection, spec: EncoderSpec, prefix_names: Sequence[str]) -> None:
    """Raise ``ExportUsageError`` for layers the model lacks, layers naming one block twice, or
    ``registers`` on a model without register tokens."""
    blocks = [block_index(i, spec.depth) for i in selection.layers]
    if len(set(blocks)) != len(blocks):
        raise ExportUsageError(f"--layers {list(selection.layers)} name the same block twice "
                               f"(blocks {blocks} of {spec.depth})")
    if selection.registers and register_slice(prefix_names) == (0, 0):
        raise ExportUsageError(f"{spec.model_name} has no register tokens (prefix tokens: "
                               f"{', '.join(prefix_names) or 'none'}); drop --registers")
    if selection.attention and not spec.has_cls_token:
        raise ExportUsageError(f"{spec.model_name} has no CLS token, so it has no CLS attention; drop --attention")


def compute_outputs(model: nn.Module, spec: EncoderSpec, selection: OutputSelection,
                    x: torch.Tensor, prefix_names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """The selected outputs, in ``selection.names()`` order, for normalised input ``[N, C, H, W]``.

    The default selection is exactly the original export (``forward_features``); otherwise one
    ``forward_intermediates`` pass yields every requested block (its final features are
    ``norm(blocks(x))``, the same tensor ``forward_features`` returns).
    """
    p = spec.num_prefix_tokens
    if selection.is_default:
        tokens = model.forward_features(x)  # [N, P + h*w, D]
        patches = tokens[:, p:]
        return (tokens[:, 0] if spec.has_cls_token else patches.mean(dim=1)), patches
    last = spec.depth - 1
    blocks = sorted({block_index(i, spec.depth) for i in selection.layers} | {last})
    with last_block_input(model) as last_input:  # the attention is recomputed from it (fused in timm)
        out = model.forward_intermediates(x, indices=blocks, norm=False, output_fmt="NLC",
                                          return_prefix_tokens=True, output_dict=True)
    final = out["image_features"]  # [N, P + h*w, D], final norm applied
    raw = dict(zip(blocks, out["image_intermediates"]))  # block -> [N, h*w, D] without norm
    raw_prefix = dict(zip(blocks, out.get("image_intermediates_prefix") or [None] * len(blocks)))

    def normed(t: torch.Tensor) -> torch.Tensor:
        return model.norm(t) if selection.final_norm else t  # LayerNorm is per token

    patches = final[:, p:]
    results = [final[:, 0] if spec.has_cls_token else patches.mean(dim=1), patches]
    results += [normed(raw[block_index(i, spec.depth)]) for i in selection.layers]
    if selection.registers:
        start, stop = register_slice(prefix_names)
        results.append(normed(raw_prefix[last][:, start:stop]))
    if selection.mean_patch:
        results.append(normed(raw[last]).mean(dim=1))
    if selection.attention:
        results.append(cls_attention(model.blocks[-1], last_input[-1], p))
    return tuple(results)


def describe_outputs(spec: EncoderSpec, arch: dict[str, Any], selection: OutputSelection,
                     cls_what: str, patch_what: str) -> dict[str, dict[str, Any]]:
    """Manifest ``outputs``: name -> {dtype, shape, description, block, layer, final_norm, tokens, pooling}.

    ``tokens`` is ``[start, stop)`` in the block's output sequence (prefix tokens first, then the
    row-major patch grid); ``final_norm`` is true only where a real final norm was applied (models
    whose ``norm`` is an identity, e.g. MAE-style avg-pool ViTs, report false).
    """
    p, hw, d = spec.num_prefix_tokens, spec.num_patches, spec.embed_dim
    last = spec.depth - 1
    gh, gw = spec.grid_size
    has_norm = bool(arch["final_norm"])
    extra_norm = has_norm and selection.final_norm
    norm_text = "after the final norm" if extra_norm else (
        "WITHOUT the final norm" if has_norm else "WITHOUT a final norm (the model has none)")

    def entry(shape: list[int], description: str, block: int, layer: int, final_norm: bool,
              tokens: list[int], pooling: str | None) -> dict[str, Any]:
        return {"dtype": "float32", "shape": shape, "description": description, "block": block,
                "layer": layer, "final_norm": final_norm, "tokens": tokens, "pooling": pooling}

    outputs = {
        "cls": entry([-1, d], cls_what, last, -1, has_norm, [0, 1] if spec.has_cls_token else [p, p + hw],
                     None if spec.has_cls_token else "mean"),
        "patch_tokens": entry([-1, hw, d], patch_what, last, -1, has_norm, [p, p + hw], None),
    }
    for i in selection.layers:
        b = block_index(i, spec.depth)
        same = " (the same tensor as patch_tokens)" if b == last and extra_norm == has_norm else ""
        outputs[layer_output_name(i)] = entry(
            [-1, hw, d], f"patch tokens after block {b} (layer {i} of {spec.depth}) {norm_text}, "
            f"row-major {gh}x{gw} grid, tokens {p}..{p + hw - 1} of that block's output{same}",
            b, b - spec.depth, extra_norm, [p, p + hw], None)
    if selection.registers:
        start, stop = register_slice(arch["prefix_tokens"])
        outputs["registers"] = entry(
            [-1, stop - start, d], f"{stop - start} register tokens after the last block {norm_text} "
            f"(tokens {start}..{stop - 1}: {', '.join(arch['prefix_tokens'][start:stop])})",
            last, -1, extra_norm, [start, stop], None)
    if selection.mean_patch:
        outputs["mean_patch"] = entry(
            [-1, d], f"mean of the {hw} patch tokens of the last block {norm_text} (norm applied per "
            "token before the mean)", last, -1, extra_norm, [p, p + hw], "mean")
    if selection.attention:
        heads = int(arch["attention_heads"])
        outputs[ATTENTION_OUTPUT] = {
            **entry([-1, heads, hw], f"softmax attention weights of the CLS query of the last block "
                    f"(block {last}) over the {hw} patch keys, per head ({heads}), row-major {gh}x{gw} grid; "
                    f"the softmax runs over all {p + hw} keys and the {p} prefix column(s) "
                    f"({', '.join(arch['prefix_tokens'])}) are dropped, so each row sums to <= 1",
                    last, -1, False, [p, p + hw], None),
            "heads": heads}
    return outputs


def output_dims(spec: EncoderSpec, arch: dict[str, Any], selection: OutputSelection) -> list[tuple[str, tuple[int, ...]]]:
    """(name, per-item dims without the batch axis) of every output, in graph order."""
    described = describe_outputs(spec, arch, selection, "", "")
    return [(name, tuple(described[name]["shape"][1:])) for name in selection.names()]


def selection_from_manifest(manifest: Manifest | Mapping[str, Any]) -> OutputSelection:
    """The ``OutputSelection`` an exported entry was built with, read back from its manifest's ``outputs``."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_dict(manifest)
    outputs = manifest.outputs or {}
    prefix = layer_output_name(0)[:-1]  # "patch_tokens_l"
    layers = tuple(int(n[len(prefix):]) for n in outputs if n.startswith(prefix))
    extras = [v for n, v in outputs.items() if n not in (*DEFAULT_OUTPUTS, ATTENTION_OUTPUT)]
    has_norm = bool((manifest.architecture or {}).get("final_norm", True))
    final_norm = bool(extras[0].get("final_norm", True)) if extras and has_norm else True
    return OutputSelection(layers=layers, final_norm=final_norm, registers="registers" in outputs,
                           mean_patch="mean_patch" in outputs, attention=ATTENTION_OUTPUT in outputs)
