"""Weighted k-NN classification on frozen features, the protocol of DINO's evaluation.

Caron et al. 2021 (``eval_knn.py``): cosine similarity, the k nearest training features vote for
their label with weight ``exp(sim / T)``; k = 20, T = 0.07. Pure numpy, chunked over test rows so
that memory stays ``O(chunk * N_train)``.
"""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of ``[N, D]`` features (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def knn_predict(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """Predicted labels ``[M]`` for ``test_features [M, D]`` from ``train_features [N, D]``."""
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} train features but {len(train_labels)} labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"feature widths differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    train = l2_normalize(train_features)
    test = l2_normalize(test_features)
    labels = np.asarray(train_labels, dtype=np.int64)
    c = int(num_classes if num_classes is not None else labels.max() + 1)
    k = min(k, len(train))
    preds = np.empty(len(test), dtype=np.int64)
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ train.T                        # [m, N]
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]                # [m, k] unordered top-k
        top_sim = np.take_along_axis(sim, idx, axis=1)
        weights = np.exp(top_sim / temperature)                          # [m, k]
        votes = np.zeros((len(idx), c), dtype=np.float64)
        np.add.at(votes, (np.arange(len(idx))[:, None], labels[idx]), weights)
        preds[start:start + chunk] = votes.argmax(axis=1)
    return preds


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in [0, 1] of the weighted k-NN classifier."""
    num_classes = int(max(np.max(train_labels), np.max(test_labels)) + 1)
    preds = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes)
    return float(np.mean(preds == np.asarray(test_labels)))
