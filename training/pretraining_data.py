"""The pre-training images of a config: the training split, the online k-NN hold-out and the
normalisation (Fashion-MNIST's constants, or the per-channel statistics of a user's image folder)."""

from __future__ import annotations

import dataclasses

import numpy as np

from training import data as data_mod
from training.backbone import FASHION_MNIST_MEAN, FASHION_MNIST_STD, EncoderSpec
from training.config import FASHION_MNIST, ConfigError, TrainConfig
from training.online_knn import split_validation


def load_pretraining_data(cfg: TrainConfig, spec: EncoderSpec
                          ) -> tuple[data_mod.LabelledImages, data_mod.LabelledImages, EncoderSpec]:
    """``(train, val, spec)``: the pre-training images, the ``knn_val`` images held out of them for
    the online k-NN (empty when 0) and the spec with the data's mean/std filled in. The hold-out is
    drawn from the whole training split first, then ``limit_train`` subsets the rest; Fashion-MNIST's
    test split is never touched."""
    if cfg.data == FASHION_MNIST:
        if spec.img_size != (28, 28) or spec.in_chans != 1:
            raise ConfigError(
                f"Fashion-MNIST is 28x28 grey but the encoder takes {spec.img_size} x "
                f"{spec.in_chans} channels; set model.img_size=28 model.in_chans=1")
        full = data_mod.load_fashion_mnist("train", cfg.data_dir)
    else:
        full = data_mod.load_image_folder(cfg.data, spec.img_size, spec.in_chans)
    train_part, val = split_validation(full, cfg.knn_val, cfg.seed + 1)
    train_part = train_part.subset(cfg.limit_train, cfg.seed)
    if cfg.data == FASHION_MNIST:
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    else:
        mean, std = channel_mean_std(train_part.images)
    if len(train_part) < cfg.batch_size:
        raise ConfigError(f"{len(train_part)} training images are fewer than batch_size={cfg.batch_size}")
    return train_part, val, dataclasses.replace(spec, mean=mean, std=std)


def channel_mean_std(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``[N, H, W, C]`` images on the 0-1 scale (chunked, float64)."""
    c = images.shape[-1]
    total, total_sq, count = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(images), chunk):
        px = images[i:i + chunk].reshape(-1, c).astype(np.float64) / 255.0
        total += px.sum(axis=0)
        total_sq += (px * px).sum(axis=0)
        count += len(px)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return tuple(float(m) for m in mean), tuple(max(float(s), 1e-3) for s in std)  # 1e-3: constant channel
