"""What a benchmark reads of a model repository: the models, each one's ONNX file, served thread count,
input geometry and manifest (precision, quality figures)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.manifest import Manifest

_THREADS_RE = re.compile(
    r'key:\s*"(?:intra_op_threads|intra_op_thread_count)"\s*value\s*:?\s*\{\s*string_value:\s*"(\d+)"')
_MAX_BATCH_RE = re.compile(r"^max_batch_size:\s*(\d+)", re.M)


def served_intra_op_threads(config_pbtxt: str) -> int:
    """The ONNX Runtime intra-op thread count a ``config.pbtxt`` gives its model (0: ORT's default)."""
    m = _THREADS_RE.search(config_pbtxt)
    return int(m.group(1)) if m else 0


class UnknownModelError(ValueError):
    """A requested model is not in the repository (the message names the ones that are)."""


@dataclass(frozen=True)
class RepositoryModel:
    """One model entry: its ``model.onnx``, served intra-op threads (0: ORT default), max batch, manifest."""

    name: str
    onnx_path: Path
    intra_op_threads: int
    max_batch_size: int
    manifest: Manifest

    @property
    def precision(self) -> str:
        return (self.manifest.variant or {}).get("precision", "fp32")

    @property
    def input_size(self) -> tuple[int, int]:
        spec = self.manifest.spec
        return tuple(spec["img_size"])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return int(self.manifest.spec.get("in_chans", 3))

    def quality(self) -> dict[str, Any]:
        """Parity (max abs error vs PyTorch), the variant gate's mean cosine and k-NN drop, probe scores."""
        m = self.manifest
        q: dict[str, Any] = {}
        parity = m.parity or {}
        errs = [v for v in (parity.get("max_abs_err") or {}).values() if isinstance(v, (int, float))] \
            if isinstance(parity.get("max_abs_err"), dict) else []
        if errs:
            q["parity_max_abs_err"] = max(errs)
        elif isinstance(parity.get("max_abs_err"), (int, float)):
            q["parity_max_abs_err"] = parity["max_abs_err"]
        figures = (m.variant or {}).get("figures") or {}
        cosine = figures.get("mean_cosine")
        if isinstance(cosine, dict):  # per output
            q.update({f"variant_mean_cosine_{k}": v for k, v in cosine.items()})
        elif cosine is not None:
            q["variant_mean_cosine"] = cosine
        knn = figures.get("knn") or {}
        if "drop_points" in knn:
            q["variant_knn_drop_points"] = knn["drop_points"]
        q.update({f"probe_{k}": v for k, v in m.probe_scores().items()})
        return q


def model_entry(repository: str | Path, name: str) -> RepositoryModel:
    """The entry ``name`` of ``repository`` (its manifest's version directory)."""
    model_dir = Path(repository) / name
    manifest = Manifest.read(model_dir)
    onnx_path = model_dir / str(manifest.version or 1) / "model.onnx"
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no {onnx_path}: the in-process systems need the exported model.onnx")
    config = (model_dir / "config.pbtxt").read_text() if (model_dir / "config.pbtxt").is_file() else ""
    b = _MAX_BATCH_RE.search(config)
    return RepositoryModel(name, onnx_path, served_intra_op_threads(config), int(b.group(1)) if b else 8, manifest)


def repository_models(repository: str | Path) -> list[str]:
    """Names of the entries of ``repository`` that hold a ``manifest.json`` and a ``model.onnx``, sorted."""
    repo = Path(repository)
    if not repo.is_dir():
        raise FileNotFoundError(f"model repository {repo} is not a directory")
    return sorted(p.name for p in repo.iterdir()
                  if (p / "config.pbtxt").is_file() and any(p.glob("*/model.onnx")))


def select_models(repository: str | Path, wanted: list[str] | None) -> list[str]:
    """``wanted`` checked against the repository (``None``: all of its models)."""
    available = repository_models(repository)
    if not wanted:
        if not available:
            raise UnknownModelError(f"model repository {repository} holds no exported model")
        return available
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise UnknownModelError(f"unknown model{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                                f"the repository {repository} holds: {', '.join(available) or 'none'}")
    return wanted
