"""Feature sources: torch and ONNX give the same tensors and the same probe scores; the baselines."""

import numpy as np
import pytest

from probes.evaluate import load_probe_data, probe_source
from probes.linear import LinearProtocol
from probes.sources import (OnnxSource, RawPixelSource, SourceError, TorchEncoderSource, extract_global,
                            extract_patches, extract_pooled, pooling_unavailable, random_init_source)

FAST = LinearProtocol(l2_grid=(1e-2, 1e-4), max_iter=60)


@pytest.fixture(scope="module")
def torch_source(small_run):
    return TorchEncoderSource.from_run_dir(small_run)


@pytest.fixture(scope="module")
def onnx_source(small_export):
    return OnnxSource(small_export / "1" / "model.onnx", intra_op_threads=1)


def test_torch_and_onnx_sources_give_the_same_tokens(torch_source, onnx_source, fmnist):
    images = fmnist[1].images[:50]
    a, b = torch_source.features(images), onnx_source.features(images)
    assert a.cls.shape == (50, 64) and a.patch_tokens.shape == (50, 49, 64) and a.grid == b.grid == (7, 7)
    np.testing.assert_allclose(a.cls, b.cls, atol=1e-4)
    np.testing.assert_allclose(a.patch_tokens, b.patch_tokens, atol=1e-4)
    cls, mean = extract_global(onnx_source, images, batch=16)  # batching does not change anything
    np.testing.assert_allclose(cls, b.cls, atol=1e-5)
    np.testing.assert_allclose(mean, b.patch_tokens.mean(1), atol=1e-5)
    np.testing.assert_allclose(extract_patches(torch_source, images, batch=7), a.patch_tokens, atol=1e-5)


def test_torch_and_onnx_probe_scores_agree(torch_source, onnx_source):
    data = load_probe_data(limit_train=400, limit_test=200, train_scenes=40, test_scenes=20)
    a = probe_source(torch_source, data, protocol=FAST, batch=128, poolings=("cls", "mean"))
    b = probe_source(onnx_source, data, protocol=FAST, batch=128, poolings=("cls", "mean"))
    assert set(a.scores) == {"knn_cls_top1", "knn_mean_top1", "linear_cls_top1", "linear_mean_top1",
                             "dense_patch_acc", "dense_miou"}
    for k in a.scores:
        assert abs(a.scores[k] - b.scores[k]) <= 0.5, (k, a.scores[k], b.scores[k])
    assert all(0 <= v <= 100 for v in a.scores.values())


def test_onnx_source_reads_a_model_directory_and_refuses_bad_paths(small_export, tmp_path):
    assert OnnxSource(small_export).grid == (7, 7)
    with pytest.raises(SourceError, match="does not exist"):
        OnnxSource(tmp_path / "nope.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(SourceError, match="cannot load"):
        OnnxSource(tmp_path / "bad.onnx")


def test_random_init_is_seeded_and_leaves_the_global_rng_alone(torch_source, fmnist):
    import torch

    images = fmnist[1].images[:8]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = random_init_source(torch_source.spec, seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    b = random_init_source(torch_source.spec, seed=0)
    c = random_init_source(torch_source.spec, seed=1)
    fa, fb, fc = (s.features(images).cls for s in (a, b, c))
    np.testing.assert_array_equal(fa, fb)
    assert not np.allclose(fa, fc)


def test_raw_pixel_source_shapes_and_values():
    images = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    f = RawPixelSource((8, 8), 1, (4, 4)).features(images)
    assert f.cls.shape == (2, 64) and f.patch_tokens.shape == (2, 4, 16) and f.grid == (2, 2)
    np.testing.assert_allclose(f.patch_tokens[0, 1], images[0, :4, 4:8, 0].ravel() / 255.0)  # patch (0, 1)
    with pytest.raises(SourceError, match="uint8"):
        RawPixelSource((8, 8), 1, (4, 4)).features(images.astype(np.float32))


def test_last4_is_the_normed_cls_of_the_last_four_blocks_and_the_mean_patch(torch_source, fmnist):
    import torch

    from training.data import to_float_nchw

    images = fmnist[1].images[:10]
    out = extract_pooled(torch_source, images, ("cls", "mean", "last4"), batch=4)
    d = torch_source.spec.embed_dim
    assert out["last4"].shape == (10, 5 * d)
    # hand-computed reference: run the blocks one by one, put each of the last 4 through the final norm
    model, spec = torch_source.model, torch_source.spec
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(to_float_nchw(images, spec.mean, spec.std))))
        normed = []
        for blk in model.blocks:
            x = blk(x)
            normed.append(model.norm(x))
    expected = torch.cat([t[:, 0] for t in normed[-4:]] + [normed[-1][:, spec.num_prefix_tokens:].mean(1)], 1)
    np.testing.assert_allclose(out["last4"], expected.numpy(), atol=1e-5)
    # the last CLS and the mean are the cls and mean poolings, the same as forward_features gives
    np.testing.assert_allclose(out["last4"][:, 3 * d:4 * d], out["cls"], atol=1e-6)
    np.testing.assert_allclose(out["last4"][:, 4 * d:], out["mean"], atol=1e-6)
    cls, mean = extract_global(torch_source, images)
    np.testing.assert_allclose(out["cls"], cls, atol=1e-5)
    np.testing.assert_allclose(out["mean"], mean, atol=1e-5)


def test_sources_that_cannot_give_last4_say_why(torch_source, onnx_source, fmnist):
    from training.backbone import create_encoder

    assert pooling_unavailable(torch_source, "last4") is None
    assert "not the CLS token of earlier blocks" in pooling_unavailable(onnx_source, "last4")
    assert "no transformer blocks" in pooling_unavailable(RawPixelSource(), "last4")
    shallow, spec = create_encoder("vit_tiny_patch16_224", {"img_size": 28, "patch_size": 4, "in_chans": 1,
                                                            "embed_dim": 32, "depth": 2, "num_heads": 2})
    assert "has 2 blocks; last4 needs at least 4" in pooling_unavailable(TorchEncoderSource(shallow, spec, "t"), "last4")
    assert "unknown pooling 'max'" in pooling_unavailable(torch_source, "max")
    with pytest.raises(SourceError, match="not the CLS token of earlier blocks"):
        extract_pooled(onnx_source, fmnist[1].images[:2], ("cls", "last4"))
