"""Dense probe: a per-patch linear classifier on frozen patch tokens of the scene set (``probes.scenes``).

Every patch of every train scene is one training example (its token, its majority label among the 10
classes and background); the classifier and its protocol are the linear probe's
(``probes.linear.linear_probe``: standardised features, L2 chosen on a held-out split of the train
patches, full-batch L-BFGS). Reported on the test scenes: patch accuracy and mean IoU over the 11
classes (from the confusion matrix over all test patches; a class absent from both prediction and
target is left out of the mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probes.linear import LinearProtocol, linear_probe
from probes.scenes import NUM_DENSE_CLASSES, Scenes, tile_canvases, untile_grid
from probes.sources import DEFAULT_BATCH, FeatureSource, SourceError, extract_patches


@dataclass(frozen=True)
class DenseResult:
    """Patch accuracy and mIoU in [0, 1], per-class IoU ``[C]`` (NaN where undefined), chosen L2."""

    patch_accuracy: float
    miou: float
    iou: np.ndarray
    l2: float
    val_accuracy: dict[float, float]


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` counts, rows = target, columns = prediction."""
    pred = np.asarray(pred, dtype=np.int64).ravel()
    target = np.asarray(target, dtype=np.int64).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target sizes differ: {pred.shape} vs {target.shape}")
    return np.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, -1)


def mean_iou(pred: np.ndarray, target: np.ndarray, num_classes: int = NUM_DENSE_CLASSES) -> tuple[float, np.ndarray]:
    """``(mIoU, IoU per class [C])``: ``IoU_c = TP / (TP + FP + FN)``; classes with an empty union are NaN
    and left out of the mean."""
    cm = confusion_matrix(pred, target, num_classes)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    iou = np.full(num_classes, np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    return float(np.nanmean(iou)) if np.any(union > 0) else float("nan"), iou


def scene_patch_features(source: FeatureSource, scenes: Scenes, batch: int = DEFAULT_BATCH,
                         desc: str = "scene patch features") -> np.ndarray:
    """Canvas-grid patch tokens ``[N, g, g, D]`` of ``scenes``: each canvas encoded tile by tile."""
    spec = scenes.spec
    if tuple(source.img_size) != (spec.tile_size, spec.tile_size):
        raise SourceError(f"{source.name} takes {source.img_size} images but the scenes are tiled in "
                          f"{spec.tile_size} px tiles")
    if tuple(source.patch_size) != (spec.patch_size, spec.patch_size):
        raise SourceError(f"{source.name} has patch size {source.patch_size} but the scenes are labelled in "
                          f"{spec.patch_size} px patches")
    tokens = extract_patches(source, tile_canvases(scenes.canvases, spec.tile_size), batch, desc)
    return untile_grid(tokens, spec.tiles, tuple(source.grid))


def dense_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                test_labels: np.ndarray, protocol: LinearProtocol = LinearProtocol(),
                num_classes: int = NUM_DENSE_CLASSES) -> DenseResult:
    """Per-patch linear probe: features ``[N, g, g, D]`` with labels ``[N, g, g]`` (train and test)."""
    d = train_features.shape[-1]
    result = linear_probe(train_features.reshape(-1, d), np.asarray(train_labels).reshape(-1),
                          test_features.reshape(-1, d), np.asarray(test_labels).reshape(-1),
                          protocol, num_classes)
    target = np.asarray(test_labels).reshape(-1)
    miou, iou = mean_iou(result.predictions, target, num_classes)
    return DenseResult(result.accuracy, miou, iou, result.l2, result.val_accuracy)
