"""Data-parallel helpers for pre-training under ``torchrun`` (gloo; training runs on the CPU).

Each rank takes a contiguous shard of the global batch (:func:`shard`), the model is wrapped in
``DistributedDataParallel`` (gradients averaged) with BatchNorm statistics over all ranks
(:class:`GlobalBatchNorm1d`, since ``SyncBatchNorm`` refuses CPU modules; :func:`wrap_ddp`),
contrastive negatives come from every rank through a gradient-preserving all-gather
(:func:`gather_with_grad`), and DINO's centre averages the teacher outputs of all ranks
(:func:`all_reduce_mean`). With one process (no process group) every helper is the identity.

Gradient bookkeeping: every rank computes the *global* contrastive loss on the gathered features;
the all-gather's backward sums the gradients that land on a rank's own rows (``world`` copies of
the global gradient) and DDP divides by ``world``, so each rank steps with exactly the gradient a
single process would compute on the whole batch.

MoCo: v2 enqueues the keys of the *global* batch (:func:`gather_no_grad`, MoCo's
``concat_all_gather``) and its loss is per query against its own key and the shared queue, so the
mean over ranks is the single-process loss; v3 contrasts each rank's queries with the gathered keys
of every rank (labels offset by the rank, as the reference). Two-rank tests check that one step of
SimCLR, DINO, MoCo v2 (queue included) and MoCo v3 equals the single-process step on the same
global batch (tests/training/test_distributed.py).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def shard(batch: torch.Tensor, rank: int | None = None, world: int | None = None) -> torch.Tensor:
    """This rank's contiguous ``1/world`` slice of a global batch (its size must divide evenly),
    as DistributedSampler's partition of one batch of indices."""
    r, w = rank_world()
    rank, world = (r if rank is None else rank), (w if world is None else world)
    n = batch.shape[0]
    if n % world:
        raise ValueError(f"global batch {n} does not divide over {world} ranks")
    per = n // world
    return batch[rank * per:(rank + 1) * per]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x [n, ...]`` concatenated in rank order ``[world * n, ...]``, differentiable."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of _functional_collectives (private)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x [n, ...]`` concatenated in rank order ``[world * n, ...]``, without gradient
    (MoCo's ``concat_all_gather``: keys for the queue and v3's negatives)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (a new tensor; ``x`` itself is left alone)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are over every rank's batch (differentiable
    all-reduce), for CPU/gloo where ``nn.SyncBatchNorm`` refuses to run. Equal shard sizes assumed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        n = x.shape[0] * dist.get_world_size()
        with warnings.catch_warnings():  # deprecated in favour of _functional_collectives (private)
            warnings.simplefilter("ignore", FutureWarning)
            mean = all_reduce(x.sum(0)) / n
            var = all_reduce(((x - mean) ** 2).sum(0)) / n  # biased, as BatchNorm normalises
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / max(n - 1, 1), alpha=m)
                self.num_batches_tracked.add_(1)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` (in place, weights and buffers kept) by :class:`GlobalBatchNorm1d`."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module


def wrap_ddp(model: nn.Module) -> nn.Module:
    """``model`` with BatchNorm statistics over all ranks (``SyncBatchNorm`` on GPU,
    :class:`GlobalBatchNorm1d` on CPU), wrapped in DDP; as is when not distributed. The method's
    ``after_step`` is on ``wrapped.module`` (:func:`unwrap`)."""
    if not is_distributed():
        return model
    on_gpu = any(p.is_cuda for p in model.parameters())
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if on_gpu else convert_batchnorm(model)
    # find_unused_parameters: MoCo under torchrun failed DDP's "finished reduction in the prior
    # iteration" check without it (every parameter gets a gradient single-process; the cause is not
    # yet traced). The extra graph walk is cheap for these models.
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment) with
    gloo: training.train keeps model and data on the CPU, so NCCL would not fit even where CUDA is
    present. Returns whether this call started it (so the caller tears it down)."""
    import os

    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("gloo")
    return True


def from_rank0(value: float) -> float:
    """Rank 0's ``value`` on every rank (lr progress, stop flags), so ranks never disagree."""
    if not is_distributed() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())
