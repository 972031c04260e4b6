"""Self-supervised pre-training of a timm ViT encoder; writes a run directory (docs/CONTRACTS.md).

``vitserve train --method {mae,dino,dinov2,simclr,moco} [--config FILE.yaml] [--out DIR] ... [key=value ...]``
calls :func:`main`, a thin layer over :func:`train`. The methods (MAE, He et al. 2022; DINO, Caron
et al. 2021; DINOv2, Oquab et al. 2024; SimCLR, Chen et al. 2020; MoCo v2/v3) live in
:mod:`training.methods`.

The recipe follows MAE's ``engine_pretrain.py``: AdamW (betas 0.9/0.95, weight decay 0.05 on
matrices only), lr = base_lr * batch / 256 with linear warm-up and cosine decay, a non-finite loss
stops the run. Data stays in memory as one uint8 tensor and batches are random index sets, so no
loader processes compete with the two compute threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training import data as data_mod
from training.backbone import BackboneError
from training.config import (  # noqa: F401  (TrainConfig and friends are part of this module's API)
    FASHION_MNIST, METHOD_DEFAULTS, METHODS, ConfigError, TrainConfig, apply_overrides, config_from_yaml,
)
from training.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from training import distributed as dist_mod
from training.methods import METHOD_REGISTRY, build_model, schedules_at, weight_decay_at  # noqa: F401
from training.online_knn import OnlineKNN
from training.param_groups import param_groups  # noqa: F401  (re-exported: tests and benchmarks use it)
from training.pretraining_data import load_pretraining_data
from training.run_dir import CHECKPOINT_FILENAME, CONFIG_FILENAME, METRICS_FILENAME, write_json

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


def lr_at(step: float, total: float, warmup: float, base: float, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps to ``base``, then half-cosine to ``min_lr`` at ``total``.

    Steps may be fractional (a time-budgeted run passes wall-clock progress in step units).
    """
    if warmup > 0 and step < warmup:
        return base * step / warmup
    if total <= warmup:
        return base
    t = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


class _MetricsWindow:
    """Mean loss and throughput since the last metrics line."""

    def __init__(self, start: float) -> None:
        self._reset(start)

    def _reset(self, start: float) -> None:
        self.start, self.loss, self.steps, self.images = start, 0.0, 0, 0
        self.parts: dict[str, float] = {}

    def add(self, loss: float, images: int, parts: dict[str, float] | None = None) -> None:
        self.loss += loss
        self.steps += 1
        self.images += images
        for k, v in (parts or {}).items():
            self.parts[k] = self.parts.get(k, 0.0) + v

    def flush(self, step: int, epoch: int, lr: float, elapsed: float,
              extra: dict[str, float] | None = None) -> dict[str, float]:
        now = time.perf_counter()
        steps = max(self.steps, 1)
        record = {"step": step, "epoch": epoch, "loss": self.loss / steps, "lr": lr,
                  "img_per_s": self.images / max(now - self.start, 1e-9), "elapsed_s": elapsed,
                  **{k: v / steps for k, v in self.parts.items()}, **(extra or {})}
        self._reset(now)
        return record


def train_step(model: nn.Module, opt: torch.optim.Optimizer, views: torch.Tensor | list[torch.Tensor],
               lr: float, bf16: bool, schedules: dict[str, float] | None = None,
               clip_grad: float | None = None, frozen: list[nn.Parameter] | tuple = ()
               ) -> tuple[float, dict[str, float]]:
    """One optimiser step on ``views`` (a batch ``[N, C, H, W]`` or a list of views of it) at
    learning rate ``lr`` (gradient norm clipped to ``clip_grad`` if set; the gradients of ``frozen``
    then dropped, so AdamW leaves them alone, as DINO's ``cancel_gradients_last_layer``), then the
    method's ``after_step`` (EMA, centre, queue) with ``schedules``.

    Returns the fp32 loss and the scalar loss parts / collapse signals of the method's output. A
    non-finite loss is returned without stepping, so the caller can stop on it.
    """
    views = [views] if isinstance(views, torch.Tensor) else list(views)
    for group in opt.param_groups:  # layer-wise decay / patch-embed scale (training.param_groups)
        group["lr"] = lr * group.get("lr_scale", 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(*views, **(schedules or {}))  # losses upcast to fp32
    loss = out["loss"]
    value = loss.item()
    parts = {k: float(v) for k, v in out.items()
             if k != "loss" and isinstance(v, torch.Tensor) and v.ndim == 0}
    if math.isfinite(value):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip_grad)
        for p in frozen:
            p.grad = None
        opt.step()
        after_step = getattr(dist_mod.unwrap(model), "after_step", None)
        if after_step is not None:
            after_step(out, **(schedules or {}))
    return value, parts


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Pre-train an encoder as ``config`` says and return the run directory it wrote.

    With ``resume`` the run goes on from ``config.out_dir``'s checkpoint: weights, teacher, centre,
    queue, optimiser, step, data position and RNG states, so a step-scheduled run continues exactly
    as if it had not stopped (a time budget anneals on wall-clock progress, which is not exact).
    A directory that already holds a run is refused unless ``overwrite``: a stored checkpoint is
    never replaced by accident.
    """

    cfg = config
    started_dist = dist_mod.init_from_env()  # under torchrun: one process group, batch sharded per rank
    try:
        return _train(cfg, resume, overwrite)
    finally:
        if started_dist:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    from tqdm import tqdm

    rank, world = dist_mod.rank_world()
    main_rank = rank == 0
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} (the global batch) must divide over {world} ranks")
    torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    if resume and not cfg.out_dir:
        raise ConfigError("resuming needs the run directory (out_dir)")

    run_dir = Path(cfg.out_dir or f"runs/{cfg.method}-{datetime.now():%Y%m%d-%H%M%S}")
    cfg = dataclasses.replace(cfg, out_dir=str(run_dir))
    if not resume and not overwrite and (run_dir / CHECKPOINT_FILENAME).exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                          "write elsewhere with --out, or replace it with --overwrite")
    ckpt = load_checkpoint(run_dir) if resume else None
    model, spec = build_model(cfg, init=ckpt is None)  # init_from only for a fresh run
    train_data, val_data, spec = load_pretraining_data(cfg, spec)
    images = torch.from_numpy(np.ascontiguousarray(train_data.images))
    knn = (OnlineKNN.from_split(train_data, val_data, cfg.knn_bank, cfg.seed, cfg.knn_k)
           if cfg.knn_val and (cfg.knn_every or cfg.knn_every_steps) and main_rank else None)
    model.spec = spec  # now with the data's mean/std
    model.train()
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:  # the run's config.json no longer describes the checkpoint's model
            raise ConfigError(f"cannot resume from {run_dir / CHECKPOINT_FILENAME}: its weights do not fit the "
                              f"model that {run_dir / CONFIG_FILENAME} describes (was the config edited?): "
                              f"{e}") from e
    core = model
    model = dist_mod.wrap_ddp(model)  # replaces BatchNorm modules, so the optimiser comes after
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.patch_embed_lr_scale),
                            lr=cfg.lr, betas=cfg.betas)
    step, start_epoch, start_batch, saved_perm = 0, 0, 0, None
    if ckpt is not None:
        try:
            opt.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise ConfigError(f"cannot resume from {run_dir / CHECKPOINT_FILENAME}: its optimiser state does "
                              f"not fit this model's parameters: {e}") from e
        step, start_epoch, start_batch, saved_perm = ckpt["step"], ckpt["epoch"], ckpt["batch"], ckpt["perm"]
        restore_rng(ckpt["rng"], data_gen)
    # After load_state_dict, which replaces the group dicts. A checkpoint from before lr scales has
    # two groups without "wd_scale": the first is the decayed one.
    decay_groups = [g for i, g in enumerate(opt.param_groups) if g.get("wd_scale", float(i == 0)) > 0]
    last_layer = list(getattr(core, "last_layer_params", lambda: [])())

    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume and (run_dir / CHECKPOINT_FILENAME).exists():
        log.warning("%s already holds a run; overwriting it (--overwrite)", run_dir)
    if main_rank:
        write_json(run_dir / CONFIG_FILENAME, cfg.to_dict())
    metrics = (run_dir / METRICS_FILENAME).open("a" if resume else "w") if main_rank else open(os.devnull, "w")

    n = len(images)
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    warmup = cfg.warmup * total
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    method = METHOD_REGISTRY[cfg.method]
    log.info("%s on %d images, %d steps/epoch, up to %d steps%s; peak lr %.3g, %d threads; "
             "encoder %.2fM params, heads %.2fM trainable%s", cfg.method, n, steps_per_epoch, total,
             f" or {budget_s:.0f} s" if budget_s else "", cfg.lr, torch.get_num_threads(),
             sum(p.numel() for p in core.encoder.parameters()) / 1e6, _head_param_count(core) / 1e6,
             f"; resuming at step {step}" if resume else "")
    if world > 1:
        log.info("rank %d of %d: %d images of each global batch of %d", rank, world,
                 cfg.batch_size // world, cfg.batch_size)

    epoch, batch_pos, perm, stop, out_of_time = start_epoch, start_batch, saved_perm, False, False
    knn_period = cfg.knn_every * steps_per_epoch if cfg.knn_every else math.inf
    next_knn = (math.floor(step / knn_period) + 1) * knn_period if cfg.knn_every else math.inf
    budget_clock = time.process_time if cfg.budget_clock == "cpu" else time.perf_counter
    budget_start = budget_clock()
    start = time.perf_counter()
    window = _MetricsWindow(start)
    bar = tqdm(total=total, initial=step, desc=f"{cfg.method} {run_dir.name}", unit="step",
               dynamic_ncols=True, disable=None if main_rank else True)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            resumed_here = epoch == start_epoch and saved_perm is not None
            perm = saved_perm if resumed_here else torch.randperm(n, generator=data_gen)
            for i in range(start_batch if epoch == start_epoch else 0, steps_per_epoch):
                spent = budget_clock() - budget_start
                # A time-budgeted run anneals on its clock's progress so the cosine ends with the budget.
                progress = max(step, spent / budget_s * total) if budget_s else step
                progress = dist_mod.from_rank0(progress)  # every rank steps at one lr
                lr = lr_at(progress, total, warmup, cfg.lr, cfg.min_lr)
                batch = images[perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
                x01 = batch.permute(0, 3, 1, 2).float().div_(255.0)  # [N, C, H, W] in [0, 1]
                views = method.views(cfg, x01, spec, data_gen)
                if world > 1:  # same seed on every rank: the same global views, each rank its shard
                    views = [dist_mod.shard(v) for v in views]
                sched = {k: v for k, v in schedules_at(cfg, progress, total).items() if k in method.schedules}
                if cfg.weight_decay_end is not None:  # DINO's cosine, on the decayed groups only
                    for group in decay_groups:
                        group["weight_decay"] = weight_decay_at(cfg, progress, total)
                frozen = last_layer if progress < cfg.freeze_last_layer * steps_per_epoch else ()
                loss, parts = train_step(model, opt, views, lr, cfg.bf16, sched, cfg.clip_grad, frozen)
                if not math.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss is {loss} at step {step} (epoch {epoch}, lr {lr:.3g}); stopping. "
                        "Lower base_lr, raise warmup, or set bf16=false.")
                step += 1
                batch_pos = i + 1
                window.add(loss, len(batch), parts)  # the global batch: img/s counts every rank's images
                bar.update(1)
                elapsed = time.perf_counter() - start
                spent = budget_clock() - budget_start
                out_of_time = bool(dist_mod.from_rank0(float(budget_s is not None and spent >= budget_s)))
                stop = out_of_time or (cfg.stop_at_step is not None and step >= cfg.stop_at_step)
                extra = dict(sched)
                if cfg.weight_decay_end is not None:
                    extra["weight_decay"] = decay_groups[0]["weight_decay"]
                # k-NN every knn_every epochs on the progress axis (a budgeted run: at fractions of
                # its budget), every knn_every_steps steps, and at the end.
                done = max(step, spent / budget_s * total) if budget_s else step
                knn_due = knn is not None and (stop or step == total or done >= next_knn
                                               or bool(cfg.knn_every_steps and step % cfg.knn_every_steps == 0))
                if knn_due:
                    t_knn, b_knn = time.perf_counter(), budget_clock()
                    extra["knn_val_top1"] = knn.top1(getattr(core, "export_encoder", core.encoder), spec)
                    extra["knn_s"] = time.perf_counter() - t_knn
                    # Monitoring is not training: img_per_s and the time budget leave it out.
                    window.start += extra["knn_s"]
                    budget_start += budget_clock() - b_knn
                    if done >= next_knn:
                        next_knn = (math.floor(done / knn_period) + 1) * knn_period
                if step % cfg.log_every == 0 or stop or step == total or "knn_val_top1" in extra:
                    record = window.flush(step, epoch, lr, elapsed, extra)
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                    img_s=f"{record['img_per_s']:.0f}")
                if stop:
                    break
            if stop and batch_pos < steps_per_epoch:
                log.info("stopping after %d steps (epoch %d, batch %d)%s", step, epoch, batch_pos,
                         f": time budget of {cfg.max_minutes} min reached" if out_of_time else "")
                break
            epoch, batch_pos, perm = epoch + 1, 0, None
            if stop:
                break
            if epoch < cfg.epochs and main_rank:  # the final save follows the loop
                save_checkpoint(run_dir, core, opt, step, epoch, cfg, spec, data_gen)
    finally:
        bar.close()
        metrics.close()
    if main_rank:
        save_checkpoint(run_dir, core, opt, step, epoch, cfg, spec, data_gen, batch_pos, perm)
        log.info("saved %s after %d steps in %.0f s", run_dir, step, time.perf_counter() - start)
    return run_dir


def _head_param_count(model: nn.Module) -> int:
    """Trainable parameters outside the encoder (decoder, heads) for logging."""
    enc = {id(p) for p in model.encoder.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in enc and p.requires_grad)


# ----------------------------------------------------------------------------------------------- CLI

_FLAG_FIELDS = {"out": "out_dir", "epochs": "epochs", "max_minutes": "max_minutes",
                "batch_size": "batch_size", "data": "data", "data_dir": "data_dir", "seed": "seed"}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < YAML file < command-line flags < trailing ``key=value`` overrides."""
    if args.resume:  # the run's own resolved config, then flags and overrides on top
        config_path = Path(args.resume) / CONFIG_FILENAME
        if not config_path.is_file():
            raise ConfigError(f"cannot resume: {config_path} does not exist")
        values = json.loads(config_path.read_text())
        if args.method and args.method != values["method"]:
            raise ConfigError(f"{args.resume} is a {values['method']} run; it cannot resume as {args.method}")
        values.update(out_dir=str(args.resume), stop_at_step=None)
    else:
        from_file = config_from_yaml(args.config) if args.config else {}
        method = args.method or from_file.get("method", "mae")
        if method not in METHODS:
            raise ConfigError(f"method {method!r} is not available; choose one of {list(METHODS)}")
        values = TrainConfig.for_method(method).to_dict()  # dataclass < method defaults < file < flags
        values.update(from_file)
        values["method"] = method
    for flag, name in _FLAG_FIELDS.items():
        if getattr(args, flag) is not None:
            values[name] = getattr(args, flag)
    values = apply_overrides(values, args.overrides)
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(f"bad config value: {e}") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitserve train", description="Self-supervised pre-training of a ViT encoder.",
        epilog="Trailing key=value pairs set any TrainConfig field (e.g. base_lr=3e-4 mask_ratio=0.6); "
               "model.<kwarg>=v sets a timm.create_model override (e.g. model.depth=4).")
    p.add_argument("--method", choices=METHODS, help="pre-training method (default: mae)")
    p.add_argument("--config", help="YAML file of TrainConfig fields")
    p.add_argument("--resume", metavar="RUN_DIR", help="go on with the run in RUN_DIR from its checkpoint")
    p.add_argument("--out", help="run directory to write (default: runs/<method>-<timestamp>)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-minutes", type=float, help="wall-clock budget; stops cleanly and saves")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--data", help="'fashion-mnist' or an image folder")
    p.add_argument("--data-dir", help="directory holding the Fashion-MNIST IDX files")
    p.add_argument("--seed", type=int)
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    """``vitserve train``: 0 on success, 2 for a bad command line or config, 1 if training failed."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and usage errors (2)
        return int(e.code or 0)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"vitserve train: error: {e}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_dir = train(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    except (ConfigError, BackboneError) as e:
        print(f"vitserve train: error: {e}", file=sys.stderr)
        return 2
    except (data_mod.DataError, NonFiniteLossError) as e:
        print(f"vitserve train: error: {e}", file=sys.stderr)
        return 1
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
