"""The training configuration: one dataclass, YAML experiment files and ``key=value`` overrides.

Precedence (as DINOv2's configs): dataclass defaults < YAML file < command-line flags < trailing
``key=value`` pairs; ``model.<kwarg>=v`` sets a ``timm.create_model`` override. The resolved config
is saved with every run as ``config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.backbone import DEFAULT_MODEL_NAME, DEFAULT_OVERRIDES, parse_override_value

METHODS = ("mae", "dino", "dinov2", "simclr", "moco")
FASHION_MNIST = "fashion-mnist"


class ConfigError(ValueError):
    """A training option is unknown or has a value that cannot work."""


@dataclass
class TrainConfig:
    """Every option of a pre-training run; saved resolved as ``config.json``."""

    method: str = "mae"
    model_name: str = DEFAULT_MODEL_NAME
    overrides: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OVERRIDES))
    data: str = FASHION_MNIST  # "fashion-mnist" or the path of an image folder
    data_dir: str | None = None  # directory of the Fashion-MNIST IDX files (default: auto-detect)
    limit_train: int | None = None  # use a random subset of this many training images
    batch_size: int = 256
    epochs: int = 10
    max_minutes: float | None = None  # time budget of the loop; stops after the current step
    # What max_minutes counts: "wall" (elapsed time) or "cpu" (this process's CPU time, all threads),
    # which gives runs sharing a loaded machine equal compute, as a fair method comparison needs.
    budget_clock: str = "wall"
    stop_at_step: int | None = None  # stop (and save a resumable checkpoint) at this global step
    base_lr: float = 1.5e-4  # MAE's base lr; the lr used is base_lr * batch_size / 256
    min_lr: float = 0.0
    clip_grad: float | None = None  # max gradient norm (DINO: 3.0); None = no clipping
    weight_decay: float = 0.05
    # Cosine weight-decay schedule from weight_decay to weight_decay_end (DINO: 0.04 -> 0.4) over the
    # run, on the decayed parameter group only; None keeps weight_decay constant (MAE, SimCLR, MoCo).
    weight_decay_end: float | None = None
    warmup: float = 0.05  # fraction of the run spent in linear warm-up
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads (default: os.cpu_count())
    # bf16 autocast measured 2-5x *slower* than fp32 for this model on the 2-core dev CPU (oneDNN bf16
    # matmuls and SDPA backward are slow there), so it is off; turn it on where bf16 is faster.
    bf16: bool = False
    # timm's fused SDPA attention is slower than the plain matmul path for ~13-50 token sequences.
    fused_attn: bool = False
    hflip: bool = True
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    # --- DINO (Caron et al. 2021), contrastive (SimCLR, MoCo) options; see METHOD_DEFAULTS.
    n_local_crops: int = 4
    local_crop_size: int = 16
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    dino_out_dim: int = 1024
    head_hidden_dim: int = 512
    head_bottleneck_dim: int = 128
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    teacher_temp_start: float = 0.04
    teacher_temp_warmup: float = 0.0  # fraction of the run for the linear teacher-temperature warm-up
    center_momentum: float = 0.9
    # DINO zeroes the gradient of the head's last (prototype) layer for the first epoch(s). In epochs
    # on the lr schedule's progress axis: with max_minutes the run's progress is its budget fraction,
    # so the layer is frozen for the first freeze_last_layer / epochs of the budget.
    freeze_last_layer: float = 0.0
    # --- DINOv2 (Oquab et al. 2024): iBOT masked-patch loss, KoLeo, Sinkhorn-Knopp; see configs/dinov2.yaml.
    ibot_mask_ratio: tuple[float, float] = (0.1, 0.5)  # block-mask ratio range of the masked global crops
    ibot_mask_probability: float = 0.5  # share of the global crops that are masked
    ibot_separate_head: bool = False  # patch tokens through their own head (False: the DINO head)
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    centering: str = "sinkhorn_knopp"  # DINOv2's teacher centring: "sinkhorn_knopp" or "centre" (running)
    sinkhorn_iterations: int = 3
    # Layer-wise lr decay (lr * layer_decay ** (depth + 1 - layer), blocks 1..depth, embeddings 0) and the
    # patch embedding's extra lr factor (training.param_groups); 1.0 = off (every method but DINOv2).
    layer_decay: float = 1.0
    patch_embed_lr_scale: float = 1.0
    momentum: float = 0.996  # base teacher / key-encoder EMA momentum
    momentum_cosine: bool = True  # raise the momentum to 1 along a cosine (DINO, MoCo v3)
    temperature: float = 0.5  # SimCLR / MoCo softmax temperature
    proj_dim: int = 128
    queue_size: int = 4096
    moco_v3: bool = False
    # MoCo v3 (§4.2): keep the random patch projection frozen, which stabilises ViT training.
    moco_v3_freeze_patch_embed: bool = False
    # Initialise the encoder (not decoder/heads) from a run directory, an encoder/checkpoint file
    # (.pt, .pth, .safetensors) or timm:<name[.tag]> (timm's pretrained weights, where reachable).
    init_from: str | None = None
    # Online k-NN (DINO's weighted 20-NN, training.knn) on knn_val images held out of pre-training,
    # against a bank of knn_bank pre-training images with their labels; every knn_every epochs
    # (progress axis, as freeze_last_layer) and/or every knn_every_steps steps; 0 = off.
    knn_val: int = 0
    knn_bank: int = 10000
    knn_every: float = 0.0
    knn_every_steps: int = 0
    knn_k: int = 20
    log_every: int = 20
    out_dir: str | None = None  # the run directory (default: runs/<method>-<timestamp>)

    def __post_init__(self) -> None:
        for name in ("betas", "global_crop_scale", "local_crop_scale", "ibot_mask_ratio"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        checks = [
            (self.method in METHODS,
             f"method {self.method!r} is not available; choose one of {list(METHODS)}"),
            (isinstance(self.overrides, dict), "overrides must be a mapping of timm keyword arguments"),
            (self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}"),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.max_minutes is None or self.max_minutes > 0,
             f"max_minutes must be > 0, got {self.max_minutes}"),
            (self.budget_clock in ("wall", "cpu"),
             f"budget_clock must be 'wall' or 'cpu', got {self.budget_clock!r}"),
            (self.limit_train is None or self.limit_train > 0,
             f"limit_train must be > 0, got {self.limit_train}"),
            (0.0 <= self.mask_ratio < 1.0, f"mask_ratio must be in [0, 1), got {self.mask_ratio}"),
            (0.0 <= self.warmup < 1.0, f"warmup is a fraction in [0, 1), got {self.warmup}"),
            (self.base_lr > 0 and self.min_lr >= 0, "base_lr must be > 0 and min_lr >= 0"),
            (len(self.betas) == 2, f"betas must be two numbers, got {self.betas}"),
            (self.n_local_crops >= 0 and self.local_crop_size > 0, "n_local_crops >= 0 and local_crop_size > 0"),
            (0.0 <= self.momentum <= 1.0, f"momentum must be in [0, 1], got {self.momentum}"),
            (self.temperature > 0 and self.teacher_temp > 0 and self.student_temp > 0,
             "temperatures must be > 0"),
            (self.queue_size > 0, f"queue_size must be > 0, got {self.queue_size}"),
            (self.log_every > 0, f"log_every must be > 0, got {self.log_every}"),
            (self.weight_decay_end is None or self.weight_decay_end >= 0,
             f"weight_decay_end must be >= 0, got {self.weight_decay_end}"),
            (self.freeze_last_layer >= 0, f"freeze_last_layer must be >= 0 epochs, got {self.freeze_last_layer}"),
            (self.knn_val >= 0 and self.knn_bank > 0 and self.knn_k > 0,
             "knn_val must be >= 0, knn_bank and knn_k > 0"),
            (self.knn_every >= 0 and self.knn_every_steps >= 0, "knn_every and knn_every_steps must be >= 0"),
            (not (self.knn_every or self.knn_every_steps) or self.knn_val > 0,
             "online k-NN (knn_every / knn_every_steps) needs held-out images: set knn_val (e.g. 5000)"),
            (len(self.ibot_mask_ratio) == 2 and 0.0 <= self.ibot_mask_ratio[0] <= self.ibot_mask_ratio[1] < 1.0,
             f"ibot_mask_ratio must be (low, high) with 0 <= low <= high < 1, got {self.ibot_mask_ratio}"),
            (0.0 <= self.ibot_mask_probability <= 1.0,
             f"ibot_mask_probability must be in [0, 1], got {self.ibot_mask_probability}"),
            (self.centering in ("sinkhorn_knopp", "centre"),
             f"centering must be 'sinkhorn_knopp' or 'centre', got {self.centering!r}"),
            (self.sinkhorn_iterations >= 1, f"sinkhorn_iterations must be >= 1, got {self.sinkhorn_iterations}"),
            (0.0 < self.layer_decay <= 1.0, f"layer_decay must be in (0, 1], got {self.layer_decay}"),
            (self.patch_embed_lr_scale > 0, f"patch_embed_lr_scale must be > 0, got {self.patch_embed_lr_scale}"),
            (self.ibot_loss_weight >= 0 and self.koleo_loss_weight >= 0, "loss weights must be >= 0"),
            (not self.moco_v3_freeze_patch_embed or self.moco_v3,
             "moco_v3_freeze_patch_embed is a MoCo v3 option; set moco_v3=true"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def lr(self) -> float:
        """Peak learning rate: MAE's linear scaling rule ``base_lr * batch_size / 256``."""
        return self.base_lr * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def for_method(cls, method: str, **kw: Any) -> "TrainConfig":
        """A config with ``method``'s defaults (:data:`METHOD_DEFAULTS`) under the given fields."""
        if method not in METHODS:
            raise ConfigError(f"method {method!r} is not available; choose one of {list(METHODS)}")
        return cls(**{**METHOD_DEFAULTS[method], "method": method, **kw})


# Per-method defaults over the dataclass's (which are MAE's). Paper values, scaled down where a
# 90 s - 10 min CPU run on 60k 28 px images differs from 100-800 ImageNet epochs:
# - lr: AdamW for all ViTs (DINO, MoCo v3 use it for ViT; SimCLR's LARS is for ResNets), the
#   base lr scaled by batch/256; DINO's 5e-4 (its ViT-S recipe), MoCo v3's 1.5e-4 is for a 4096
#   batch and 300 epochs, too slow here, so the contrastive runs use 1e-3, the base lr of the
#   90 s MAE reference run (not tuned per method).
# - momentum: DINO 0.996 -> 1 cosine as the paper. MoCo v2's 0.999 gives the key encoder a
#   ~700-step half-life, longer than a short run, so 0.99 (MoCo v3's value), raised by the cosine.
# - DINO's weight-decay cosine 0.04 -> 0.4 and freezing the head's last layer for epoch 1, as the
#   paper; under a time budget "epoch 1" is 1/epochs of the budget (see freeze_last_layer).
# - temperatures: SimCLR 0.5 (its CIFAR setting for small batches), MoCo 0.2 (v2 and v3), DINO
#   student 0.1, teacher 0.04 (no warm-up needed at 0.04, the paper's default).
# - queue: 65536 in MoCo; 4096 here so the queued keys are at most ~64 steps (batch 64) stale.
# - batch 64: contrastive losses want large batches, but on the 2-core CPU these methods train at
#   ~50 (DINO, 6 crops + teacher) to ~160 (MoCo v2) img/s with the default ViT, MAE at ~380.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "mae": {},
    "dino": {"batch_size": 64, "base_lr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4,
             "betas": (0.9, 0.999), "momentum": 0.996, "momentum_cosine": True, "clip_grad": 3.0,
             "freeze_last_layer": 1.0},
    # DINOv2: DINO's values plus the reference's layer decay 0.9 and patch-embed lr x 0.2
    # (ssl_default_config.yaml), Sinkhorn-Knopp centring (3 iterations), iBOT masks of ratio 0.1-0.5 on
    # half the global crops, KoLeo weight 0.1; configs/dinov2.yaml adds the small-data recipe.
    "dinov2": {"batch_size": 64, "base_lr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4,
               "betas": (0.9, 0.999), "momentum": 0.996, "momentum_cosine": True, "clip_grad": 3.0,
               "freeze_last_layer": 1.0, "layer_decay": 0.9, "patch_embed_lr_scale": 0.2},
    "simclr": {"batch_size": 64, "base_lr": 1e-3, "weight_decay": 0.05, "betas": (0.9, 0.999),
               "temperature": 0.5},
    "moco": {"batch_size": 64, "base_lr": 1e-3, "weight_decay": 0.05, "betas": (0.9, 0.999),
             "temperature": 0.2, "momentum": 0.99, "momentum_cosine": True},
}


def apply_overrides(values: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings to a config dict; ``model.<key>=v`` sets an encoder override."""
    values = dict(values)
    values["overrides"] = dict(values.get("overrides") or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {pair!r}")
        value = parse_override_value(text)
        if key.startswith("model."):
            values["overrides"][key[len("model."):]] = value
        elif key in known:
            values[key] = value
        else:
            raise ConfigError(f"unknown config key {key!r}; known keys: {sorted(known)} and model.<timm kwarg>")
    return values


def config_from_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML experiment file of TrainConfig fields (``model:`` may hold encoder overrides)."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options, not {type(loaded).__name__}")
    model = loaded.pop("model", None) or {}
    if not isinstance(model, dict):
        raise ConfigError(f"{path}: 'model' must be a mapping of timm keyword arguments")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(loaded) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown config keys {unknown}; known keys: {sorted(known)}")
    if model:
        loaded["overrides"] = {**loaded.get("overrides", dict(DEFAULT_OVERRIDES)), **model}
    return loaded
