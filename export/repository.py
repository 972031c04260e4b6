"""Write one exported encoder into a Triton model repository, atomically (``vitserve export``).

Layout (docs/CONTRACTS.md)::

    REPO/<name>/config.pbtxt          generated from export.triton_config, carries the manifest
    REPO/<name>/manifest.json         encoder spec, tensors, hashes, parity, exporter versions
    REPO/<name>/<version>/model.onnx  uint8 [N, H, W, C] -> cls [N, D], patch_tokens [N, h*w, D]
    REPO/<name>/<version>/model.py    Triton Python-backend model (export/model.py, verbatim)

Everything is built in a hidden staging directory beside the repository (same file system; Triton
would try to load anything inside it), checked (ONNX checker, parity gate), then renamed into place in one step. A
failed export leaves nothing behind; an existing model is replaced only with ``force=True``, by an
atomic exchange where the kernel offers one. ``add_version=True`` adds a version directory to
existing entries instead (same config required; the manifest gains a ``versions`` record).
"""

from __future__ import annotations

import contextlib
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
from export.buckets import bucket_names, bucket_table, resize_encoder
from export.onnx_export import (DEFAULT_OPSET, DEFAULT_TOLERANCE, INPUT_NAME, TORCH_EXPORTER,
                                ExportUsageError, check_parity, export_onnx)
from export.outputs import DEFAULT_SELECTION, OutputSelection, describe_outputs, output_dims, validate_selection
from export.preprocessing import check_preprocessing, default_preprocessing
from export.publish import exists_message, fsync_tree, publish, staging_directory
from export.triton_config import (BACKENDS, DynamicBatching, GpuAccelerator, InstanceGroup, TensorSpec,
                                  TritonConfigError, TritonModelConfig, VersionPolicy,
                                  parse_pbtxt)
from training.backbone import BackboneError, EncoderSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILENAME = "manifest.json"
CONFIG_FILENAME = "config.pbtxt"
MANIFEST_PARAMETER = "vitserve_manifest"
WEIGHTS_FILENAME = "encoder.pt"  # training.run_dir.ENCODER_FILENAME
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
LANES = ("throughput", "latency")
LATENCY_SUFFIX = "_latency"
LATENCY_PREFERRED = (1, 2, 4)        # latency lane: answer alone or with the few requests already there
THROUGHPUT_PREFERRED = (8, 16, 32)   # throughput lane: wait (max_queue_delay) to fill larger batches


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
                  selection: OutputSelection | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Manifest ``inputs`` and ``outputs``: name -> {dtype, shape (batch as -1), description, ...}.

    ``architecture`` (``export.architecture.describe_architecture``) makes the descriptions say which
    prefix tokens were removed and whether the tokens carry a final norm; without it a standard
    final-norm ViT is assumed. Each output also states its ``block``, ``layer``, ``final_norm``,
    ``tokens`` range and ``pooling`` (``export.outputs.describe_outputs``).
    """
    h, w = spec.img_size
    arch = architecture or {"final_norm": True, "fc_norm": False, "global_pool": "token",
                            "prefix_tokens": ["cls"] * spec.num_prefix_tokens}
    cls_what, patch_what = output_descriptions(spec, arch)
    inputs = {INPUT_NAME: {"dtype": "uint8", "shape": [-1, h, w, spec.in_chans],
                           "description": "raw pixels NHWC; (x/255 - mean)/std is inside the graph"}}
    outputs = describe_outputs(spec, arch, selection or DEFAULT_SELECTION, cls_what, patch_what)
    return inputs, outputs


def lane_batching(lane: str | None, max_batch_size: int, max_queue_delay_us: int) -> DynamicBatching:
    """Dynamic batching of a lane: none given -> ``max_queue_delay_us`` without preferred sizes;
    ``throughput`` -> the same delay, preferred 8/16/32; ``latency`` -> no delay, preferred 1/2/4
    (sizes above ``max_batch_size`` dropped)."""
    if lane is None:
        return DynamicBatching(max_queue_delay_microseconds=max_queue_delay_us)
    if lane not in LANES:
        raise ExportUsageError(f"lane {lane!r} is not one of {list(LANES)}")
    preferred, delay = ((LATENCY_PREFERRED, 0) if lane == "latency"
                        else (THROUGHPUT_PREFERRED, max_queue_delay_us))
    sizes = tuple(b for b in preferred if b <= max_batch_size) or (max_batch_size,)
    return DynamicBatching(max_queue_delay_microseconds=delay, preferred_batch_size=sizes)


def manifest_parameter(manifest: dict[str, Any]) -> str:
    """The manifest as the config's ``vitserve_manifest`` parameter (compact, keys sorted)."""
    return json.dumps(manifest, separators=(",", ":"), sort_keys=True)


def config_with_manifest(config_text: str, manifest: dict[str, Any], name: str | None = None) -> str:
    """``config_text`` (a config.pbtxt) with ``manifest`` as its ``vitserve_manifest`` parameter
    (and ``name`` as the model's name, when given): an entry derived from another one's config."""
    from google.protobuf import text_format

    config = parse_pbtxt(config_text)
    if name is not None:
        config.name = name
    config.parameters[MANIFEST_PARAMETER].string_value = manifest_parameter(manifest)
    return text_format.MessageToString(config)


def triton_config(name: str, spec: EncoderSpec, manifest: dict[str, Any], max_batch_size: int,
                  backend: str = "python", instance_count: int = 1, instance_kind: str = "CPU",
                  intra_op_threads: int = 0, max_queue_delay_us: int = 500, *,
                  outputs: Sequence[tuple[str, tuple[int, ...]]] | None = None, lane: str | None = None,
                  version_policy: VersionPolicy | None = None,
                  gpu_accelerators: Sequence[GpuAccelerator] = (),
                  cc_model_filenames: Sequence[tuple[str, str]] = ()) -> TritonModelConfig:
    """The typed Triton configuration of an exported encoder, carrying ``manifest`` as a parameter.

    ``outputs`` (name, dims) default to ``cls`` and ``patch_tokens``; ``lane`` picks the batching
    (``lane_batching``); ``version_policy`` and ``gpu_accelerators`` are for the production target;
    ``cc_model_filenames`` ((compute capability, engine file) pairs) for ``backend="tensorrt"``.
    """
    h, w = spec.img_size
    params = {MANIFEST_PARAMETER: manifest_parameter(manifest)}
    if backend == "python":
        params[triton_model.THREADS_PARAMETER] = str(intra_op_threads)
    elif intra_op_threads > 0:  # the onnxruntime backend's own knob
        params["intra_op_thread_count"] = str(intra_op_threads)
    if outputs is None:
        outputs = [("cls", (spec.embed_dim,)), ("patch_tokens", (spec.num_patches, spec.embed_dim))]
    return TritonModelConfig(
        name=name, backend=backend, max_batch_size=max_batch_size,
        inputs=(TensorSpec(INPUT_NAME, np.uint8, (h, w, spec.in_chans)),),
        outputs=tuple(TensorSpec(n, np.float32, tuple(d)) for n, d in outputs),
        dynamic_batching=lane_batching(lane, max_batch_size, max_queue_delay_us),
        instance_groups=(InstanceGroup(count=instance_count, kind=instance_kind),),
        parameters=params, version_policy=version_policy, gpu_accelerators=tuple(gpu_accelerators),
        cc_model_filenames=tuple((str(cc), str(f)) for cc, f in cc_model_filenames))


def _resized_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` bilinearly resized to ``size`` (parity images for another bucket)."""
    if tuple(images.shape[1:3]) == tuple(size):
        return images
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def export_encoder(model: nn.Module, spec: EncoderSpec, repository: str | Path, name: str,
                   version: int = 1, force: bool = False, max_batch_size: int = 64, **options: Any) -> Path:
    """Export ``model`` as ``repository/<name>`` (ONNX + parity gate + config + manifest); return its path.

    ``options`` are ``export_entries``' keywords; with resolution buckets or lanes the other entries
    are written beside it (``export_entries`` returns them all).
    """
    return export_entries(model, spec, repository, name, version, force, max_batch_size, **options)[0]


def export_entries(
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
    selection: OutputSelection | None = None,
    resolutions: Sequence[tuple[int, int]] | None = None,
    lanes: bool = False,
    version_policy: VersionPolicy | None = None,
    gpu_accelerators: Sequence[GpuAccelerator] = (),
    target: str | None = None,
    weights: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
    add_version: bool = False,
) -> list[Path]:
    """Export ``model`` into ``repository``: one entry per resolution bucket and lane; return their paths.

    The first path is ``repository/<name>`` (first resolution, throughput lane). Each bucket is its
    own ONNX graph with its own parity gate; a lane entry holds the same graph as its bucket with
    other batching. ``weights_sha256`` defaults to a hash of the state dict; ``parity_images`` to
    ``default_parity_images(spec)`` (resized for other buckets); ``preprocessing`` (the manifest
    entry the gateway reads, ``export.preprocessing``) to a plain bilinear resize that says so.
    Raises ``ExportUsageError`` for bad arguments or an existing entry (without ``force``),
    ``ExportError`` when a check fails; in both cases nothing is published (all entries are staged
    and checked before the first one is moved in).

    ``add_version`` adds ``version`` to entries that already exist instead of writing new ones
    (``force`` then replaces only that version directory): every entry must exist, its config must
    equal the one this export generates except for the manifest (``config_differences``), and its
    manifest gains a ``versions`` record (``merge_version``); see ``publish_versions`` for the order.
    """
    validate_model_name(name)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportUsageError(f"version must be an integer >= 1, got {version!r}")
    if max_batch_size < 1:
        raise ExportUsageError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if backend not in BACKENDS:
        raise ExportUsageError(f"backend {backend!r} is not one of {BACKENDS} for an ONNX export "
                               "(TensorRT engines: export.tensorrt_engine.export_tensorrt)")
    selection = selection or DEFAULT_SELECTION
    target = target or ("production" if backend == "onnxruntime" else "embedded")
    config_args = (max_batch_size, backend, instance_count, instance_kind, intra_op_threads,
                   max_queue_delay_us)
    config_kw = {"version_policy": version_policy, "gpu_accelerators": tuple(gpu_accelerators)}
    lane_list: list[str | None] = ["throughput", "latency"] if lanes else [None]
    try:
        for lane in lane_list:  # before the slow part
            triton_config(name, spec, {}, *config_args, lane=lane, **config_kw).validate()
    except TritonConfigError as e:
        raise ExportUsageError(f"invalid Triton configuration: {e}") from e
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise ExportUsageError(f"model repository {repository} exists and is not a directory")

    architecture = describe_architecture(model, spec)  # raises for a family we do not understand
    validate_selection(selection, spec, architecture["prefix_tokens"])
    sizes = [tuple(s) for s in resolutions] if resolutions else [tuple(spec.img_size)]
    bucket_entries = bucket_names(name, sizes)
    encoders = [resize_encoder(model, spec, s) for s in sizes]  # fails fast on a bad size
    buckets = bucket_table(bucket_entries, [s for _, s in encoders]) if resolutions else None
    entries = [(b, lane, i) for i, b in enumerate(bucket_entries) for lane in lane_list]
    entry_name = {(i, lane): b + (LATENCY_SUFFIX if lane == "latency" else "") for b, lane, i in entries}
    for n in entry_name.values():
        validate_model_name(n)
    from export.versions import ExistingEntry, check_compatible, merge_version, publish_versions, read_existing_entry

    existing: dict[str, ExistingEntry] = {}
    if add_version:  # every entry must be there; nothing is created before the checks pass
        if not repository.is_dir():
            raise ExportUsageError(f"--add-version: model repository {repository} does not exist; "
                                   "export the model first without --add-version")
        existing = {n: read_existing_entry(repository / n, version, force) for n in entry_name.values()}
    else:
        repository.mkdir(parents=True, exist_ok=True)
        for n in entry_name.values():
            if (repository / n).exists() and not force:  # fail before the slow part; publish() re-checks
                raise ExportUsageError(exists_message(repository / n))

    weights_hash = weights_sha256 or state_dict_sha256(model)
    preprocessing = dict(preprocessing) if preprocessing else default_preprocessing(spec)
    check_preprocessing(preprocessing, spec)

    def entry_files(i: int, lane: str | None, files: dict[str, str], parity: dict[str, Any]
                    ) -> tuple[dict[str, Any], str]:
        """The manifest and config.pbtxt text of entry (bucket ``i``, ``lane``)."""
        bucket_spec = encoders[i][1]
        entry = entry_name[(i, lane)]
        inputs, outputs = tensor_layout(bucket_spec, architecture, selection)
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": entry,
            "version": version,
            "encoder_spec": bucket_spec.to_dict(),
            "architecture": architecture,
            "inputs": inputs,
            "outputs": outputs,
            "weights_sha256": weights_hash,
            "files": files,
            "parity": parity,
            "exporter": {**exporter_info(opset, backend), "target": target},
            # probe scores were measured at the encoder's own size; other buckets get none
            "probes": dict(probes or {}) if tuple(bucket_spec.img_size) == tuple(spec.img_size) else {},
            "source": source or f"in-memory {spec.model_name}",
            "preprocessing": preprocessing,
        }
        if weights:
            manifest["weights"] = dict(weights)
        if buckets is not None:
            manifest["buckets"] = buckets
            manifest["bucket"] = {"size": list(bucket_spec.img_size), "grid": list(bucket_spec.grid_size)}
        if lane is not None:
            manifest["lanes"] = {"throughput": entry_name[(i, "throughput")],
                                 "latency": entry_name[(i, "latency")]}
            manifest["lane"] = lane
        if add_version:
            manifest = merge_version(existing[entry].manifest, manifest, version)
        dims = output_dims(bucket_spec, architecture, selection)
        pbtxt = triton_config(entry, bucket_spec, manifest, *config_args, outputs=dims, lane=lane,
                              **config_kw).to_pbtxt()
        if add_version:
            check_compatible(existing[entry], manifest, pbtxt, version)
        return manifest, pbtxt

    if add_version:  # refuse an incompatible entry before the slow part (and again once staged)
        for i, lane in entry_name:
            entry_files(i, lane, {}, {})
    staged: list[tuple[Path, Path]] = []
    with contextlib.ExitStack() as stack:
        for i, (bucket_model, bucket_spec) in enumerate(encoders):
            images = None if parity_images is None else _resized_images(parity_images, bucket_spec.img_size)
            onnx_path: Path | None = None
            parity: dict[str, Any] = {}
            for lane in lane_list:
                entry = entry_name[(i, lane)]
                staging = stack.enter_context(staging_directory(repository, entry))
                version_dir = staging / str(version)
                version_dir.mkdir()
                if onnx_path is None:
                    onnx_path = export_onnx(bucket_model, bucket_spec, version_dir / "model.onnx", opset=opset,
                                            selection=selection)
                    parity = check_parity(bucket_model, bucket_spec, onnx_path, images, tol=tol,
                                          selection=selection)
                    if tuple(bucket_spec.img_size) != tuple(spec.img_size):
                        parity["position_embedding"] = (
                            f"resampled from grid {list(spec.grid_size)} to {list(bucket_spec.grid_size)} "
                            "by timm set_input_size/resample_abs_pos_embed; reference: the resampled "
                            "PyTorch model")
                else:
                    shutil.copyfile(onnx_path, version_dir / "model.onnx")
                files = {f"{version}/model.onnx": sha256_file(version_dir / "model.onnx")}
                if backend == "python":
                    shutil.copyfile(triton_model.__file__, version_dir / "model.py")
                    files[f"{version}/model.py"] = sha256_file(version_dir / "model.py")
                manifest, pbtxt = entry_files(i, lane, files, parity)
                (staging / CONFIG_FILENAME).write_text(pbtxt)
                (staging / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
                fsync_tree(staging)
                staged.append((staging, repository / entry))
        if add_version:
            publish_versions(staged, existing, version, force)
        else:
            for staging, target_dir in staged:  # every entry passed its checks: move them in
                publish(staging, target_dir, force)
    for _, target_dir in staged:
        log.info("exported %s version %d to %s", target_dir.name, version, target_dir)
    return [t for _, t in staged]


# --- adding a version to an existing entry (--add-version) -------------------------------------

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

    ``name`` defaults to the run directory's name; ``options`` are ``export_entries``' keywords.
    The run's ``probes.json`` (``vitserve probe --write-run``), when present, goes verbatim into the
    manifest's ``probes``.
    """
    return export_run_entries(run_dir, repository, name, version, force, max_batch_size, **options)[0]


def export_run_entries(run_dir: str | Path, repository: str | Path, name: str | None = None,
                       version: int = 1, force: bool = False, max_batch_size: int = 64,
                       **options: Any) -> list[Path]:
    """``export_run`` returning every entry written (resolution buckets, lanes)."""
    from export.preprocessing import run_preprocessing
    from export.sources import read_probes

    run_dir = Path(run_dir)
    name = validate_model_name(name) if name is not None else default_model_name(run_dir)
    model, spec = load_run_encoder(run_dir)
    weights = run_dir / WEIGHTS_FILENAME
    options.setdefault("weights_sha256", sha256_file(weights) if weights.is_file() else None)
    options.setdefault("source", str(run_dir.resolve()))
    options.setdefault("probes", read_probes(run_dir))
    options.setdefault("preprocessing", run_preprocessing(run_dir, spec))
    return export_entries(model, spec, repository, name, version, force, max_batch_size, **options)


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The manifest.json of an exported model directory."""
    return json.loads((Path(model_dir) / MANIFEST_FILENAME).read_text())


def main(argv: Sequence[str] | None = None) -> int:
    """``vitserve export``; see ``export.cli.main``."""
    from export.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
