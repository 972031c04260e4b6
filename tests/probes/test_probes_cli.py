"""``vitserve probe``: a small end-to-end run that writes probes.json, and precise errors."""

import json

import pytest

from probes.cli import main

SMALL = ["--limit-train", "300", "--limit-test", "100", "--train-scenes", "20", "--test-scenes", "10",
         "--threads", "1", "--l2-grid", "1e-2,1e-4", "--max-iter", "50"]


def test_probe_run_writes_probes_json_and_results(small_run, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["--run", str(small_run), "--baselines", "--write-run", "--out", str(out), *SMALL]) == 0
    record = json.loads((small_run / "probes.json").read_text())
    assert record["format_version"] == 1 and record["data"] == "fashion-mnist"
    # k-NN on the final layer (DINO's eval_knn), the linear probe also on last4 (DINOv2's linear eval)
    assert set(record["scores"]) == {"knn_cls_top1", "knn_mean_top1", "linear_cls_top1", "linear_mean_top1",
                                     "linear_last4_top1", "dense_patch_acc", "dense_miou"}
    assert all(0 <= v <= 100 for v in record["scores"].values())
    assert record["skipped"] == {}
    # a subset, recorded as such (export copies it and warns)
    assert (record["n_train"], record["n_test"], record["full_split"]) == (300, 100, False)
    p = record["protocol"]
    assert (p["knn"]["k"], p["knn"]["temperature"], p["n_train"], p["n_test"]) == (20, 0.07, 300, 100)
    assert p["full_split"] is False and "last 4 blocks" in p["global_features"]["last4"]
    assert p["knn"]["poolings"] == ["cls", "mean"] and p["linear"]["poolings"] == ["cls", "mean", "last4"]
    assert p["scenes"]["n_train_scenes"] == 20 and p["scenes"]["grid"] == 14
    assert record["source"].startswith("torch:") and record["created"].endswith("Z")
    results = json.loads(out.read_text())
    assert [r["source"].split(":")[0] for r in results["records"]] == ["torch", "raw-pixels", "random-init"]
    raw = results["records"][1]
    assert "linear_last4_top1" not in raw["scores"] and "no transformer blocks" in raw["skipped"]["last4"]
    assert "linear_last4_top1" in results["records"][2]["scores"]  # the random-init encoder has 4 blocks
    printed = capsys.readouterr().out
    assert "a subset, not the full Fashion-MNIST split" in printed
    assert "skipped last4 for raw-pixels" in printed


def test_probe_subset_of_probes(small_run, tmp_path):
    out = tmp_path / "r.json"
    assert main(["--run", str(small_run), "--probes", "knn", "--out", str(out), *SMALL]) == 0
    assert set(json.loads(out.read_text())["records"][0]["scores"]) == {"knn_cls_top1", "knn_mean_top1"}
    assert main(["--run", str(small_run), "--probes", "knn", "--knn-poolings", "last4", "--out", str(out), *SMALL]) == 0
    assert set(json.loads(out.read_text())["records"][0]["scores"]) == {"knn_last4_top1"}


def test_onnx_source_records_why_it_has_no_last4(small_export, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--onnx", str(small_export), "--probes", "knn", "--knn-poolings", "cls,mean,last4",
                 "--out", str(out), *SMALL]) == 0
    record = json.loads(out.read_text())["records"][0]
    assert set(record["scores"]) == {"knn_cls_top1", "knn_mean_top1"}
    assert "not the CLS token of earlier blocks" in record["skipped"]["last4"]
    assert "skipped last4 for onnx:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, code, message", [
    (["--run", "/nonexistent/run"], 2, "run directory /nonexistent/run does not exist"),
    (["--onnx", "/nonexistent/model.onnx"], 2, "does not exist"),
    (["--service", "127.0.0.1:9"], 2, "--service needs --model"),
    (["--run", "RUN", "--probes", "knn,segmentation"], 2, "unknown probe"),
    (["--onnx", "X", "--write-run"], 2, "--write-run needs --run"),
    (["--run", "RUN", "--limit-train", "0"], 2, "--limit-train must be >= 1"),
    (["--run", "RUN", "--l2-grid", "a,b"], 2, "--l2-grid must be comma-separated numbers"),
    (["--run", "RUN", "--poolings", "cls,last12"], 2, "--poolings: unknown pooling(s) ['last12']"),
])
def test_usage_errors(argv, code, message, small_run, small_export, capsys):
    argv = [str(small_run) if a == "RUN" else str(small_export) if a == "X" else a for a in argv]
    assert main(argv) == code
    assert message in capsys.readouterr().err


def test_incomplete_run_dir_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["--run", str(tmp_path / "run")]) == 2
    assert "missing encoder_spec.json, encoder.pt" in capsys.readouterr().err


def test_missing_data_exits_1(small_run, tmp_path, capsys):
    assert main(["--run", str(small_run), "--data-dir", str(tmp_path), *SMALL]) == 1
    assert "Fashion-MNIST not found" in capsys.readouterr().err


def test_unreachable_service_exits_1(capsys):
    assert main(["--service", "127.0.0.1:9", "--model", "m", "--timeout", "2", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:9" in err and "UNAVAILABLE" in err


def test_full_split_is_recorded_only_for_the_whole_splits(fmnist):
    from probes.evaluate import load_probe_data

    full = load_probe_data(dense=False)
    assert full.full_split is True and full.protocol()["n_train"] == len(fmnist[0]) == 60000
    assert load_probe_data(limit_train=100, dense=False).full_split is False
    assert load_probe_data(limit_test=100, dense=False).full_split is False
    assert load_probe_data(limit_train=10 ** 6, limit_test=10 ** 6, dense=False).full_split is True  # caps: all
