"""The preprocessing spec: how a model wants images of another size brought to its input.

The exporter writes it as the manifest's ``preprocessing`` entry and refuses one this parser would
refuse; the gateway (``serving.preprocess``) and the dataset embedder apply it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from protos import vitserve_pb2

ResizeOp = vitserve_pb2.ResizeOp
OP_NAMES = {ResizeOp.RESIZE: "resize", ResizeOp.CENTER_CROP: "center_crop", ResizeOp.LETTERBOX: "letterbox"}
OPS_BY_NAME = {v: k for k, v in OP_NAMES.items()}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")


class PreprocessSpecError(ValueError):
    """A model's manifest ``preprocessing`` entry is malformed."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants images of another size treated (from its manifest's ``preprocessing``)."""

    resize_op: int = ResizeOp.RESIZE
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    pad_value: tuple[int, ...] = (0,)

    @classmethod
    def from_manifest(cls, manifest: Any, channels: int) -> "PreprocessSpec":
        """The spec of a manifest (a ``contract.manifest.Manifest`` or its dict) for ``channels`` inputs.

        The letterbox pad is the model's mean colour, which the in-graph normalisation maps to zero.
        """
        if hasattr(manifest, "to_dict"):
            manifest = manifest.to_dict()
        spec = manifest.get("encoder_spec", {}) or {}
        mean = spec.get("mean") or [0.0] * channels
        pad = tuple(int(round(255 * float(m))) for m in list(mean)[:channels])
        if len(pad) != channels:
            pad = (pad[0] if pad else 0,) * channels
        return cls.from_entry(manifest.get("preprocessing") or {}, pad)

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], pad_value: tuple[int, ...] = (0,)) -> "PreprocessSpec":
        """The spec of one ``preprocessing`` dict (``resize_op``, ``crop_pct``, ``interpolation``)."""
        if not isinstance(entry, Mapping):
            raise PreprocessSpecError(f"manifest 'preprocessing' must be an object, got {entry!r}")
        op_name = str(entry.get("resize_op", "resize"))
        if op_name not in OPS_BY_NAME:
            raise PreprocessSpecError(f"manifest preprocessing.resize_op {op_name!r} is not one of "
                                      f"{', '.join(OPS_BY_NAME)}")
        crop_pct = float(entry.get("crop_pct", 1.0))
        if not 0.0 < crop_pct <= 1.0:
            raise PreprocessSpecError(f"manifest preprocessing.crop_pct {crop_pct} is not in (0, 1]")
        interpolation = str(entry.get("interpolation", "bilinear")).lower()
        if interpolation not in INTERPOLATIONS:
            raise PreprocessSpecError(f"manifest preprocessing.interpolation {interpolation!r} is not one "
                                      f"of {', '.join(INTERPOLATIONS)}")
        return cls(OPS_BY_NAME[op_name], crop_pct, interpolation, tuple(pad_value))

    @property
    def resize_op_name(self) -> str:
        return OP_NAMES[self.resize_op]
