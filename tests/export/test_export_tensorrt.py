"""The ``tensorrt_plan`` entry writer and the engine gate's runner hook.

No TensorRT and no GPU here: engines cannot be built, so the entry writer is fed a placeholder file
in place of a serialized engine (its bytes are only copied and hashed). ``build_engine`` and
``run_engine`` are UNTESTED (export/tensorrt_engine.py says so).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from google.protobuf import json_format

from export.errors import ExportUsageError
from export.gate import VariantGate, gate_data, judge, run_onnx
from export.layout import sha256_file
from export.tensorrt_engine import engine_filename, tensorrt_unavailable_reason, write_tensorrt_entry
from export.triton_config import parse_pbtxt
from tests.export.conftest import read_manifest
from serving.catalog import model_from_config

RECORD = {"key": {"compute_capability": "9.0", "tensorrt": "10.3.0", "gpu": "NVIDIA H100"},
          "profile": {"min": [1, 28, 28, 1], "opt": [8, 28, 28, 1], "max": [32, 28, 28, 1]},
          "precision": "fp16, normalisation layers fp32"}


def test_engine_filename():
    assert engine_filename(RECORD["key"]) == "model_cc9.0_trt10.3.0.plan"


def test_tensorrt_entry_layout_config_and_manifest(exported, tmp_path):
    placeholder = tmp_path / "engine.plan"
    placeholder.write_bytes(b"placeholder: no TensorRT on this machine")
    gate_record = {"max_abs_err": {"cls": 1e-3}, "mean_cosine": {"cls": 0.9999}, "n_images": 4, "data": "x",
                   "passed": True}
    path = write_tensorrt_entry(exported.parent, "fmnist_trt", exported, [(placeholder, RECORD)], gate_record)
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == [
        "1/model_cc9.0_trt10.3.0.plan", "config.pbtxt", "manifest.json"]
    manifest, base = read_manifest(path), read_manifest(exported)
    engine = manifest["tensorrt"]["engines"]["9.0"]
    assert engine["file"] == "1/model_cc9.0_trt10.3.0.plan" and engine["tensorrt"] == "10.3.0"
    assert engine["sha256"] == sha256_file(path / engine["file"]) == manifest["files"][engine["file"]]
    assert manifest["exporter"]["target"] == "tensorrt_plan" and manifest["tensorrt"]["base_model"] == "fmnist"
    assert manifest["outputs"] == base["outputs"] and manifest["preprocessing"] == base["preprocessing"]
    assert manifest["probes"] == {} and not {"lanes", "lane", "buckets", "bucket"} & set(manifest)
    config = parse_pbtxt((path / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and dict(config.cc_model_filenames) == {
        "9.0": "model_cc9.0_trt10.3.0.plan"}
    assert config.max_batch_size == 32  # the engine's profile maximum
    assert json.loads(config.parameters["vitserve_manifest"].string_value) == manifest
    served = model_from_config(json_format.MessageToDict(config, preserving_proto_field_name=True), "1")
    assert served.outputs == ("cls", "patch_tokens") and served.max_batch_size == 32
    with pytest.raises(ExportUsageError, match="already exists"):
        write_tensorrt_entry(exported.parent, "fmnist_trt", exported, [(placeholder, RECORD)], gate_record)
    with pytest.raises(ExportUsageError, match="two engines"):
        write_tensorrt_entry(exported.parent, "fmnist_trt2", exported,
                             [(placeholder, RECORD), (placeholder, RECORD)], gate_record)
    assert not (exported.parent / "fmnist_trt2").exists()


def test_gate_runner_hook_judges_what_the_runner_returns(encoder, exported):
    model, spec = encoder
    gate = VariantGate(n_eval=32, n_knn_train=0, n_calibration=8)
    data = gate_data(model, spec, gate)
    onnx_path = exported / "1/model.onnx"
    figures, failure = judge(None, data, gate, runner=lambda images, names: run_onnx(onnx_path, images,
                                                                                     names=names))
    assert failure is None and figures["max_abs_err"]["cls"] < 1e-4  # the fp32 graph itself

    def half(images, names):  # what an fp16 engine does to the numbers
        outputs = run_onnx(onnx_path, images, names=names)
        return {k: v.astype(np.float16).astype(np.float32) for k, v in outputs.items()}

    figures, failure = judge(None, data, gate, runner=half)
    assert failure is None and 1e-5 < figures["max_abs_err"]["patch_tokens"] < 1e-1


def test_tensorrt_unavailable_reason_names_what_is_missing():
    reason = tensorrt_unavailable_reason()
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    import torch

    assert (reason is None) == (has_trt and torch.cuda.is_available())
    if not has_trt:
        assert "tensorrt" in reason
