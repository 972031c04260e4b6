"""Online k-NN monitoring during pre-training: DINO's weighted k-NN (``training.knn``) on a
validation split held out of the pre-training images, never the test split.

The bank is a fixed labelled subset of the pre-training images (labels are not used by
pre-training itself, as DINO's ``eval_knn.py`` uses the ImageNet train labels); the queries are the
held-out images. Features are the pooled pre-logits (CLS) of the method's evaluation encoder (DINO:
the teacher) in eval mode, fp32, without drawing from any RNG, so monitoring does not change the
training run it watches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.backbone import EncoderSpec, cls_features
from training.config import ConfigError
from training.data import LabelledImages, to_float_nchw
from training.knn import knn_accuracy


def split_validation(data: LabelledImages, n_val: int, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """``(train, val)``: ``n_val`` images drawn at random (``seed``) and held out of ``data``;
    both keep the original order. ``n_val == 0`` returns ``data`` itself and an empty split."""
    if n_val <= 0:
        return data, LabelledImages(data.images[:0], data.labels[:0], data.classes)
    if n_val >= len(data):
        raise ConfigError(f"knn_val={n_val} would hold out all {len(data)} images; lower it")
    held = np.zeros(len(data), dtype=bool)
    held[np.random.default_rng(seed).choice(len(data), size=n_val, replace=False)] = True
    return (LabelledImages(data.images[~held], data.labels[~held], data.classes),
            LabelledImages(data.images[held], data.labels[held], data.classes))


@torch.no_grad()
def encode(encoder: nn.Module, images: np.ndarray, spec: EncoderSpec, batch: int = 512) -> np.ndarray:
    """Pooled features ``[N, D]`` (float32) of uint8 images ``[N, H, W, C]`` in eval mode; the
    encoder's train/eval mode is restored afterwards."""
    was_training = encoder.training
    encoder.eval()
    try:
        feats = [cls_features(encoder, to_float_nchw(images[i:i + batch], spec.mean, spec.std)).float()
                 for i in range(0, len(images), batch)]
    finally:
        encoder.train(was_training)
    return torch.cat(feats).numpy()


@dataclass
class OnlineKNN:
    """The bank and held-out queries of one run; :meth:`top1` scores an encoder on them."""

    bank: LabelledImages
    val: LabelledImages
    k: int = 20

    @classmethod
    def from_split(cls, train: LabelledImages, val: LabelledImages, bank_size: int, seed: int,
                   k: int = 20) -> "OnlineKNN":
        if (val.labels < 0).any() or (train.labels < 0).any():
            raise ConfigError("online k-NN needs labels: give an image folder with one sub-folder per class")
        return cls(train.subset(bank_size, seed), val, k)

    def top1(self, encoder: nn.Module, spec: EncoderSpec) -> float:
        """Weighted k-NN top-1 accuracy in [0, 1] of the held-out images."""
        bank = encode(encoder, self.bank.images, spec)
        val = encode(encoder, self.val.images, spec)
        return knn_accuracy(bank, self.bank.labels, val, self.val.labels, k=self.k)
