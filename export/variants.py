"""Reduced-precision variants of an exported encoder (int8 dynamic/static, fp16) behind a quality gate.

Each variant is built from the fp32 ONNX graph, then judged against the fp32 *PyTorch* model on real
images (Fashion-MNIST, resized and channel-repeated to the model's input when it is not 28x28x1):
max abs error and mean cosine similarity of ``cls`` and ``patch_tokens``, and the change of weighted
k-NN accuracy (DINO protocol, ``training.knn``) with ``cls`` features. A variant that misses the gate
is not written unless forced. A written variant is a model entry of its own, ``<base>_<suffix>``,
with the same tensors as the base model (uint8 in, fp32 out), so the gateway serves it unchanged;
its manifest carries a ``variant`` dict (precision, method, gate figures, base model).

Static int8 quantises only the MatMuls whose second operand is a weight: quantising the two
activation-by-activation MatMuls of attention (``q @ k^T``, ``attn @ v``) with MinMax calibration
took the CLS cosine of a random-init Fashion-MNIST ViT to 0.46 (tried here); weights-only gives 0.999.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from google.protobuf import text_format
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from torch import nn

from export import model as triton_model
from export.onnx_export import INPUT_NAME, OUTPUT_NAMES, ExportUsageError, _reference
from export.repository import (CONFIG_FILENAME, MANIFEST_FILENAME, MANIFEST_PARAMETER, read_manifest,
                               sha256_file)
from export.triton_config import parse_pbtxt
from export.publish import exists_message, fsync_tree, publish, staging_directory
from training.backbone import EncoderSpec
from training.knn import knn_accuracy

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
    """Quality a variant must keep against fp32 PyTorch: cosine of both outputs, k-NN drop in points."""

    min_mean_cosine: float = 0.99
    max_knn_drop_points: float = 0.5
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


def _run_onnx(onnx_path: str | Path, images: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    from export.model import make_session

    session = make_session(str(onnx_path))
    outs: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUT_NAMES}
    for i in range(0, len(images), batch):
        for name, value in zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[i:i + batch]})):
            outs[name].append(value.astype(np.float32))
    return {k: np.concatenate(v) for k, v in outs.items()}


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity over the last axis of two same-shaped arrays (``[N, D]`` or ``[N, L, D]``)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = np.sum(a64 * b64, axis=-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return float(np.mean(num / np.maximum(den, 1e-30)))


def compare_outputs(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, Any]:
    """``{max_abs_err: {output: e}, mean_cosine: {output: c}}`` of ``got`` against ``reference``."""
    return {"max_abs_err": {k: float(np.max(np.abs(got[k].astype(np.float64) - reference[k])))
                            for k in OUTPUT_NAMES},
            "mean_cosine": {k: mean_cosine(reference[k], got[k]) for k in OUTPUT_NAMES}}


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


def gate_data(model: nn.Module, spec: EncoderSpec, gate: VariantGate) -> GateData:
    """Fashion-MNIST evaluation, k-NN bank and calibration images, with fp32 PyTorch ``cls``/patches."""
    eval_images, eval_labels = fashion_mnist_for(spec, "test", 0, gate.n_eval)
    knn_images, knn_labels = fashion_mnist_for(spec, "train", 0, gate.n_knn_train)
    calibration, _ = fashion_mnist_for(spec, "train", 60000 - gate.n_calibration, gate.n_calibration)
    reference = _reference(model, spec, eval_images, 64)
    knn_reference = _reference(model, spec, knn_images, 64)["cls"] if gate.n_knn_train else None
    resized = "" if tuple(spec.img_size) == (28, 28) else f" resized to {spec.img_size[0]}x{spec.img_size[1]}"
    description = (f"fashion-mnist test[:{gate.n_eval}]{resized}; k-NN bank train[:{gate.n_knn_train}]; "
                   f"calibration train[-{gate.n_calibration}:]")
    return GateData(eval_images, eval_labels, reference, knn_images, knn_labels, knn_reference,
                    calibration, description)


def judge(onnx_path: str | Path, data: GateData, gate: VariantGate) -> tuple[dict[str, Any], str | None]:
    """Gate figures of a variant graph and ``None`` when it passes, else the reason it fails."""
    got = _run_onnx(onnx_path, data.eval_images)
    figures = compare_outputs(data.reference, got)
    figures.update(n_images=int(len(data.eval_images)), data=data.description, gate=asdict(gate))
    failures = [f"mean cosine of {k} {c:.4f} < {gate.min_mean_cosine}"
                for k, c in figures["mean_cosine"].items() if not c >= gate.min_mean_cosine]
    if data.knn_reference is not None:
        bank = _run_onnx(onnx_path, data.knn_images)["cls"]
        fp32 = knn_accuracy(data.knn_reference, data.knn_labels, data.reference["cls"], data.eval_labels)
        ours = knn_accuracy(bank, data.knn_labels, got["cls"], data.eval_labels)
        drop = 100.0 * (fp32 - ours)
        figures["knn"] = {"fp32_accuracy": fp32, "variant_accuracy": ours, "drop_points": drop,
                          "n_train": int(len(bank)), "n_test": int(len(got["cls"])), "k": 20,
                          "features": "cls"}
        if not drop <= gate.max_knn_drop_points + 1e-9:  # 1e-9: float noise of 100 * (a - b)
            failures.append(f"k-NN accuracy drops {drop:.2f} points > {gate.max_knn_drop_points}")
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
                               "n_images": figures["n_images"], "tolerance": None, "data": figures["data"],
                               "reference": "fp32 PyTorch"}}
        config = parse_pbtxt((base / CONFIG_FILENAME).read_text())
        config.name = name
        config.parameters[MANIFEST_PARAMETER].string_value = json.dumps(
            manifest, separators=(",", ":"), sort_keys=True)
        (staging / CONFIG_FILENAME).write_text(text_format.MessageToString(config))
        (staging / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
        fsync_tree(staging)
        publish(staging, target, force)
    return target


def export_variants(model: nn.Module, spec: EncoderSpec, base: str | Path, kinds: Sequence[str],
                    force_variants: bool = False, force: bool = False,
                    gate: VariantGate = VariantGate()) -> list[VariantResult]:
    """Build, gate and publish the ``kinds`` variants of the exported model at ``base`` beside it.

    ``force_variants`` writes a variant that misses the gate (its manifest says so); ``force``
    replaces existing variant entries. Returns one ``VariantResult`` per kind, in order.
    """
    import tempfile

    base = Path(base)
    kinds = parse_variants(kinds)
    base_manifest = read_manifest(base)
    fp32_onnx = base / str(base_manifest["version"]) / "model.onnx"
    data = gate_data(model, spec, gate)
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
