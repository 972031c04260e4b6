"""The preprocessing spec parser that the exporter checks against and the gateway applies."""

from __future__ import annotations

import pytest

from contract.manifest import Manifest
from contract.preprocess import PreprocessSpec, PreprocessSpecError, ResizeOp


def test_from_manifest_dict_or_dataclass():
    d = {"encoder_spec": {"mean": [0.5, 0.25, 0.0]},
         "preprocessing": {"resize_op": "center_crop", "crop_pct": 0.875, "interpolation": "BICUBIC"}}
    for m in (d, Manifest.from_dict(d)):
        spec = PreprocessSpec.from_manifest(m, 3)
        assert spec == PreprocessSpec(ResizeOp.CENTER_CROP, 0.875, "bicubic", (128, 64, 0))
        assert spec.resize_op_name == "center_crop"
    assert PreprocessSpec.from_manifest({}, 1) == PreprocessSpec()


@pytest.mark.parametrize("entry, message", [
    ("resize", "must be an object"), ({"resize_op": "warp"}, "resize_op 'warp'"),
    ({"crop_pct": 1.5}, r"not in \(0, 1\]"), ({"interpolation": "area"}, "interpolation 'area'")])
def test_bad_entries_name_the_key(entry, message):
    with pytest.raises(PreprocessSpecError, match=message):
        PreprocessSpec.from_manifest({"preprocessing": entry}, 1)
