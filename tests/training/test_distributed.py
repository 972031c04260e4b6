"""Data-parallel SimCLR: one step on 2 gloo CPU processes equals one single-process step on the
same global batch (rank-synchronised BatchNorm head, gradient-preserving all-gather of the negatives)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.backbone import DEFAULT_OVERRIDES
from training.config import TrainConfig
from training.distributed import all_reduce_mean, rank_world, shard, unwrap, wrap_ddp
from training.methods import build_model
from training.train import param_groups

WORLD, BATCH = 2, 8


def _cfg() -> TrainConfig:
    return TrainConfig.for_method("simclr", batch_size=BATCH,
                                  overrides={**DEFAULT_OVERRIDES, "depth": 1, "embed_dim": 48, "num_heads": 2},
                                  head_hidden_dim=32, proj_dim=16)


def _setup() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    # float64 throughout: in float32 the two reduction orders differ by ~1e-5 after a 0.5-lr step
    # (round-off, amplified by BatchNorm over 8 samples); in float64 they agree to ~1e-14.
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    model, _ = build_model(_cfg())
    model.train()
    views = [torch.randn(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    return model, views


def _step(model, views) -> dict[str, torch.Tensor]:
    # SGD, not AdamW: Adam's first step is lr * g / (|g| + eps), about lr * sign(g), which turns
    # float noise on parameters whose true gradient is exactly zero (the attention key bias; the
    # encoder norm's bias, cancelled by the head's BatchNorm) into lr-sized differences. SGD's step
    # is lr * g, so equal weights mean equal gradients.
    opt = torch.optim.SGD(param_groups(model, 0.0), lr=0.5)
    loss = model(*views)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        assert rank_world() == (rank, WORLD)
        model, views = _setup()
        state = _step(wrap_ddp(model), [shard(v) for v in views])
        mean = all_reduce_mean(torch.tensor([float(rank)]))
        if rank == 0:
            torch.save({"state": state, "mean": mean}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_partitions_the_batch():
    x = torch.arange(8)
    assert torch.equal(torch.cat([shard(x, r, 4) for r in range(4)]), x)


def test_two_process_simclr_step_equals_single_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    got = torch.load(out)
    assert got["mean"].item() == 0.5
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    try:
        model, views = _setup()
        want = _step(model, views)
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    for k, v in want.items():
        if k.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(got["state"][k], v, rtol=0, atol=1e-9, msg=k)


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
