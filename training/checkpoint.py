"""``checkpoint.pt`` and ``encoder.pt``: everything an exact resume needs, written atomically with the encoder files.

Holds the whole method module's state (student, teacher/key encoder, heads, decoder, DINO centre,
MoCo queue and pointer — all parameters or buffers), the optimiser, the step, the data position
(epoch, batch index and that epoch's permutation) and every RNG the loop draws from (torch global,
the data generator, numpy, python). The schedules are functions of the step, so the step is their
position.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.backbone import EncoderSpec
from training.config import ConfigError, TrainConfig
from training.run_dir import CHECKPOINT_FILENAME, atomic_torch_save, save_encoder


def rng_state(data_gen: torch.Generator) -> dict[str, Any]:
    """The states of every RNG the training loop uses."""
    return {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
            "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng(state: dict[str, Any], data_gen: torch.Generator) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, epoch: int,
                    cfg: TrainConfig, spec: EncoderSpec, data_gen: torch.Generator,
                    batch: int = 0, perm: torch.Tensor | None = None) -> None:
    """Write ``checkpoint.pt`` and the encoder files; ``(epoch, batch, perm)`` is where to go on."""
    atomic_torch_save({
        "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "epoch": epoch,
        "batch": batch, "perm": perm if batch else None,
        "config": cfg.to_dict(), "encoder_spec": spec.to_dict(), "rng": rng_state(data_gen),
    }, run_dir / CHECKPOINT_FILENAME)
    # A method may store another encoder than the one trained by gradient (DINO: its EMA teacher).
    save_encoder(run_dir, getattr(model, "export_encoder", model.encoder), spec)


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """Read ``RUN_DIR/checkpoint.pt`` for a resume, with a message naming what is missing."""
    path = Path(run_dir) / CHECKPOINT_FILENAME
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} does not exist (was the run started?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG tuples
    except Exception as e:  # a torn or foreign file: torch/pickle/zip raise many kinds
        raise ConfigError(f"cannot resume: {path} is not a readable checkpoint ({type(e).__name__}: {e}); "
                          "it may be truncated or corrupt. Restart the run with --overwrite") from e
    if not isinstance(ckpt, dict):
        raise ConfigError(f"cannot resume: {path} holds a {type(ckpt).__name__}, not a vitserve checkpoint")
    missing = {"model", "optimizer", "step", "epoch", "batch", "rng", "config"} - set(ckpt)
    if missing:
        raise ConfigError(f"cannot resume from {path}: it lacks {sorted(missing)} (written by an older version?)")
    return ckpt
