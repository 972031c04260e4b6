"""The manifest contract: every manifest main wrote before the dataclass (tests/contract/data, saved
from commit 79b605a's exporter) loads, round-trips byte for byte, and answers the readers' questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.manifest import FORMAT_VERSION, Bucket, Manifest, ManifestError
from contract.names import MANIFEST_FILENAME

DATA = Path(__file__).parent / "data"
SAVED = sorted(DATA.glob("manifest_*.json"))


def test_saved_manifests_exist():
    assert {p.stem for p in SAVED} >= {"manifest_plain", "manifest_lanes", "manifest_v", "manifest_plain_int8",
                                        "manifest_buck_r32"}


@pytest.mark.parametrize("path", SAVED, ids=lambda p: p.stem)
def test_saved_manifest_round_trips(path):
    text = path.read_text()
    m = Manifest.from_json(text)
    assert m.format_version == FORMAT_VERSION
    assert m.extra == {}  # every key main writes is a typed field
    assert m.to_dict() == json.loads(text)
    assert m.to_json() == text  # same key order and layout as the exporter wrote
    assert json.loads(m.to_json(indent=None)) == json.loads(text)


def test_read_from_a_model_directory(tmp_path):
    (tmp_path / MANIFEST_FILENAME).write_text((DATA / "manifest_plain.json").read_text())
    m = Manifest.read(tmp_path)
    assert m.name == "plain" and m.version == 1
    assert m.spec["grid_size"] == [7, 7]
    assert m.output("patch_tokens")["tokens"] == [1, 50]
    assert m.output("nope") == {}
    assert m.token_outputs() == ["patch_tokens"]
    assert m.probe_scores() == {"knn_top1": 0.7}
    assert m.precision == "fp32" and m.base_model == ""
    assert m.lane_map() == {} and m.lane_name() == ""
    assert m.own_bucket("plain") is None


def test_lanes_buckets_variant_versions():
    lanes = Manifest.from_json((DATA / "manifest_lanes_latency.json").read_text())
    assert lanes.lane_map() == {"throughput": "lanes", "latency": "lanes_latency"}
    assert lanes.lane_name() == "latency"
    buck = Manifest.from_json((DATA / "manifest_buck_r32.json").read_text())
    assert buck.bucket_list() == [Bucket((28, 28), (7, 7), "buck"), Bucket((32, 32), (8, 8), "buck_r32")]
    assert buck.own_bucket("buck_r32") == Bucket((32, 32), (8, 8), "buck_r32")
    int8 = Manifest.from_json((DATA / "manifest_plain_int8.json").read_text())
    assert int8.precision == "int8" and int8.base_model == "plain"
    v = Manifest.from_json((DATA / "manifest_v.json").read_text())
    h1, _ = v.version_record("1")
    h2, probes2 = v.version_record("2")
    assert h1 and h1 == h2 == v.weights_sha256 and probes2 == {}
    assert v.version_record("3") == ("", {})
    plain = Manifest.from_json((DATA / "manifest_plain.json").read_text())
    assert plain.version_record("1") == (plain.weights_sha256, None)
    assert plain.version_record("2") == ("", None)


def test_unknown_keys_survive_and_empty_manifest_is_falsy():
    m = Manifest.from_dict({"format_version": 1, "name": "x", "from_the_future": {"a": 1}})
    assert m.extra == {"from_the_future": {"a": 1}}
    assert m.replace(name="y").to_dict() == {"format_version": 1, "name": "y", "from_the_future": {"a": 1}}
    assert not Manifest.from_dict({}) and m


@pytest.mark.parametrize("bad, message", [
    ([], "JSON object"),
    ({"name": 3}, "'name' must be str"),
    ({"format_version": True}, "'format_version' must be int"),
    ({"lanes": ["throughput"]}, "'lanes' must be dict"),
    ({"format_version": FORMAT_VERSION + 1}, "newer than this vitserve reads"),
])
def test_malformed_manifests_are_refused_with_the_key(bad, message):
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(bad)
    with pytest.raises(ManifestError, match="not JSON"):
        Manifest.from_json("{not json")
