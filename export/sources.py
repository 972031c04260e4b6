"""Where an exported encoder comes from: a training run directory, or a timm name plus a local checkpoint
or a pretrained tag; each is loaded into an ``EncoderSource`` (the model, its spec, and what the
manifest records about the weights).

``load_run_encoder`` reads a run directory through ``training.run_dir.load_encoder`` (the one run-dir
reader, docs/CONTRACTS.md), with the weights file's hash, the run's probe scores and its
preprocessing. ``load_timm_encoder`` covers the weights users already have. The model is built by
``training.backbone.create_encoder`` (headless timm ViT, with overrides such as ``img_size``) and the
checkpoint goes through timm's own readers:
``timm.models.load_checkpoint`` (safetensors or torch files, ``state_dict``/``model``/EMA keys,
DDP prefixes) with the family's ``checkpoint_filter_fn`` (original DINOv2/CLIP/DeiT layouts, position
embeddings resampled to the built size). Classifier heads the headless model does not have are
dropped and reported; every other missing or unexpected key is an error that names the keys.

Also here: ``read_probes``, the run directory's ``probes.json`` copied into the manifest (with a
warning when its scores come from a subset of the data, or when it does not say).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from export.errors import ExportUsageError
from export.layout import sha256_file
from export.preprocessing import run_preprocessing, timm_preprocessing
from training.backbone import BackboneError, EncoderSpec, create_encoder

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
PROBES_FILENAME = "probes.json"  # written by ``vitserve probe --write-run``
WEIGHTS_FILENAME = "encoder.pt"  # training.run_dir.ENCODER_FILENAME
_SHOW_KEYS = 8


@dataclass
class EncoderSource:
    """An encoder to export: the model, its spec, and what the manifest records about its weights."""

    model: nn.Module
    spec: EncoderSpec
    source: str | None = None  # manifest ``source``; None: "in-memory <model name>"
    weights_sha256: str | None = None  # of the weights file; None: a hash of the state dict
    weights: dict[str, Any] = field(default_factory=dict)  # manifest ``weights`` entry (timm sources)
    probes: dict[str, Any] = field(default_factory=dict)  # manifest ``probes`` (a run's probes.json)
    preprocessing: dict[str, Any] | None = None  # manifest ``preprocessing``; None: plain resize, saying so


def state_dict_sha256(model: nn.Module) -> str:
    """Hex SHA-256 over a model's state dict (names, dtypes, shapes, raw bytes), for in-memory weights."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_run_encoder(run_dir: str | Path) -> EncoderSource:
    """The eval-mode encoder of a run directory (``training.run_dir.load_encoder``) with its weights file's
    hash, its ``probes.json`` verbatim (``read_probes``) and its preprocessing (``run_preprocessing``)."""
    from training.run_dir import load_encoder  # the one run-dir reader (docs/CONTRACTS.md)

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportUsageError(f"run directory {run_dir} does not exist; pass the directory that "
                               "`vitserve train` wrote (it holds encoder_spec.json and encoder.pt)")
    try:
        model, spec = load_encoder(run_dir)
    except (BackboneError, OSError, ValueError) as e:  # RunDirError is a ValueError
        raise ExportUsageError(f"cannot export run directory {run_dir}: {e}") from e
    weights = run_dir / WEIGHTS_FILENAME
    return EncoderSource(model.eval(), spec, str(run_dir.resolve()),
                         sha256_file(weights) if weights.is_file() else None,
                         probes=read_probes(run_dir), preprocessing=run_preprocessing(run_dir, spec))


def _family_filter(model: nn.Module) -> Callable[[dict, nn.Module], dict] | None:
    """The ``checkpoint_filter_fn`` of the timm module that defines ``model``'s class, if any."""
    module = importlib.import_module(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _head_keys(model: nn.Module, keys: list[str]) -> list[str]:
    """Checkpoint keys of classifier heads that the headless model has replaced by ``Identity``."""
    heads = [name for name in ("head", "head_dist") if isinstance(getattr(model, name, None), nn.Identity)]
    return [k for k in keys if any(k.startswith(h + ".") for h in heads)]


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW_KEYS])
    return f"{shown}{f' ... (+{len(keys) - _SHOW_KEYS} more)' if len(keys) > _SHOW_KEYS else ''}"


def load_checkpoint_into(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load ``path`` into ``model`` strictly (heads aside) with timm's ``load_checkpoint``.

    Returns ``{"file", "dropped_keys"}``; raises ``ExportUsageError`` naming missing/unexpected keys
    or shape mismatches, and for unreadable files.
    """
    from timm.models import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise ExportUsageError(f"checkpoint {path} does not exist")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ExportUsageError(f"checkpoint {path}: unsupported file type {path.suffix!r}; "
                               f"use one of {', '.join(CHECKPOINT_SUFFIXES)}")
    family = _family_filter(model)
    dropped: list[str] = []

    def filter_fn(state_dict: dict, model: nn.Module) -> dict:
        state_dict = family(state_dict, model) if family is not None else state_dict
        dropped.extend(_head_keys(model, list(state_dict)))
        return {k: v for k, v in state_dict.items() if k not in dropped}

    try:
        incompatible = load_checkpoint(model, str(path), strict=False, filter_fn=filter_fn)
    except RuntimeError as e:  # shape mismatches: the checkpoint is for another architecture/size
        detail = " ".join(str(e).split())  # torch lists mismatches on tab-indented lines
        raise ExportUsageError(f"checkpoint {path} does not fit {type(model).__name__} (wrong --timm name or "
                               f"overrides?): {detail}") from e
    except Exception as e:  # unreadable/corrupt file: safetensors, pickle and zip raise many types
        raise ExportUsageError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    missing, unexpected = list(incompatible.missing_keys), list(incompatible.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
        raise ExportUsageError(f"checkpoint {path} does not match the model built for it: "
                               + "; ".join(parts)
                               + " (wrong --timm name or overrides such as img_size/embed_dim/depth?)")
    if dropped:
        log.info("dropped classifier-head keys the headless encoder does not use: %s", dropped)
    return {"file": str(path.resolve()), "dropped_keys": sorted(dropped)}


def load_timm_encoder(name: str, overrides: dict[str, Any] | None = None,
                      checkpoint: str | Path | None = None, pretrained: bool = False) -> EncoderSource:
    """Build timm ``name`` (headless, ``overrides``) and load ``checkpoint`` or timm's pretrained weights.

    Without either the weights stay random (``source`` says so). ``pretrained`` needs the weights to
    be reachable (Hugging Face hub or its local cache); otherwise ``ExportUsageError`` says so. The
    preprocessing is the model's timm pretrained data config (``timm_preprocessing``).
    """
    import timm

    overrides = dict(overrides or {})
    if checkpoint is not None and pretrained:
        raise ExportUsageError("pass either --checkpoint FILE or --pretrained, not both")
    try:
        model, spec = create_encoder(name, overrides)
    except BackboneError as e:
        raise ExportUsageError(str(e)) from e
    if checkpoint is not None:
        weights = load_checkpoint_into(model, checkpoint)
        return EncoderSource(model.eval(), spec, f"timm:{name} checkpoint {Path(checkpoint).resolve()}",
                             sha256_file(checkpoint), {"kind": "checkpoint", **weights},
                             preprocessing=timm_preprocessing(model, spec))
    if pretrained:
        tag = timm.models.get_pretrained_cfg(name)
        if tag is None or not (tag.hf_hub_id or tag.url or tag.file):
            raise ExportUsageError(f"timm has no pretrained weights for {name!r}")
        try:
            pre = timm.create_model(name, pretrained=True, num_classes=0, **overrides)
        except Exception as e:  # network, hub and cache errors come in many types
            where = tag.hf_hub_id or tag.url or tag.file
            raise ExportUsageError(
                f"pretrained weights for {name!r} are not reachable ({where}): {type(e).__name__}: {e}. "
                "Without network access, download the file elsewhere and pass --checkpoint FILE") from e
        model.load_state_dict(pre.state_dict(), strict=True)  # same architecture, so every key fits
        return EncoderSource(model.eval(), spec, f"timm:{name} pretrained {tag.hf_hub_id or tag.url}",
                             None, {"kind": "pretrained", "tag": name, "hub": tag.hf_hub_id or tag.url or tag.file},
                             preprocessing=timm_preprocessing(model, spec))
    log.warning("exporting %s with RANDOM weights (no --checkpoint or --pretrained)", name)
    return EncoderSource(model.eval(), spec, f"timm:{name} random init", None, {"kind": "random"},
                         preprocessing=timm_preprocessing(model, spec))


def read_probes(run_dir: str | Path) -> dict[str, Any]:
    """``RUN_DIR/probes.json`` (written by ``vitserve probe --write-run``) verbatim, or ``{}`` if absent.

    Raises ``ExportUsageError`` when the file exists but is not a JSON object with a ``scores`` dict:
    a manifest must not carry probe scores nobody can read.
    """
    path = Path(run_dir) / PROBES_FILENAME
    if not path.is_file():
        return {}
    try:
        probes = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportUsageError(f"{path} is not readable JSON: {e}; fix or remove it") from e
    if not isinstance(probes, dict) or not isinstance(probes.get("scores"), dict):
        raise ExportUsageError(f"{path} must be a JSON object with a 'scores' object "
                               "(as `vitserve probe --write-run` writes); fix or remove it")
    if probes.get("full_split") not in (True, False, None):
        raise ExportUsageError(f"{path}: full_split must be true, false or absent, got {probes['full_split']!r}; "
                               "fix or remove it")
    warning = probes_split_warning(probes, path)
    if warning:
        log.warning("%s", warning)
    return probes


def probes_split_warning(probes: dict[str, Any], path: str | Path = PROBES_FILENAME) -> str | None:
    """A warning when the probe scores do not come from the full Fashion-MNIST splits, or when the
    record does not say (``probes.json`` written before ``full_split`` existed: unknown); else None."""
    if not probes.get("scores"):
        return None
    protocol = probes.get("protocol") if isinstance(probes.get("protocol"), dict) else {}
    n_train = probes.get("n_train", protocol.get("n_train"))
    n_test = probes.get("n_test", protocol.get("n_test"))
    full = probes.get("full_split", protocol.get("full_split"))
    if full is True:
        return None
    if full is False:
        return (f"probe scores in {path} come from a subset of Fashion-MNIST ({n_train} train / {n_test} test "
                "images), not the full splits; the manifest records them with full_split: false")
    return (f"{path} does not say whether its probe scores come from the full Fashion-MNIST splits (written "
            f"before full_split was recorded; its protocol says {n_train} train / {n_test} test images); the "
            "manifest records them as they are (full_split unknown)")
