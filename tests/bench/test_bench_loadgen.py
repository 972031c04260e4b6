"""``vitserve bench`` against a real service and in-process ONNX Runtime / PyTorch, driven by LoadGen.

Settings are generous on purpose (latency bound 5 s, server target half of what the system sustains,
short minimum durations with early stopping's minimum query counts), so a VALID verdict depends on
what the code promises, not on how fast this machine is: single-stream needs 64 queries, multi-stream
and server 662 (early stopping's minimum for p90 and p99), offline its minimum duration.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from bench.report import TIMM_COLUMNS, pareto_front, rows, write_report
from bench.run import BenchOptions, ModelRun, run_models
from bench.scenarios import SCENARIOS

pytestmark = pytest.mark.slow

GENEROUS_MS = 5000.0


def _opts(**kw) -> BenchOptions:
    base = dict(scenarios=list(SCENARIOS), systems=["service", "onnxruntime"], num_samples=32, cameras=2,
                latency_bound_ms=GENEROUS_MS, min_duration_ms=300, control_hz=1000.0)
    base.update(kw)
    return BenchOptions(**base)


def _conditions(opts: BenchOptions, target: str) -> dict:
    from bench.cli import describe_conditions
    from bench.machine import machine

    return {"machine": machine(matmul_seconds=0.2, int8=True), **describe_conditions(opts, target, False),
            "command": "test"}


@pytest.fixture(scope="module")
def full_run(bench_repository, service_target, tmp_path_factory) -> tuple[list[ModelRun], Path, BenchOptions]:
    """tiny_a through every scenario, the service and in-process ORT side by side, plus accuracy mode."""
    out = tmp_path_factory.mktemp("bench_full")
    opts = _opts(accuracy=True)
    return run_models(["tiny_a"], bench_repository.path, opts, out, target=service_target), out, opts


def test_every_scenario_is_valid_against_the_service_and_in_process(full_run) -> None:
    runs, out, _ = full_run
    [run] = runs
    assert [s.system for s in run.systems] == ["service", "onnxruntime"]
    for sr in run.systems:
        assert [r.scenario for r in sr.results] == list(SCENARIOS)
        for r in sr.results:
            assert r.valid is True, (sr.system, r.scenario, r.failed_checks, r.advice)
            assert r.failed_checks == [] and r.sut_errors == []
            assert r.metric is not None and r.metric > 0
            summary = Path(r.log_dir) / "mlperf_log_summary.txt"  # LoadGen's own logs, kept
            assert summary.is_file() and (Path(r.log_dir) / "mlperf_log_detail.txt").is_file()
            assert "Result is : VALID" in summary.read_text()
            assert Path(r.log_dir).is_relative_to(out)
        by = {r.scenario: r for r in sr.results}
        assert by["multi-stream"].settings["cameras"] == 2
        for scenario in ("single-stream", "multi-stream"):  # --control-hz: a fraction of the steps
            assert 0.0 <= by[scenario].deadline_miss <= 1.0
        assert by["server"].settings["target_qps"] > 0 and by["server"].p99_ms <= GENEROUS_MS
        for request in ("embed", "features"):  # the first request after load, reported apart
            assert sr.cold_start[request]["first_ms"] > 0 and sr.cold_start[request]["warm_ms"] > 0


def test_accuracy_mode_service_outputs_equal_in_process_outputs(full_run) -> None:
    runs, _, opts = full_run
    acc = runs[0].accuracy
    assert set(acc) == {"service vs onnxruntime embed", "service vs onnxruntime features"}
    for v in acc.values():
        assert v["samples"] == opts.num_samples and v["max_abs_err"] <= 1e-4


def test_accuracy_logs_hold_cls_and_patch_tokens(full_run, bench_repository) -> None:
    """The accuracy logs are the model's outputs: CLS [D] for Embed, patch tokens [h*w, D] for Features."""
    from bench.scenarios import read_accuracy_log
    from training.data import to_float_nchw

    runs, out, _ = full_run
    import torch

    model, spec = bench_repository.torch_models["tiny_a"]
    base = out / "loadgen" / "tiny_a" / "service"
    d = spec.embed_dim
    ph, pw = spec.patch_size if isinstance(spec.patch_size, tuple) else (spec.patch_size,) * 2
    grid = (spec.img_size[0] // ph) * (spec.img_size[1] // pw)
    cls = read_accuracy_log(base / "accuracy-embed", (d,))
    tokens = read_accuracy_log(base / "accuracy-features", (grid, d))
    from training.data import load_fashion_mnist

    images = load_fashion_mnist("test").images[:4]
    with torch.no_grad():
        ref = model.forward_features(to_float_nchw(images, spec.mean, spec.std)).numpy()
    for i in range(4):
        np.testing.assert_allclose(cls[i], ref[i, 0], atol=1e-4)
        np.testing.assert_allclose(tokens[i], ref[i, spec.num_prefix_tokens:], atol=1e-4)


def test_a_latency_bound_no_system_can_meet_is_invalid_with_the_reason(bench_repository, service_target,
                                                                       tmp_path) -> None:
    opts = _opts(scenarios=["server"], latency_bound_ms=1e-6, target_qps=50.0,
                 min_query_count={"server": 100})  # 1 ns
    runs = run_models(["tiny_a"], bench_repository.path, opts, tmp_path, target=service_target)
    for sr in runs[0].systems:
        [r] = sr.results
        assert r.valid is False
        assert "Performance constraints satisfied" in r.failed_checks
        assert r.advice, "LoadGen's advice (what to change) is reported"
        assert "Result is : INVALID" in (Path(r.log_dir) / "mlperf_log_summary.txt").read_text()
    paths = write_report(runs, _conditions(opts, service_target), tmp_path / "report", opts.scenarios)
    md = paths["md"].read_text()
    assert "INVALID" in md and "failed: Performance constraints satisfied" in md and "LoadGen says:" in md


def test_torch_system_matches_onnxruntime_in_accuracy_mode(bench_repository, tmp_path) -> None:
    opts = _opts(scenarios=["single-stream"], systems=["onnxruntime", "torch"], accuracy=True)
    runs = run_models(["tiny_a"], bench_repository.path, opts, tmp_path, torch_models=bench_repository.torch_models)
    run = runs[0]
    assert [s.system for s in run.systems] == ["onnxruntime", "torch-cpu"]
    assert all(r.valid for s in run.systems for r in s.results)
    [(key, v)] = run.accuracy.items()
    assert key == "onnxruntime vs torch-cpu features" and v["samples"] == 32 and v["max_abs_err"] <= 1e-4


def test_http_and_encoded_inputs_match_in_process_decoding(bench_repository, service_target, service_http_url,
                                                           tmp_path) -> None:
    """PNG bytes in every request: gRPC and HTTP (the gateway decodes) and ORT (decodes in-process) agree."""
    opts = _opts(scenarios=["single-stream", "offline"], systems=["service", "http", "onnxruntime"],
                 input_kind="encoded", accuracy=True)
    runs = run_models(["tiny_b"], bench_repository.path, opts, tmp_path, target=service_target,
                      http_url=service_http_url)
    run = runs[0]
    assert [s.system for s in run.systems] == ["service", "http", "onnxruntime"]
    for sr in run.systems:
        for r in sr.results:
            assert r.valid is True, (sr.system, r.scenario, r.failed_checks, r.advice)
    assert run.info["samples"]["kind"] == "encoded"
    assert set(run.accuracy) == {f"service vs {o} {req}" for o in ("http", "onnxruntime")
                                 for req in ("embed", "features")}
    for v in run.accuracy.values():
        assert v["samples"] == 32 and v["max_abs_err"] <= 1e-4


def test_two_models_give_one_table_and_one_plot(bench_repository, service_target, tmp_path) -> None:
    from PIL import Image

    opts = _opts(scenarios=["single-stream", "offline"])
    runs = run_models(["tiny_a", "tiny_b"], bench_repository.path, opts, tmp_path, target=service_target)
    conditions = _conditions(opts, service_target)
    paths = write_report(runs, conditions, tmp_path / "report", opts.scenarios)
    with open(paths["csv"]) as f:
        reader = csv.DictReader(f)
        table = list(reader)
        columns = reader.fieldnames
    assert list(columns[:len(TIMM_COLUMNS)]) == list(TIMM_COLUMNS)
    assert [(r["model"], r["system"]) for r in table] == [
        ("tiny_a", "service"), ("tiny_a", "onnxruntime"), ("tiny_b", "service"), ("tiny_b", "onnxruntime")]
    for r in table:
        assert float(r["infer_samples_per_sec"]) > 0 and int(r["infer_img_size"]) == 28
        assert float(r["param_count"]) > 0 and float(r["infer_gmacs"]) > 0
        assert float(r["fraction_of_matmul_rate"]) > 0 and r["matmul_rate_measured_with"]
    assert table[0]["offline_vs_in_process"] and not table[1]["offline_vs_in_process"]
    md = paths["md"].read_text()
    assert md.index("## Conditions") < md.index("## Leaderboard")  # conditions first
    assert md.count("| tiny_a |") == 2 and md.count("| tiny_b |") == 2
    for needle in ("matmul rate", "transport:", "input:", "decoding timed", "batching:", "software:"):
        assert needle in md
    doc = json.loads(paths["json"].read_text())
    assert len(doc["plot_points"]) == 4  # two models x two systems x single-stream
    with Image.open(paths["png"]) as im:
        assert im.size[0] >= 600 and im.size[1] >= 400
        pixels = np.asarray(im.convert("L"))
    assert (pixels < 128).mean() > 0.01  # axes, labels and points drawn, not a blank image


def test_pareto_front_keeps_points_no_other_beats_on_both() -> None:
    # (p99 ms, samples/s): (10, 100) beats (20, 50); (5, 60) and (30, 300) are each best on one axis
    pts = [(10.0, 100.0), (20.0, 50.0), (5.0, 60.0), (30.0, 300.0), (10.0, 90.0)]
    assert pareto_front(pts) == [2, 0, 3]


def test_cli_runs_against_a_running_service(bench_repository, service_target, tmp_path, capsys) -> None:
    from bench.cli import main

    out = tmp_path / "cli"
    code = main(["--model-repository", str(bench_repository.path), "--target", service_target, "--models", "tiny_b",
                 "--scenario", "single-stream", "--num-samples", "16", "--min-duration-ms", "200",
                 "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"bench.md", "bench.csv", "bench.json", "bench.png", "loadgen"}
    assert (out / "loadgen" / "tiny_b" / "service" / "single-stream" / "mlperf_log_summary.txt").is_file()
    assert "tiny_b" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--scenario", "bogus"], "expected a comma list of single-stream"),
    (["--systems", "tensorrt"], "expected a comma list of service, http, onnxruntime"),
    (["--systems", "http"], "--systems http sends image files: add --input encoded"),
    (["--latency-bound", "-1"], "expected a positive number"),
    (["--models", "vit_huge"], "unknown model vit_huge; the repository"),
])
def test_cli_bad_flags_exit_2_with_a_message(bench_repository, argv, message, capsys) -> None:
    from bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model-repository", str(bench_repository.path), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: vitserve bench" in err
    if argv[0] == "--models":
        assert "tiny_a, tiny_b" in err
