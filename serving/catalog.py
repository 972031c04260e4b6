"""What the gateway knows about each served model, learned from Triton's model configs.

Each config carries the export manifest as the string parameter ``vitserve_manifest`` (see
docs/CONTRACTS.md), so the gateway needs no file access to the model repository. The manifest is
parsed once, here, into a ``contract.manifest.Manifest``; ``ServedModel`` reads it through its helpers.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from contract.manifest import Bucket, Manifest, ManifestError
from contract.names import CLS_OUTPUT, DEFAULT_OUTPUTS, INPUT_NAME, MANIFEST_PARAMETER, PATCH_OUTPUT, is_token_output
from contract.preprocess import PreprocessSpec, PreprocessSpecError
from protos import vitserve_pb2
from serving.images import InputGeometry

log = logging.getLogger(__name__)


class CatalogError(ValueError):
    """A model's config does not describe a vitserve encoder."""


def _bucket_message(bucket: Bucket) -> vitserve_pb2.ResolutionBucket:
    (h, w), (gh, gw) = bucket.size, bucket.grid
    return vitserve_pb2.ResolutionBucket(height=h, width=w, grid_height=gh, grid_width=gw, model=bucket.model)


@dataclass(frozen=True)
class ServedModel:
    """One Triton model (at one version) as the gateway serves it."""

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
    manifest: Manifest = field(default_factory=Manifest)
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    # this version's probe results when the manifest records versions (None: the manifest's own)
    probes: dict[str, Any] | None = None
    # the manifest's resolution buckets and this entry's own one, parsed once (malformed ones dropped)
    buckets: tuple[vitserve_pb2.ResolutionBucket, ...] = ()
    bucket: vitserve_pb2.ResolutionBucket | None = None

    @property
    def encoder_spec(self) -> dict[str, Any]:
        return self.manifest.spec

    @property
    def lane(self) -> str:
        """This model's lane ("throughput" / "latency") when its manifest declares lanes, else ""."""
        return self.manifest.lane_name()

    @property
    def lanes(self) -> dict[str, str]:
        """Lane -> model name, as the manifest declares (``{}``: none)."""
        return self.manifest.lane_map()

    @property
    def probe_scores(self) -> dict[str, float]:
        """``probes.scores`` of this version (numbers only); ``{}`` when it was exported without probes."""
        return self.manifest.probe_scores(self.probes)

    def output_entry(self, name: str) -> dict[str, Any]:
        """The manifest's description of output ``name`` (``{}`` if it has none)."""
        return self.manifest.output(name)

    @property
    def token_outputs(self) -> list[str]:
        """Outputs shaped like ``patch_tokens`` (``[h*w, D]`` per image): the layers Features can return."""
        return [o for o in self.outputs if is_token_output(o)]

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def base_model(self) -> str:
        return self.manifest.base_model

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
            manifest_json=json.dumps(self.manifest.to_dict(), sort_keys=True),
            probe_scores=self.probe_scores, max_batch_size=self.max_batch_size, outputs=list(self.outputs),
            precision=self.precision, base_model=self.base_model, variants=sorted(variants or []),
            lane=self.lane, lanes=self.lanes, preferred_batch_sizes=list(self.preferred_batch_sizes),
            max_queue_delay_us=self.max_queue_delay_us, default_resize_op=self.preprocess.resize_op,
            crop_pct=self.preprocess.crop_pct, buckets=list(self.buckets))


def _dims(tensors: list[dict[str, Any]], name: str, model: str) -> list[int]:
    for t in tensors:
        if t.get("name") == name:
            return [int(d) for d in t.get("dims", [])]
    raise CatalogError(f"model {model!r} has no tensor {name!r} (a vitserve model has input "
                       f"{INPUT_NAME!r} and outputs {CLS_OUTPUT!r}, {PATCH_OUTPUT!r})")


def _first(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _read_manifest(config: dict[str, Any]) -> Manifest:
    """The manifest a Triton JSON model config carries (empty without the parameter; ``CatalogError``
    naming the model if it is not a manifest)."""
    name = str(config.get("name", ""))
    raw = config.get("parameters", {}).get(MANIFEST_PARAMETER, {}).get("string_value", "")
    if not raw:
        log.warning("model %r has no %s parameter; deriving its layout from tensor dims", name, MANIFEST_PARAMETER)
        return Manifest()
    try:
        return Manifest.from_json(raw)
    except ManifestError as e:
        raise CatalogError(f"model {name!r}: parameter {MANIFEST_PARAMETER}: {e}") from e


def _buckets(manifest: Manifest, name: str) -> tuple[tuple[vitserve_pb2.ResolutionBucket, ...],
                                                     vitserve_pb2.ResolutionBucket | None]:
    """The manifest's resolution buckets (malformed entries skipped, with a warning) and the entry's own."""
    buckets = []
    for entry in manifest.buckets or []:
        try:
            buckets.append(_bucket_message(Bucket.from_dict(entry)))
        except (KeyError, TypeError, ValueError):
            log.warning("model %r: ignoring malformed manifest bucket %r", name, entry)
    try:
        own = manifest.own_bucket(name)
    except (KeyError, TypeError, ValueError):
        own = None
    return tuple(buckets), (_bucket_message(own) if own is not None else None)


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
    manifest = _read_manifest(config)
    spec = manifest.spec
    num_patches, embed_dim = patch_dims[0], patch_dims[-1]
    if spec:
        try:
            grid = (int(spec["grid_size"][0]), int(spec["grid_size"][1]))
            patch = _first(spec["patch_size"])
            prefix = int(spec.get("num_prefix_tokens", 1))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CatalogError(f"model {name!r}: manifest encoder_spec has no usable grid_size / patch_size "
                               f"({e!r})") from e
        normalization = f"(x/255 - mean)/std in graph, mean={spec.get('mean')}, std={spec.get('std')}"
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
    version = str(version or (manifest.version if manifest.version is not None else ""))
    weights_sha256, probes = manifest.version_record(version)
    buckets, own_bucket = _buckets(manifest, name)
    return ServedModel(
        name=name, version=version, geometry=InputGeometry(in_dims[0], in_dims[1], in_dims[2]),
        embed_dim=embed_dim, grid=grid, patch_size=patch, num_prefix_tokens=prefix, max_batch_size=max_batch,
        weights_sha256=weights_sha256, normalization=normalization, manifest=manifest, preprocess=preprocess,
        outputs=outputs, preferred_batch_sizes=preferred, max_queue_delay_us=delay, probes=probes,
        buckets=buckets, bucket=own_bucket)
