"""k-NN and linear probes on synthetic features with known answers."""

import numpy as np
import pytest

from probes.linear import LinearProtocol, linear_probe, standardize
from training.knn import knn_accuracy

FAST = LinearProtocol(l2_grid=(1e-2, 1e-4), max_iter=100)


def test_separable_clusters_are_classified_almost_perfectly(separable):
    xtr, ytr, xte, yte = separable
    assert knn_accuracy(xtr, ytr, xte, yte, k=20, temperature=0.07) >= 0.99
    assert linear_probe(xtr, ytr, xte, yte, FAST).accuracy >= 0.99


def test_random_labels_stay_near_chance(separable):
    xtr, _, xte, _ = separable
    rng = np.random.default_rng(1)
    ytr, yte = rng.integers(0, 10, len(xtr)), rng.integers(0, 10, len(xte))
    # 300 test items: chance is 10% with a standard deviation of 1.7 points.
    assert knn_accuracy(xtr, ytr, xte, yte) < 0.18
    assert linear_probe(xtr, ytr, xte, yte, FAST).accuracy < 0.18


def test_linear_probe_is_deterministic_and_never_looks_at_test_labels(separable):
    xtr, ytr, xte, yte = separable
    a = linear_probe(xtr, ytr, xte, yte, FAST)
    b = linear_probe(xtr, ytr, xte, yte, FAST)
    assert a.accuracy == b.accuracy and a.l2 == b.l2
    np.testing.assert_array_equal(a.predictions, b.predictions)
    # Scrambled test labels change the score but not the penalty chosen or the predictions.
    c = linear_probe(xtr, ytr, xte, np.roll(yte, 1), FAST)
    assert c.l2 == a.l2 and set(c.val_accuracy) == set(FAST.l2_grid)
    np.testing.assert_array_equal(c.predictions, a.predictions)


def test_penalty_is_chosen_on_the_validation_split():
    # Few noisy examples in many dimensions: an unpenalised fit memorises noise, so validation prefers
    # the strong penalty; the chosen value is the grid's validation arg-max.
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 3))
    x = rng.normal(size=(120, 64)).astype(np.float32)
    y = (x @ w + 4.0 * rng.normal(size=(120, 3))).argmax(1)
    res = linear_probe(x, y, x[:10], y[:10], LinearProtocol(l2_grid=(1.0, 1e-6), val_fraction=0.25, max_iter=200))
    best = max(res.val_accuracy.values())
    assert res.val_accuracy[res.l2] == best
    assert res.l2 == max(l2 for l2, v in res.val_accuracy.items() if v == best)


def test_standardize_uses_train_statistics_only():
    train = np.array([[0.0, 10.0], [2.0, 10.0]], dtype=np.float32)
    test = np.array([[4.0, 11.0]], dtype=np.float32)
    tr, te = standardize(train, test)
    np.testing.assert_allclose(tr.numpy(), [[-1.0, 0.0], [1.0, 0.0]], atol=1e-6)
    # Dimension 2 has zero train spread: floored std, no division by zero.
    assert te.numpy()[0, 0] == pytest.approx(3.0) and np.isfinite(te.numpy()).all()


def test_length_mismatch_is_refused(separable):
    xtr, ytr, xte, yte = separable
    with pytest.raises(ValueError, match="differ in length"):
        linear_probe(xtr, ytr[:-1], xte, yte, FAST)


def test_default_grid_reaches_down_to_no_penalty_and_still_picks_on_validation(separable):
    # The full-split probe chose the weakest of 1e-1..1e-6, so the default grid continues to 1e-8 and 0.
    grid = LinearProtocol().l2_grid
    assert min(grid) == 0.0 and 1e-8 in grid and max(grid) == 1e-1
    xtr, ytr, xte, yte = separable
    res = linear_probe(xtr, ytr, xte, yte, LinearProtocol(l2_grid=(1e-2, 1e-8, 0.0), max_iter=60))
    assert set(res.val_accuracy) == {1e-2, 1e-8, 0.0} and res.accuracy >= 0.99
    best = max(res.val_accuracy.values())
    assert res.l2 == max(l2 for l2, v in res.val_accuracy.items() if v == best)  # ties: the stronger
    assert res.summary()["val_accuracy"].keys() == {"0.01", "1e-08", "0"}


def test_fits_flush_subnormals_and_leave_the_default_behind():
    # Weak-penalty fits push exp() of losing logits into the subnormal range, tens of times slower on
    # the CPU; the fit flushes them (same predictions: checked on 3000 raw-pixel images, docs/PROBES.md).
    import torch

    from probes.linear import flush_denormals

    tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal in float32
    assert (tiny * 1.0).item() != 0.0
    with flush_denormals():
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() != 0.0
