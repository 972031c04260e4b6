"""Data-parallel training: one step on 2 gloo CPU processes equals one single-process step on the
same global batch, for SimCLR (gathered negatives), DINO (centre all-reduced), DINOv2 (Sinkhorn-Knopp
sums or the CLS and patch centres all-reduced, KoLeo on gathered features, ranks masking different
numbers of patches), MoCo v2 (queue of the global batch's keys) and MoCo v3 (keys gathered, labels
offset by rank), BatchNorm heads included."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.backbone import DEFAULT_OVERRIDES
from training.config import TrainConfig
from training.distributed import all_reduce_mean, gather_no_grad, rank_world, shard, unwrap, wrap_ddp
from training.block_masking import ibot_masks
from training.methods import build_model
from training.train import param_groups

WORLD, BATCH = 2, 8
CASES = {  # name -> (method, extra config)
    "simclr": ("simclr", {}),
    "dino": ("dino", {"n_local_crops": 2, "local_crop_size": 16, "dino_out_dim": 32, "head_bottleneck_dim": 8}),
    "dinov2": ("dinov2", {"n_local_crops": 2, "local_crop_size": 16, "dino_out_dim": 32, "head_bottleneck_dim": 8}),
    "dinov2_centre": ("dinov2", {"n_local_crops": 2, "local_crop_size": 16, "dino_out_dim": 32,
                                 "head_bottleneck_dim": 8, "centering": "centre", "ibot_separate_head": True}),
    "moco_v2": ("moco", {"queue_size": 20}),  # 20: the second half of the global batch wraps around
    "moco_v3": ("moco", {"moco_v3": True}),
}
SCHEDULES = {"momentum": 0.9, "teacher_temp": 0.04}


def _cfg(case: str) -> TrainConfig:
    method, extra = CASES[case]
    return TrainConfig.for_method(method, batch_size=BATCH,
                                  overrides={**DEFAULT_OVERRIDES, "depth": 1, "embed_dim": 48, "num_heads": 2},
                                  head_hidden_dim=32, proj_dim=16, **extra)


def _setup(case: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    # float64 throughout: in float32 the two reduction orders differ by ~1e-5 after a 0.5-lr step
    # (round-off, amplified by BatchNorm over 8 samples); in float64 they agree to ~1e-14.
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    model, _ = build_model(_cfg(case))
    model.train()
    sizes = (28, 28, 16, 16) if case.startswith("dino") else (28, 28)
    views = [torch.randn(BATCH, 1, s, s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(sizes)]
    if case.startswith("dinov2"):  # block masks on 12 of the 16 global crops: rank 0 and rank 1 mask unequal counts
        masks = ibot_masks(2 * BATCH, (7, 7), torch.Generator().manual_seed(3), mask_probability=0.75)
        views += list(masks.view(2, BATCH, -1).unbind(0))
    if case == "moco_v2":  # a queue already half full, so the step's negatives are not all random
        with torch.no_grad():
            model.queue.ptr.fill_(6)
    return model, views


def _step(model, views) -> dict[str, torch.Tensor]:
    # SGD, not AdamW: Adam's first step is lr * g / (|g| + eps), about lr * sign(g), which turns
    # float noise on parameters whose true gradient is exactly zero (the attention key bias; the
    # encoder norm's bias, cancelled by the head's BatchNorm) into lr-sized differences. SGD's step
    # is lr * g, so equal weights mean equal gradients.
    opt = torch.optim.SGD(param_groups(model, 0.0), lr=0.5)
    out = model(*views, **SCHEDULES)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    unwrap(model).after_step(out, **SCHEDULES)  # teacher / key EMA, DINO centre, MoCo queue
    state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    state["loss"] = all_reduce_mean(out["loss"].detach())  # the mean of the ranks' losses
    return state


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        assert rank_world() == (rank, WORLD)
        result = {"mean": all_reduce_mean(torch.tensor([float(rank)])),
                  "gathered": gather_no_grad(torch.tensor([[float(rank)]] * 2))}
        for case in CASES:
            model, views = _setup(case)
            result[case] = _step(wrap_ddp(model), [shard(v) for v in views])
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_partitions_the_batch():
    x = torch.arange(8)
    assert torch.equal(torch.cat([shard(x, r, 4) for r in range(4)]), x)


@pytest.fixture(scope="module")
def two_rank_steps(tmp_path_factory):
    """One step of every case on 2 gloo processes (one spawn for all), rank 0's results."""
    out = str(tmp_path_factory.mktemp("ddp") / "rank0.pt")
    dtype = torch.get_default_dtype()
    try:
        mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    finally:
        torch.set_default_dtype(dtype)
    return torch.load(out)


def test_collectives(two_rank_steps):
    assert two_rank_steps["mean"].item() == 0.5
    assert two_rank_steps["gathered"].flatten().tolist() == [0.0, 0.0, 1.0, 1.0]  # rank order


@pytest.mark.parametrize("case", list(CASES))
def test_two_process_step_equals_single_process(two_rank_steps, case):
    got = two_rank_steps[case]
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    try:
        model, views = _setup(case)
        want = _step(model, views)
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    if case == "moco_v2":  # the whole global batch's keys went into the queue, in order
        assert int(got["queue.ptr"]) == (6 + BATCH) % 20
    # DINO's local crops go through timm's position-embedding resampling, which interpolates in
    # float32 even for float64 weights: its round-off (~1e-9 after the 0.5-lr step) sets DINO's bound.
    atol = 1e-7 if case.startswith("dino") else 1e-9
    for k, v in want.items():
        if k.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(got[k], v, rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _train_worker(rank: int, port: int, folder: str, out: str) -> None:
    from training.train import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    cfg = TrainConfig.for_method("simclr", data=folder, batch_size=8, epochs=1, stop_at_step=2, log_every=1,
                                 num_threads=1, overrides={**DEFAULT_OVERRIDES, "depth": 1, "embed_dim": 32,
                                                           "num_heads": 2}, head_hidden_dim=32, proj_dim=16,
                                 out_dir=out)
    train(cfg)
    assert not dist.is_initialized()  # train() tears down the group it started


def test_train_under_two_ranks_writes_one_run(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    mp.spawn(_train_worker, args=(_free_port(), str(tmp_path / "imgs"), str(out)), nprocs=WORLD, join=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone writes
    assert (out / "checkpoint.pt").exists()
