"""The manifest's ``preprocessing`` entry: how the gateway should bring an image of another size to the
model's input (``contract.preprocess.PreprocessSpec.from_manifest`` reads it).

Schema (docs/CONTRACTS.md): ``resize_op`` (``resize`` | ``center_crop`` | ``letterbox``), ``crop_pct``
(in (0, 1]), ``interpolation`` (``bilinear`` | ``bicubic`` | ``nearest`` | ``lanczos``), plus what the
gateway does not read: ``exact`` (whether the gateway's op reproduces the source transform), ``source``
(a sentence) and, for timm models, ``timm`` (the pretrained data config it came from).

- timm models: ``timm.data.resolve_model_data_config`` — the evaluation transform of the checkpoint's
  pretrained config (``transforms_imagenet_eval``). ``crop_mode`` ``center`` is the gateway's
  ``center_crop`` (shorter side to ``size / crop_pct``, centre crop); ``squash`` with ``crop_pct`` 1
  is ``resize``; ``border`` with ``crop_pct`` 1 is ``letterbox`` (longer side fits, padded with the
  mean colour). ``squash``/``border`` with ``crop_pct`` < 1 also trim a border the gateway does not
  trim: written as ``resize``/``letterbox`` with ``exact: false`` and a warning.
- our runs: trained on their own image size without any crop (Fashion-MNIST is 28x28; image folders
  are stretched to the size with bilinear resampling by ``training.data.load_image_folder``), so a
  plain bilinear ``resize``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from contract.preprocess import INTERPOLATIONS, PreprocessSpec, PreprocessSpecError
from training.backbone import EncoderSpec

log = logging.getLogger(__name__)

RUN_CONFIG_FILENAME = "config.json"  # training.run_dir.CONFIG_FILENAME


def plain_resize(source: str) -> dict[str, Any]:
    """Stretch to the input size with bilinear resampling, no crop."""
    return {"resize_op": "resize", "crop_pct": 1.0, "interpolation": "bilinear", "exact": True,
            "source": source}


def timm_preprocessing(model: nn.Module, spec: EncoderSpec) -> dict[str, Any]:
    """The ``preprocessing`` entry from ``model``'s timm pretrained data config."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    crop_mode = str(cfg.get("crop_mode") or "center")
    interpolation = str(cfg.get("interpolation") or "bilinear").lower()
    exact = True
    notes: list[str] = []
    if interpolation not in INTERPOLATIONS:
        notes.append(f"timm interpolation {interpolation!r} has no gateway equivalent; bilinear used")
        interpolation, exact = "bilinear", False
    if crop_mode == "squash":
        op = "resize"
        if crop_pct < 1.0:
            exact = False
            notes.append(f"timm squash also trims {(1 - crop_pct) / 2:.3f} of each edge after stretching; "
                         "the gateway's resize does not")
        crop_pct = 1.0  # the gateway's resize takes no crop
    elif crop_mode == "border":
        op = "letterbox"
        if crop_pct < 1.0:
            exact = False
            notes.append(f"timm border mode scales the longer side to size/{crop_pct:g} then crops; the "
                         "gateway's letterbox fits the longer side")
        crop_pct = 1.0
    else:
        if crop_mode != "center":
            notes.append(f"unknown timm crop_mode {crop_mode!r} taken as center")
            exact = False
        op = "center_crop"
    if not 0.0 < crop_pct <= 1.0:  # the gateway refuses it; so do we, before anything is written
        from export.onnx_export import ExportUsageError

        raise ExportUsageError(f"timm data config of {spec.model_name} has crop_pct {crop_pct}, not in (0, 1]")
    mean = [float(m) for m in cfg.get("mean", ())]
    std = [float(s) for s in cfg.get("std", ())]
    if len(mean) == spec.in_chans and any(abs(a - b) > 1e-6 for a, b in zip(mean, spec.mean)):
        notes.append(f"timm mean {mean} differs from the graph's normalisation {list(spec.mean)}")
    for note in notes:
        log.warning("preprocessing of %s: %s", spec.model_name, note)
    entry: dict[str, Any] = {
        "resize_op": op, "crop_pct": crop_pct, "interpolation": interpolation, "exact": exact,
        "source": f"timm pretrained data config of {spec.model_name} (timm.data.resolve_model_data_config): "
                  f"crop_mode {crop_mode}, crop_pct {float(cfg.get('crop_pct') or 1.0):g}, "
                  f"{cfg.get('interpolation')} interpolation; mean/std are applied inside the graph",
        "timm": {"crop_mode": crop_mode, "crop_pct": float(cfg.get("crop_pct") or 1.0),
                 "interpolation": cfg.get("interpolation"), "mean": mean, "std": std},
    }
    if notes:
        entry["notes"] = notes
    return entry


def run_preprocessing(run_dir: str | Path, spec: EncoderSpec) -> dict[str, Any]:
    """The ``preprocessing`` entry of a training run: plain bilinear resize (trained without crops)."""
    h, w = spec.img_size
    path = Path(run_dir) / RUN_CONFIG_FILENAME
    data = None
    if path.is_file():
        try:
            data = json.loads(path.read_text()).get("data")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            log.warning("cannot read %s (%s); preprocessing assumes plain resize", path, e)
    if data in (None, "fashion-mnist"):
        what = "Fashion-MNIST at its own 28x28" if (h, w) == (28, 28) else f"images at {h}x{w}"
    else:
        what = f"the image folder {data}, stretched to {h}x{w} with bilinear resampling"
    return plain_resize(f"run config{'' if data else ' (absent)'}: trained on {what} without crop, "
                        "so other sizes are stretched (bilinear)")


def check_preprocessing(entry: dict[str, Any], spec: EncoderSpec) -> None:
    """Refuse a ``preprocessing`` entry the gateway's parser (``contract.preprocess``) would reject."""
    from export.onnx_export import ExportUsageError

    try:
        PreprocessSpec.from_manifest({"encoder_spec": spec.to_dict(), "preprocessing": entry}, spec.in_chans)
    except PreprocessSpecError as e:
        raise ExportUsageError(f"preprocessing entry {entry!r} would be refused by the gateway: {e}") from e


def default_preprocessing(spec: EncoderSpec) -> dict[str, Any]:
    """For an in-memory model nobody described: plain bilinear resize, saying so."""
    return plain_resize(f"default: no data config given for in-memory {spec.model_name}; plain resize")
