"""``benchmarks.embed_dataset`` end to end, tiny: 2000 Fashion-MNIST images (4 blocks of 512, so a steady state exists), one worker, on a local Ray."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_tiny_run_writes_the_report(tmp_path):
    pytest.importorskip("ray")
    pytest.importorskip("export.repository")
    from benchmarks import embed_dataset as bench

    out = tmp_path / "bench.md"
    assert bench.main(["--fmnist-images", "2000", "--vit-images", "0", "--workers", "1", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in report["rows"]] == ["Fashion-MNIST PNG folder", "Fashion-MNIST Parquet"]
    for row in report["rows"]:
        assert row["baseline"]["img_s"] > 0 and row["baseline_after"]["img_s"] > 0
        (job,) = row["jobs"]
        assert job["workers"] == 1 and job["steady_img_s"] > 0
    assert report["ray_start_s"] > 0 and report["machine"]["fp32_matmul_gflops"] > 0
    assert "| Fashion-MNIST Parquet | 2000 | 1 x" in out.read_text()
