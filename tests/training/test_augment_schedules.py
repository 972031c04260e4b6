"""Batched augmentations, schedules and the EMA update (pure functions)."""

from __future__ import annotations

import math

import pytest
import torch

from training import augment as aug
from training.schedules import cosine_schedule, ema_update, momentum_schedule, warmup_schedule


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_resized_crop_full_box_is_identity_and_crops_are_seeded():
    x = torch.rand(6, 1, 28, 28)
    same = aug.random_resized_crop(x, 28, (1.0, 1.0), gen(), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    a = aug.random_resized_crop(x, 16, (0.05, 0.4), gen(1))
    assert a.shape == (6, 1, 16, 16) and torch.equal(a, aug.random_resized_crop(x, 16, (0.05, 0.4), gen(1)))
    # A box of a quarter of the area around the centre of a left/right split image: half the
    # crop samples each side. Left half 0, right half 1 -> crop mean near 0.5.
    split = torch.zeros(1, 1, 28, 28)
    split[..., 14:] = 1.0
    crop = aug.random_resized_crop(split.expand(200, -1, -1, -1), 14, (0.25, 0.25), gen(), ratio=(1.0, 1.0))
    assert 0.3 < float(crop.mean()) < 0.7


def test_flip_jitter_blur():
    x = torch.rand(64, 1, 4, 4)
    f = aug.random_hflip(x, gen())
    flipped = (f != x).flatten(1).any(1)
    assert 10 < int(flipped.sum()) < 54 and torch.equal(f[flipped], x[flipped].flip(-1))
    const = torch.full((8, 1, 6, 6), 0.5)
    # Contrast scales about each image's mean: a constant image only changes by brightness.
    j = aug.brightness_contrast(const, gen(), brightness=0.0, contrast=0.9, p=1.0)
    assert torch.allclose(j, const)
    j = aug.brightness_contrast(x, gen(), brightness=0.4, contrast=0.4, p=1.0)
    assert j.min() >= 0 and j.max() <= 1 and not torch.allclose(j, x)
    assert torch.equal(aug.brightness_contrast(x, gen(), p=0.0), x)
    # Blur keeps constants, keeps the image sum of an interior impulse, spreads it.
    assert torch.allclose(aug.gaussian_blur(const, gen(), p=1.0), const, atol=1e-6)
    imp = torch.zeros(1, 1, 9, 9)
    imp[..., 4, 4] = 1.0
    b = aug.gaussian_blur(imp, gen(), sigma=(1.0, 1.0), p=1.0)
    k = aug.gaussian_kernels(torch.tensor([1.0]), 2)[0]
    assert b.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert b[0, 0, 4, 4].item() == pytest.approx(float(k[2] ** 2), rel=1e-5)
    assert k[2].item() == pytest.approx(1 / sum(math.exp(-t * t / 2) for t in range(-2, 3)), rel=1e-6)


def test_multi_crop_shapes_order_and_seed():
    x = torch.rand(5, 1, 28, 28)
    crops = aug.multi_crop(x, gen(3), n_global=2, n_local=3)
    assert [tuple(c.shape[-2:]) for c in crops] == [(28, 28)] * 2 + [(16, 16)] * 3
    again = aug.multi_crop(x, gen(3), n_global=2, n_local=3)
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    assert not torch.equal(crops[0], crops[1])


def test_schedules():
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_schedule(100, 100, 0.996, 1.0) == 1.0 == cosine_schedule(500, 100, 0.996, 1.0)
    assert momentum_schedule(25, 100, 0.9) == pytest.approx(1 - 0.1 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_schedule(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert warmup_schedule(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert warmup_schedule(20, 10, 0.04, 0.07) == pytest.approx(0.07) == warmup_schedule(3, 0, 0.04, 0.07)


def test_ema_update():
    teacher, student = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for p_t, p0, p_s in zip(teacher.parameters(), t0, student.parameters()):
        assert torch.allclose(p_t, 0.9 * p0 + 0.1 * p_s)
        assert p_t.grad is None
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))
