import numpy as np
import pytest

from training.knn import knn_accuracy, knn_predict, l2_normalize


def _reference_knn(train, labels, test, k, t, c):
    """Loop-by-loop weighted k-NN, written straight from DINO's eval_knn description."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = []
    for q in test:
        sims = train @ q
        order = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(c)
        for j in order:
            votes[labels[j]] += np.exp(sims[j] / t)
        out.append(int(np.argmax(votes)))
    return np.array(out)


def test_matches_reference_on_random_data():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 16)).astype(np.float32)
    labels = rng.integers(0, 5, size=200)
    test = rng.normal(size=(37, 16)).astype(np.float32)
    got = knn_predict(train, labels, test, k=7, temperature=0.07, num_classes=5, chunk=10)
    np.testing.assert_array_equal(got, _reference_knn(train, labels, test, 7, 0.07, 5))


def test_hand_computed_vote():
    # Two neighbours of class 1 at similarity 0.6 outvote one of class 0 at 0.9 only at high T.
    train = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]], dtype=np.float32)
    labels = np.array([0, 1, 1])
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    # T=0.07: exp(1/0.07) >> 2 exp(0.6/0.07), class 0 wins.
    assert knn_predict(train, labels, q, k=3, temperature=0.07)[0] == 0
    # T=10: weights ~ equal, the majority (class 1) wins.
    assert knn_predict(train, labels, q, k=3, temperature=10.0)[0] == 1


def test_accuracy_on_separable_clusters_and_errors():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 8)) * 10
    y = np.repeat(np.arange(3), 30)
    x = centres[y] + rng.normal(size=(90, 8))
    assert knn_accuracy(x[::2], y[::2], x[1::2], y[1::2], k=5) == 1.0
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(x), axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="widths differ"):
        knn_predict(x, y, x[:, :4])
