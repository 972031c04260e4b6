"""Write an encoder into a Triton model repository: every entry staged, checked, then published at once.

``export_entries`` is the export (``vitserve export`` calls it, through ``export_run`` for a run
directory): one ONNX graph per resolution bucket, each through the parity gate
(``export.gate.check_parity``), one entry per bucket and lane with its config and manifest
(``export.entry``), all built in hidden staging directories beside the repository
(``export.publish.Staging``) and moved in only once every one passed its checks. A failed export
leaves nothing behind; an existing entry is replaced only with ``force``, by an atomic exchange where
the kernel offers one. ``add_version`` adds a version directory to existing entries instead
(``export.versions``: same config required; the manifest gains a ``versions`` record).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from contract.manifest import Manifest
from export import model as triton_model
from export.architecture import describe_architecture
from export.attention import attention_heads
from export.buckets import bucket_names, bucket_table, resize_encoder
from export.entry import entry_manifest, exporter_info, lane_entry_name, triton_config
from export.errors import ExportUsageError
from export.gate import check_parity, resize_images
from export.layout import MODEL_PY_FILENAME, ONNX_FILENAME, default_model_name, validate_model_name
from export.onnx_export import export_onnx
from export.options import ExportOptions
from export.outputs import output_dims, validate_selection
from export.preprocessing import check_preprocessing, default_preprocessing
from export.publish import Staging, refuse_existing
from export.sources import EncoderSource, load_run_encoder, state_dict_sha256
from export.triton_config import TritonConfigError
from export.versions import ExistingEntry, check_compatible, merge_version, publish_versions, read_existing_entry

log = logging.getLogger(__name__)


def export_entries(encoder: EncoderSource, repository: str | Path, name: str,
                   options: ExportOptions = ExportOptions()) -> list[Path]:
    """Export ``encoder`` into ``repository``: one entry per resolution bucket and lane; return their paths.

    The first path is ``repository/<name>`` (first resolution, throughput lane). Each bucket is its
    own ONNX graph with its own parity gate; a lane entry holds the same graph as its bucket with
    other batching. The weights hash defaults to a hash of the state dict; the parity images to
    ``export.gate.default_parity_images`` (resized for other buckets); the preprocessing (the manifest
    entry the gateway reads, ``export.preprocessing``) to a plain bilinear resize that says so.
    Raises ``ExportUsageError`` for bad arguments or an existing entry (without ``force``),
    ``ExportError`` when a check fails; in both cases nothing is published (all entries are staged
    and checked before the first one is moved in).

    ``options.add_version`` adds ``options.version`` to entries that already exist instead of writing
    new ones (``force`` then replaces only that version directory): every entry must exist, its config
    must equal the one this export generates except for the manifest (``config_differences``), and its
    manifest gains a ``versions`` record (``merge_version``); see ``publish_versions`` for the order.
    """
    model, spec, triton = encoder.model, encoder.spec, options.triton
    validate_model_name(name)
    options.check()
    version, selection = options.version, options.outputs
    lane_list: list[str | None] = ["throughput", "latency"] if options.lanes else [None]
    try:
        for lane in lane_list:  # before the slow part
            triton_config(name, spec, Manifest(), triton, lane=lane).validate()
    except TritonConfigError as e:
        raise ExportUsageError(f"invalid Triton configuration: {e}") from e
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise ExportUsageError(f"model repository {repository} exists and is not a directory")

    architecture = describe_architecture(model, spec)  # raises for a family we do not understand
    validate_selection(selection, spec, architecture["prefix_tokens"])
    if selection.attention:  # only then: the manifests of other exports stay as they were
        architecture["attention_heads"] = attention_heads(model)
    sizes = [tuple(s) for s in options.resolutions] if options.resolutions else [tuple(spec.img_size)]
    bucket_entries = bucket_names(name, sizes)
    encoders = [resize_encoder(model, spec, s) for s in sizes]  # fails fast on a bad size
    buckets = bucket_table(bucket_entries, [s for _, s in encoders]) if options.resolutions else None
    entry_name = {(i, lane): lane_entry_name(b, lane) for i, b in enumerate(bucket_entries) for lane in lane_list}
    for n in entry_name.values():
        validate_model_name(n)
    existing: dict[str, ExistingEntry] = {}
    if options.add_version:  # every entry must be there; nothing is created before the checks pass
        if not repository.is_dir():
            raise ExportUsageError(f"--add-version: model repository {repository} does not exist; "
                                   "export the model first without --add-version")
        existing = {n: read_existing_entry(repository / n, version, options.force) for n in entry_name.values()}
    else:
        repository.mkdir(parents=True, exist_ok=True)
        refuse_existing([repository / n for n in entry_name.values()], options.force)

    weights_hash = encoder.weights_sha256 or state_dict_sha256(model)
    preprocessing = dict(encoder.preprocessing) if encoder.preprocessing else default_preprocessing(spec)
    check_preprocessing(preprocessing, spec)

    def entry_files(i: int, lane: str | None, files: dict[str, str], parity: dict[str, Any]
                    ) -> tuple[Manifest, str]:
        """The manifest and config.pbtxt text of entry (bucket ``i``, ``lane``)."""
        bucket_spec = encoders[i][1]
        entry = entry_name[(i, lane)]
        manifest = entry_manifest(
            name=entry, version=version, spec=bucket_spec, architecture=architecture, selection=selection,
            weights_sha256=weights_hash, files=files, parity=parity,
            exporter={**exporter_info(options.opset, triton.backend), "target": triton.resolved_target},
            # probe scores were measured at the encoder's own size; other buckets get none
            probes=dict(encoder.probes or {}) if tuple(bucket_spec.img_size) == tuple(spec.img_size) else {},
            source=encoder.source or f"in-memory {spec.model_name}", preprocessing=preprocessing,
            weights=encoder.weights, buckets=buckets, lane=lane,
            lanes={ln: entry_name[(i, ln)] for ln in ("throughput", "latency")} if lane is not None else None)
        if options.add_version:
            manifest = merge_version(existing[entry].manifest, manifest, version)
        dims = output_dims(bucket_spec, architecture, selection)
        pbtxt = triton_config(entry, bucket_spec, manifest, triton, outputs=dims, lane=lane).to_pbtxt()
        if options.add_version:
            check_compatible(existing[entry], manifest, pbtxt, version)
        return manifest, pbtxt

    if options.add_version:  # refuse an incompatible entry before the slow part (and again once staged)
        for i, lane in entry_name:
            entry_files(i, lane, {}, {})
    with Staging(repository, version, options.force) as staging:
        for i, (bucket_model, bucket_spec) in enumerate(encoders):
            onnx_path: Path | None = None
            parity: dict[str, Any] = {}
            for lane in lane_list:
                staged = staging.entry(entry_name[(i, lane)])
                if onnx_path is None:
                    onnx_path = export_onnx(bucket_model, bucket_spec, staged.version_dir / ONNX_FILENAME,
                                            opset=options.opset, selection=selection)
                    images = (None if options.parity_images is None
                              else resize_images(options.parity_images, bucket_spec.img_size))
                    parity = check_parity(bucket_model, bucket_spec, onnx_path, images, tol=options.tol,
                                          selection=selection)
                    if tuple(bucket_spec.img_size) != tuple(spec.img_size):
                        parity["position_embedding"] = (
                            f"resampled from grid {list(spec.grid_size)} to {list(bucket_spec.grid_size)} "
                            "by timm set_input_size/resample_abs_pos_embed; reference: the resampled "
                            "PyTorch model")
                    staged.add_file(ONNX_FILENAME)
                else:
                    staged.add_file(ONNX_FILENAME, onnx_path)
                if triton.backend == "python":
                    staged.add_file(MODEL_PY_FILENAME, Path(triton_model.__file__))
                staged.finish(*entry_files(i, lane, staged.files, parity))
        if options.add_version:
            paths = publish_versions(staging.entries, existing, version, options.force)
        else:  # every entry passed its checks: move them in
            paths = staging.publish()
    for path in paths:
        log.info("exported %s version %d to %s", path.name, version, path)
    return paths


def export_run(run_dir: str | Path, repository: str | Path, name: str | None = None,
               options: ExportOptions = ExportOptions()) -> list[Path]:
    """Export the encoder of a training run directory into ``repository``; return the entries written.

    ``name`` defaults to the run directory's name. The run's ``probes.json`` (``vitserve probe
    --write-run``), when present, goes verbatim into the manifest's ``probes``.
    """
    name = validate_model_name(name) if name is not None else default_model_name(run_dir)
    return export_entries(load_run_encoder(run_dir), repository, name, options)
