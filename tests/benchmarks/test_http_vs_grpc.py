"""``benchmarks.http_vs_grpc`` end to end, tiny: one round of 0.3 s per side against a real service."""

from __future__ import annotations

import json

import pytest

from benchmarks import http_vs_grpc as bench

pytestmark = pytest.mark.slow


def test_tiny_run_writes_the_report(tmp_path):
    pytest.importorskip("export.repository")
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    assert bench.main(["--duration", "0.3", "--rounds", "1", "--json", str(out_json), "--markdown", str(out_md)]) == 0
    report = json.loads(out_json.read_text())
    sides = report["result"]["sides"]
    assert set(sides) == {"grpc_b8_c8", "http_float_b8_c8", "http_base64_b8_c8", "grpc_b1_c1", "http_float_b1_c1"}
    for side in sides.values():
        assert side["requests"] > 0 and side["img_per_s"] > 0 and 0 < side["p50_ms"] <= side["p95_ms"]
    ratio = report["result"]["throughput_ratio_http_float"]
    assert ratio == round(sides["http_float_b8_c8"]["img_per_s"] / sides["grpc_b8_c8"]["img_per_s"], 3)
    assert len(report["result"]["round_ratios_http_float"]) == 1 and report["result"]["round_ratios_http_base64"][0] > 0
    assert report["machine"]["fp32_matmul_gflops"] > 0 and len(report["machine"]["load_average"]) == 3
    assert "HTTP p50 overhead" in out_md.read_text() and report["command"].startswith("python -m benchmarks.http_vs_grpc")


def test_repository_and_model_go_together(capsys):
    assert bench.main(["--model", "m"]) == 2
    assert "give --model-repository and --model together" in capsys.readouterr().err
