"""Start pre-training from existing encoder weights (``init_from``), to continue pre-training on a
user's own domain.

Three sources, told apart by their form:

- a run directory (``training.run_dir.load_encoder``: its ``encoder.pt``, for DINO the teacher);
- a weights file: ``.safetensors`` (``safetensors.torch.load_file``) or a torch file (``.pt``,
  ``.pth``, ``.bin``) holding an encoder state_dict, a vitserve ``checkpoint.pt`` (its ``encoder.*``
  entries) or a ``{"model"|"state_dict": ...}`` wrapper around either;
- ``timm:<name[.tag]>``: timm's pretrained weights, built with the run's encoder overrides (timm
  itself resamples the position embedding and adapts the input channels). It needs the weights to
  be reachable (Hugging Face cache or network); otherwise the error says so.

Only the encoder is initialised; decoders and heads keep their fresh initialisation. Files must
match the encoder exactly: a missing, unexpected or differently shaped key is an error naming it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.config import ConfigError

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
# timm classifier heads: an encoder is built with num_classes=0, so these are dropped, not errors.
_HEAD_KEYS = ("head.", "head_dist.", "fc_norm.")


def encoder_state_from(source: str, model_name: str, overrides: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The encoder state_dict ``source`` names (see the module docstring)."""
    if source.startswith(TIMM_PREFIX):
        return _timm_state(source[len(TIMM_PREFIX):], overrides)
    path = Path(source)
    if path.is_dir():
        from training.run_dir import RunDirError, load_encoder

        try:
            encoder, _ = load_encoder(path)
        except RunDirError as e:
            raise ConfigError(f"init_from={source}: {e}") from e
        return encoder.state_dict()
    if not path.is_file():
        raise ConfigError(f"init_from={source}: no such run directory or weights file "
                          f"(or use timm:<model name> for timm's pretrained weights)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ConfigError(f"init_from={source}: cannot read safetensors file: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and runtime errors for a torn or foreign file
        raise ConfigError(f"init_from={source}: cannot read weights file: {e}") from e
    return _unwrap_state(obj, source)


def _unwrap_state(obj: Any, source: str) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"init_from={source}: expected a state_dict of tensors, got {type(obj).__name__}")
    if any(k.startswith("encoder.") for k in obj):  # a vitserve checkpoint.pt: the student encoder
        obj = {k[len("encoder."):]: v for k, v in obj.items() if k.startswith("encoder.")}
    return obj


def _timm_state(name: str, overrides: dict[str, Any]) -> dict[str, torch.Tensor]:
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ConfigError(f"init_from=timm:{name}: unknown timm model")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, **overrides)
    except Exception as e:  # hub download errors differ by backend; none is recoverable here
        raise ConfigError(f"init_from=timm:{name}: pretrained weights are not reachable or do not fit "
                          f"the overrides {overrides} ({type(e).__name__}: {e}); use a local weights "
                          "file or run directory instead") from e
    return model.state_dict()


def load_encoder_weights(encoder: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``encoder`` in place; any key mismatch is a :class:`ConfigError` naming it."""
    own = encoder.state_dict()
    dropped = [k for k in state if k not in own and k.startswith(_HEAD_KEYS)]
    state = {k: v for k, v in state.items() if k not in dropped}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs encoder {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(shapes)} shape mismatches ({'; '.join(shapes[:6])})" if shapes else "",
                 f"missing keys {missing[:6]}" if missing else "",
                 f"unexpected keys {unexpected[:6]}" if unexpected else ""]
        raise ConfigError(f"init_from={source} does not fit the encoder: "
                          + ", ".join(p for p in parts if p)
                          + "; set model_name / model.<kwarg> overrides to the source's architecture")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConfigError(f"init_from={source} has non-finite values in {bad[:6]}")
    encoder.load_state_dict(state, strict=True)
    if dropped:
        log.info("init_from=%s: ignored classifier keys %s", source, dropped[:6])


def init_encoder(encoder: nn.Module, source: str, model_name: str, overrides: dict[str, Any]) -> None:
    """Initialise ``encoder`` from ``source`` (run dir, weights file or ``timm:<name>``), without
    drawing from the global RNG (building a source model would), so the heads initialise as they
    would from scratch."""
    with torch.random.fork_rng(devices=[]):
        state = encoder_state_from(source, model_name, overrides)
    load_encoder_weights(encoder, state, source)
    log.info("encoder initialised from %s", source)
