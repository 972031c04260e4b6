"""Adding a version to an existing repository entry (``vitserve export --add-version``).

Triton serves every version directory of an entry with the entry's one config, so a new version
must leave that config unchanged except for the manifest parameter, and the manifest's serving-side
description (output meaning, grid, preprocessing, buckets, lanes) too. The manifest keeps one record
per version under ``versions`` (``merge_version``); ``publish_versions`` moves the version directories
staged by ``export.publish.Staging`` in and then replaces each manifest and config atomically, so a
failure leaves the old entry intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from contract.manifest import Manifest, ManifestError
from contract.names import CONFIG_FILENAME, MANIFEST_FILENAME, MANIFEST_PARAMETER
from export.errors import ExportUsageError
from export.layout import config_with_manifest
from export.publish import StagedEntry, publish_version, replace_file, withdraw_version
from export.triton_config import parse_pbtxt


# Manifest fields that change what the gateway does for every version of an entry (it reads them
# from the one config): they must not change when a version is added.
_SERVING_SPEC_KEYS = ("grid_size", "patch_size", "num_prefix_tokens")  # input size: the config's
_OUTPUT_KEYS = ("layer", "final_norm", "tokens", "pooling")  # dtype and shape: the config's
_PREPROCESSING_KEYS = ("resize_op", "crop_pct", "interpolation")


@dataclass(frozen=True)
class ExistingEntry:
    """A vitserve entry as read before a version is added to it (bytes kept to detect changes)."""

    path: Path
    config_text: str
    manifest_text: str
    manifest: Manifest

    def unchanged(self) -> bool:
        """Whether config.pbtxt and manifest.json still hold the bytes read at the start."""
        try:
            return ((self.path / CONFIG_FILENAME).read_text() == self.config_text
                    and (self.path / MANIFEST_FILENAME).read_text() == self.manifest_text)
        except OSError:
            return False


def entry_versions(path: Path) -> list[int]:
    """The version directories of an entry, ascending."""
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()) if path.is_dir() else []


def read_existing_entry(path: Path, version: int, force: bool) -> ExistingEntry:
    """The entry at ``path`` that ``version`` is to be added to; ``ExportUsageError`` if it cannot be."""
    config_path, manifest_path = path / CONFIG_FILENAME, path / MANIFEST_FILENAME
    if not (config_path.is_file() and manifest_path.is_file()):
        raise ExportUsageError(
            f"--add-version: model {path.name!r} is not in {path.parent} (no vitserve entry with "
            f"{CONFIG_FILENAME} and {MANIFEST_FILENAME}); export it first without --add-version")
    config_text, manifest_text = config_path.read_text(), manifest_path.read_text()
    try:
        manifest = Manifest.from_json(manifest_text)
        int(manifest.version)  # type: ignore[arg-type]  # None: no version, refused here
    except (ManifestError, ValueError, TypeError) as e:
        raise ExportUsageError(f"--add-version: {manifest_path} is not a vitserve manifest ({e!r}); "
                               "export under a new --name") from e
    versions = entry_versions(path)
    if (path / str(version)).exists() and not force:
        raise ExportUsageError(
            f"model {path.name!r} in {path.parent} already has version {version} (versions {versions}); "
            f"pass --version {max(versions + [version]) + 1} to add a new one, or --force to replace "
            f"version {version} only")
    return ExistingEntry(path, config_text, manifest_text, manifest)


def version_record(manifest: Manifest) -> dict[str, Any]:
    """One manifest's version as a ``versions`` record: weights hash, its files, parity, source, probes."""
    version = str(manifest.version)
    exporter = dict(manifest.exporter or {})
    record = {"weights_sha256": str(manifest.weights_sha256 or ""),
              "files": {f: h for f, h in (manifest.files or {}).items() if f.startswith(version + "/")},
              "parity": manifest.parity or {},
              "source": manifest.source if manifest.source is not None else "",
              "probes": manifest.probes or {},
              "exported_at": exporter.pop("exported_at", ""),
              "exporter": exporter}
    if manifest.weights is not None:
        record["weights"] = manifest.weights
    return record


def version_records(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """The manifest's ``versions`` map (a copy), or, for a manifest from before the map, its one record."""
    if manifest.versions is not None:  # may be empty: a replaced version's record was dropped
        return {str(k): v for k, v in manifest.versions.items()}
    return {str(manifest.version): version_record(manifest)}


def merge_version(old: Manifest, new: Manifest, version: int) -> Manifest:
    """``new`` (this export's manifest) with ``versions``: ``old``'s records plus this version's.

    A manifest written before ``versions`` existed contributes one record built from its top-level
    fields. The top level keeps describing the version just exported; top-level ``files`` lists
    every recorded version's files.
    """
    versions = version_records(old)
    versions[str(version)] = version_record(new)
    versions = dict(sorted(versions.items(), key=lambda kv: int(kv[0])))
    files = {f: h for record in versions.values() for f, h in record["files"].items()}
    return new.replace(files=files, versions=versions)


def _tensor_differences(kind: str, old: Sequence[Any], new: Sequence[Any]) -> list[str]:
    from tritonclient.grpc import model_config_pb2 as mc

    def table(tensors: Sequence[Any]) -> dict[str, tuple[str, list[int]]]:
        return {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in tensors}

    a, b = table(old), table(new)
    if list(a) != list(b):
        return [f"{kind}s {list(a)} in the entry, {list(b)} in this export"]
    out = []
    for name, (dtype, dims) in a.items():
        if dims != b[name][1]:
            out.append(f"{kind} {name!r} dims {dims} in the entry, {b[name][1]} in this export")
        if dtype != b[name][0]:
            out.append(f"{kind} {name!r} data type {dtype} in the entry, {b[name][0]} in this export")
    return out


def config_differences(old_pbtxt: str, new_pbtxt: str) -> list[str]:
    """What differs between two config.pbtxt texts other than the ``vitserve_manifest`` parameter."""
    from google.protobuf import text_format

    old, new = parse_pbtxt(old_pbtxt), parse_pbtxt(new_pbtxt)
    for config in (old, new):
        if MANIFEST_PARAMETER in config.parameters:
            del config.parameters[MANIFEST_PARAMETER]
    out: list[str] = []
    for field in old.DESCRIPTOR.fields:
        if getattr(old, field.name) == getattr(new, field.name):
            continue
        if field.name in ("input", "output"):
            out += _tensor_differences(field.name, getattr(old, field.name), getattr(new, field.name))
            continue

        def text(config: Any) -> str:
            part = type(config)()
            part.CopyFrom(config)
            for other in part.DESCRIPTOR.fields:
                if other.name != field.name:
                    part.ClearField(other.name)
            return text_format.MessageToString(part, as_one_line=True) or "(not set)"

        out.append(f"{text(old)} in the entry, {text(new)} in this export")
    return out


def manifest_differences(old_manifest: Manifest, new_manifest: Manifest) -> list[str]:
    """Differences in what the gateway reads from the manifest for every version (not in the config)."""
    old, new = (json.loads(m.to_json()) for m in (old_manifest, new_manifest))  # as stored: tuples are lists
    pairs: list[tuple[str, Any, Any]] = []
    old_spec, new_spec = old.get("encoder_spec") or {}, new.get("encoder_spec") or {}
    pairs += [(f"encoder_spec.{k}", old_spec.get(k), new_spec.get(k)) for k in _SERVING_SPEC_KEYS]
    old_out, new_out = old.get("outputs") or {}, new.get("outputs") or {}
    pairs += [(f"output {name!r} {k}", old_out[name].get(k), new_out[name].get(k))
              for name in old_out if name in new_out for k in _OUTPUT_KEYS]
    old_pre, new_pre = old.get("preprocessing") or {}, new.get("preprocessing") or {}
    pairs += [(f"preprocessing.{k}", old_pre.get(k), new_pre.get(k)) for k in _PREPROCESSING_KEYS]
    pairs += [(k, old.get(k), new.get(k)) for k in ("buckets", "lanes", "lane")]
    return [f"{what} {_shown(a)} in the entry, {_shown(b)} in this export" for what, a, b in pairs if a != b]


def _shown(value: Any) -> str:
    return "(none)" if value is None else json.dumps(value) if isinstance(value, (dict, list, str)) else str(value)


def check_compatible(entry: ExistingEntry, manifest: Manifest, pbtxt: str, version: int) -> None:
    """Raise ``ExportUsageError`` unless ``pbtxt``/``manifest`` may serve beside the entry's versions."""
    diffs = config_differences(entry.config_text, pbtxt) + manifest_differences(entry.manifest, manifest)
    if diffs:
        raise ExportUsageError(
            f"cannot add version {version} to model {entry.path.name!r}: Triton serves every version of an "
            "entry with one config, and this export's differs from the entry's: " + "; ".join(diffs)
            + ". Repeat the options of the entry's export, or export under a new --name")


def publish_versions(entries: Sequence[StagedEntry], existing: dict[str, ExistingEntry], version: int,
                     force: bool) -> list[Path]:
    """Publish staged versions into existing entries: every ``<N>`` directory, then every manifest and config.

    Each step is atomic (``publish_version``, ``replace_file``); the entries are re-read first, and if
    one changed since the checks, or a version directory cannot be moved in, those already moved are
    taken back out, so a failed add leaves every entry as it was. With ``force``, a version being
    replaced first loses its record (manifest and config rewritten without it), so it is never
    reported with the weights hash of the directory it replaced. Returns the entries' paths.
    """
    staged = [(e.root, e.target) for e in entries]
    changed = [e.path.name for e in existing.values() if not e.unchanged()]
    if changed:
        raise ExportUsageError(f"model(s) {changed} changed while this export ran (another export?); "
                               "nothing was written")
    # --force over an existing version: first drop its record, so that no step below leaves the new
    # directory described by the old version's weights hash
    replacing = [existing[t.name] for _, t in staged if force and (t / str(version)).is_dir()]
    moved: list[tuple[Path, Path, Path | None]] = []
    try:
        for entry in replacing:
            manifest_bytes, config_bytes = _without_version(entry, version)
            replace_file(entry.path / MANIFEST_FILENAME, manifest_bytes)
            replace_file(entry.path / CONFIG_FILENAME, config_bytes)
        for staging, target in staged:
            moved.append((staging / str(version), target / str(version),
                          publish_version(staging / str(version), target / str(version), force)))
    except BaseException:
        for staged_dir, target_dir, replaced in reversed(moved):
            withdraw_version(staged_dir, target_dir, replaced)
        for entry in replacing:  # the bytes read at the start
            replace_file(entry.path / MANIFEST_FILENAME, entry.manifest_text.encode())
            replace_file(entry.path / CONFIG_FILENAME, entry.config_text.encode())
        raise
    # A crash from here on leaves version directories the manifests do not describe yet: served, with
    # an empty weights hash, until the next step.
    for staging, target in staged:
        replace_file(target / MANIFEST_FILENAME, (staging / MANIFEST_FILENAME).read_bytes())
        replace_file(target / CONFIG_FILENAME, (staging / CONFIG_FILENAME).read_bytes())
    return [target for _, target in staged]


def _without_version(entry: ExistingEntry, version: int) -> tuple[bytes, bytes]:
    """manifest.json and config.pbtxt of ``entry`` with no ``versions`` record of ``version``."""
    versions = version_records(entry.manifest)
    versions.pop(str(version), None)
    manifest = entry.manifest.replace(versions=versions)
    return manifest.to_json().encode(), config_with_manifest(entry.config_text, manifest).encode()
