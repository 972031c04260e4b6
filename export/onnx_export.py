"""ONNX export of a timm ViT encoder with the preprocessing folded into the graph, and its parity gate.

The exported graph takes what clients send — uint8 images ``[N, H, W, C]`` — and returns the final-norm
CLS token ``[N, D]`` and patch tokens ``[N, h*w, D]`` (register tokens skipped). Export follows timm's
``onnx_export.py``: exportable layers (no fused attention), a fixed resolution, the ONNX checker, then a
numeric comparison of ONNX Runtime against the PyTorch model on real images.

torch 2.14 defaults to the dynamo exporter, which needs ``onnxscript``; the TorchScript exporter
(``dynamo=False``) needs nothing extra and exports these ViTs exactly, so it is the one used here.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from training.backbone import EncoderSpec

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAMES = ("cls", "patch_tokens")
DEFAULT_OPSET = 17  # >= 17 keeps LayerNormalization as one node (no fp16 overflow in its parts)
DEFAULT_TOLERANCE = 1e-4
DEFAULT_PARITY_IMAGES = 64
TORCH_EXPORTER = "torchscript"  # torch.onnx.export(..., dynamo=False)


class ExportError(RuntimeError):
    """An export could not be produced or failed its checks; the message says which and why."""


class ExportUsageError(ExportError, ValueError):
    """The user asked for something that cannot be exported (bad run dir, name, existing model...)."""


class ExportableEncoder(nn.Module):
    """uint8 images ``[N, H, W, C]`` -> (``cls [N, D]``, ``patch_tokens [N, h*w, D]``, extras) in one graph.

    The preprocessing is ``training.data.to_float_nchw`` op for op (permute, cast, /255, -mean, /std),
    so the served model sees exactly the pixels training saw. Tokens come from ``forward_features``
    (after the final norm); the first ``spec.num_prefix_tokens`` tokens (CLS, then registers) are not
    patches. A model without a CLS token reports the mean patch token as ``cls``. ``selection``
    (``export.outputs.OutputSelection``) appends the outputs chosen at export time.
    """

    def __init__(self, model: nn.Module, spec: EncoderSpec, selection: Any = None) -> None:
        super().__init__()
        from export.architecture import prefix_token_names
        from export.outputs import DEFAULT_SELECTION, validate_selection

        if len(spec.mean) != spec.in_chans or len(spec.std) != spec.in_chans:
            raise ExportUsageError(
                f"encoder spec has {spec.in_chans} channels but mean={spec.mean} std={spec.std}")
        self.model = model
        self.spec = spec
        self.selection = selection or DEFAULT_SELECTION
        self.prefix_names = prefix_token_names(model, spec) if not self.selection.is_default else []
        validate_selection(self.selection, spec, self.prefix_names)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from export.outputs import compute_outputs

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


def _check_images(images: np.ndarray, spec: EncoderSpec) -> np.ndarray:
    images = np.asarray(images)
    expected = (*spec.img_size, spec.in_chans)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ExportUsageError(
            f"parity images must be uint8 [N, {expected[0]}, {expected[1]}, {expected[2]}], "
            f"got {images.dtype} {list(images.shape)}")
    if len(images) == 0:
        raise ExportUsageError("parity needs at least one image")
    return images


def export_onnx(model: nn.Module, spec: EncoderSpec, path: str | Path, opset: int = DEFAULT_OPSET,
                selection: Any = None) -> Path:
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


def default_parity_images(spec: EncoderSpec, n: int = DEFAULT_PARITY_IMAGES) -> tuple[np.ndarray, str]:
    """Images for the parity gate and a description: Fashion-MNIST test images when the encoder takes
    28x28x1, otherwise (or when the data set is absent) deterministic uniform random uint8 images."""
    if tuple(spec.img_size) == (28, 28) and spec.in_chans == 1:
        from training.data import DataError, load_fashion_mnist

        try:
            return load_fashion_mnist("test").images[:n], f"fashion-mnist test[:{n}]"
        except DataError as e:
            log.warning("Fashion-MNIST unavailable for the parity check, using random images: %s", e)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, *spec.img_size, spec.in_chans), dtype=np.uint8)
    return images, f"uniform random uint8 (seed 0, n={n})"


def ort_providers() -> list[Any]:
    """ONNX Runtime providers to check: CPU always, CUDA too when torch sees a GPU (TF32 off)."""
    import onnxruntime as ort

    providers: list[Any] = ["CPUExecutionProvider"]
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        # TF32 matmuls would put ~1e-3 errors on fp32 outputs and hide real export bugs.
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": 0}))
    return providers


def _reference(model: nn.Module, spec: EncoderSpec, images: np.ndarray, batch: int,
               selection: Any = None) -> dict[str, np.ndarray]:
    """The PyTorch model as trained (fused attention, ``to_float_nchw``) in fp32 on CPU."""
    from export.architecture import prefix_token_names
    from export.outputs import DEFAULT_SELECTION, compute_outputs
    from training.data import to_float_nchw

    selection = selection or DEFAULT_SELECTION
    prefix = prefix_token_names(model, spec) if not selection.is_default else []
    outs: dict[str, list[np.ndarray]] = {k: [] for k in selection.names()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = to_float_nchw(images[i:i + batch], spec.mean, spec.std)
                for name, value in zip(outs, compute_outputs(model, spec, selection, x, prefix)):
                    outs[name].append(value.float().numpy())
    finally:
        model.train(was_training)
    return {k: np.concatenate(v) for k, v in outs.items()}


def check_parity(
    model: nn.Module,
    spec: EncoderSpec,
    onnx_path: str | Path,
    images: np.ndarray | None = None,
    tol: float = DEFAULT_TOLERANCE,
    batch_sizes: Sequence[int] = (1, 32),
    data: str | None = None,
    selection: Any = None,
) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch fp32 on uint8 ``images [N, H, W, C]``; raise above ``tol``.

    Every image goes through ORT at each batch size (so batching cannot change results) and through
    every available provider. Returns ``{max_abs_err: {output: err}, n_images, tolerance, data,
    batch_sizes, providers}`` with the worst error over all runs; ``ExportError`` when any output's
    error exceeds ``tol`` or is not finite.
    """
    import onnxruntime as ort

    if images is None:
        images, default_data = default_parity_images(spec)
        data = data or default_data
    images = _check_images(images, spec)
    data = data or f"{len(images)} caller-supplied images"
    batch_sizes = sorted({max(1, min(int(b), len(images))) for b in batch_sizes})
    ref = _reference(model, spec, images, max(batch_sizes), selection)
    names = list(ref)  # every output of the graph: the default pair and the selected extras
    errors = {k: 0.0 for k in names}
    used: list[str] = []
    for provider in ort_providers():
        options = ort.SessionOptions()
        session = ort.InferenceSession(str(onnx_path), options, providers=[provider])
        used.append(session.get_providers()[0])
        for b in batch_sizes:
            for i in range(0, len(images), b):
                got = session.run(names, {INPUT_NAME: images[i:i + b]})
                for name, value in zip(names, got):
                    expected = ref[name][i:i + b]
                    if value.shape != expected.shape:
                        raise ExportError(f"ONNX output {name} has shape {list(value.shape)}, "
                                          f"PyTorch gives {list(expected.shape)} (batch {b})")
                    err = float(np.max(np.abs(value.astype(np.float64) - expected)))
                    if not np.isfinite(err) or err > errors[name]:  # NaN/inf must stick
                        errors[name] = err
    result = {"max_abs_err": errors, "n_images": int(len(images)), "tolerance": float(tol),
              "data": data, "batch_sizes": batch_sizes, "providers": used}
    bad = {k: v for k, v in errors.items() if not (np.isfinite(v) and v <= tol)}
    if bad:
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch beyond tolerance {tol:g}: "
            + ", ".join(f"{k} max_abs_err={v:.3g}" for k, v in bad.items())
            + f" ({len(images)} images, {data}, providers {used})")
    log.info("parity ok on %d images (%s): %s", len(images), data,
             ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    return result
