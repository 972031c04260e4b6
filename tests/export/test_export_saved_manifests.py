"""Today's exporter writes the manifests main wrote before ``export/`` was restructured.

``tests/contract/data/manifest_*.json`` were saved from commit 79b605a's exporter. The same small
encoder (seed 0) is exported again the same ways - plain with probe scores, lanes, two resolution
buckets, a second version, an int8 variant - and every field is compared, key order included.
What legitimately differs is left out: timestamps, library versions, file hashes (the graph's bytes
follow the torch version, and model.py's its text) and the last digits of measured errors.

The weights' hash is compared with this machine's own encoder, not with the saved string: the seeded
random init is not bit-identical from one CPU to the next (the same torch 2.14.1 and timm 1.0.31 gave
another state dict on an Intel Xeon with AMX than on the AMD EPYC where the manifests were saved), so
the saved hash stands for "the hash of the encoder that was exported", which is what is checked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from export.options import ExportOptions
from export.repository import export_entries
from export.sources import EncoderSource, state_dict_sha256
from export.variants import export_variants
from tests.export.conftest import read_manifest

SAVED = Path(__file__).parents[1] / "contract" / "data"
# dotted paths whose values legitimately differ between two exports of the same model
VOLATILE = re.compile(r"(exporter\.exported_at|exporter\.versions\..+|files\..+|variant\.base_files\..+"
                      r"|versions\.\d+\.(exported_at|exporter\.versions\..+|files\..+)"
                      r"|variant\.figures\.knn\.confidence\.statement)")


def flat(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, leaf) of every leaf of a JSON value, each object's key list (``path{}``) and each
    list's length (``path[]``)."""
    if isinstance(value, dict):
        yield path.rstrip(".") + "{}", list(value)  # the key order is part of the contract
        for k, v in value.items():
            yield from flat(v, f"{path}{k}.")
    elif isinstance(value, list):
        yield path.rstrip(".") + "[]", len(value)
        for i, v in enumerate(value):
            yield from flat(v, f"{path}{i}.")
    else:
        yield path.rstrip("."), value


def volatile(path: str) -> bool:
    return VOLATILE.fullmatch(path) is not None


def assert_same(saved: dict, written: dict) -> None:
    a = {k: v for k, v in flat(saved) if not volatile(k)}
    b = {k: v for k, v in flat(written) if not volatile(k)}
    assert list(a) == list(b)
    for key, value in a.items():
        if isinstance(value, float):
            assert b[key] == pytest.approx(value, rel=0.05, abs=1e-5), key
        else:
            assert b[key] == value, key


def with_weights_hash(value: Any, saved_hash: str, local_hash: str) -> Any:
    """``value`` with every string equal to ``saved_hash`` replaced by ``local_hash``."""
    if isinstance(value, dict):
        return {k: with_weights_hash(v, saved_hash, local_hash) for k, v in value.items()}
    if isinstance(value, list):
        return [with_weights_hash(v, saved_hash, local_hash) for v in value]
    return local_hash if value == saved_hash else value


@pytest.fixture(scope="module")
def local_weights_hash(make_encoder) -> str:
    """The hash of the seed-0 encoder as this machine initialises it (what every entry exported)."""
    model, _ = make_encoder(0)
    return state_dict_sha256(model)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, make_encoder, fmnist_images) -> Path:
    """The saved manifests' exports, again: ``plain`` (+ ``plain_int8``), ``lanes``, ``buck``, ``v``."""
    repo = tmp_path_factory.mktemp("saved_manifests") / "repo"
    model, spec = make_encoder(0)
    encoder = EncoderSource(model.eval(), spec)
    parity = ExportOptions(parity_images=fmnist_images[:8])
    (plain,) = export_entries(EncoderSource(model, spec, probes={"scores": {"knn_top1": 0.7}}), repo, "plain",
                              parity)
    export_variants(model, spec, plain, ["int8-dynamic"])
    export_entries(encoder, repo, "lanes", ExportOptions(lanes=True, parity_images=fmnist_images[:8]))
    export_entries(encoder, repo, "buck", ExportOptions(resolutions=[(28, 28), (32, 32)],
                                                        parity_images=fmnist_images[:8]))
    export_entries(encoder, repo, "v", parity)
    export_entries(encoder, repo, "v", ExportOptions(version=2, add_version=True, parity_images=fmnist_images[:8]))
    return repo


@pytest.mark.parametrize("entry", ["plain", "plain_int8", "lanes", "lanes_latency", "buck_r32", "v"])
def test_manifest_equals_the_saved_one(repo, local_weights_hash, entry):
    saved = json.loads((SAVED / f"manifest_{entry}.json").read_text())
    saved = with_weights_hash(saved, saved["weights_sha256"], local_weights_hash)
    assert_same(saved, read_manifest(repo / entry))


def test_only_volatile_paths_are_left_out():
    saved = json.loads((SAVED / "manifest_v.json").read_text())
    left_out = {k for k, _ in flat(saved) if volatile(k)}
    kept = {k for k, _ in flat(saved)} - left_out
    assert {"exporter.exported_at", "exporter.versions.torch", "files.2/model.py", "versions.1.exported_at",
            "versions.2.files.2/model.onnx", "versions.2.exporter.versions.onnx"} <= left_out
    assert {"exporter.opset", "files{}", "weights_sha256", "versions.1.weights_sha256", "parity.max_abs_err.cls",
            "versions.2.parity.max_abs_err.cls", "versions.2.files{}", "version", "name"} <= kept
    with pytest.raises(AssertionError):
        assert_same(saved, {**saved, "source": "elsewhere"})
    with pytest.raises(AssertionError):
        assert_same(saved, {"name": saved["name"], **saved})  # same fields, another key order
