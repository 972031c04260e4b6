"""ONNX export of a timm ViT encoder with the preprocessing folded into the graph.

The exported graph takes what clients send — uint8 images ``[N, H, W, C]`` — and returns the final-norm
CLS token ``[N, D]`` and patch tokens ``[N, h*w, D]`` (register tokens skipped), plus the outputs an
``export.outputs.OutputSelection`` adds. Export follows timm's ``onnx_export.py``: exportable layers
(no fused attention), a fixed resolution, then the ONNX checker; the numeric comparison of ONNX Runtime
against the PyTorch model is ``export.gate.check_parity``.

torch 2.14 defaults to the dynamo exporter, which needs ``onnxscript``; the TorchScript exporter
(``dynamo=False``) needs nothing extra and exports these ViTs exactly, so it is the one used here.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from contract.names import INPUT_NAME
from export.architecture import prefix_token_names
from export.attention import last_attention
from export.errors import ExportError, ExportUsageError
from export.outputs import DEFAULT_SELECTION, OutputSelection, compute_outputs, validate_selection
from training.backbone import EncoderSpec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # >= 17 keeps LayerNormalization as one node (no fp16 overflow in its parts)
TORCH_EXPORTER = "torchscript"  # torch.onnx.export(..., dynamo=False)


class ExportableEncoder(nn.Module):
    """uint8 images ``[N, H, W, C]`` -> (``cls [N, D]``, ``patch_tokens [N, h*w, D]``, extras) in one graph.

    The preprocessing is ``training.data.to_float_nchw`` op for op (permute, cast, /255, -mean, /std),
    so the served model sees exactly the pixels training saw. Tokens come from ``forward_features``
    (after the final norm); the first ``spec.num_prefix_tokens`` tokens (CLS, then registers) are not
    patches. A model without a CLS token reports the mean patch token as ``cls``. ``selection``
    (``export.outputs.OutputSelection``) appends the outputs chosen at export time.
    """

    def __init__(self, model: nn.Module, spec: EncoderSpec, selection: OutputSelection | None = None) -> None:
        super().__init__()
        if len(spec.mean) != spec.in_chans or len(spec.std) != spec.in_chans:
            raise ExportUsageError(
                f"encoder spec has {spec.in_chans} channels but mean={spec.mean} std={spec.std}")
        self.model = model
        self.spec = spec
        self.selection = selection or DEFAULT_SELECTION
        self.prefix_names = prefix_token_names(model, spec) if not self.selection.is_default else []
        validate_selection(self.selection, spec, self.prefix_names)
        if self.selection.attention:
            last_attention(model)  # raises for a block whose attention weights it cannot recompute
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.permute(0, 3, 1, 2).float().div(255.0)  # [N, C, H, W] in [0, 1]
        x = (x - self.mean) / self.std
        return compute_outputs(self.model, self.spec, self.selection, x, self.prefix_names)


@contextlib.contextmanager
def exportable_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off fused attention (``F.scaled_dot_product_attention``) on every timm block, then restore.

    timm reads ``use_fused_attn()`` when a block is *built*, so the global ``set_fused_attn(False)``
    does not reach an existing model; the per-module flag is what the forward pass checks.
    """
    flipped = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    for m in flipped:
        m.fused_attn = False
    try:
        yield model
    finally:
        for m in flipped:
            m.fused_attn = True


def export_onnx(model: nn.Module, spec: EncoderSpec, path: str | Path, opset: int = DEFAULT_OPSET,
                selection: OutputSelection | None = None) -> Path:
    """Export ``model`` as uint8 ``[N, H, W, C]`` -> (cls, patch_tokens, extras) ONNX, dynamic batch axis.

    The graph is checked with ``onnx.checker`` and carries the encoder spec as metadata;
    ``selection`` (``export.outputs.OutputSelection``) adds the outputs chosen at export time.
    """
    import json

    import onnx

    if opset < 17:
        raise ExportUsageError(f"opset {opset} < 17 splits LayerNorm into parts; use opset >= 17")
    path = Path(path)
    was_training = model.training
    model.eval()
    wrapper = ExportableEncoder(model, spec, selection).eval()
    output_names = list(wrapper.selection.names())
    h, w = spec.img_size
    example = torch.zeros((2, h, w, spec.in_chans), dtype=torch.uint8)
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)}
    t0 = time.perf_counter()
    try:
        with exportable_attention(model), torch.no_grad(), warnings.catch_warnings():
            # The legacy-exporter deprecation and timm's constant shape asserts are expected here.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                wrapper, (example,), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=output_names, dynamic_axes=dynamic,
                do_constant_folding=True)
    except Exception as e:  # the exporter raises many types; all mean "this model does not export"
        raise ExportError(f"torch.onnx.export failed for {spec.model_name}: {e}") from e
    finally:
        model.train(was_training)
    proto = onnx.load(str(path))
    proto.producer_name = "vitserve"
    for key, value in (("vitserve_encoder_spec", json.dumps(spec.to_dict(), separators=(",", ":"))),
                       ("vitserve_outputs", ",".join(output_names))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"exported graph {path} fails the ONNX checker: {e}") from e
    log.info("exported %s to %s (opset %d, %.1f MB) in %.1fs", spec.model_name, path, opset,
             path.stat().st_size / 1e6, time.perf_counter() - t0)
    return path
