"""Write one exported encoder into a Triton model repository, atomically (``vitserve export``).

Layout (docs/CONTRACTS.md)::

    REPO/<name>/config.pbtxt          generated from export.triton_config, carries the manifest
    REPO/<name>/manifest.json         encoder spec, tensors, hashes, parity, exporter versions
    REPO/<name>/<version>/model.onnx  uint8 [N, H, W, C] -> cls [N, D], patch_tokens [N, h*w, D]
    REPO/<name>/<version>/model.py    Triton Python-backend model (export/model.py, verbatim)

Everything is built in a hidden staging directory beside the repository (same file system; Triton
would try to load anything inside it), checked (ONNX checker, parity gate), then renamed into place in one step. A
failed export leaves nothing behind; an existing model is replaced only with ``force=True``, by an
atomic exchange where the kernel offers one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import sys
import time
from importlib.metadata import PackageNotFoundError, version as _dist_version
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from export import model as triton_model
from export.architecture import describe_architecture, output_descriptions
from export.onnx_export import (DEFAULT_OPSET, DEFAULT_TOLERANCE, INPUT_NAME, TORCH_EXPORTER,
                                ExportError, ExportUsageError, check_parity, export_onnx)
from export.publish import exists_message, fsync_tree, publish, staging_directory
from export.triton_config import (BACKENDS, DynamicBatching, InstanceGroup, TensorSpec,
                                  TritonConfigError, TritonModelConfig)
from training.backbone import BackboneError, EncoderSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILENAME = "manifest.json"
CONFIG_FILENAME = "config.pbtxt"
MANIFEST_PARAMETER = "vitserve_manifest"
WEIGHTS_FILENAME = "encoder.pt"  # training.run_dir.ENCODER_FILENAME
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a usable Triton model name (``[A-Za-z0-9_.-]+``, not hidden)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name.startswith("."):
        raise ExportUsageError(
            f"invalid model name {name!r}: use letters, digits, '_', '-' and '.', not starting with '.'")
    return name


def default_model_name(run_dir: str | Path) -> str:
    """A model name derived from the run directory's name (invalid characters become '_')."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(run_dir).resolve().name).lstrip(".")
    return name or "encoder"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """Hex SHA-256 over a model's state dict (names, dtypes, shapes, raw bytes), for in-memory weights."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_run_encoder(run_dir: str | Path) -> tuple[nn.Module, EncoderSpec]:
    """The eval-mode encoder and spec of a run directory, through ``training.run_dir.load_encoder``."""
    from training.run_dir import load_encoder  # the one run-dir reader (docs/CONTRACTS.md)

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportUsageError(f"run directory {run_dir} does not exist; pass the directory that "
                               "`vitserve train` wrote (it holds encoder_spec.json and encoder.pt)")
    try:
        model, spec = load_encoder(run_dir)
    except (BackboneError, OSError, ValueError) as e:  # RunDirError is a ValueError
        raise ExportUsageError(f"cannot export run directory {run_dir}: {e}") from e
    return model.eval(), spec


def _dist(name: str) -> str | None:
    try:
        return _dist_version(name)
    except PackageNotFoundError:
        return None


def exporter_info(opset: int, backend: str) -> dict[str, Any]:
    """The manifest's ``exporter`` entry: versions of everything that shaped the graph, and the opset."""
    import onnx
    import onnxruntime
    import timm

    versions = {"torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                "vitserve": _dist("vitserve")}
    return {"versions": versions, "opset": int(opset), "torch_exporter": TORCH_EXPORTER,
            "backend": backend, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def tensor_layout(spec: EncoderSpec, architecture: dict[str, Any] | None = None,
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Manifest ``inputs`` and ``outputs``: name -> {dtype, shape (batch as -1), description}.

    ``architecture`` (``export.architecture.describe_architecture``) makes the descriptions say which
    prefix tokens were removed and whether the tokens carry a final norm; without it a standard
    final-norm ViT is assumed.
    """
    h, w = spec.img_size
    gh, gw = spec.grid_size
    d = spec.embed_dim
    arch = architecture or {"final_norm": True, "fc_norm": False, "global_pool": "token",
                            "prefix_tokens": ["cls"] * spec.num_prefix_tokens}
    cls_what, patch_what = output_descriptions(spec, arch)
    inputs = {INPUT_NAME: {"dtype": "uint8", "shape": [-1, h, w, spec.in_chans],
                           "description": "raw pixels NHWC; (x/255 - mean)/std is inside the graph"}}
    outputs = {
        "cls": {"dtype": "float32", "shape": [-1, d], "description": cls_what},
        "patch_tokens": {"dtype": "float32", "shape": [-1, gh * gw, d], "description": patch_what},
    }
    return inputs, outputs


def triton_config(name: str, spec: EncoderSpec, manifest: dict[str, Any], max_batch_size: int,
                  backend: str = "python", instance_count: int = 1, instance_kind: str = "CPU",
                  intra_op_threads: int = 0, max_queue_delay_us: int = 500) -> TritonModelConfig:
    """The typed Triton configuration of an exported encoder, carrying ``manifest`` as a parameter."""
    h, w = spec.img_size
    params = {MANIFEST_PARAMETER: json.dumps(manifest, separators=(",", ":"), sort_keys=True)}
    if backend == "python":
        params[triton_model.THREADS_PARAMETER] = str(intra_op_threads)
    elif intra_op_threads > 0:  # the onnxruntime backend's own knob
        params["intra_op_thread_count"] = str(intra_op_threads)
    return TritonModelConfig(
        name=name, backend=backend, max_batch_size=max_batch_size,
        inputs=(TensorSpec(INPUT_NAME, np.uint8, (h, w, spec.in_chans)),),
        outputs=(TensorSpec("cls", np.float32, (spec.embed_dim,)),
                 TensorSpec("patch_tokens", np.float32, (spec.num_patches, spec.embed_dim))),
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=max_queue_delay_us),
        instance_groups=(InstanceGroup(count=instance_count, kind=instance_kind),),
        parameters=params)


def export_encoder(
    model: nn.Module,
    spec: EncoderSpec,
    repository: str | Path,
    name: str,
    version: int = 1,
    force: bool = False,
    max_batch_size: int = 64,
    *,
    source: str | None = None,
    weights_sha256: str | None = None,
    parity_images: np.ndarray | None = None,
    tol: float = DEFAULT_TOLERANCE,
    opset: int = DEFAULT_OPSET,
    backend: str = "python",
    instance_count: int = 1,
    instance_kind: str = "CPU",
    intra_op_threads: int = 0,
    max_queue_delay_us: int = 500,
    probes: dict[str, Any] | None = None,
) -> Path:
    """Export ``model`` as ``repository/<name>`` (ONNX + parity gate + config + manifest); return its path.

    ``weights_sha256`` defaults to a hash of the state dict; ``parity_images`` to
    ``default_parity_images(spec)``. Raises ``ExportUsageError`` for bad arguments or an existing model
    (without ``force``), ``ExportError`` when the export fails its checks; either way nothing is left.
    """
    validate_model_name(name)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportUsageError(f"version must be an integer >= 1, got {version!r}")
    if max_batch_size < 1:
        raise ExportUsageError(f"max_batch_size must be >= 1, got {max_batch_size}")
    config_args = (max_batch_size, backend, instance_count, instance_kind, intra_op_threads,
                   max_queue_delay_us)
    try:
        triton_config(name, spec, {}, *config_args).validate()  # before the slow part
    except TritonConfigError as e:
        raise ExportUsageError(f"invalid Triton configuration: {e}") from e
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise ExportUsageError(f"model repository {repository} exists and is not a directory")
    repository.mkdir(parents=True, exist_ok=True)
    target = repository / name
    if target.exists() and not force:  # fail before the slow part; publish() re-checks atomically
        raise ExportUsageError(exists_message(target))

    architecture = describe_architecture(model, spec)  # raises for a family we do not understand
    with staging_directory(repository, name) as staging:
        version_dir = staging / str(version)
        version_dir.mkdir()
        onnx_path = export_onnx(model, spec, version_dir / "model.onnx", opset=opset)
        parity = check_parity(model, spec, onnx_path, parity_images, tol=tol)
        files = {f"{version}/model.onnx": sha256_file(onnx_path)}
        if backend == "python":
            shutil.copyfile(triton_model.__file__, version_dir / "model.py")
            files[f"{version}/model.py"] = sha256_file(version_dir / "model.py")
        inputs, outputs = tensor_layout(spec, architecture)
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "encoder_spec": spec.to_dict(),
            "architecture": architecture,
            "inputs": inputs,
            "outputs": outputs,
            "weights_sha256": weights_sha256 or state_dict_sha256(model),
            "files": files,
            "parity": parity,
            "exporter": exporter_info(opset, backend),
            "probes": dict(probes or {}),
            "source": source or f"in-memory {spec.model_name}",
        }
        pbtxt = triton_config(name, spec, manifest, *config_args).to_pbtxt()
        (staging / CONFIG_FILENAME).write_text(pbtxt)
        (staging / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
        fsync_tree(staging)
        publish(staging, target, force)
    log.info("exported %s version %d to %s", name, version, target)
    return target


def export_run(
    run_dir: str | Path,
    repository: str | Path,
    name: str | None = None,
    version: int = 1,
    force: bool = False,
    max_batch_size: int = 64,
    **options: Any,
) -> Path:
    """Export the encoder of a training run directory into ``repository``; return the model directory.

    ``name`` defaults to the run directory's name; ``options`` are ``export_encoder``'s keywords.
    """
    run_dir = Path(run_dir)
    name = validate_model_name(name) if name is not None else default_model_name(run_dir)
    model, spec = load_run_encoder(run_dir)
    weights = run_dir / WEIGHTS_FILENAME
    options.setdefault("weights_sha256", sha256_file(weights) if weights.is_file() else None)
    options.setdefault("source", str(run_dir.resolve()))
    return export_encoder(model, spec, repository, name, version, force, max_batch_size, **options)


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The manifest.json of an exported model directory."""
    return json.loads((Path(model_dir) / MANIFEST_FILENAME).read_text())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitserve export",
                                description="Export a training run's encoder into a Triton model repository.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `vitserve train`")
    p.add_argument("--repository", required=True, metavar="DIR", help="Triton model repository")
    p.add_argument("--name", help="model name (default: the run directory's name)")
    p.add_argument("--version", type=int, default=1, help="model version directory (default 1)")
    p.add_argument("--force", action="store_true", help="replace an existing model of that name")
    p.add_argument("--max-batch-size", type=int, default=64, help="Triton max_batch_size (default 64)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"parity gate: max abs error ONNX vs PyTorch (default {DEFAULT_TOLERANCE:g})")
    p.add_argument("--backend", choices=BACKENDS, default="python",
                   help="python: ORT inside Triton's Python backend (embedded server); "
                        "onnxruntime: Triton's native ORT backend (external Triton)")
    p.add_argument("--intra-op-threads", type=int, default=0,
                   help="ONNX Runtime threads per model instance (default 0: one per core)")
    p.add_argument("--variants", default="", metavar="KINDS",
                   help="comma-separated precision variants written as <name>_<suffix> beside the model: "
                        "int8-dynamic, int8-static, fp16 (each gated against fp32 PyTorch on Fashion-MNIST; "
                        "exit 1 when one misses its gate and is not written)")
    p.add_argument("--gate-images", type=int, default=1000, metavar="N",
                   help="variant gate: N Fashion-MNIST test images as k-NN queries, 2N train images as "
                        "the k-NN bank (default 1000)")
    p.add_argument("--force-variants", action="store_true",
                   help="write variants that miss the quality gate (their manifest says so)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``vitserve export RUN_DIR --repository DIR ...``: 0 on success, 2 on a user error, 1 on a failed check."""
    try:
        a = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse already printed the usage message
        return int(e.code or 0)
    try:
        from export.variants import parse_variants

        kinds = parse_variants(a.variants)
        if kinds and a.gate_images < 1:
            raise ExportUsageError(f"--gate-images must be >= 1, got {a.gate_images}")
        model_dir = export_run(a.run_dir, a.repository, a.name, a.version, a.force, a.max_batch_size,
                               tol=a.tolerance, backend=a.backend, intra_op_threads=a.intra_op_threads)
    except ExportUsageError as e:
        print(f"vitserve export: error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"vitserve export: export failed: {e}", file=sys.stderr)
        return 1
    parity = read_manifest(model_dir)["parity"]
    errs = " ".join(f"{k}={v:.2e}" for k, v in parity["max_abs_err"].items())
    print(f"{model_dir}  version {a.version}  parity max_abs_err {errs} "
          f"({parity['n_images']} images, {parity['data']}, tol {parity['tolerance']:g})")
    return _export_variants_cli(a, model_dir, kinds) if kinds else 0


def _export_variants_cli(a: argparse.Namespace, model_dir: Path, kinds: list[str]) -> int:
    """Variants of the model just exported; 1 when one missed its gate and was not written."""
    from export.variants import VariantGate, export_variants

    model, spec = load_run_encoder(a.run_dir)
    try:
        gate = VariantGate(n_eval=a.gate_images, n_knn_train=2 * a.gate_images)
        results = export_variants(model, spec, model_dir, kinds, a.force_variants, a.force, gate)
    except ExportUsageError as e:
        print(f"vitserve export: error: {e}", file=sys.stderr)
        return 2
    except (ExportError, OSError, RuntimeError) as e:
        print(f"vitserve export: variant export failed: {e}", file=sys.stderr)
        return 1
    for r in results:
        cos = " ".join(f"{k}={v:.4f}" for k, v in r.figures["mean_cosine"].items())
        knn = r.figures.get("knn")
        knn_text = f" knn_drop={knn['drop_points']:+.2f}pt" if knn else ""
        where = str(r.path) if r.written else "NOT written"
        print(f"{r.name} ({r.kind}): {where}  cosine {cos}{knn_text}  {r.reason}"
              + ("  (forced)" if r.written and not r.passed else ""),
              file=sys.stdout if r.written else sys.stderr)
    return 0 if all(r.written for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
