"""Contrastive methods around a timm ViT encoder: SimCLR (Chen et al. 2020, arXiv:2002.05709) and
MoCo v2 / v3 (He et al. 2020, arXiv:1911.05722; Chen et al. 2020, arXiv:2003.04297; Chen, Xie & He
2021, arXiv:2104.02057).

Both take two augmented views of a batch. MoCo's momentum (key) encoder is an EMA copy updated by
the training loop through :meth:`MoCo.after_step` with the momentum it passes in; v2 keeps a FIFO
queue of past keys as negatives (:class:`MoCoQueue`), v3 uses in-batch negatives and a predictor.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from training.backbone import EncoderSpec, cls_features
from training.losses.info_nce import info_nce
from training.distributed import gather_no_grad, gather_with_grad, rank_world
from training.losses.moco import moco_loss, moco_v3_loss
from training.schedules import ema_update


def mlp(in_dim: int, hidden_dim: int, out_dim: int, n_layers: int = 2, last_bn: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU blocks then a linear output (SimCLR v2 / MoCo v2-v3 projection and prediction heads)."""
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
    for i in range(n_layers):
        last = i == n_layers - 1
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=last and not last_bn))
        if not last:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))  # MoCo v3's last BN
    return nn.Sequential(*layers)


@torch.no_grad()
def feature_std(z: torch.Tensor) -> float:
    """Mean per-dimension std of L2-normalised features ``[N, D]`` (SimSiam's collapse signal):
    0 for collapsed features, about ``1/sqrt(D)`` for well-spread ones."""
    return float(F.normalize(z.detach().float(), dim=1).std(dim=0).mean())


class SimCLR(nn.Module):
    """Encoder + MLP projection head trained with NT-Xent on two views (Chen et al. 2020)."""

    def __init__(self, encoder: nn.Module, spec: EncoderSpec, proj_dim: int = 128, hidden_dim: int = 512,
                 temperature: float = 0.5) -> None:
        super().__init__()
        self.encoder, self.spec, self.temperature = encoder, spec, temperature
        self.projector = mlp(spec.embed_dim, hidden_dim, proj_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, **_: float) -> dict[str, torch.Tensor]:
        """Two views ``[N, C, H, W]`` -> ``{"loss", "feature_std"}``."""
        z = self.projector(cls_features(self.encoder, torch.cat([x1, x2])))  # [2N, proj_dim]
        z1, z2 = z.chunk(2)
        # Under torchrun the negatives are every rank's views (gradient-preserving all-gather).
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        return {"loss": info_nce(z1, z2, self.temperature), "feature_std": torch.tensor(feature_std(z1))}

    def after_step(self, out: dict[str, torch.Tensor], **_: float) -> None:
        """Nothing to update outside the optimiser."""


class MoCoQueue(nn.Module):
    """FIFO queue ``[K, D]`` of past keys with a write pointer; K need not be a multiple of the batch.

    MoCo's reference asserts ``K % batch == 0``; here a batch that runs past the end wraps around,
    so the queue size is decoupled from the batch size. Initialised with random unit vectors, as in
    the reference. Queue and pointer are buffers, so they live in the checkpoint.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be > 0, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys [N, D]`` at the pointer (wrapping), replacing the oldest; advance the pointer."""
        size = self.keys.shape[0]
        keys = keys.detach()[-size:]  # a batch larger than the queue keeps only its newest keys
        idx = (int(self.ptr) + torch.arange(len(keys))) % size
        self.keys[idx] = keys.to(self.keys.dtype)
        self.ptr.fill_((int(self.ptr) + len(keys)) % size)


class MoCo(nn.Module):
    """MoCo v2 (queue of negatives) or, with ``v3=True``, MoCo v3 (symmetric, predictor, in-batch).

    The query branch is encoder + projector (+ predictor for v3); the key branch is an EMA copy of
    encoder + projector without gradients.
    """

    def __init__(self, encoder: nn.Module, spec: EncoderSpec, queue_size: int = 4096, proj_dim: int = 128,
                 hidden_dim: int = 512, temperature: float = 0.2, v3: bool = False,
                 freeze_patch_embed: bool = False) -> None:
        super().__init__()
        if freeze_patch_embed:
            # MoCo v3 §4.2: a random, frozen patch projection removes the training instability
            # (loss dips) of ViTs; the key encoder is copied below, so it gets the same frozen one.
            for p in encoder.patch_embed.parameters():
                p.requires_grad_(False)
        self.encoder, self.spec, self.temperature, self.v3 = encoder, spec, temperature, v3
        # v2: 2-layer MLP head; v3: 3-layer projector with a final BN and a 2-layer predictor.
        self.projector = mlp(spec.embed_dim, hidden_dim, proj_dim, n_layers=3 if v3 else 2, last_bn=v3)
        self.predictor = mlp(proj_dim, hidden_dim, proj_dim, n_layers=2) if v3 else None
        self.key_encoder = copy.deepcopy(encoder)
        self.key_projector = copy.deepcopy(self.projector)
        for p in (*self.key_encoder.parameters(), *self.key_projector.parameters()):
            p.requires_grad_(False)
        self.queue = None if v3 else MoCoQueue(queue_size, proj_dim)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projector(cls_features(self.encoder, x))
        return self.predictor(z) if self.predictor is not None else z

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_projector(cls_features(self.key_encoder, x)), dim=1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, **_: float) -> dict[str, torch.Tensor]:
        """Two views ``[N, C, H, W]`` -> ``{"loss", "keys" [N, D], "feature_std"}``."""
        if self.v3:
            q1, q2 = self._query(torch.cat([x1, x2])).chunk(2)
            k1, k2 = self._key(torch.cat([x1, x2])).chunk(2)
            # Under torchrun the negatives are every rank's keys; the positives sit at rank * n.
            rank, _ = rank_world()
            loss = moco_v3_loss(q1, q2, gather_no_grad(k1), gather_no_grad(k2), self.temperature,
                                offset=rank * len(q1))
        else:  # v2 (as the reference): query from view 1, key from view 2
            q1, k2 = self._query(x1), self._key(x2)
            loss = moco_loss(q1, k2, self.queue.keys.clone(), self.temperature)
        return {"loss": loss, "keys": k2, "feature_std": torch.tensor(feature_std(q1))}

    @torch.no_grad()
    def after_step(self, out: dict[str, torch.Tensor], momentum: float = 0.99, **_: float) -> None:
        """After the optimiser step: EMA the key branch and (v2) enqueue the keys of the global
        batch (every rank's, in rank order, under torchrun), so all ranks hold one queue."""
        ema_update(self.key_encoder, self.encoder, momentum)
        ema_update(self.key_projector, self.projector, momentum)
        if self.queue is not None:
            self.queue.enqueue(gather_no_grad(out["keys"]))
