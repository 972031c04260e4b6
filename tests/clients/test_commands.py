import numpy as np
import pytest
from PIL import Image

from clients.commands import embed_main, features_main


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_embed_prints_shape_and_saves_npy(fake_service, image_files, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    code = embed_main([*image_files, "--target", fake_service[0], "--normalize", "--out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "embeddings: shape [3, 4] float32" in stdout and f"saved {out}" in stdout
    emb = np.load(out)
    assert emb.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    assert fake_service[1].requests[-1].l2_normalize


def test_features_grid_tokens_and_cls(fake_service, image_files, tmp_path, capsys):
    out = tmp_path / "f.npy"
    assert features_main([*image_files[:2], "--target", fake_service[0], "--out", str(out), "--cls"]) == 0
    assert np.load(out).shape == (2, 2, 3, 4) and np.load(tmp_path / "f.cls.npy").shape == (2, 4)
    assert "features: shape [2, 2, 3, 4] float32 (grid 2x3, patch 4" in capsys.readouterr().out
    assert features_main([image_files[0], "--target", fake_service[0], "--layout", "tokens",
                          "--dtype", "float16"]) == 0
    assert "features: shape [1, 6, 4] float16" in capsys.readouterr().out


def test_server_error_exits_1_with_its_message(fake_service, image_files, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"bad bytes")
    assert features_main([str(bad), "--target", fake_service[0]]) == 1
    assert "server error INVALID_ARGUMENT: image 0: cannot decode" in capsys.readouterr().err
    assert embed_main([image_files[0], "--target", fake_service[0], "--model", "missing"]) == 1
    assert "NOT_FOUND: unknown model 'missing'" in capsys.readouterr().err


def test_usage_errors_exit_2(fake_service, image_files, tmp_path, capsys):
    assert embed_main([]) == 2
    assert embed_main([str(tmp_path / "nope.png"), "--target", fake_service[0]]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert features_main([image_files[0], "--layout", "hwc"]) == 2
    assert embed_main([image_files[0], "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out must name a .npy file" in capsys.readouterr().err


def test_embed_pooling_and_token_file(fake_service, image_files, tmp_path):
    token = tmp_path / "token"
    token.write_text("abc\n")
    assert embed_main([*image_files, "--target", fake_service[0], "--pooling", "both",
                       "--token-file", str(token)]) == 0
    assert fake_service[1].requests[-1].pooling == 3  # CLS_AND_MEAN_PATCH
    assert fake_service[1].metadata[-1]["authorization"] == "Bearer abc"
    assert embed_main([*image_files, "--target", fake_service[0], "--token-file", str(tmp_path / "no")]) == 2


def test_tls_flag_errors_exit_2(fake_service, image_files, tmp_path, capsys):
    assert embed_main([*image_files, "--target", fake_service[0], "--tls-cert", str(tmp_path / "c.pem")]) == 2
    assert "give both tls_cert and tls_key" in capsys.readouterr().err
    assert embed_main([*image_files, "--target", fake_service[0], "--tls-ca", str(tmp_path / "no.pem")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_lane_resize_op_and_outputs_reach_the_request(fake_service, image_files):
    from protos import vitserve_pb2

    assert embed_main([image_files[0], "--target", fake_service[0], "--lane", "latency",
                       "--resize-op", "letterbox"]) == 0
    request = fake_service[1].requests[-1]
    assert (request.lane, request.resize_op) == (vitserve_pb2.LATENCY, vitserve_pb2.LETTERBOX)
    assert features_main([image_files[0], "--target", fake_service[0], "--output", "patch_tokens",
                          "--resize-op", "center_crop"]) == 0
    request = fake_service[1].requests[-1]
    assert list(request.outputs) == ["patch_tokens"] and request.resize_op == vitserve_pb2.CENTER_CROP
    assert embed_main([image_files[0], "--target", fake_service[0], "--lane", "fast"]) == 2


def test_bucket_and_version_reach_the_request(fake_service, image_files, capsys):
    from protos import vitserve_pb2

    assert embed_main([image_files[0], "--target", fake_service[0], "--bucket", "auto", "--version", "2"]) == 0
    request = fake_service[1].requests[-1]
    assert (request.bucket, request.version) == (vitserve_pb2.BUCKET_AUTO, "2")
    assert features_main([image_files[0], "--target", fake_service[0], "--version", "1"]) == 0
    request = fake_service[1].requests[-1]
    assert (request.bucket, request.version) == (vitserve_pb2.BUCKET_UNSPECIFIED, "1")
    n = len(fake_service[1].requests)
    assert embed_main([image_files[0], "--target", fake_service[0], "--version", "latest"]) == 2
    assert "--version must be an integer >= 1, got 'latest'" in capsys.readouterr().err
    assert embed_main([image_files[0], "--target", fake_service[0], "--bucket", "smallest"]) == 2
    assert len(fake_service[1].requests) == n  # nothing was sent
