"""The model a job embeds with: a repository entry's ONNX file, or the same model on running gateways.

Either way the job learns the model's input geometry and preprocessing spec from its manifest and
parses the spec with the gateway's ``PreprocessSpec.from_manifest``, so images are brought to the
input exactly as the gateway would bring them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from clients.client import VitServeClient, VitServeError
from clients.targets import TargetError, parse_target, replica_addresses
from contract.manifest import Manifest, ManifestError
from contract.names import CLS_OUTPUT, INPUT_NAME, MANIFEST_FILENAME, PATCH_OUTPUT
from contract.preprocess import OP_NAMES, PreprocessSpec, PreprocessSpecError
from serving.images import InputGeometry
from serving.preprocess import resolve_op

from embed_dataset.options import EmbedOptions, UsageError, service_target

ONNX_FILENAME = "model.onnx"
_SERVICE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class EmbedModel:
    """What the decode tasks and the actors need to know about the model (picklable)."""

    name: str
    version: str
    weights_sha256: str
    geometry: InputGeometry
    preprocess: PreprocessSpec
    embed_dim: int
    grid: tuple[int, int]
    onnx_path: Path | None = None      # None in --service mode
    onnx_sha256: str = ""

    @property
    def resize_op(self) -> int:
        """The op the gateway applies to a request that names none: the model's default."""
        return resolve_op(0, self.preprocess)

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing applied to every image, as the outputs' metadata records it."""
        g = self.geometry
        return {"input": [g.height, g.width, g.channels], "resize_op": OP_NAMES[self.resize_op],
                "crop_pct": self.preprocess.crop_pct, "interpolation": self.preprocess.interpolation,
                "decoder": "serving.images.decode_encoded + serving.preprocess.prepare_image"}

    def identity(self) -> dict[str, Any]:
        """What makes two runs' embeddings the same model's (a resumed run must match it)."""
        return {"model": self.name, "version": self.version, "weights_sha256": self.weights_sha256,
                "embed_dim": self.embed_dim, "grid": list(self.grid), "preprocessing": self.preprocessing()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _spec(manifest: Manifest | dict[str, Any], channels: int, where: str) -> PreprocessSpec:
    try:
        return PreprocessSpec.from_manifest(manifest, channels)
    except PreprocessSpecError as e:
        raise UsageError(f"{where}: {e}") from e


def _grid(manifest: Manifest, name: str) -> tuple[int, int]:
    bucket = manifest.own_bucket(name)
    if bucket is not None:
        return bucket.grid
    grid = manifest.spec.get("grid_size") or (0, 0)
    return int(grid[0]), int(grid[1])


def from_repository(repository: Path, name: str) -> EmbedModel:
    """The newest version of ``repository/name`` that has a ``model.onnx``; ``UsageError`` if none."""
    if not repository.is_dir():
        raise UsageError(f"model repository {repository} does not exist or is not a directory")
    entry = repository / name
    if not (entry / MANIFEST_FILENAME).is_file():
        names = sorted(p.name for p in repository.iterdir() if (p / MANIFEST_FILENAME).is_file())
        raise UsageError(f"no model {name!r} in {repository} (no {name}/{MANIFEST_FILENAME}); "
                         f"it holds: {', '.join(names) or 'no exported models'}")
    try:
        manifest = Manifest.read(entry)
    except (OSError, ManifestError) as e:
        raise UsageError(f"{entry / MANIFEST_FILENAME} cannot be read: {e}") from e
    versions = sorted((int(p.name) for p in entry.iterdir() if p.name.isdigit() and (p / ONNX_FILENAME).is_file()))
    if not versions:
        raise UsageError(f"{entry} has no <version>/{ONNX_FILENAME} (a TensorRT-only entry? "
                         f"embed with its base model)")
    version = str(versions[-1])
    outputs = manifest.outputs or {}
    missing = [o for o in (CLS_OUTPUT, PATCH_OUTPUT) if o not in outputs]
    shape = ((manifest.inputs or {}).get(INPUT_NAME) or {}).get("shape") or []
    if missing or len(shape) != 4:
        raise UsageError(f"{entry / MANIFEST_FILENAME} does not describe a vitserve encoder "
                         f"(needs inputs.images [N, H, W, C] and outputs cls, patch_tokens)")
    geometry = InputGeometry(int(shape[1]), int(shape[2]), int(shape[3]))
    onnx_path = entry / version / ONNX_FILENAME
    onnx_sha256 = _sha256(onnx_path)
    weights_sha256, _ = manifest.version_record(version)
    record = (manifest.versions or {}).get(version) or {}
    recorded = (record.get("files") or manifest.files or {}).get(f"{version}/{ONNX_FILENAME}")
    if recorded and recorded != onnx_sha256:
        raise UsageError(f"{onnx_path} does not match the SHA-256 its manifest records ({recorded[:12]}...); "
                         f"the repository was changed after export; export the model again")
    return EmbedModel(name=name, version=version, weights_sha256=weights_sha256, geometry=geometry,
                      preprocess=_spec(manifest, geometry.channels, str(entry)),
                      embed_dim=int(manifest.output(CLS_OUTPUT)["shape"][-1]), grid=_grid(manifest, name),
                      onnx_path=onnx_path, onnx_sha256=onnx_sha256)


def from_service(targets: Sequence[str], name: str) -> EmbedModel:
    """The model as every gateway of ``targets`` (``--service``: listed, or what ``dns:///`` resolves
    to now) describes it; ``UsageError`` if one cannot or differs."""
    try:
        replicas = replica_addresses(parse_target(service_target(tuple(targets))))
    except TargetError as e:
        raise UsageError(f"--service: {e}") from e
    described: list[EmbedModel] = []
    for target in replicas:
        try:
            with VitServeClient(target, timeout=_SERVICE_TIMEOUT_S, retries=False) as client:
                info = client.get_model(name)
        except VitServeError as e:
            raise UsageError(f"gateway {target}: {e}") from e
        geometry = InputGeometry(info.input_size[0], info.input_size[1], info.input_channels)
        described.append(EmbedModel(name=info.name, version=info.version, weights_sha256=info.weights_sha256,
                                    geometry=geometry, preprocess=_spec(info.manifest, geometry.channels, target),
                                    embed_dim=info.embed_dim, grid=info.grid))
    first = described[0]
    for target, other in zip(replicas[1:], described[1:]):
        if other.identity() != first.identity():
            raise UsageError(f"gateways {replicas[0]} and {target} serve different models named {name!r} "
                             f"({first.identity()} vs {other.identity()})")
    return first


def resolve_model(options: EmbedOptions) -> EmbedModel:
    """The job's model: from the gateways with ``--service``, else from the repository."""
    if options.service:
        model = from_service(options.service, options.model)
        if options.model_repository is not None:
            local = from_repository(options.model_repository, options.model)
            if local.weights_sha256 != model.weights_sha256:
                raise UsageError(f"--model-repository's {options.model!r} (weights {local.weights_sha256[:12]}) is "
                                 f"not the model the gateways serve (weights {model.weights_sha256[:12]})")
        return model
    assert options.model_repository is not None  # EmbedOptions checks one of the two is given
    return from_repository(options.model_repository, options.model)
