"""``python -m benchmarks.serving_bench`` (the old ``vitserve bench``) against a real service: a one-point sweep of 0.5 s per side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import serving_bench as bench

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    export_repository = pytest.importorskip("export.repository")
    import torch

    from training.backbone import FASHION_MNIST_MEAN, FASHION_MNIST_STD, create_encoder

    torch.manual_seed(0)
    model, spec = create_encoder(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    model.eval()
    repo = tmp_path_factory.mktemp("bench_repository")
    from export.options import ExportOptions, TritonOptions
    from export.sources import EncoderSource

    export_repository.export_entries(EncoderSource(model, spec), repo, "bench_tiny",
                                     ExportOptions(triton=TritonOptions(max_batch_size=8, intra_op_threads=1)))
    return repo


@pytest.fixture(scope="module")
def target(repository: Path):
    from serving.gateway import BackgroundGateway
    from serving.triton_launcher import TritonLauncher

    launcher = TritonLauncher(repository)
    gateway = None
    try:
        launcher.start(timeout=180)
        gateway = BackgroundGateway(launcher.grpc_url).start(timeout=60)
        yield gateway.target
    finally:
        if gateway is not None:
            gateway.stop()
        launcher.stop()


def _check_side(side: dict) -> None:
    assert side["requests"] > 0 and side["images"] > 0 and side["img_per_s"] > 0
    assert 0 < side["p50_ms"] <= side["p95_ms"] <= side["p99_ms"]


def test_model_files_reads_the_served_thread_count(repository: Path) -> None:
    onnx_path, threads = bench.model_files(repository, "bench_tiny")
    assert onnx_path == repository / "bench_tiny" / "1" / "model.onnx" and threads == 1


@pytest.mark.parametrize("client", bench.CLIENT_KINDS)
def test_one_point_sweep_against_a_real_service(repository: Path, target: str, tmp_path: Path,
                                                client: str) -> None:
    onnx_path, threads = bench.model_files(repository, "bench_tiny")
    result = bench.run_bench(target, "bench_tiny", onnx_path=onnx_path, intra_op_threads=threads,
                             batch_sizes=[2], concurrencies=[2], duration=0.5, warmup=0.1, client_kind=client)
    json.loads(json.dumps(result))  # JSON-serialisable
    cond = result["conditions"]
    assert cond["client"] == client
    assert cond["model"] == "bench_tiny" and cond["image_shape"] == [28, 28, 1]
    assert cond["intra_op_threads"] == 1 and cond["duration_s_per_point"] == 0.5
    (point,) = result["points"]
    assert point["batch_size"] == 2 and point["concurrency"] == 2
    _check_side(point["service"])
    _check_side(point["in_process"])
    assert point["service"]["images"] == 2 * point["service"]["requests"]
    assert point["throughput_ratio"] > 0 and point["p50_overhead_ms"] is not None
    assert "batch" in bench.format_table(result)


def test_main_writes_json_and_table(target: str, repository: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    rc = bench.main(["--target", target, "--model-repository", str(repository), "--batch-sizes", "1",
                     "--concurrency", "1", "--duration", "0.3", "--warmup", "0", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["points"]) == 1 and data["points"][0]["service"]["requests"] > 0
    assert data["conditions"]["command"].startswith("python -m benchmarks.serving_bench --target")
    assert "img/s" in capsys.readouterr().out


def test_usage_errors() -> None:
    assert bench.main([]) == 2
    with pytest.raises(SystemExit):
        bench.main(["--target", "x:1", "--batch-sizes", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--target", "x:1", "--client", "threads"])
    with pytest.raises(ValueError, match="client must be one of"):
        bench.bench_service("x:1", "m", np.zeros((1, 28, 28, 1), np.uint8), 1, 0.1, client="threads")
