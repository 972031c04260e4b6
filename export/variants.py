"""Reduced-precision variants of an exported encoder (int8 dynamic/static, fp16) behind a quality gate.

Each variant is built from the fp32 ONNX graph (``build_variant``), then judged against the fp32
*PyTorch* model by ``export.gate.judge``: every output of the graph on its own (max abs error, mean
cosine) and the k-NN accuracy change with its confidence statement. A variant where any output misses
the gate is not written unless forced. A written variant is a model entry of its own,
``<base>_<suffix>``, with the same tensors as the base model (uint8 in, fp32 out), so the gateway
serves it unchanged; its manifest carries a ``variant`` dict (precision, method, gate figures, base
model).

Static int8 quantises only the MatMuls whose second operand is a weight: quantising the two
activation-by-activation MatMuls of attention (``q @ k^T``, ``attn @ v``) with MinMax calibration
took the CLS cosine of a random-init Fashion-MNIST ViT to 0.46 (tried here); weights-only gives 0.999.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from torch import nn

from contract.manifest import Manifest
from contract.names import CONFIG_FILENAME, INPUT_NAME
from export import model as triton_model
from export.errors import ExportUsageError
from export.gate import VariantGate, gate_data, judge
from export.layout import MODEL_PY_FILENAME, ONNX_FILENAME, config_with_manifest
from export.outputs import OutputSelection, selection_from_manifest
from export.publish import Staging, refuse_existing
from training.backbone import EncoderSpec

log = logging.getLogger(__name__)

# kind -> (model-name suffix, precision, method)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "int8-dynamic": ("int8", "int8", "onnxruntime quantize_dynamic, QInt8 weights, MatMul/Gemm"),
    "int8-static": ("int8_static", "int8",
                    "onnxruntime quantize_static, QDQ, QUInt8 activations / per-channel QInt8 weights, "
                    "MinMax calibration, weight MatMul/Gemm only"),
    "fp16": ("fp16", "fp16", "onnxruntime.transformers.float16, fp32 inputs/outputs kept"),
}


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


def _write_entry(repository: Path, name: str, base: Path, onnx_path: Path, variant: dict[str, Any],
                 figures: dict[str, Any], force: bool) -> Path:
    """Publish ``repository/<name>``: the base model's config and manifest with this graph and ``variant``."""
    base_manifest = Manifest.read(base)
    version = int(base_manifest.version)  # type: ignore[arg-type]
    refuse_existing([repository / name], force)
    with Staging(repository, version, force) as staging:
        staged = staging.entry(name)
        staged.add_file(ONNX_FILENAME, onnx_path)
        if (base / str(version) / MODEL_PY_FILENAME).is_file():
            staged.add_file(MODEL_PY_FILENAME, Path(triton_model.__file__))
        # lanes and buckets name the base's fp32 entries: a variant entry is none of them
        manifest = base_manifest.replace(
            name=name, files=staged.files, variant=variant, probes={}, lanes=None, lane=None, buckets=None,
            bucket=None, parity={"max_abs_err": figures["max_abs_err"], "mean_cosine": figures["mean_cosine"],
                                 "outputs": figures["outputs"], "n_images": figures["n_images"],
                                 "tolerance": None, "data": figures["data"], "reference": "fp32 PyTorch"})
        staged.finish(manifest, config_with_manifest((base / CONFIG_FILENAME).read_text(), manifest, name))
        return staging.publish()[0]


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
    base_manifest = Manifest.read(base)
    fp32_onnx = base / str(base_manifest.version) / ONNX_FILENAME
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
                       "base_files": base_manifest.files, "gate": asdict(gate), "passed": passed,
                       "forced": written and not passed, "figures": figures}
            out = _write_entry(base.parent, name, base, path, variant, figures, force) if written else None
            (log.info if passed else log.warning)("variant %s (%s): %s%s", name, kind, reason,
                                                  "" if written == passed else
                                                  (", written (forced)" if written else ", not written"))
            results.append(VariantResult(kind, name, passed, written, reason, figures, out))
    return results
