"""benchmarks.training_bench: the step-time benchmark runs end to end on a tiny encoder and writes its report."""

from __future__ import annotations

from benchmarks import training_bench as bench


def test_bench_small_writes_report(tmp_path, capsys):
    doc = tmp_path / "bench.md"
    assert bench.main(["--small", "--rounds", "1", "--steps", "1", "--warmup", "0",
                       "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "Masked / unmasked" in text and "python -m benchmarks.training_bench --small" in text
    for method in ("mae", "dino", "simclr", "moco"):
        assert f"| {method} | 8 |" in text
    assert "Training step-time benchmark" in capsys.readouterr().out
