"""The one quality gate of an export: reference outputs, output comparison, and the judgement.

Every check compares what a served graph returns with the PyTorch model as trained (fused attention,
``training.data.to_float_nchw``, fp32 on CPU: ``reference_outputs``), output by output:

- the parity gate of the fp32 ONNX graph (``check_parity``): max abs error of every output, through
  ONNX Runtime at several batch sizes and on every available provider, against ``tolerance``;
- the gate of a precision variant or a TensorRT engine (``judge`` on ``gate_data``): max abs error and
  mean cosine of every output (``compare_outputs``), each judged on its own, on Fashion-MNIST
  images (resized and channel-repeated to the model's input when it is not 28x28x1), and the change
  of weighted k-NN accuracy (DINO protocol, ``training.knn``) with ``cls`` features, with a paired
  confidence statement over the query images (``knn_drop_confidence``: bootstrap interval and exact
  McNemar test). ``VariantGate`` holds the thresholds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from contract.names import CLS_OUTPUT, INPUT_NAME
from export.architecture import prefix_token_names
from export.errors import ExportError, ExportUsageError
from export.outputs import DEFAULT_SELECTION, OutputSelection, compute_outputs
from training.backbone import EncoderSpec
from training.knn import knn_predict

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
DEFAULT_PARITY_IMAGES = 64

Outputs = dict[str, np.ndarray]
Runner = Callable[[np.ndarray, Sequence[str]], Outputs]


# --- what is compared ---------------------------------------------------------------------------

def reference_outputs(model: nn.Module, spec: EncoderSpec, images: np.ndarray, batch: int = 64,
                      selection: OutputSelection | None = None) -> Outputs:
    """Every output of ``selection`` from the PyTorch model as trained (fused attention, ``to_float_nchw``)
    in fp32 on CPU, for uint8 ``images [N, H, W, C]``."""
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


def run_onnx(onnx_path: str | Path, images: np.ndarray, batch: int = 64,
             names: Sequence[str] | None = None) -> Outputs:
    """Every output of the graph (or ``names``) for ``images`` through ONNX Runtime, in batches of ``batch``."""
    from export.model import make_session

    session = make_session(str(onnx_path))
    names = list(names or [o.name for o in session.get_outputs()])
    outs: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for i in range(0, len(images), batch):
        for name, value in zip(names, session.run(names, {INPUT_NAME: images[i:i + batch]})):
            outs[name].append(value.astype(np.float32))
    return {k: np.concatenate(v) for k, v in outs.items()}


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` bilinearly resized to ``size`` (unchanged when already that size)."""
    if tuple(images.shape[1:3]) == tuple(size):
        return images
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def max_abs_err(reference: np.ndarray, got: np.ndarray) -> float:
    """Largest absolute difference of two same-shaped arrays, in float64 (NaN when either holds one)."""
    return float(np.max(np.abs(got.astype(np.float64) - reference)))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity over the last axis of two same-shaped arrays (``[N, D]`` or ``[N, L, D]``)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = np.sum(a64 * b64, axis=-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return float(np.mean(num / np.maximum(den, 1e-30)))


def compare_outputs(reference: Outputs, got: Outputs) -> dict[str, Any]:
    """``{max_abs_err: {output: e}, mean_cosine: {output: c}}`` of ``got`` against ``reference``, for
    every output of ``reference`` (``got`` must have them all)."""
    missing = [k for k in reference if k not in got]
    if missing:
        raise ValueError(f"variant graph lacks output(s) {missing} of the reference")
    return {"max_abs_err": {k: max_abs_err(reference[k], got[k]) for k in reference},
            "mean_cosine": {k: mean_cosine(reference[k], got[k]) for k in reference}}


# --- the parity gate of the fp32 graph ----------------------------------------------------------

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


def ort_providers() -> list[Any]:
    """ONNX Runtime providers to check: CPU always, CUDA too when torch sees a GPU (TF32 off)."""
    import onnxruntime as ort

    providers: list[Any] = ["CPUExecutionProvider"]
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        # TF32 matmuls would put ~1e-3 errors on fp32 outputs and hide real export bugs.
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": 0}))
    return providers


def check_parity(
    model: nn.Module,
    spec: EncoderSpec,
    onnx_path: str | Path,
    images: np.ndarray | None = None,
    tol: float = DEFAULT_TOLERANCE,
    batch_sizes: Sequence[int] = (1, 32),
    data: str | None = None,
    selection: OutputSelection | None = None,
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
    ref = reference_outputs(model, spec, images, max(batch_sizes), selection)
    names = list(ref)  # every output of the graph: the default pair and the selected extras
    errors = {k: 0.0 for k in names}
    used: list[str] = []
    for provider in ort_providers():
        session = ort.InferenceSession(str(onnx_path), ort.SessionOptions(), providers=[provider])
        used.append(session.get_providers()[0])
        for b in batch_sizes:
            for i in range(0, len(images), b):
                got = session.run(names, {INPUT_NAME: images[i:i + b]})
                for name, value in zip(names, got):
                    expected = ref[name][i:i + b]
                    if value.shape != expected.shape:
                        raise ExportError(f"ONNX output {name} has shape {list(value.shape)}, "
                                          f"PyTorch gives {list(expected.shape)} (batch {b})")
                    err = max_abs_err(expected, value)
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


# --- the gate of a precision variant or engine --------------------------------------------------

@dataclass(frozen=True)
class VariantGate:
    """Quality a variant must keep against fp32 PyTorch: mean cosine of every output, k-NN drop in points,
    and (when set) the max abs error of every output."""

    min_mean_cosine: float = 0.99
    max_knn_drop_points: float = 0.5
    max_abs_err: float | None = None  # None: recorded, not gated (int8 errors scale with the features)
    n_eval: int = 1000       # test images for errors and cosine (also the k-NN queries; 1 image = 0.1 pt)
    n_knn_train: int = 2000  # train images of the k-NN memory bank; 0 turns the k-NN check off
    n_calibration: int = 64  # train images (disjoint from the k-NN bank) for static calibration


def fashion_mnist_for(spec: EncoderSpec, split: str, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split[start:start+n]`` as uint8 ``[n, H, W, C]`` for ``spec`` (bilinear resize,
    grey repeated over channels) and its labels ``[n]``."""
    from training.data import load_fashion_mnist

    data = load_fashion_mnist(split)
    images, labels = data.images[start:start + n], np.asarray(data.labels[start:start + n])
    images = resize_images(images, tuple(spec.img_size))
    if images.shape[-1] != spec.in_chans:
        images = np.repeat(images[..., :1], spec.in_chans, axis=-1)
    return np.ascontiguousarray(images), labels


@dataclass
class GateData:
    """Images (and fp32 PyTorch outputs) a variant is judged on, computed once for all variants."""

    eval_images: np.ndarray
    eval_labels: np.ndarray
    reference: Outputs
    knn_images: np.ndarray
    knn_labels: np.ndarray
    knn_reference: np.ndarray | None
    calibration: np.ndarray
    description: str


def gate_data(model: nn.Module, spec: EncoderSpec, gate: VariantGate,
              selection: OutputSelection | None = None) -> GateData:
    """Fashion-MNIST evaluation, k-NN bank and calibration images, with fp32 PyTorch outputs (every
    output of ``selection``; the k-NN bank needs only ``cls``)."""
    eval_images, eval_labels = fashion_mnist_for(spec, "test", 0, gate.n_eval)
    knn_images, knn_labels = fashion_mnist_for(spec, "train", 0, gate.n_knn_train)
    calibration, _ = fashion_mnist_for(spec, "train", 60000 - gate.n_calibration, gate.n_calibration)
    reference = reference_outputs(model, spec, eval_images, 64, selection or DEFAULT_SELECTION)
    knn_reference = reference_outputs(model, spec, knn_images, 64)[CLS_OUTPUT] if gate.n_knn_train else None
    resized = "" if tuple(spec.img_size) == (28, 28) else f" resized to {spec.img_size[0]}x{spec.img_size[1]}"
    description = (f"fashion-mnist test[:{gate.n_eval}]{resized}; k-NN bank train[:{gate.n_knn_train}]; "
                   f"calibration train[-{gate.n_calibration}:]")
    return GateData(eval_images, eval_labels, reference, knn_images, knn_labels, knn_reference,
                    calibration, description)


def _binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair-coin trials (McNemar's exact test)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2.0 ** n
    return float(min(1.0, 2.0 * tail))


def knn_drop_confidence(fp32_correct: np.ndarray, variant_correct: np.ndarray, n_boot: int = 2000,
                        level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired statistics of a k-NN accuracy drop over the same query images.

    ``fp32_correct`` / ``variant_correct``: bool per query image. Returns the drop in points, its
    percentile paired-bootstrap interval (query images resampled with replacement, the k-NN bank held
    fixed), the discordant counts and McNemar's exact p-value (H0: both classify equally often right).
    """
    a = np.asarray(fp32_correct, dtype=bool)
    b = np.asarray(variant_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two equal-length 1-D correctness vectors, got {a.shape} and {b.shape}")
    diff = a.astype(np.int8) - b.astype(np.int8)  # +1: only fp32 right, -1: only the variant right
    n = len(diff)
    rng = np.random.default_rng(seed)
    drops = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # bounded memory for large n
        idx = rng.integers(0, n, size=(min(256, n_boot - start), n))
        drops[start:start + len(idx)] = 100.0 * diff[idx].mean(axis=1)
    lo, hi = np.quantile(drops, [(1 - level) / 2, (1 + level) / 2])
    only_fp32, only_variant = int(np.sum(diff == 1)), int(np.sum(diff == -1))
    p = _binom_two_sided(only_fp32, only_fp32 + only_variant)
    drop = 100.0 * float(diff.mean())
    return {"drop_points": drop, "ci_points": [float(lo), float(hi)], "level": level, "n_boot": n_boot,
            "method": "paired percentile bootstrap over the query images (k-NN bank fixed), seed "
                      f"{seed}; McNemar exact test on the discordant images",
            "only_fp32_correct": only_fp32, "only_variant_correct": only_variant, "mcnemar_p": p,
            "statement": (f"drop {drop:+.2f} points, {100 * level:.0f}% CI [{lo:+.2f}, {hi:+.2f}] over {n} "
                          f"query images; {only_fp32} images only fp32 classifies right, {only_variant} only "
                          f"the variant (McNemar exact p = {p:.3g})")}


def judge(onnx_path: str | Path | None, data: GateData, gate: VariantGate,
          runner: Runner | None = None) -> tuple[dict[str, Any], str | None]:
    """Gate figures of a variant graph and ``None`` when it passes, else the reason it fails.

    Every output of the reference (all outputs of the exported graph) is judged on its own:
    ``figures["outputs"][name]`` holds its max abs error, mean cosine and whether it passed.
    ``runner(images, names)`` replaces ONNX Runtime on ``onnx_path`` (TensorRT engines use it).
    """
    def run(images: np.ndarray, names: Sequence[str]) -> Outputs:
        return runner(images, names) if runner is not None else run_onnx(onnx_path, images, names=names)

    got = run(data.eval_images, list(data.reference))
    figures = compare_outputs(data.reference, got)
    figures.update(n_images=int(len(data.eval_images)), data=data.description, gate=asdict(gate))
    failures: list[str] = []
    per_output: dict[str, dict[str, Any]] = {}
    for k in data.reference:
        c, e = figures["mean_cosine"][k], figures["max_abs_err"][k]
        missed = []
        if not c >= gate.min_mean_cosine:
            missed.append(f"mean cosine of {k} {c:.4f} < {gate.min_mean_cosine}")
        if gate.max_abs_err is not None and not e <= gate.max_abs_err:
            missed.append(f"max abs error of {k} {e:.3g} > {gate.max_abs_err:g}")
        per_output[k] = {"max_abs_err": e, "mean_cosine": c, "passed": not missed}
        failures += missed
    figures["outputs"] = per_output
    if data.knn_reference is not None:
        bank = run(data.knn_images, [CLS_OUTPUT])[CLS_OUTPUT]
        classes = int(max(np.max(data.knn_labels), np.max(data.eval_labels)) + 1)
        fp32_pred = knn_predict(data.knn_reference, data.knn_labels, data.reference[CLS_OUTPUT],
                                num_classes=classes)
        ours_pred = knn_predict(bank, data.knn_labels, got[CLS_OUTPUT], num_classes=classes)
        labels = np.asarray(data.eval_labels)
        fp32, ours = float(np.mean(fp32_pred == labels)), float(np.mean(ours_pred == labels))
        drop = 100.0 * (fp32 - ours)
        figures["knn"] = {"fp32_accuracy": fp32, "variant_accuracy": ours, "drop_points": drop,
                          "n_train": int(len(bank)), "n_test": int(len(got[CLS_OUTPUT])), "k": 20,
                          "features": CLS_OUTPUT,
                          "confidence": knn_drop_confidence(fp32_pred == labels, ours_pred == labels)}
        if not drop <= gate.max_knn_drop_points + 1e-9:  # 1e-9: float noise of 100 * (a - b)
            failures.append(f"k-NN accuracy drops {drop:.2f} points > {gate.max_knn_drop_points} "
                            f"({figures['knn']['confidence']['statement']})")
    return figures, ("; ".join(failures) or None)
