"""Mean IoU against a hand computation, and the dense probe on features with a known answer."""

import numpy as np
import pytest

from probes.dense import confusion_matrix, dense_probe, mean_iou
from probes.linear import LinearProtocol


def test_mean_iou_matches_a_hand_computed_example():
    target = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    # class 0: TP 2, FP 0, FN 1 -> 2/3; class 1: TP 1, FP 1, FN 1 -> 1/3; class 2: TP 1, FP 1, FN 0 -> 1/2;
    # class 3 never appears -> NaN, left out of the mean.
    miou, iou = mean_iou(pred, target, 4)
    np.testing.assert_allclose(iou[:3], [2 / 3, 1 / 3, 1 / 2])
    assert np.isnan(iou[3])
    assert miou == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    np.testing.assert_array_equal(confusion_matrix(pred, target, 3), [[2, 1, 0], [0, 1, 1], [0, 0, 1]])


def test_perfect_prediction_has_iou_one():
    t = np.array([[0, 1], [2, 10]])
    miou, iou = mean_iou(t, t, 11)
    assert miou == 1.0 and np.isnan(iou[3:10]).all()


def test_dense_probe_on_patch_features_that_encode_the_label():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(11, 16)) * 3
    ytr, yte = rng.integers(0, 11, (40, 4, 4)), rng.integers(0, 11, (20, 4, 4))
    ftr = centers[ytr] + rng.normal(size=(40, 4, 4, 16))
    fte = centers[yte] + rng.normal(size=(20, 4, 4, 16))
    res = dense_probe(ftr, ytr, fte, yte, LinearProtocol(l2_grid=(1e-3,), max_iter=100))
    assert res.patch_accuracy > 0.97 and res.miou > 0.9 and res.iou.shape == (11,)
    noise = dense_probe(rng.normal(size=ftr.shape), ytr, rng.normal(size=fte.shape), yte,
                        LinearProtocol(l2_grid=(1e-3,), max_iter=100))
    assert noise.patch_accuracy < 0.2 and noise.miou < 0.15
