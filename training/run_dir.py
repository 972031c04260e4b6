"""The run directory: what training writes and the one reader the later stages use.

Layout (docs/CONTRACTS.md)::

    RUN_DIR/
      config.json         resolved training config
      encoder_spec.json   training.backbone.EncoderSpec.save()
      encoder.pt          state_dict of the timm encoder only
      checkpoint.pt       model (incl. decoder/heads), optimiser, step, epoch, config, RNG states
      metrics.jsonl       one JSON object per logged step

Every file is written atomically (a temporary file in the same directory, then ``os.replace``), so
a run killed mid-write leaves the previous complete file, never a torn one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.backbone import SPEC_FILENAME, BackboneError, EncoderSpec, build_from_spec

CONFIG_FILENAME = "config.json"
ENCODER_FILENAME = "encoder.pt"
CHECKPOINT_FILENAME = "checkpoint.pt"
METRICS_FILENAME = "metrics.jsonl"


class RunDirError(ValueError):
    """A run directory is missing a file or holds one that cannot be read."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` that never leaves a half-written file at ``path``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def write_json(path: str | Path, obj: Any) -> Path:
    """Write pretty JSON atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_encoder(run_dir: str | Path, encoder: nn.Module, spec: EncoderSpec) -> None:
    """Write ``encoder_spec.json`` and ``encoder.pt`` (the timm encoder's state_dict only)."""
    run_dir = Path(run_dir)
    write_json(run_dir / SPEC_FILENAME, spec.to_dict())
    state = {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}
    atomic_torch_save(state, run_dir / ENCODER_FILENAME)


def load_encoder(run_dir: str | Path) -> tuple[nn.Module, EncoderSpec]:
    """Rebuild the trained encoder of a run directory: ``(model.eval(), spec)``.

    Raises :class:`RunDirError` naming the missing or unreadable file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist (train one with `vitserve train`)")
    missing = [n for n in (SPEC_FILENAME, ENCODER_FILENAME) if not (run_dir / n).is_file()]
    if missing:
        raise RunDirError(
            f"run directory {run_dir} is incomplete: missing {', '.join(missing)} "
            "(was the training run interrupted before it saved?)")
    try:
        spec = EncoderSpec.load(run_dir / SPEC_FILENAME)
    except (BackboneError, TypeError, KeyError) as e:
        raise RunDirError(f"{run_dir / SPEC_FILENAME} is corrupt: {e}") from e
    try:
        model = build_from_spec(spec)
    except BackboneError as e:
        raise RunDirError(f"cannot rebuild the encoder described by {run_dir / SPEC_FILENAME}: {e}") from e
    try:
        state = torch.load(run_dir / ENCODER_FILENAME, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types (pickle, zip, runtime) for a torn file
        raise RunDirError(f"{run_dir / ENCODER_FILENAME} cannot be read: {e}") from e
    if not isinstance(state, dict):
        raise RunDirError(f"{run_dir / ENCODER_FILENAME} holds a {type(state).__name__}, not a state_dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise RunDirError(f"{run_dir / ENCODER_FILENAME} does not match {SPEC_FILENAME}: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise RunDirError(
            f"{run_dir / ENCODER_FILENAME} does not match {SPEC_FILENAME}: "
            f"missing keys {result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RunDirError(f"{run_dir / ENCODER_FILENAME} has non-finite values in {bad[:5]}")
    return model.eval(), spec
