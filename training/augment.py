"""Batched image augmentations on float ``[N, C, H, W]`` images in [0, 1], seeded by a generator.

The SimCLR recipe (Chen et al. 2020, §3 and appendix A) is random resized crop + flip + colour
jitter + Gaussian blur; DINO adds multi-crop (Caron et al. 2021, §3.1). Everything is one torch op
over the whole batch (per-sample parameters, ``grid_sample`` / grouped convolutions), so no loader
processes are needed on a 2-core machine.

Fashion-MNIST is grey: hue and saturation jitter (and SimCLR's random greyscale) do nothing on one
channel, so only brightness and contrast jitter remain of colour jitter. Sizes and blur are scaled
from 224 px to 28 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def random_resized_crop(
    x: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Crop a random box of ``scale`` area fraction and aspect ``ratio`` per image, resized to ``size``.

    ``[N, C, H, W]`` -> ``[N, C, size, size]`` by bilinear ``grid_sample`` of an affine grid; boxes
    wider than the image are clamped to it (torchvision retries instead; the effect is the same).
    """
    n = x.shape[0]
    area = _uniform(n, scale[0], scale[1], generator)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # box width / image width
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)  # box centre in [-1, 1] coordinates
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], generator=generator) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def mae_flip(x: torch.Tensor, generator: torch.Generator, hflip: bool) -> torch.Tensor:
    """MAE's augmentation reduced to a random horizontal flip for ``[N, C, H, W]`` (``hflip=False``: none).

    MAE uses RandomResizedCrop(scale 0.2-1) + flip at 224 px. At 28 px a 20%-area crop upsampled to
    28 px is a blur of a 12 px region that 4 px patches can barely reconstruct, and Fashion-MNIST
    items are already centred and size-normalised, so only the flip is kept.
    """
    return random_hflip(x, generator) if hflip else x


def brightness_contrast(
    x: torch.Tensor, generator: torch.Generator, brightness: float = 0.4, contrast: float = 0.4,
    p: float = 0.8,
) -> torch.Tensor:
    """Multiply brightness by U(1-b, 1+b) and scale contrast about each image's mean by U(1-c, 1+c),
    with probability ``p`` per image (SimCLR's colour jitter minus the hue/saturation parts); clamps to [0, 1]."""
    n = x.shape[0]
    apply = (torch.rand(n, generator=generator) < p).float().view(-1, 1, 1, 1)
    b = _uniform(n, 1 - brightness, 1 + brightness, generator).view(-1, 1, 1, 1)
    c = _uniform(n, 1 - contrast, 1 + contrast, generator).view(-1, 1, 1, 1)
    y = (x * b).clamp(0, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * c + mean).clamp(0, 1)
    return apply * y + (1 - apply) * x


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels ``[N, 2r+1]`` for per-sample ``sigma [N]``."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(
    x: torch.Tensor, generator: torch.Generator, sigma: tuple[float, float] = (0.1, 1.0), p: float = 0.5,
    radius: int = 2,
) -> torch.Tensor:
    """Separable Gaussian blur with sigma ~ U(sigma) applied with probability ``p`` per image.

    SimCLR blurs with a kernel of 10% of the image side and sigma in (0.1, 2.0) at 224 px; at 28 px
    that is a 3-5 px kernel, so sigma is capped at 1 px (else the item's outline is gone).
    """
    n, c, h, w = x.shape
    s = _uniform(n, sigma[0], sigma[1], generator)
    apply = torch.rand(n, generator=generator) < p
    k = gaussian_kernels(s, radius).repeat_interleave(c, dim=0)  # [N*C, K]
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)  # along W
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)  # along H
    return torch.where(apply.view(-1, 1, 1, 1), y.view(n, c, h, w), x)


@dataclass(frozen=True)
class ViewConfig:
    """One kind of augmented view: crop size and scale, then flip/jitter/blur probabilities."""

    size: int = 28
    scale: tuple[float, float] = (0.4, 1.0)
    jitter_p: float = 0.8
    blur_p: float = 0.5


def augmented_view(x: torch.Tensor, view: ViewConfig, generator: torch.Generator) -> torch.Tensor:
    """One SimCLR-style view ``[N, C, size, size]`` of ``x [N, C, H, W]`` in [0, 1]."""
    y = random_resized_crop(x, view.size, view.scale, generator)
    y = random_hflip(y, generator)
    y = brightness_contrast(y, generator, p=view.jitter_p)
    return gaussian_blur(y, generator, p=view.blur_p) if view.blur_p > 0 else y


def multi_crop(
    x: torch.Tensor, generator: torch.Generator, n_global: int = 2, n_local: int = 4,
    global_view: ViewConfig = ViewConfig(28, (0.4, 1.0)),
    local_view: ViewConfig = ViewConfig(16, (0.05, 0.4)),
) -> list[torch.Tensor]:
    """DINO's multi-crop: ``n_global`` global views then ``n_local`` small local views.

    At 224 px DINO uses 224 px globals from scale (0.4, 1) and 96 px locals from (0.05, 0.4); the
    28 px analogue is 28 px globals and 16 px locals (a 4x4 grid of 4 px patches; 12 px would leave
    a 3x3 grid, too few tokens to say much). DINO blurs global view 1 always and view 2 rarely; here
    every view gets the same blur probability, a simplification.
    """
    views = [augmented_view(x, global_view, generator) for _ in range(n_global)]
    return views + [augmented_view(x, local_view, generator) for _ in range(n_local)]


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel for ``[N, C, H, W]`` in [0, 1] (the exported graph's preprocessing)."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s
