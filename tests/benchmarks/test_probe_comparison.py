"""The comparison driver: training info from a run's files, the table, the claim checks and the plot."""

import json

import pytest

from benchmarks.probe_comparison import main, merge_into, training_info
from benchmarks.probe_report import check_claims, check_dinov2, check_targets, write_outputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as in tests/probes/

KEYS = ("knn_cls_top1", "knn_mean_top1", "knn_last4_top1", "linear_cls_top1", "linear_mean_top1",
        "linear_last4_top1", "dense_patch_acc", "dense_miou")


def _row(label, kind, values, method=None, img_per_s=None):
    scores = {k: v for k, v in zip(KEYS, values) if v is not None}
    return {"label": label, "kind": kind, "scores": scores,
            "training": {"method": method, "img_per_s": img_per_s} if method else {}}


ROWS = [_row("mae", "run", (80, 82, 83, 84, 86, 85.5, 85, 40), "mae", 300.0),
        _row("simclr", "run", (86, 84, 85, 87, 85, 89, 80, 30), "simclr", 100.0),
        _row("raw-pixels", "raw-pixels", (85.7, 20, None, 84, 30, None, 75, 25)),
        _row("random-init", "random-init", (75, 76, 77, 80, 81, 82, 78, 35))]
ROWS[2]["skipped"] = {"last4": "raw pixels have no transformer blocks"}
PROTOCOL = {"n_train": 60000, "n_test": 10000, "knn": {"k": 20, "temperature": 0.07},
            "linear": {"method": "softmax", "l2_grid": [0.1], "max_iter": 300},
            "scenes": {"n_train_scenes": 2000, "n_test_scenes": 1000, "canvas_size": 56, "grid": 14}}


def test_training_info_reads_throughput_and_budget(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"method": "moco", "batch_size": 64, "max_minutes": 2.0,
                                                      "budget_clock": "cpu"}))
    lines = [{"step": 20, "loss": 3.0, "elapsed_s": 10.0, "knn_val_top1": 0.5}, {"step": 30, "loss": 2.7, "elapsed_s": 20.0},
             {"step": 40, "loss": 2.5, "elapsed_s": 32.0, "knn_val_top1": 0.625}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"step\": 4")  # torn tail
    info = training_info(tmp_path)
    assert (info["method"], info["steps"], info["images_seen"], info["final_loss"]) == ("moco", 40, 2560, 2.5)
    assert info["img_per_s"] == pytest.approx(80.0) and info["img_per_budget_s"] == pytest.approx(2560 / 120)
    # the online k-NN curve: only the records that carry knn_val_top1, in percent, against images seen
    assert info["online_knn"] == [{"step": 20, "images_seen": 1280, "elapsed_s": 10.0, "top1": 50.0},
                                  {"step": 40, "images_seen": 2560, "elapsed_s": 32.0, "top1": 62.5}]
    assert (info["online_knn_last"], info["online_knn_images"]) == (62.5, 2560)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(lines[1]) + "\n")
    assert "online_knn" not in training_info(tmp_path)


def test_targets_and_claims_are_judged_from_the_numbers():
    targets = check_targets(ROWS)
    # simclr's dense mIoU (30) is below the random-init encoder's (35): the only miss.
    assert targets[0] == ("every method beats the random-init encoder on every probe (each probe and pooling "
                          "against the same one of random-init): **no** (simclr dense_miou 30.00 <= 35.00)")
    # the targets name the pooling that reached them
    assert targets[1].endswith("**yes** (simclr 86.00 with cls pooling; best of CLS / mean / last4)")  # k-NN
    assert targets[2].endswith("**yes** (simclr 89.00 with last4 pooling; best of CLS / mean / last4)")
    claims = "\n".join(check_claims(ROWS))
    assert "linear probe: contrastive high, MAE moderate: simclr 89.00 vs mae 86.00 — **agrees**" in claims
    assert "dense prediction: MAE high, contrastive moderate (dense mIoU): mae 40.00 vs simclr 30.00 — **agrees**" in claims
    assert "training efficiency: MAE highly efficient (img/s): mae 300.00 vs simclr 100.00 — **agrees**" in claims


def test_dino_and_dinov2_both_stand_in_the_self_distillation_column():
    rows = [*ROWS[:2], _row("dino", "run", (60, 61, 62, 70, 71, 72, 76, 19), "dino", 30.0),
            _row("dinov2", "run", (66, 64, 65, 75, 74, 76, 78, 41), "dinov2", 28.0), *ROWS[2:]]
    claims = "\n".join(check_claims(rows))
    for d, miou in (("dino", "19.00"), ("dinov2", "41.00")):
        assert (f"spatial precision: self-distillation strong, contrastive weak (dense mIoU): {d} {miou} vs "
                f"simclr 30.00 — **{'agrees' if d == 'dinov2' else 'disagrees'}**") in claims
    assert "global semantics: self-distillation strong, MAE moderate (k-NN): dinov2 66.00 vs mae 83.00" in claims
    assert check_dinov2(rows) == [
        "DINOv2 above DINO on k-NN: **yes** (66.00 vs 62.00)",
        "DINOv2 above DINO on linear: **yes** (76.00 vs 72.00)",
        "DINOv2 above DINO on dense mIoU: **yes** (41.00 vs 19.00)",
        "DINOv2's dense mIoU above every other method: **yes** (41.00; the best other is mae 40.00)"]
    assert check_dinov2(ROWS) == []  # no DINOv2 run: no such section


def test_rows_probed_later_go_into_an_earlier_comparison(tmp_path):
    saved = {"protocol": PROTOCOL, "rows": json.loads(json.dumps(ROWS)), "created": "2026-01-01T00:00:00Z",
             "elapsed_s": 100.0}
    dino = _row("dino", "run", (60, 61, 62, 70, 71, 72, 76, 19), "dino", 30.0)
    dinov2 = _row("dinov2", "run", (66, 64, 65, 75, 74, 76, 78, 41), "dinov2", 28.0)
    mae_again = _row("mae", "run", (1, 1, 1, 1, 1, 1, 1, 1), "mae", 1.0)
    fresh = {"protocol": PROTOCOL, "rows": [mae_again, dino, dinov2], "created": "2026-02-02T00:00:00Z",
             "elapsed_s": 50.0}
    merged = merge_into(saved, fresh)
    # runs before baselines; the re-probed mae replaces the saved one
    assert [r["label"] for r in merged["rows"]] == ["simclr", "mae", "dino", "dinov2", "raw-pixels", "random-init"]
    assert merged["rows"][1]["scores"] == mae_again["scores"]
    assert merged["parts"] == [
        {"created": "2026-01-01T00:00:00Z", "elapsed_s": 100.0, "labels": ["simclr", "raw-pixels", "random-init"]},
        {"created": "2026-02-02T00:00:00Z", "elapsed_s": 50.0, "labels": ["mae", "dino", "dinov2"]}]
    md = write_outputs(merged, tmp_path / "m")[1].read_text()
    assert "Probed in parts with the same protocol: simclr, raw-pixels, random-init at 2026-01-01T00:00:00Z (100 s)" in md
    assert "## Targets (issue 22: DINOv2)" in md
    other = {**fresh, "protocol": {**PROTOCOL, "n_train": 1000}}
    with pytest.raises(ValueError, match=r"the protocols differ \(in n_train\)"):
        merge_into(saved, other)
    with pytest.raises(ValueError, match=r"the protocols differ \(in knn.k\)"):
        merge_into(saved, {**fresh, "protocol": {**PROTOCOL, "knn": {**PROTOCOL["knn"], "k": 10}}})
    # a setting the earlier comparison did not record yet (an older version wrote it) is named, not refused
    newer = {**fresh, "protocol": {**PROTOCOL, "knn": {**PROTOCOL["knn"], "poolings": ["cls", "mean"]}}}
    assert merge_into(saved, newer)["parts"][-1]["not_recorded_before"] == ["knn.poolings"]


def test_outputs_and_render_round_trip(tmp_path):
    rows = json.loads(json.dumps(ROWS))
    rows[0]["training"].update(knn_val=2000, knn_bank=5000, online_knn_last=71.5, online_knn_images=372224,
                               online_knn=[{"step": 1, "images_seen": 256, "top1": 40.0},
                                           {"step": 1454, "images_seen": 372224, "top1": 71.5}])
    protocol = {**PROTOCOL, "full_split": True, "global_features": {"cls": "CLS", "last4": "4 CLS + mean"}}
    result = {"protocol": protocol, "rows": rows, "created": "2026-01-01T00:00:00Z", "elapsed_s": 1.0}
    paths = write_outputs(result, tmp_path / "cmp")
    assert [p.name for p in paths] == ["cmp.json", "cmp.md", "cmp.png"]
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "cmp.md").read_text()
    assert "| simclr | simclr |" in md and "| 89.00 |" in md and "Self-distillation" in md
    assert "| k-NN last4 |" in md and "| linear last4 |" in md and "(the full splits)" in md
    assert "| 71.50 (372,224) |" in md and "2000 held-out train images against a bank of 5000" in md
    assert "- raw-pixels: no last4 (raw pixels have no transformer blocks)" in md
    assert "- **last4**: 4 CLS + mean" in md
    assert main(["--render", str(tmp_path / "cmp.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again.md").read_text() == md


def test_an_older_comparison_json_still_renders(tmp_path):
    # written before last4, online k-NN and full_split existed: no such columns, the split "not recorded"
    old_keys = ("knn_cls_top1", "knn_mean_top1", "linear_cls_top1", "linear_mean_top1", "dense_patch_acc",
                "dense_miou")
    rows = [{"label": "mae", "kind": "run", "scores": dict.fromkeys(old_keys, 50.0), "training": {"method": "mae"}}]
    md = write_outputs({"protocol": PROTOCOL, "rows": rows, "created": "x", "elapsed_s": 1.0}, tmp_path / "o")[1]
    text = md.read_text()
    assert "last4 |" not in text and "full split not recorded" in text and "| mae | mae |" in text


def test_missing_run_dir_is_refused(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "do not exist" in capsys.readouterr().err


def test_compare_runs_in_worker_processes_matches_in_process(small_run, tmp_path):
    import shutil

    from benchmarks.probe_comparison import compare_runs
    from probes.linear import LinearProtocol

    runs = [shutil.copytree(small_run, tmp_path / name) for name in ("a", "b")]
    kw = dict(limit_train=200, limit_test=100, train_scenes=8, test_scenes=4, threads=1,
              protocol=LinearProtocol(l2_grid=(1e-2,), max_iter=30), batch=128)
    serial = compare_runs(runs[:1], write_runs=False, **kw)
    parallel = compare_runs(runs, jobs=2, **kw)
    assert [r["label"] for r in parallel["rows"]] == ["a", "b", "raw-pixels", "random-init"]
    assert [r["label"] for r in serial["rows"]] == ["a", "raw-pixels", "random-init"]
    for s, p in zip(serial["rows"], [parallel["rows"][i] for i in (0, 2, 3)]):
        assert s["scores"] == p["scores"]
    assert parallel["rows"][0]["scores"] == parallel["rows"][1]["scores"]  # the same weights
    # in the pool each source is two tasks (global, dense), merged back into one row
    assert {"linear_last4_top1", "dense_miou"} <= set(parallel["rows"][0]["scores"])
    assert "knn_last4_top1" not in parallel["rows"][0]["scores"]  # k-NN: the final layer's poolings
    assert {"global_features_s", "dense_probe_s"} <= set(parallel["rows"][0]["timings"])
    assert "last4" in parallel["rows"][2]["skipped"] and serial["rows"][1]["skipped"] == parallel["rows"][2]["skipped"]
    assert json.loads((runs[1] / "probes.json").read_text())["full_split"] is False
    assert json.loads((runs[1] / "probes.json").read_text())["scores"] == parallel["rows"][1]["scores"]
