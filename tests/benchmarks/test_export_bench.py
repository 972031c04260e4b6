"""The benchmark runs end to end on the small encoder and reports what it measured."""

import json

import numpy as np
import pytest

from benchmarks.export_bench import main, time_paths


def test_time_paths_counts_images_per_second():
    calls = {"a": 0}

    def run(images):
        calls["a"] += 1
        assert images.shape[0] == 4

    speed = time_paths({"a": run}, np.zeros((10, 2, 2, 1), np.uint8), batch=4, rounds=2, min_seconds=0.01)
    assert calls["a"] >= 3  # warm-up + at least one call per round
    assert speed["a"]["min"] <= speed["a"]["img_per_s"] <= speed["a"]["max"]


def test_bench_small_encoder_end_to_end(tmp_path, fmnist_images, capsys):
    out = tmp_path / "bench.md"
    argv = ["--skip-vit-s", "--rounds", "1", "--min-seconds", "0.01", "--gate-images", "50",
            "--batches", "1,2", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    (model,) = report["models"]
    rows = {r["path"]: r for r in model["rows"]}
    assert set(rows) == {"pytorch eager fp32", "pytorch bf16 autocast", "onnxruntime fp32",
                         "onnxruntime int8-dynamic", "onnxruntime int8-static", "onnxruntime fp16"}
    assert rows["pytorch eager fp32"]["b1_speedup"] == pytest.approx(1.0)
    assert rows["onnxruntime fp32"]["quality"]["mean_cosine"]["cls"] > 0.99999
    assert rows["onnxruntime int8-dynamic"]["quality"]["max_abs_err"]["cls"] > 1e-3  # really int8
    assert rows["onnxruntime int8-dynamic"]["quality"]["knn"]["n_test"] == 50
    bf16 = rows["pytorch bf16 autocast"]["quality"]
    assert 0.99 < bf16["mean_cosine"]["cls"] < 1.0 and bf16["max_abs_err"]["cls"] > 1e-4  # really bf16
    assert "confidence" in bf16["knn"] and set(report["ort_bf16_kernels"]) >= {"MatMul", "Erf"}
    assert all(r["b2"]["img_per_s"] > 0 for r in rows.values())
    text = out.read_text()
    assert "Fastest path passing the gate at batch 2" in text and report["threads"] == 1
    assert "bf16 on this CPU" in text and "k-NN drop 95% CI" in text
    assert text.strip() in capsys.readouterr().out  # the CLI prints the page it writes


def test_ort_bf16_probe_reports_each_op():
    from benchmarks.export_bench import ort_bf16_kernels, ort_bf16_path

    kernels = ort_bf16_kernels({"MatMul": [[2, 4], [4, 3]], "Transpose": [[2, 4]]})
    assert set(kernels) == {"MatMul", "Transpose"}
    assert kernels["Transpose"] == "yes"  # a layout op ORT has for every type
    assert kernels["MatMul"] == "yes" or "NOT_IMPLEMENTED" in kernels["MatMul"]
    assert ort_bf16_path({"MatMul": "yes", "Add": "yes", "Softmax": "yes", "Erf": "yes"})
    assert not ort_bf16_path({**{op: "yes" for op in ("Add", "Softmax", "Erf")}, "MatMul": "NOT_IMPLEMENTED"})
