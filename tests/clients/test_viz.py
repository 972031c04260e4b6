"""``clients.viz``: the numpy feature views, against hand-made features and torch's interpolation."""

from __future__ import annotations

import numpy as np
import pytest

from clients.viz import (attention_maps, border_mask, feature_views, first_component, fit_pca, foreground_mask,
                         mask_iou, normalize_maps, pca_rgb, robust_range, upsample, upsample_rgb)


def planted_grid(n: int = 3, size: int = 7, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tokens ``[n, size, size, d]``: background tokens near one vector, a central square of object
    tokens near another, small noise; and the object mask ``[n, size, size]``."""
    rng = np.random.default_rng(seed)
    bg, fg = rng.normal(size=d), rng.normal(size=d) * 3
    mask = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        y, x = rng.integers(1, size - 3, size=2)
        mask[i, y:y + 3, x:x + 3] = True
    tokens = np.where(mask[..., None], fg, bg) + 0.05 * rng.normal(size=(n, size, size, d))
    return tokens.astype(np.float32), mask


def test_pca_finds_the_planted_direction_with_a_fixed_sign() -> None:
    rng = np.random.default_rng(0)
    direction = rng.normal(size=8)
    direction /= np.linalg.norm(direction)
    x = rng.normal(size=(500, 1)) * 10 * direction + rng.normal(size=(500, 8)) * 0.1
    basis = fit_pca(x, 3)
    assert abs(basis.components[0] @ direction) > 0.999
    assert basis.explained[0] > 0.95 and np.all(np.diff(basis.explained) <= 0)
    again = fit_pca(-x, 3)  # the sign rule makes the basis independent of the data's sign
    assert np.all(again.components[np.arange(3), np.argmax(np.abs(again.components), axis=1)] > 0)


def test_robust_range_ignores_outliers_as_radio_does() -> None:
    v = np.concatenate([np.linspace(-1, 1, 101), [50.0, -80.0]])[:, None]
    low, high = robust_range(v)
    assert -1.0 <= low[0] < -0.9 and 0.9 < high[0] <= 1.0  # median 0, MAD 0.5: inliers |v| < 1
    rgb, _ = pca_rgb(np.stack([v[:, 0]] * 4, axis=-1).reshape(1, 1, -1, 4))
    assert rgb.min() == 0.0 and rgb.max() == 1.0  # outliers clipped, not stretching the scale


def test_one_basis_for_all_images_of_a_call_makes_colours_comparable() -> None:
    tokens, _ = planted_grid(n=2)
    tokens[1] = tokens[0, ::-1]  # image 1: image 0 flipped upside down
    rgb, _ = pca_rgb(tokens)
    np.testing.assert_allclose(rgb[1], rgb[0, ::-1], atol=1e-6)


def test_foreground_from_the_first_component_finds_the_planted_object() -> None:
    tokens, mask = planted_grid()
    for sign in (1, -1):  # whichever sign the SVD gives, the border decides which side is background
        got = foreground_mask(sign * tokens)
        assert mask_iou(got, mask) == 1.0
    score = first_component(tokens)
    assert score[mask].min() > score[~mask].max()


def test_attention_maps_are_normalised_per_map() -> None:
    rng = np.random.default_rng(0)
    att = rng.random((2, 3, 12))
    mean, heads = attention_maps(att, (3, 4))
    assert mean.shape == (2, 3, 4) and heads.shape == (2, 3, 3, 4)
    for m in (*mean, *heads.reshape(-1, 3, 4)):
        assert m.min() == 0.0 and m.max() == pytest.approx(1.0)
    np.testing.assert_allclose(mean, normalize_maps(att.mean(axis=1).reshape(2, 3, 4)), atol=1e-6)
    with pytest.raises(ValueError, match="cls_attention must be"):
        attention_maps(att, (4, 4))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsample_equals_torch_interpolate(mode: str) -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((2, 3, 7, 5)).astype(np.float32)
    kw = {} if mode == "nearest" else {"align_corners": False}
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(28, 19), mode=mode, **kw).numpy()
    np.testing.assert_allclose(upsample(x, (28, 19), mode), want, atol=1e-6)
    rgb = np.moveaxis(x, 1, -1)
    np.testing.assert_allclose(upsample_rgb(rgb, (28, 19), mode), np.moveaxis(want, 1, -1), atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        upsample(x, (8, 8), "cubic")


def test_feature_views_bundle_and_shapes() -> None:
    tokens, _ = planted_grid()
    v = feature_views(tokens, np.random.default_rng(0).random((3, 2, 49)), foreground=True)
    assert v.pca.shape == (3, 7, 7, 3) and v.foreground.shape == (3, 7, 7)
    assert v.attention.shape == (3, 7, 7) and v.attention_heads.shape == (3, 2, 7, 7)
    assert feature_views(tokens).attention is None and feature_views(tokens).foreground is None
    assert border_mask((3, 3)).sum() == 8 and mask_iou(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    with pytest.raises(ValueError, match="grid"):
        feature_views(tokens.reshape(3, 49, 16))
