"""What the gateway knows about each served model, learned from Triton's model configs.

Each config carries the export manifest as the string parameter ``vitserve_manifest`` (see
docs/CONTRACTS.md), so the gateway needs no file access to the model repository.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from protos import vitserve_pb2
from serving.images import InputGeometry
from contract.preprocess import PreprocessSpec, PreprocessSpecError

log = logging.getLogger(__name__)

MANIFEST_PARAMETER = "vitserve_manifest"
INPUT_NAME = "images"
CLS_OUTPUT = "cls"
PATCH_OUTPUT = "patch_tokens"
LANES = ("throughput", "latency")


class CatalogError(ValueError):
    """A model's config does not describe a vitserve encoder."""


@dataclass(frozen=True)
class ServedModel:
    """One Triton model as the gateway serves it."""

    name: str
    version: str
    geometry: InputGeometry
    embed_dim: int
    grid: tuple[int, int]
    patch_size: int
    num_prefix_tokens: int
    max_batch_size: int
    weights_sha256: str
    normalization: str
    manifest: dict[str, Any] = field(default_factory=dict)
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    outputs: tuple[str, ...] = (CLS_OUTPUT, PATCH_OUTPUT)
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    # this version's probe results when the manifest records versions (None: the manifest's own)
    probes: dict[str, Any] | None = None

    @property
    def encoder_spec(self) -> dict[str, Any]:
        return dict(self.manifest.get("encoder_spec", {}))

    @property
    def lane(self) -> str:
        """This model's lane ("throughput" / "latency") when its manifest declares lanes, else ""."""
        lane = self.manifest.get("lane", "")
        return lane if isinstance(lane, str) and lane in LANES and self.lanes else ""

    @property
    def lanes(self) -> dict[str, str]:
        """Lane -> model name, as the manifest declares (``{}``: none)."""
        lanes = self.manifest.get("lanes") or {}
        if not isinstance(lanes, dict):
            return {}
        return {str(k): str(v) for k, v in lanes.items() if k in LANES and isinstance(v, str) and v}

    @property
    def probe_scores(self) -> dict[str, float]:
        """``probes.scores`` of this version (numbers only); ``{}`` when it was exported without probes."""
        probes = (self.manifest.get("probes") if self.probes is None else self.probes) or {}
        scores = probes.get("scores") if isinstance(probes, dict) else None
        if not isinstance(scores, dict):
            return {}
        return {str(k): float(v) for k, v in scores.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    @property
    def buckets(self) -> list[vitserve_pb2.ResolutionBucket]:
        """The manifest's resolution buckets (``[{"size", "grid", "model"}]``); malformed entries skipped."""
        out = []
        for b in self.manifest.get("buckets") or []:
            try:
                (h, w), (gh, gw) = b["size"], b["grid"]
                out.append(vitserve_pb2.ResolutionBucket(height=int(h), width=int(w), grid_height=int(gh),
                                                         grid_width=int(gw), model=str(b["model"])))
            except (KeyError, TypeError, ValueError):
                log.warning("model %r: ignoring malformed manifest bucket %r", self.name, b)
        return out

    @property
    def bucket(self) -> vitserve_pb2.ResolutionBucket | None:
        """This entry's own bucket (manifest ``bucket``: ``{"size", "grid"}``), if it is one."""
        b = self.manifest.get("bucket")
        if not self.manifest.get("buckets") or not isinstance(b, dict):
            return None
        try:
            (h, w), (gh, gw) = b["size"], b["grid"]
            return vitserve_pb2.ResolutionBucket(height=int(h), width=int(w), grid_height=int(gh),
                                                 grid_width=int(gw), model=self.name)
        except (KeyError, TypeError, ValueError):
            return None

    def output_entry(self, name: str) -> dict[str, Any]:
        """The manifest's description of output ``name`` (``{}`` if it has none)."""
        entry = (self.manifest.get("outputs") or {}).get(name) or {}
        return entry if isinstance(entry, dict) else {}

    @property
    def token_outputs(self) -> list[str]:
        """Outputs shaped like ``patch_tokens`` (``[h*w, D]`` per image): the layers Features can return."""
        return [o for o in self.outputs if o == PATCH_OUTPUT or o.startswith(PATCH_OUTPUT + "_l")]

    @property
    def variant(self) -> dict[str, Any]:
        v = self.manifest.get("variant") or {}
        return v if isinstance(v, dict) else {}

    @property
    def precision(self) -> str:
        return str(self.variant.get("precision", "fp32"))

    @property
    def base_model(self) -> str:
        return str(self.variant.get("base_model", ""))

    def ref(self) -> vitserve_pb2.ModelRef:
        return vitserve_pb2.ModelRef(name=self.name, version=self.version,
                                     weights_sha256=self.weights_sha256, lane=self.lane, bucket=self.bucket)

    def info(self, ready: bool, variants: list[str] | None = None,
             versions: list[str] | None = None) -> vitserve_pb2.ModelInfo:
        """The model's description; ``variants``: the served precision variants derived from it;
        ``versions``: the versions Triton has loaded (default: this one)."""
        return vitserve_pb2.ModelInfo(versions=versions if versions is not None else [self.version],
            model=self.ref(), ready=ready,
            input_height=self.geometry.height, input_width=self.geometry.width,
            input_channels=self.geometry.channels, embed_dim=self.embed_dim,
            grid_height=self.grid[0], grid_width=self.grid[1], patch_size=self.patch_size,
            num_prefix_tokens=self.num_prefix_tokens,
            encoder_spec_json=json.dumps(self.encoder_spec, sort_keys=True),
            manifest_json=json.dumps(self.manifest, sort_keys=True),
            probe_scores=self.probe_scores, max_batch_size=self.max_batch_size, outputs=list(self.outputs),
            precision=self.precision, base_model=self.base_model, variants=sorted(variants or []),
            lane=self.lane, lanes=self.lanes, preferred_batch_sizes=list(self.preferred_batch_sizes),
            max_queue_delay_us=self.max_queue_delay_us, default_resize_op=self.preprocess.resize_op,
            crop_pct=self.preprocess.crop_pct, buckets=self.buckets)


def _dims(tensors: list[dict[str, Any]], name: str, model: str) -> list[int]:
    for t in tensors:
        if t.get("name") == name:
            return [int(d) for d in t.get("dims", [])]
    raise CatalogError(f"model {model!r} has no tensor {name!r} (a vitserve model has input "
                       f"{INPUT_NAME!r} and outputs {CLS_OUTPUT!r}, {PATCH_OUTPUT!r})")


def _first(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def model_from_config(config: dict[str, Any], version: str = "") -> ServedModel:
    """A ``ServedModel`` from Triton's JSON model config (``get_model_config(as_json=True)['config']``).

    The manifest's encoder spec is authoritative; without a manifest the shapes come from the
    config's tensor dims and a square grid is assumed.
    """
    name = str(config.get("name", ""))
    max_batch = int(config.get("max_batch_size", 0))
    if max_batch <= 0:
        raise CatalogError(f"model {name!r} has max_batch_size {max_batch}; vitserve models batch (> 0)")
    in_dims = _dims(config.get("input", []), INPUT_NAME, name)
    cls_dims = _dims(config.get("output", []), CLS_OUTPUT, name)
    patch_dims = _dims(config.get("output", []), PATCH_OUTPUT, name)
    if len(in_dims) != 3 or any(d <= 0 for d in in_dims):
        raise CatalogError(f"model {name!r} input {INPUT_NAME!r} dims {in_dims} are not a fixed [H, W, C]")
    raw = config.get("parameters", {}).get(MANIFEST_PARAMETER, {}).get("string_value", "")
    manifest: dict[str, Any] = {}
    if raw:
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CatalogError(f"model {name!r}: parameter {MANIFEST_PARAMETER} is not JSON: {e}") from e
    else:
        log.warning("model %r has no %s parameter; deriving its layout from tensor dims",
                    name, MANIFEST_PARAMETER)
    spec = manifest.get("encoder_spec", {})
    num_patches, embed_dim = patch_dims[0], patch_dims[-1]
    if spec:
        grid = (int(spec["grid_size"][0]), int(spec["grid_size"][1]))
        patch = _first(spec["patch_size"])
        prefix = int(spec.get("num_prefix_tokens", 1))
        mean, std = spec.get("mean"), spec.get("std")
        normalization = f"(x/255 - mean)/std in graph, mean={mean}, std={std}"
    else:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise CatalogError(f"model {name!r}: {num_patches} patch tokens is not a square grid "
                               f"and no manifest gives the grid")
        grid, prefix = (side, side), 1
        patch = in_dims[0] // side
        normalization = "in graph (no manifest)"
    try:
        preprocess = PreprocessSpec.from_manifest(manifest, in_dims[2])
    except PreprocessSpecError as e:
        raise CatalogError(f"model {name!r}: {e}") from e
    batching = config.get("dynamic_batching") or {}
    preferred = tuple(int(b) for b in batching.get("preferred_batch_size", []) or [])
    delay = int(batching.get("max_queue_delay_microseconds", 0) or 0)
    outputs = tuple(str(t.get("name")) for t in config.get("output", []))
    if grid[0] * grid[1] != num_patches or cls_dims[-1] != embed_dim:
        raise CatalogError(f"model {name!r}: manifest grid {grid} / dims cls {cls_dims} disagree with "
                           f"output {PATCH_OUTPUT!r} dims {patch_dims}")
    version = str(version or manifest.get("version", ""))
    weights_sha256, probes = version_weights(manifest, version)
    return ServedModel(
        name=name,
        version=version,
        geometry=InputGeometry(in_dims[0], in_dims[1], in_dims[2]),
        embed_dim=embed_dim,
        grid=grid,
        patch_size=patch,
        num_prefix_tokens=prefix,
        max_batch_size=max_batch,
        weights_sha256=weights_sha256,
        normalization=normalization,
        manifest=manifest,
        preprocess=preprocess,
        outputs=outputs,
        preferred_batch_sizes=preferred,
        max_queue_delay_us=delay,
        probes=probes,
    )


def version_weights(manifest: dict[str, Any], version: str) -> tuple[str, dict[str, Any] | None]:
    """(weights hash, probes) of ``version``: its record in the manifest's ``versions`` map.

    The manifest travels in the config, shared by all version directories. With a ``versions`` map
    (``vitserve export --add-version``) each recorded version has its own hash and probes; a version
    directory the map does not record (copied by hand, or published by an export that stopped before
    its manifest) gets ``""``. Without a map the manifest describes only the version its export wrote.
    """
    versions = manifest.get("versions")
    if isinstance(versions, dict):  # empty while `--force` replaces the only recorded version
        record = versions.get(version)
        if not isinstance(record, dict):
            return "", {}
        probes = record.get("probes")
        return str(record.get("weights_sha256", "")), probes if isinstance(probes, dict) else {}
    described = str(manifest.get("version", version))
    return (str(manifest.get("weights_sha256", "")) if described == version else ""), None
