"""Reduced-precision variants of an exported encoder (int8 dynamic/static, fp16) behind a quality gate.

Each variant is built from the fp32 ONNX graph, then judged against the fp32 *PyTorch* model on real
images (Fashion-MNIST, resized and channel-repeated to the model's input when it is not 28x28x1):
max abs error and mean cosine similarity of *every* output of the graph (``cls``, ``patch_tokens`` and
the extras chosen at export: ``patch_tokens_l<i>``, ``registers``, ``mean_patch``), each judged on its
own, and the change of weighted k-NN accuracy (DINO protocol, ``training.knn``) with ``cls`` features,
with a paired confidence statement over the query images (``knn_drop_confidence``: bootstrap
interval and exact McNemar test). A variant where any output misses the gate is not written unless
forced. A written variant is a model entry of its own, ``<base>_<suffix>``,
with the same tensors as the base model (uint8 in, fp32 out), so the gateway serves it unchanged;
its manifest carries a ``variant`` dict (precision, method, gate figures, base model).

Static int8 quantises only the MatMuls whose second operand is a weight: quantising the two
activation-by-activation MatMuls of attention (``q @ k^T``, ``attn @ v``) with MinMax calibration
took the CLS cosine of a random-init Fashion-MNIST ViT to 0.46 (tried here); weights-only gives 0.999.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from torch import nn

from export import model as triton_model
from export.onnx_export import INPUT_NAME, OUTPUT_NAMES, ExportUsageError, _reference
from export.outputs import DEFAULT_SELECTION, OutputSelection, layer_output_name
from export.repository import CONFIG_FILENAME, MANIFEST_FILENAME, config_with_manifest, read_manifest, sha256_file
from export.publish import exists_message, fsync_tree, publish, staging_directory
from training.backbone import EncoderSpec
from training.knn import knn_predict

log = logging.getLogger(__name__)

# kind -> (model-name suffix, precision, method)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "int8-dynamic": ("int8", "int8", "onnxruntime quantize_dynamic, QInt8 weights, MatMul/Gemm"),
    "int8-static": ("int8_static", "int8",
                    "onnxruntime quantize_static, QDQ, QUInt8 activations / per-channel QInt8 weights, "
                    "MinMax calibration, weight MatMul/Gemm only"),
    "fp16": ("fp16", "fp16", "onnxruntime.transformers.float16, fp32 inputs/outputs kept"),
}


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


@dataclass
class VariantResult:
    """What happened to one requested variant."""

    kind: str
    name: str
    passed: bool
    written: bool
    reason: str
    figures: dict[str, Any]
    path: Path | None = None


def parse_variants(text: str | Sequence[str]) -> list[str]:
    """``"int8-dynamic,fp16"`` -> ``["int8-dynamic", "fp16"]``; unknown kinds raise ``ExportUsageError``."""
    kinds = [k.strip() for k in (text.split(",") if isinstance(text, str) else text) if k.strip()]
    unknown = [k for k in kinds if k not in VARIANTS]
    if unknown:
        raise ExportUsageError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    return list(dict.fromkeys(kinds))


def fashion_mnist_for(spec: EncoderSpec, split: str, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split[start:start+n]`` as uint8 ``[n, H, W, C]`` for ``spec`` (bilinear resize,
    grey repeated over channels) and its labels ``[n]``."""
    from training.data import load_fashion_mnist

    data = load_fashion_mnist(split)
    images, labels = data.images[start:start + n], np.asarray(data.labels[start:start + n])
    h, w = spec.img_size
    if images.shape[1:3] != (h, w):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if images.shape[-1] != spec.in_chans:
        images = np.repeat(images[..., :1], spec.in_chans, axis=-1)
    return np.ascontiguousarray(images), labels


class _Calibration(CalibrationDataReader):
    """onnxruntime ``CalibrationDataReader`` over uint8 images in batches."""

    def __init__(self, images: np.ndarray, batch: int = 16) -> None:
        self._batches = iter([{INPUT_NAME: images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def weight_matmuls(onnx_path: str | Path) -> list[str]:
    """Names of MatMul/Gemm nodes whose second input is a weight (initializer or Constant)."""
    graph = onnx.load(str(onnx_path)).graph
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in constants]


def build_variant(kind: str, fp32_onnx: str | Path, out_path: str | Path,
                  calibration: np.ndarray | None = None) -> Path:
    """Write the ``kind`` variant of ``fp32_onnx`` to ``out_path`` (``calibration``: uint8 images for static)."""
    fp32_onnx, out_path = str(fp32_onnx), Path(out_path)
    if kind == "int8-dynamic":
        quantize_dynamic(fp32_onnx, str(out_path), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
    elif kind == "int8-static":
        if calibration is None or len(calibration) == 0:
            raise ExportUsageError("int8-static needs calibration images")
        quantize_static(fp32_onnx, str(out_path), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax,
                        op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=weight_matmuls(fp32_onnx))
    elif kind == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(fp32_onnx), keep_io_types=True), str(out_path))
    else:
        raise ExportUsageError(f"unknown variant {kind!r}; choose from {sorted(VARIANTS)}")
    onnx.checker.check_model(str(out_path))
    return out_path


def _run_onnx(onnx_path: str | Path, images: np.ndarray, batch: int = 64,
              names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Every output of the graph (or ``names``) for ``images``, in batches of ``batch``."""
    from export.model import make_session

    session = make_session(str(onnx_path))
    names = list(names or [o.name for o in session.get_outputs()])
    outs: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for i in range(0, len(images), batch):
        for name, value in zip(names, session.run(names, {INPUT_NAME: images[i:i + batch]})):
            outs[name].append(value.astype(np.float32))
    return {k: np.concatenate(v) for k, v in outs.items()}


def selection_from_manifest(manifest: dict[str, Any]) -> OutputSelection:
    """The ``OutputSelection`` an exported entry was built with, read back from its ``outputs``."""
    outputs = manifest.get("outputs") or {}
    prefix = layer_output_name(0)[:-1]  # "patch_tokens_l"
    layers = tuple(int(n[len(prefix):]) for n in outputs if n.startswith(prefix))
    extras = [v for n, v in outputs.items() if n not in OUTPUT_NAMES]
    has_norm = bool((manifest.get("architecture") or {}).get("final_norm", True))
    final_norm = bool(extras[0].get("final_norm", True)) if extras and has_norm else True
    return OutputSelection(layers=layers, final_norm=final_norm, registers="registers" in outputs,
                           mean_patch="mean_patch" in outputs)


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


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity over the last axis of two same-shaped arrays (``[N, D]`` or ``[N, L, D]``)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = np.sum(a64 * b64, axis=-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return float(np.mean(num / np.maximum(den, 1e-30)))


def compare_outputs(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, Any]:
    """``{max_abs_err: {output: e}, mean_cosine: {output: c}}`` of ``got`` against ``reference``, for
    every output of ``reference`` (``got`` must have them all)."""
    missing = [k for k in reference if k not in got]
    if missing:
        raise ValueError(f"variant graph lacks output(s) {missing} of the reference")
    return {"max_abs_err": {k: float(np.max(np.abs(got[k].astype(np.float64) - reference[k])))
                            for k in reference},
            "mean_cosine": {k: mean_cosine(reference[k], got[k]) for k in reference}}


@dataclass
class GateData:
    """Images (and fp32 PyTorch outputs) a variant is judged on, computed once for all variants."""

    eval_images: np.ndarray
    eval_labels: np.ndarray
    reference: dict[str, np.ndarray]
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
    reference = _reference(model, spec, eval_images, 64, selection or DEFAULT_SELECTION)
    knn_reference = _reference(model, spec, knn_images, 64)["cls"] if gate.n_knn_train else None
    resized = "" if tuple(spec.img_size) == (28, 28) else f" resized to {spec.img_size[0]}x{spec.img_size[1]}"
    description = (f"fashion-mnist test[:{gate.n_eval}]{resized}; k-NN bank train[:{gate.n_knn_train}]; "
                   f"calibration train[-{gate.n_calibration}:]")
    return GateData(eval_images, eval_labels, reference, knn_images, knn_labels, knn_reference,
                    calibration, description)


Runner = Callable[[np.ndarray, Sequence[str]], dict[str, np.ndarray]]


def judge(onnx_path: str | Path | None, data: GateData, gate: VariantGate,
          runner: Runner | None = None) -> tuple[dict[str, Any], str | None]:
    """Gate figures of a variant graph and ``None`` when it passes, else the reason it fails.

    Every output of the reference (all outputs of the exported graph) is judged on its own:
    ``figures["outputs"][name]`` holds its max abs error, mean cosine and whether it passed.
    ``runner(images, names)`` replaces ONNX Runtime on ``onnx_path`` (TensorRT engines use it).
    """
    def run(images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        return runner(images, names) if runner is not None else _run_onnx(onnx_path, images, names=names)

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
        bank = run(data.knn_images, ["cls"])["cls"]
        classes = int(max(np.max(data.knn_labels), np.max(data.eval_labels)) + 1)
        fp32_pred = knn_predict(data.knn_reference, data.knn_labels, data.reference["cls"], num_classes=classes)
        ours_pred = knn_predict(bank, data.knn_labels, got["cls"], num_classes=classes)
        labels = np.asarray(data.eval_labels)
        fp32, ours = float(np.mean(fp32_pred == labels)), float(np.mean(ours_pred == labels))
        drop = 100.0 * (fp32 - ours)
        figures["knn"] = {"fp32_accuracy": fp32, "variant_accuracy": ours, "drop_points": drop,
                          "n_train": int(len(bank)), "n_test": int(len(got["cls"])), "k": 20,
                          "features": "cls",
                          "confidence": knn_drop_confidence(fp32_pred == labels, ours_pred == labels)}
        if not drop <= gate.max_knn_drop_points + 1e-9:  # 1e-9: float noise of 100 * (a - b)
            failures.append(f"k-NN accuracy drops {drop:.2f} points > {gate.max_knn_drop_points} "
                            f"({figures['knn']['confidence']['statement']})")
    return figures, ("; ".join(failures) or None)


def _write_entry(repository: Path, name: str, base: Path, onnx_path: Path, variant: dict[str, Any],
                 figures: dict[str, Any], force: bool) -> Path:
    """Publish ``repository/<name>``: the base model's config and manifest with this graph and ``variant``."""
    base_manifest = read_manifest(base)
    version = int(base_manifest["version"])
    target = repository / name
    if target.exists() and not force:
        raise ExportUsageError(exists_message(target))
    with staging_directory(repository, name) as staging:
        version_dir = staging / str(version)
        version_dir.mkdir()
        shutil.copyfile(onnx_path, version_dir / "model.onnx")
        files = {f"{version}/model.onnx": sha256_file(version_dir / "model.onnx")}
        if (base / str(version) / "model.py").is_file():
            shutil.copyfile(triton_model.__file__, version_dir / "model.py")
            files[f"{version}/model.py"] = sha256_file(version_dir / "model.py")
        # lanes and buckets name the base's fp32 entries: a variant entry is none of them
        kept = {k: v for k, v in base_manifest.items() if k not in ("lanes", "lane", "buckets", "bucket")}
        manifest = {**kept, "name": name, "files": files, "variant": variant, "probes": {},
                    "parity": {"max_abs_err": figures["max_abs_err"], "mean_cosine": figures["mean_cosine"],
                               "outputs": figures["outputs"], "n_images": figures["n_images"], "tolerance": None,
                               "data": figures["data"], "reference": "fp32 PyTorch"}}
        (staging / CONFIG_FILENAME).write_text(config_with_manifest((base / CONFIG_FILENAME).read_text(),
                                                                    manifest, name))
        (staging / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
        fsync_tree(staging)
        publish(staging, target, force)
    return target


def export_variants(model: nn.Module, spec: EncoderSpec, base: str | Path, kinds: Sequence[str],
                    force_variants: bool = False, force: bool = False,
                    gate: VariantGate = VariantGate(),
                    selection: OutputSelection | None = None) -> list[VariantResult]:
    """Build, gate and publish the ``kinds`` variants of the exported model at ``base`` beside it.

    ``force_variants`` writes a variant that misses the gate (its manifest says so); ``force``
    replaces existing variant entries. ``selection`` (default: read back from the base manifest's
    ``outputs``) names the outputs gated: all of the base graph's. Returns one ``VariantResult`` per
    kind, in order.
    """
    import tempfile

    base = Path(base)
    kinds = parse_variants(kinds)
    base_manifest = read_manifest(base)
    fp32_onnx = base / str(base_manifest["version"]) / "model.onnx"
    selection = selection or selection_from_manifest(base_manifest)
    data = gate_data(model, spec, gate, selection)
    graph_outputs = [o.name for o in onnx.load(str(fp32_onnx), load_external_data=False).graph.output]
    if list(data.reference) != graph_outputs:
        raise ExportUsageError(f"{base.name}'s graph returns {graph_outputs} but its manifest describes "
                               f"{list(data.reference)}; re-export it")
    results: list[VariantResult] = []
    with tempfile.TemporaryDirectory(prefix="vitserve-variants-") as tmp:
        for kind in kinds:
            suffix, precision, method = VARIANTS[kind]
            name = f"{base.name}_{suffix}"
            path = build_variant(kind, fp32_onnx, Path(tmp) / f"{suffix}.onnx", data.calibration)
            figures, failure = judge(path, data, gate)
            passed = failure is None
            reason = "passed the gate" if passed else f"missed the gate: {failure}"
            written = passed or force_variants
            variant = {"precision": precision, "method": method, "kind": kind, "base_model": base.name,
                       "base_files": base_manifest["files"], "gate": asdict(gate), "passed": passed,
                       "forced": written and not passed, "figures": figures}
            out = _write_entry(base.parent, name, base, path, variant, figures, force) if written else None
            (log.info if passed else log.warning)("variant %s (%s): %s%s", name, kind, reason,
                                                  "" if written == passed else
                                                  (", written (forced)" if written else ", not written"))
            results.append(VariantResult(kind, name, passed, written, reason, figures, out))
    return results
