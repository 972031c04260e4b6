"""The demo end to end with a tiny budget: train -> export -> serve subprocess -> query -> stop."""

import re

from vitserve import demo


def test_demo_runs_end_to_end(tmp_path, capsys):
    code = demo.main(["--workdir", str(tmp_path), "--train-seconds", "3", "--knn-train", "300",
                      "--knn-test", "100"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "CLS embeddings (8, 192) float32" in out
    assert "patch grid (2, 7, 7, 192)" in out
    err = float(re.search(r"max abs error (\S+)", out).group(1))
    assert err <= 1e-4
    for label in ("service CLS embeddings:", "raw pixels (baseline):"):
        value = float(re.search(re.escape(label) + r"\s+([\d.]+)%", out).group(1))
        assert 10.0 < value <= 100.0  # 10 classes: far above chance for raw pixels and any encoder
    assert "service stopped (exit code 0)" in out
    assert (tmp_path / "model_repository" / demo.MODEL_NAME / "manifest.json").is_file()
