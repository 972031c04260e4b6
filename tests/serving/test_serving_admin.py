"""Model management, GetModel, lanes and chosen layers through a real Triton (explicit model
control) and gateway.

The repository holds ``laned`` and ``laned_latency`` (one export with lanes, probe scores and the
penultimate block's patch tokens, through the real exporter) and ``plain`` (the session's exported
model: no lanes, no probes, default outputs).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest

from clients.client import VitServeClient, VitServeError
from serving.gateway import BackgroundGateway
from serving.grpc_server import ServerOptions
from serving.triton_launcher import TritonLauncher

pytestmark = pytest.mark.slow

SCORES = {"knn_cls_top1": 0.71, "linear_cls_top1": 0.8, "dense_miou": 0.25}
TOKEN = "admin-token"


@pytest.fixture(scope="module")
def repository(exported, tmp_path_factory) -> Path:
    export_repository = pytest.importorskip("export.repository")
    repo = tmp_path_factory.mktemp("admin_repository")
    shutil.copytree(exported.repository / exported.name, repo / "plain")
    config = repo / "plain" / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{exported.name}"', 'name: "plain"'))
    probes = {"format_version": 1, "scores": SCORES, "run": "test"}
    from export.options import ExportOptions, TritonOptions
    from export.outputs import OutputSelection
    from export.sources import EncoderSource

    export_repository.export_entries(EncoderSource(exported.model, exported.spec, probes=probes), repo, "laned",
                                     ExportOptions(lanes=True, outputs=OutputSelection(layers=(-2,)),
                                                   triton=TritonOptions(max_batch_size=8)))
    return repo


@pytest.fixture(scope="module")
def triton(repository) -> Iterator[TritonLauncher]:
    launcher = TritonLauncher(repository, explicit_model_control=True)
    try:
        launcher.start(timeout=180)
        yield launcher
    finally:
        launcher.stop()


@pytest.fixture(scope="module")
def admin(triton) -> Iterator[VitServeClient]:
    """A client of a gateway with admin enabled behind a bearer token."""
    options = ServerOptions(enable_admin=True, auth_token=TOKEN)
    with BackgroundGateway(triton.grpc_url, options=options) as gw, \
            VitServeClient(gw.target, timeout=120, token=TOKEN) as client:
        yield client


@pytest.fixture(scope="module")
def no_admin(triton) -> Iterator[VitServeClient]:
    with BackgroundGateway(triton.grpc_url) as gw, VitServeClient(gw.target, timeout=60) as client:
        yield client


def images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(VitServeError) as e:
        call()
    return e.value.code, e.value.details


def test_admin_is_off_unless_enabled(no_admin):
    for call in (lambda: no_admin.load_model("plain"), lambda: no_admin.unload_model("plain"),
                 lambda: no_admin.reload_model("plain"), no_admin.list_repository):
        code, details = code_of(call)
        assert code == grpc.StatusCode.UNIMPLEMENTED and "--enable-admin" in details
    assert {m.name for m in no_admin.list_models()} == {"plain", "laned", "laned_latency"}


def test_admin_needs_the_token(admin, triton):
    with VitServeClient(admin.target, timeout=30) as anonymous:
        code, _ = code_of(lambda: anonymous.unload_model("plain"))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert triton.models == ["laned", "laned_latency", "plain"]


def test_unload_load_reload_round_trip(admin, repository, torch_reference):
    x = images()
    want, _ = torch_reference(x)
    repo = {m["name"]: m for m in admin.list_repository()}
    assert repo["plain"]["state"] == "READY"

    out = admin.unload_model("plain")
    assert out.state == "UNAVAILABLE" and "plain" not in out.served_models and out.info is None
    assert {m.name for m in admin.list_models()} == {"laned", "laned_latency"}
    assert code_of(lambda: admin.embed(x, model="plain"))[0] == grpc.StatusCode.NOT_FOUND
    assert {m["name"]: m["reason"] for m in admin.list_repository()}["plain"] == "unloaded"
    code, details = code_of(lambda: admin.reload_model("plain"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "use LoadModel" in details

    out = admin.load_model("plain")
    assert out.state == "READY" and "plain" in out.served_models and out.info.name == "plain"
    np.testing.assert_allclose(admin.embed(x, model="plain"), want, rtol=1e-4, atol=1e-4)

    # Reload re-reads the repository: a changed config (here the manifest's probe scores) is served.
    config = repository / "plain" / "config.pbtxt"
    text = config.read_text()
    match = re.search(r'key: "vitserve_manifest"\s*value\s*:?\s*\{\s*string_value: "((?:[^"\\]|\\.)*)"', text)
    assert match, text[:500]
    manifest = json.loads(json.loads(f'"{match.group(1)}"'))
    manifest["probes"] = {"format_version": 1, "scores": {"knn_cls_top1": 0.5}}
    escaped = json.dumps(json.dumps(manifest, separators=(",", ":"), sort_keys=True))[1:-1]
    config.write_text(text[:match.start(1)] + escaped + text[match.end(1):])
    assert admin.get_model("plain").probe_scores == {}
    out = admin.reload_model("plain")
    assert out.state == "READY" and out.info.probe_scores == {"knn_cls_top1": 0.5}
    assert admin.get_model("plain").probe_scores == {"knn_cls_top1": 0.5}
    np.testing.assert_allclose(admin.embed(x, model="plain"), want, rtol=1e-4, atol=1e-4)

    # A new version directory is served after a reload (Triton's default policy: the latest version).
    assert admin.get_model("plain").version == "1"
    shutil.copytree(repository / "plain" / "1", repository / "plain" / "2")
    out = admin.reload_model("plain")
    assert out.state == "READY" and out.info.version == "2"
    res = admin.embed_result(x, model="plain")
    assert res.model["version"] == "2"
    np.testing.assert_allclose(res.embeddings, want, rtol=1e-4, atol=1e-4)


def test_unknown_model_is_not_found(admin):
    for call in (admin.load_model, admin.unload_model, admin.reload_model):
        code, details = code_of(lambda: call("nope"))
        assert code == grpc.StatusCode.NOT_FOUND and "no model 'nope' in Triton's model repository" in details
    code, details = code_of(lambda: admin.get_model("nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown model 'nope'" in details


def test_get_model_reports_probes_lanes_and_batching(admin, exported):
    laned = admin.get_model("laned")
    assert laned.probe_scores == pytest.approx(SCORES)
    assert laned.lane == "throughput" and laned.lanes == {"throughput": "laned", "latency": "laned_latency"}
    assert laned.precision == "fp32" and laned.base_model == "" and laned.variants == ()
    assert laned.max_batch_size == 8 and set(laned.outputs) >= {"cls", "patch_tokens"}
    assert laned.embed_dim == exported.spec.embed_dim and laned.default_resize_op == "RESIZE"
    latency = admin.get_model("laned_latency")
    assert latency.lane == "latency" and latency.max_queue_delay_us == 0
    assert latency.preferred_batch_sizes and max(latency.preferred_batch_sizes) <= 4
    assert laned.max_queue_delay_us > 0
    plain = admin.get_model("plain")  # (its empty probe scores are checked in the round trip)
    assert plain.lane == "" and plain.lanes == {} and plain.max_batch_size == exported.max_batch_size


def test_lanes_route_requests(admin, torch_reference):
    x = images(2)
    want, _ = torch_reference(x)
    fast = admin.embed_result(x, model="laned", lane="latency")
    assert fast.model["name"] == "laned_latency" and fast.model["lane"] == "latency"
    np.testing.assert_allclose(fast.embeddings, want, rtol=1e-4, atol=1e-4)
    bulk = admin.embed_result(x, model="laned_latency", lane="throughput")
    assert bulk.model["name"] == "laned" and bulk.model["lane"] == "throughput"
    assert admin.embed_result(x, model="laned").model["name"] == "laned"  # no lane: the model itself

    code, details = code_of(lambda: admin.embed(x, model="plain", lane="latency"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'plain' declares no latency lane" in details

    # A stream goes to the latency lane unless told otherwise.
    frames = [(i, x[:1]) for i in range(3)]
    names = {r.features.model["name"] for r in admin.stream_features(frames, model="laned", timeout=60)}
    assert names == {"laned_latency"}
    names = {r.features.model["name"] for r in admin.stream_features(frames, model="laned", lane="throughput",
                                                                      timeout=60)}
    assert names == {"laned"}

    admin.unload_model("laned_latency")
    try:
        code, details = code_of(lambda: admin.embed(x, model="laned", lane="latency"))
        assert code == grpc.StatusCode.UNAVAILABLE and "'laned_latency', which is not loaded" in details
        # A stream that asked for no lane falls back to the model itself.
        names = {r.features.model["name"] for r in admin.stream_features(frames, model="laned", timeout=60)}
        assert names == {"laned"}
    finally:
        admin.load_model("laned_latency")
    assert admin.embed_result(x, model="laned", lane="latency").model["name"] == "laned_latency"


def test_features_from_chosen_layers(admin, exported, torch_reference):
    import torch

    from training.data import to_float_nchw

    x = images(2)
    spec = exported.spec
    with torch.no_grad():
        penultimate = exported.model.forward_intermediates(
            to_float_nchw(x, spec.mean, spec.std), indices=[spec.depth - 2], norm=True, output_fmt="NLC",
            intermediates_only=True)[0].numpy()
    _, last = torch_reference(x)
    res = admin.features(x, model="laned", layout="tokens", outputs=["patch_tokens_l-2", "patch_tokens"])
    assert list(res.layers) == ["patch_tokens_l-2", "patch_tokens"]
    np.testing.assert_allclose(res.layers["patch_tokens_l-2"], penultimate, rtol=0, atol=1e-4)
    np.testing.assert_allclose(res.layers["patch_tokens"], last, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(res.features, res.layers["patch_tokens_l-2"])  # the first asked for
    assert f"after block {spec.depth - 2}" in res.source
    assert "patch_tokens_l-2" in admin.get_model("laned").outputs

    code, details = code_of(lambda: admin.features(x, model="plain", outputs=["patch_tokens_l-2"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'plain' exports no patch-token output 'patch_tokens_l-2'; it has patch_tokens" in details
    code, details = code_of(lambda: admin.features(x, model="plain", include_registers=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "exports no register tokens" in details


def test_admin_command(admin, tmp_path, capsys):
    from clients.commands import admin_main

    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    conn = ["--target", admin.target, "--token-file", str(token)]
    assert admin_main(["get", "laned", *conn]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["probe_scores"] == pytest.approx(SCORES) and got["lanes"]["latency"] == "laned_latency"
    assert admin_main(["unload", "plain", *conn]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "UNAVAILABLE"
    assert admin_main(["repository", *conn]) == 0
    states = {m["name"]: m["state"] for m in json.loads(capsys.readouterr().out)}
    assert states == {"laned": "READY", "laned_latency": "READY", "plain": "UNAVAILABLE"}
    assert admin_main(["load", "plain", *conn]) == 0
    assert "plain" in json.loads(capsys.readouterr().out)["served_models"]
    assert admin_main(["reload", "nope", *conn]) == 1
    assert "server error NOT_FOUND: no model 'nope'" in capsys.readouterr().err
    assert admin_main(["unload", *conn]) == 2
    assert admin_main(["models", "--target", admin.target]) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
