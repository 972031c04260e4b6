"""The demo end to end with a tiny budget: train -> export -> serve subprocess -> query -> stop."""

import re

import numpy as np

from vitserve import demo


def test_demo_runs_end_to_end(tmp_path, capsys):
    code = demo.main(["--workdir", str(tmp_path), "--train-seconds", "3", "--knn-train", "300",
                      "--knn-test", "100", "--train-scenes", "80", "--test-scenes", "40"])
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
    png = tmp_path / "features.png"
    assert f"CLS attention mean and per head): {png}" in out
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] > 4 * 112 and image.std() > 0  # 4 rows of 112 px panels
    for label in ("service patch tokens:", "raw pixel patches (baseline):"):
        miou = float(re.search(re.escape(label) + r"\s+mIoU ([\d.]+)%", out).group(1))
        assert 100.0 / 11 < miou <= 100.0  # above predicting one class everywhere (background is ~72%)
    assert (tmp_path / "model_repository" / demo.MODEL_NAME / "manifest.json").is_file()
