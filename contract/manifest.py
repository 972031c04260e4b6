"""The model manifest: one frozen, versioned record of what an exported model entry is.

The exporter writes it (``manifest.json`` beside ``config.pbtxt``, and compact in the config's
``vitserve_manifest`` parameter); the gateway, the dataset embedder and the tools read it with
``Manifest.from_dict`` where they read it, and use its typed fields from then on. Keys are those of
docs/CONTRACTS.md; a key this module does not know is kept in ``extra`` and written back unchanged, so
a manifest from a newer exporter survives a read-modify-write here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from contract.names import LANES, MANIFEST_FILENAME, is_token_output

FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A manifest that is not JSON, not an object, or has a known key of the wrong type."""


@dataclass(frozen=True)
class Bucket:
    """One resolution bucket: input ``size`` (H, W), patch ``grid`` (h, w) and the entry serving it."""

    size: tuple[int, int]
    grid: tuple[int, int]
    model: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], model: str = "") -> "Bucket":
        (h, w), (gh, gw) = d["size"], d["grid"]
        return cls((int(h), int(w)), (int(gh), int(gw)), str(d.get("model", model)))


# (key, type the JSON value must have); None: the key is absent. The order is the writer's.
_KEYS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("format_version", int), ("name", str), ("version", (int, str)), ("encoder_spec", dict),
    ("architecture", dict), ("inputs", dict), ("outputs", dict), ("weights_sha256", str), ("files", dict),
    ("parity", dict), ("exporter", dict), ("probes", dict), ("source", str), ("preprocessing", dict),
    ("weights", dict), ("buckets", list), ("bucket", dict), ("lanes", dict), ("lane", str),
    ("variant", dict), ("tensorrt", dict), ("versions", dict),
)


@dataclass(frozen=True)
class Manifest:
    """A model entry's manifest (docs/CONTRACTS.md). ``None``: the key is absent from the file."""

    format_version: int | None = None
    name: str | None = None
    version: int | str | None = None
    encoder_spec: dict[str, Any] | None = None
    architecture: dict[str, Any] | None = None
    inputs: dict[str, Any] | None = None
    outputs: dict[str, Any] | None = None
    weights_sha256: str | None = None
    files: dict[str, str] | None = None
    parity: dict[str, Any] | None = None
    exporter: dict[str, Any] | None = None
    probes: dict[str, Any] | None = None
    source: str | None = None
    preprocessing: dict[str, Any] | None = None
    weights: dict[str, Any] | None = None
    buckets: list[dict[str, Any]] | None = None
    bucket: dict[str, Any] | None = None
    lanes: dict[str, str] | None = None
    lane: str | None = None
    variant: dict[str, Any] | None = None
    tensorrt: dict[str, Any] | None = None
    versions: dict[str, dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- reading and writing ----------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        """Parse a manifest dict; known keys are type-checked, unknown ones kept in ``extra``."""
        if not isinstance(d, Mapping):
            raise ManifestError(f"a manifest is a JSON object, got {type(d).__name__}")
        known: dict[str, Any] = {}
        for key, kind in _KEYS:
            if key not in d:
                continue
            value = d[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                raise ManifestError(f"manifest key {key!r} must be {names}, got {value!r:.80}")
            known[key] = value
        if known.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ManifestError(f"manifest format_version {known['format_version']} is newer than this "
                                f"vitserve reads ({FORMAT_VERSION}); upgrade vitserve")
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest is not JSON: {e}") from e

    @classmethod
    def read(cls, model_dir: str | Path) -> "Manifest":
        """The manifest of the entry at ``model_dir`` (``<model_dir>/manifest.json``)."""
        return cls.from_json((Path(model_dir) / MANIFEST_FILENAME).read_text())

    def to_dict(self) -> dict[str, Any]:
        """The manifest as the JSON object written to disk (absent keys omitted, ``extra`` last)."""
        out = {k: getattr(self, k) for k, _ in _KEYS if getattr(self, k) is not None}
        out.update(self.extra)
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """``manifest.json`` text (``indent=None``: the compact form the config parameter carries)."""
        if indent is None:
            return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)
        return json.dumps(self.to_dict(), indent=indent) + "\n"

    def replace(self, **changes: Any) -> "Manifest":
        """A copy with ``changes`` (``None`` removes a key)."""
        return replace(self, **changes)

    def __bool__(self) -> bool:  # an empty manifest (a config without the parameter) is falsy
        return any(getattr(self, f.name) for f in fields(self))

    # -- derived views the readers share ----------------------------------------------------

    @property
    def spec(self) -> dict[str, Any]:
        """The encoder spec (``{}`` when absent)."""
        return dict(self.encoder_spec or {})

    def output(self, name: str) -> dict[str, Any]:
        """The description of output ``name`` (``{}`` if it has none)."""
        entry = (self.outputs or {}).get(name) or {}
        return entry if isinstance(entry, dict) else {}

    def token_outputs(self) -> list[str]:
        """The described outputs shaped like ``patch_tokens`` (the layers Features can return)."""
        return [o for o in (self.outputs or {}) if is_token_output(o)]

    def lane_map(self) -> dict[str, str]:
        """Lane -> model name, as the manifest declares (``{}``: none; unknown lanes dropped)."""
        return {str(k): str(v) for k, v in (self.lanes or {}).items() if k in LANES and isinstance(v, str) and v}

    def lane_name(self) -> str:
        """This entry's lane when the manifest declares lanes, else ``""``."""
        return self.lane if self.lane in LANES and self.lane_map() else ""

    def bucket_list(self) -> list[Bucket]:
        """The resolution buckets of the export (``[]`` without ``--resolutions``); malformed ones raise."""
        return [Bucket.from_dict(b) for b in self.buckets or []]

    def own_bucket(self, model: str) -> Bucket | None:
        """This entry's own bucket, when it is one of several resolutions."""
        if not self.buckets or not isinstance(self.bucket, dict):
            return None
        return Bucket.from_dict(self.bucket, model)

    @property
    def precision(self) -> str:
        return str((self.variant or {}).get("precision", "fp32"))

    @property
    def base_model(self) -> str:
        return str((self.variant or {}).get("base_model", ""))

    def version_record(self, version: str) -> tuple[str, dict[str, Any] | None]:
        """(weights hash, probes) of ``version``: its record in the ``versions`` map.

        The manifest travels in the config, shared by all version directories. With a ``versions``
        map (``vitserve export --add-version``) each recorded version has its own hash and probes; a
        version directory the map does not record gets ``""``. A map that is present, even empty (as
        while ``--force`` replaces the only version), is authoritative. Without a map the manifest
        describes only the version its export wrote; probes ``None`` means "the top-level ones".
        """
        if self.versions is not None:
            record = self.versions.get(version)
            if not isinstance(record, dict):
                return "", {}
            probes = record.get("probes")
            return str(record.get("weights_sha256", "")), probes if isinstance(probes, dict) else {}
        described = str(self.version if self.version is not None else version)
        return (str(self.weights_sha256 or "") if described == version else ""), None

    def probe_scores(self, probes: dict[str, Any] | None = None) -> dict[str, float]:
        """Numeric ``scores`` of ``probes`` (default: the manifest's own); ``{}`` without probes."""
        probes = self.probes if probes is None else probes
        scores = (probes or {}).get("scores")
        if not isinstance(scores, dict):
            return {}
        return {str(k): float(v) for k, v in scores.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
