"""One model-repository entry on disk (docs/CONTRACTS.md): names, file hashes, manifest and config text.

Layout::

    REPO/<name>/config.pbtxt          the Triton config; carries the manifest in ``vitserve_manifest``
    REPO/<name>/manifest.json         the entry's ``contract.manifest.Manifest`` (``Manifest.read``)
    REPO/<name>/<version>/model.onnx  the graph (``model.py`` beside it for the Python backend)

File and parameter names come from ``contract.names``; this module adds the model-name rule, hashing,
and the one place the manifest is written (file and config parameter).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from contract.manifest import Manifest
from contract.names import CONFIG_FILENAME, MANIFEST_FILENAME, MANIFEST_PARAMETER
from export.errors import ExportUsageError
from export.triton_config import parse_pbtxt

ONNX_FILENAME = "model.onnx"
MODEL_PY_FILENAME = "model.py"  # export/model.py, copied verbatim for the Python backend
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a usable Triton model name (``[A-Za-z0-9_.-]+``, not hidden)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name.startswith("."):
        raise ExportUsageError(
            f"invalid model name {name!r}: use letters, digits, '_', '-' and '.', not starting with '.'")
    return name


def default_model_name(source: str | Path) -> str:
    """A model name derived from a run directory's (or timm model's) name; invalid characters become '_'."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(source).resolve().name).lstrip(".")
    return name or "encoder"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_parameter(manifest: Manifest) -> str:
    """The manifest as the config's ``vitserve_manifest`` parameter (compact, keys sorted)."""
    return manifest.to_json(indent=None)


def config_with_manifest(config_text: str, manifest: Manifest, name: str | None = None) -> str:
    """``config_text`` (a config.pbtxt) with ``manifest`` as its ``vitserve_manifest`` parameter
    (and ``name`` as the model's name, when given): an entry derived from another one's config."""
    from google.protobuf import text_format

    config = parse_pbtxt(config_text)
    if name is not None:
        config.name = name
    config.parameters[MANIFEST_PARAMETER].string_value = manifest_parameter(manifest)
    return text_format.MessageToString(config)


def write_entry_files(directory: Path, manifest: Manifest, config_text: str) -> None:
    """Write ``config.pbtxt`` and ``manifest.json`` of the entry at ``directory``."""
    (directory / CONFIG_FILENAME).write_text(config_text)
    (directory / MANIFEST_FILENAME).write_text(manifest.to_json())
