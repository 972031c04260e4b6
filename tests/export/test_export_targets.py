"""Lanes (throughput/latency entries) and the production Triton target, against saved config files."""

import json
import os
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from contract.manifest import Manifest
from export.cli import main, parse_version_policy
from export.entry import lane_batching, triton_config
from export.errors import ExportUsageError
from export.options import ExportOptions, TritonOptions
from export.repository import export_entries
from export.sources import EncoderSource
from export.triton_config import GpuAccelerator, TritonConfigError, VersionPolicy, parse_pbtxt
from tests.export.conftest import read_manifest
from training.backbone import EncoderSpec

DATA = Path(__file__).parent / "data"
REGENERATE = os.environ.get("VITSERVE_REGENERATE_EXPECTED") == "1"
# A fixed spec and manifest (the real manifest carries timestamps and hashes).
SPEC = EncoderSpec(model_name="vit_tiny_patch16_224", overrides={}, img_size=(28, 28), patch_size=(4, 4),
                   grid_size=(7, 7), in_chans=1, embed_dim=192, depth=2, num_prefix_tokens=1,
                   num_register_tokens=0, has_cls_token=True, mean=(0.286,), std=(0.353,), timm_version="x")
MANIFEST = Manifest(name="fm", version=1)

CASES = {
    "config_lane_throughput.pbtxt": dict(name="fm", lane="throughput"),
    "config_lane_latency.pbtxt": dict(name="fm_latency", lane="latency"),
    "config_production_gpu_trt.pbtxt": dict(
        name="fm", backend="onnxruntime", instance_kind="GPU", instance_count=2,
        version_policy=VersionPolicy("latest", num_versions=2), gpu_accelerators=(GpuAccelerator(),)),
    "config_production_cpu_specific.pbtxt": dict(
        name="fm", backend="onnxruntime", instance_kind="CPU", intra_op_threads=2,
        version_policy=VersionPolicy("specific", versions=(1, 3))),
    "config_tensorrt_plan.pbtxt": dict(
        name="fm_trt", backend="tensorrt", instance_kind="GPU",
        cc_model_filenames=(("8.9", "model_cc8.9_trt10.3.0.plan"), ("9.0", "model_cc9.0_trt10.3.0.plan"))),
    "config_production_all_versions_latency.pbtxt": dict(
        name="fm_latency", backend="onnxruntime", instance_kind="GPU", lane="latency",
        version_policy=VersionPolicy("all")),
}


def render(name, lane=None, cc_model_filenames=(), **triton):
    return triton_config(name, SPEC, MANIFEST, TritonOptions(**triton), lane=lane,
                         cc_model_filenames=cc_model_filenames).to_pbtxt()


@pytest.mark.parametrize("filename", sorted(CASES))
def test_config_equals_saved_expected_file(filename):
    text = render(**CASES[filename])
    if REGENERATE:
        (DATA / filename).write_text(text)
    assert text == (DATA / filename).read_text()
    assert parse_pbtxt(text) == parse_pbtxt((DATA / filename).read_text())


def test_saved_files_say_what_they_should():
    thr = parse_pbtxt((DATA / "config_lane_throughput.pbtxt").read_text())
    lat = parse_pbtxt((DATA / "config_lane_latency.pbtxt").read_text())
    assert list(thr.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert thr.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(lat.dynamic_batching.preferred_batch_size) == [1, 2, 4]
    assert lat.dynamic_batching.max_queue_delay_microseconds == 0
    gpu = parse_pbtxt((DATA / "config_production_gpu_trt.pbtxt").read_text())
    assert gpu.platform == "onnxruntime_onnx" and gpu.backend == "onnxruntime"
    assert gpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and gpu.instance_group[0].count == 2
    assert gpu.version_policy.latest.num_versions == 2
    (acc,) = gpu.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    cpu = parse_pbtxt((DATA / "config_production_cpu_specific.pbtxt").read_text())
    assert list(cpu.version_policy.specific.versions) == [1, 3]
    assert cpu.parameters["intra_op_thread_count"].string_value == "2"
    assert not cpu.HasField("optimization")
    assert parse_pbtxt((DATA / "config_production_all_versions_latency.pbtxt").read_text()
                       ).version_policy.HasField("all")


def test_lane_batching_caps_preferred_sizes_at_max_batch():
    assert lane_batching("throughput", 16, 100).preferred_batch_size == (8, 16)
    assert lane_batching("throughput", 4, 100).preferred_batch_size == (4,)
    assert lane_batching("latency", 2, 100).preferred_batch_size == (1, 2)
    assert lane_batching(None, 64, 100).preferred_batch_size == ()
    with pytest.raises(ExportUsageError, match="lane"):
        lane_batching("fast", 64, 100)


@pytest.mark.parametrize("kw, message", [
    (dict(gpu_accelerators=(GpuAccelerator(),)), "need the onnxruntime backend"),
    (dict(backend="onnxruntime", gpu_accelerators=(GpuAccelerator(),)), "KIND_GPU"),
    (dict(version_policy=VersionPolicy("latest", num_versions=0)), "num_versions"),
    (dict(version_policy=VersionPolicy("specific")), "specific version policy"),
])
def test_invalid_production_configs_are_refused(kw, message):
    with pytest.raises(TritonConfigError, match=message):
        render("fm", **kw)


def test_parse_version_policy():
    assert parse_version_policy("latest") == VersionPolicy("latest", 1)
    assert parse_version_policy("latest:3") == VersionPolicy("latest", 3)
    assert parse_version_policy("all") == VersionPolicy("all")
    assert parse_version_policy("specific:1,2") == VersionPolicy("specific", versions=(1, 2))
    for bad in ("newest", "specific", "latest:x", "all:2"):
        with pytest.raises(ExportUsageError, match="--version-policy"):
            parse_version_policy(bad)


def test_lanes_write_two_entries_pointing_at_each_other(encoder, tmp_path, fmnist_images):
    model, spec = encoder
    paths = export_entries(EncoderSource(model, spec), tmp_path / "repo", "fm",
                           ExportOptions(lanes=True, parity_images=fmnist_images[:4]))
    assert [p.name for p in paths] == ["fm", "fm_latency"]
    lanes = {"throughput": "fm", "latency": "fm_latency"}
    thr, lat = (read_manifest(p) for p in paths)
    assert thr["lanes"] == lat["lanes"] == lanes and (thr["lane"], lat["lane"]) == ("throughput", "latency")
    assert thr["files"] == lat["files"]  # the same graph, other batching
    assert thr["parity"] == lat["parity"]
    for path, preferred, delay in ((paths[0], [8, 16, 32], 500), (paths[1], [1, 2, 4], 0)):
        config = parse_pbtxt((path / "config.pbtxt").read_text())
        assert config.name == path.name
        assert list(config.dynamic_batching.preferred_batch_size) == preferred
        assert config.dynamic_batching.max_queue_delay_microseconds == delay
        assert json.loads(config.parameters["vitserve_manifest"].string_value) == read_manifest(path)
        assert sorted(p.name for p in (path / "1").iterdir()) == ["model.onnx", "model.py"]


def test_cli_production_target_with_buckets_and_lanes(tmp_path, make_run_dir, capsys):
    run = make_run_dir(tmp_path / "run")
    repo = tmp_path / "repo"
    assert main([str(run), "--repository", str(repo), "--name", "fm", "--target", "production",
                 "--trt-accelerator", "fp16", "--version-policy", "latest:2", "--lanes",
                 "--resolutions", "28,56", "--max-batch-size", "16"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    assert sorted(p.name for p in repo.iterdir()) == ["fm", "fm_latency", "fm_r56", "fm_r56_latency"]
    manifest = read_manifest(repo / "fm_r56_latency")
    assert manifest["lanes"] == {"throughput": "fm_r56", "latency": "fm_r56_latency"}
    assert [b["model"] for b in manifest["buckets"]] == ["fm", "fm_r56"]
    assert manifest["exporter"]["target"] == "production" and manifest["exporter"]["backend"] == "onnxruntime"
    config = parse_pbtxt((repo / "fm/config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx" and config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert config.version_policy.latest.num_versions == 2
    assert config.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert sorted(p.name for p in (repo / "fm/1").iterdir()) == ["model.onnx"]  # no Python in the hot path


def test_cli_tensorrt_and_accelerator_misuse(tmp_path, make_run_dir, capsys):
    run = make_run_dir(tmp_path / "run")
    repo = tmp_path / "repo"
    from export.tensorrt_engine import tensorrt_unavailable_reason

    assert main([str(run), "--repository", str(repo), "--tensorrt"]) == 1
    err = capsys.readouterr().err
    assert "TensorRT engines cannot be built here" in err and "nothing was written" in err
    reason = tensorrt_unavailable_reason()
    assert reason is None or reason in err
    assert main([str(run), "--repository", str(repo), "--trt-accelerator", "fp16"]) == 2
    assert "--target production" in capsys.readouterr().err
    assert main([str(run), "--repository", str(repo), "--target", "production", "--instance-kind", "CPU",
                 "--trt-accelerator", "fp16"]) == 2
    assert "KIND_GPU" in capsys.readouterr().err
    assert main([str(run), "--repository", str(repo), "--target", "production", "--backend", "python"]) == 2
    assert "drop --backend python" in capsys.readouterr().err
    assert not repo.exists() or list(repo.iterdir()) == []


def test_tensorrt_plan_file_says_what_it_should():
    config = parse_pbtxt((DATA / "config_tensorrt_plan.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and config.backend == "tensorrt"
    assert dict(config.cc_model_filenames) == {"8.9": "model_cc8.9_trt10.3.0.plan",
                                               "9.0": "model_cc9.0_trt10.3.0.plan"}
    assert config.default_model_filename == "model.plan"  # absent: an unknown GPU fails to load
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]


@pytest.mark.parametrize("kw, message", [
    (dict(backend="tensorrt", instance_kind="CPU", cc_model_filenames=(("9.0", "m.plan"),)), "KIND_GPU"),
    (dict(backend="tensorrt", instance_kind="GPU"), "at least one engine"),
    (dict(backend="tensorrt", instance_kind="GPU", cc_model_filenames=(("sm90", "m.plan"),)), "<major>.<minor>"),
    (dict(backend="tensorrt", instance_kind="GPU", cc_model_filenames=(("9.0", "m.onnx"),)), ".plan"),
    (dict(backend="tensorrt", instance_kind="GPU", cc_model_filenames=(("9.0", "a.plan"), ("9.0", "b.plan"))),
     "two engines"),
    (dict(backend="onnxruntime", instance_kind="GPU", cc_model_filenames=(("9.0", "m.plan"),)),
     "tensorrt backend only"),
    (dict(backend="tensorrt", instance_kind="GPU", cc_model_filenames=(("9.0", "m.plan"),),
          gpu_accelerators=(GpuAccelerator(),)), "onnxruntime backend"),
])
def test_tensorrt_plan_misconfigurations_are_refused(kw, message):
    with pytest.raises(TritonConfigError, match=message):
        render("fm_trt", **kw)
