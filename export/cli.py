"""``vitserve export``: a thin command line over the library the tests call.

The options become an ``export.options.ExportOptions``; the weights are loaded by
``export.sources.load_run_encoder`` (positional ``RUN_DIR``) or ``load_timm_encoder`` (``--timm`` with a
local checkpoint file or timm's pretrained tag), exported by ``export.repository.export_entries``,
then (when asked) turned into precision variants (``export.variants``) and TensorRT engines
(``export.tensorrt_engine``). Exit codes: 0 success, 2 a user error (bad option,
existing model, checkpoint that does not fit), 1 a failed check (parity, variant gate, TensorRT
requested but unavailable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from contract.manifest import Manifest
from export.buckets import parse_resolutions, resize_encoder
from export.errors import ExportError, ExportUsageError
from export.gate import DEFAULT_TOLERANCE, VariantGate
from export.hub import check_pretrained, offline_hub
from export.layout import default_model_name, validate_model_name
from export.options import TARGETS, ExportOptions, TritonOptions
from export.outputs import OutputSelection, parse_layers
from export.repository import export_entries
from export.sources import EncoderSource, load_run_encoder, load_timm_encoder
from export.tensorrt_engine import export_tensorrt, tensorrt_unavailable_reason
from export.triton_config import BACKENDS, GpuAccelerator, VersionPolicy
from export.variants import export_variants, parse_variants
from training.backbone import EncoderSpec, parse_override_value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitserve export",
        description="Export an encoder (a training run, or a timm ViT with a checkpoint file or pretrained "
                    "tag) into a Triton model repository, with a parity gate against PyTorch.")
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="run directory written by `vitserve train`")
    p.add_argument("--repository", required=True, metavar="DIR", help="Triton model repository")
    p.add_argument("--name", help="model name (default: the run directory's or timm model's name)")
    p.add_argument("--version", type=int, default=1, help="model version directory (default 1)")
    p.add_argument("--force", action="store_true", help="replace existing models of those names "
                   "(with --add-version: replace only that version directory)")
    p.add_argument("--add-version", action="store_true",
                   help="add --version N to existing entries instead of writing new ones (same config "
                        "required: repeat the entries' export options)")
    p.add_argument("--max-batch-size", type=int, default=64, help="Triton max_batch_size (default 64)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"parity gate: max abs error ONNX vs PyTorch (default {DEFAULT_TOLERANCE:g})")
    src = p.add_argument_group("weights from timm instead of a run directory")
    src.add_argument("--timm", metavar="NAME", help="timm model name, e.g. vit_small_patch14_reg4_dinov2")
    src.add_argument("--checkpoint", metavar="FILE", help="weights file (.safetensors, .pt, .pth, .bin), "
                     "loaded with timm's load_checkpoint and the family's checkpoint filter")
    src.add_argument("--pretrained", action="store_true",
                     help="timm's pretrained weights (needs network access or the Hugging Face cache)")
    src.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                     help="timm.create_model keyword, e.g. img_size=224 (repeatable)")
    out = p.add_argument_group("outputs (cls and patch_tokens are always there, unchanged)")
    out.add_argument("--layers", default="", metavar="I,J",
                     help="extra outputs patch_tokens_l<I>: patch tokens after those blocks (negative: "
                          "from the end, e.g. -2 = penultimate)")
    out.add_argument("--no-final-norm", action="store_true",
                     help="extra outputs without the model's final norm (alone: adds patch_tokens_l-1 un-normed)")
    out.add_argument("--registers", action="store_true", help="extra output registers [N, R, D]")
    out.add_argument("--mean-pooled", action="store_true", help="extra output mean_patch [N, D]")
    out.add_argument("--attention", action="store_true",
                     help="extra output cls_attention [N, heads, h*w]: the last block's CLS-query softmax "
                          "weights over the patch keys (prefix columns dropped)")
    out.add_argument("--resolutions", default="", metavar="S,S",
                     help="resolution buckets, e.g. 224,336 or 224x320: one entry per size (<name> for the "
                          "first, <name>_r<S> for the others), position embeddings resampled")
    tri = p.add_argument_group("Triton configuration")
    tri.add_argument("--target", choices=TARGETS, default="embedded",
                     help="embedded: Python backend running ORT (vitserve serve); production: native "
                          "onnxruntime_onnx backend for an NGC Triton (default embedded)")
    tri.add_argument("--backend", choices=BACKENDS, default=None,
                     help="override the target's backend (python or onnxruntime)")
    tri.add_argument("--instance-kind", choices=("CPU", "GPU"), default=None,
                     help="instance group kind (default: CPU embedded, GPU production)")
    tri.add_argument("--instance-count", type=int, default=1, help="instances per group (default 1)")
    tri.add_argument("--trt-accelerator", choices=("none", "fp16", "fp32"), default="none",
                     help="production: ORT's TensorRT execution accelerator at that precision")
    tri.add_argument("--version-policy", default=None, metavar="POLICY",
                     help="latest[:N] | all | specific:1,2 (default: Triton's, latest 1)")
    tri.add_argument("--lanes", action="store_true",
                     help="also write <name>_latency (no queue delay, preferred batches 1,2,4); <name> "
                          "becomes the throughput lane (preferred 8,16,32)")
    tri.add_argument("--max-queue-delay-us", type=int, default=500,
                     help="dynamic batching delay of the (throughput) entry in microseconds (default 500)")
    tri.add_argument("--intra-op-threads", type=int, default=0,
                     help="ONNX Runtime threads per model instance (default 0: one per core)")
    tri.add_argument("--tensorrt", action="store_true",
                     help="also build TensorRT engines (needs the tensorrt package and a GPU; exit 1 otherwise)")
    var = p.add_argument_group("precision variants")
    var.add_argument("--variants", default="", metavar="KINDS",
                     help="comma-separated precision variants written as <name>_<suffix> beside the model: "
                          "int8-dynamic, int8-static, fp16 (every output gated against fp32 PyTorch on "
                          "Fashion-MNIST; exit 1 when one misses its gate and is not written)")
    var.add_argument("--gate-images", type=int, default=1000, metavar="N",
                     help="variant gate: N Fashion-MNIST test images as k-NN queries, 2N train images as "
                          "the k-NN bank (default 1000)")
    var.add_argument("--gate-max-abs-err", type=float, default=None, metavar="E",
                     help="variant gate: also require max abs error <= E on every output (default: recorded only)")
    var.add_argument("--force-variants", action="store_true",
                     help="write variants that miss the quality gate (their manifest says so)")
    return p


def parse_version_policy(text: str | None) -> VersionPolicy | None:
    """``latest`` / ``latest:2`` / ``all`` / ``specific:1,3`` -> ``VersionPolicy``."""
    if not text:
        return None
    kind, _, rest = text.partition(":")
    try:
        if kind == "latest":
            return VersionPolicy("latest", num_versions=int(rest or 1))
        if kind == "all" and not rest:
            return VersionPolicy("all")
        if kind == "specific" and rest:
            return VersionPolicy("specific", versions=tuple(int(v) for v in rest.split(",")))
    except ValueError:
        pass
    raise ExportUsageError(f"--version-policy must be latest[:N], all or specific:V1,V2; got {text!r}")


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ExportUsageError(f"--override takes KEY=VALUE, got {pair!r}")
        out[key] = parse_override_value(text)
    return out


def export_options(a: argparse.Namespace) -> ExportOptions:
    """The ``ExportOptions`` of the parsed command line (raises ``ExportUsageError``)."""
    layers = parse_layers(a.layers) if a.layers else ()
    if a.no_final_norm and not layers:
        layers = (-1,)
    selection = OutputSelection(layers=layers, final_norm=not a.no_final_norm, registers=a.registers,
                                mean_patch=a.mean_pooled, attention=a.attention)
    if a.target == "production" and a.backend == "python":
        raise ExportUsageError("--target production uses the onnxruntime backend; drop --backend python")
    backend = a.backend or ("onnxruntime" if a.target == "production" else "python")
    target = "production" if backend == "onnxruntime" else "embedded"  # --backend onnxruntime alone too
    kind = a.instance_kind or ("GPU" if a.target == "production" else "CPU")
    accelerators: tuple[GpuAccelerator, ...] = ()
    if a.trt_accelerator != "none":
        if target != "production":
            raise ExportUsageError("--trt-accelerator is for --target production")
        accelerators = (GpuAccelerator("tensorrt", (("precision_mode", a.trt_accelerator.upper()),
                                                    ("max_workspace_size_bytes", str(1 << 30)))),)
    triton = TritonOptions(max_batch_size=a.max_batch_size, backend=backend, instance_count=a.instance_count,
                           instance_kind=kind, intra_op_threads=a.intra_op_threads,
                           max_queue_delay_us=a.max_queue_delay_us,
                           version_policy=parse_version_policy(a.version_policy),
                           gpu_accelerators=accelerators, target=target)
    return ExportOptions(version=a.version, force=a.force, add_version=a.add_version, outputs=selection,
                         resolutions=parse_resolutions(a.resolutions) if a.resolutions else None,
                         lanes=a.lanes, triton=triton, tol=a.tolerance, attention=a.attention)


def _load(a: argparse.Namespace) -> tuple[EncoderSource, str]:
    """The encoder to export (a run directory or a timm model) and its default entry name."""
    if a.timm:
        if a.run_dir:
            raise ExportUsageError("pass either RUN_DIR or --timm NAME, not both")
        overrides = _overrides(a.override)
        plan = check_pretrained(a.timm) if a.pretrained and not a.checkpoint else None  # seconds, not the
        # hub's minute of retries; cached weights and no hub: read the cache at once (offline mode)
        with offline_hub(plan is not None and plan.cached is not None and plan.offline_reason is not None):
            return load_timm_encoder(a.timm, overrides, a.checkpoint, a.pretrained), default_model_name(a.timm)
    if a.checkpoint or a.pretrained or a.override:
        raise ExportUsageError("--checkpoint, --pretrained and --override need --timm NAME")
    if not a.run_dir:
        raise ExportUsageError("give RUN_DIR (a `vitserve train` run directory) or --timm NAME")
    return load_run_encoder(a.run_dir), default_model_name(a.run_dir)


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--layers -1,-2`` -> ``--layers=-1,-2``: argparse takes ``-1,-2`` for an option otherwise."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in ("--layers", "--resolutions") and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``vitserve export (RUN_DIR | --timm NAME ...) --repository DIR ...``: 0 ok, 2 user error, 1 failed check."""
    try:
        a = _parser().parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    except SystemExit as e:  # argparse already printed the usage message
        return int(e.code or 0)
    if a.add_version and (a.variants or a.tensorrt):
        print("vitserve export: error: --add-version cannot be combined with --variants or --tensorrt: "
              "precision variants and TensorRT engines are entries of their own, which this export would "
              "replace whole; add the version without them, and export variants under a new --name. "
              "Nothing was written.", file=sys.stderr)
        return 2
    if a.tensorrt:
        reason = tensorrt_unavailable_reason()
        if reason:
            print(f"vitserve export: TensorRT engines cannot be built here: {reason}; nothing was written. "
                  "Export without --tensorrt (ONNX Runtime), or use --target production --trt-accelerator "
                  "fp16 to let Triton's ORT backend build TensorRT engines on the GPU.", file=sys.stderr)
            return 1
    try:
        kinds = parse_variants(a.variants)
        if kinds and a.gate_images < 1:
            raise ExportUsageError(f"--gate-images must be >= 1, got {a.gate_images}")
        if a.gate_max_abs_err is not None and not a.gate_max_abs_err > 0:
            raise ExportUsageError(f"--gate-max-abs-err must be > 0, got {a.gate_max_abs_err}")
        options = export_options(a)
        encoder, default_name = _load(a)
        name = validate_model_name(a.name) if a.name is not None else default_name
        paths = export_entries(encoder, a.repository, name, options)
    except ExportUsageError as e:
        print(f"vitserve export: error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"vitserve export: export failed: {e}", file=sys.stderr)
        return 1
    for path in paths:
        manifest = Manifest.read(path)
        parity = manifest.parity or {}
        errs = " ".join(f"{k}={v:.2e}" for k, v in parity["max_abs_err"].items())
        extra = f"  lane {manifest.lane}" if manifest.lane is not None else ""
        if a.add_version:
            extra += f"  versions recorded {', '.join(sorted(manifest.versions or {}, key=int))}"
        size = "x".join(map(str, manifest.spec["img_size"]))
        print(f"{path}  version {a.version}  {size}{extra}  parity max_abs_err {errs} "
              f"({parity['n_images']} images, {parity['data']}, tol {parity['tolerance']:g})")
    model, spec = encoder.model, encoder.spec
    rc = 0
    if kinds:
        base_model, base = resize_encoder(model, spec, tuple(Manifest.read(paths[0]).spec["img_size"]))
        rc = _export_variants_cli(a, base_model, base, paths[0], kinds)
    if a.tensorrt:
        rc = max(rc, _export_tensorrt_cli(a, model, spec, paths))
    return rc


def _export_tensorrt_cli(a: argparse.Namespace, model: nn.Module, spec: EncoderSpec, paths: list[Path]) -> int:
    """``<entry>_trt`` (tensorrt_plan) for every throughput/bucket entry; 1 when one fails or misses its gate.
    UNTESTED on a GPU (export/tensorrt_engine.py)."""
    gate = VariantGate(n_eval=a.gate_images, n_knn_train=2 * a.gate_images, max_abs_err=a.gate_max_abs_err)
    rc = 0
    for path in paths:
        manifest = Manifest.read(path)
        if manifest.lane == "latency":
            continue  # same graph as its throughput entry
        bucket_model, bucket_spec = resize_encoder(model, spec, tuple(manifest.spec["img_size"]))
        try:
            out, figures, failure = export_tensorrt(bucket_model, bucket_spec, path, force=a.force,
                                                    force_gate=a.force_variants, gate=gate)
        except ExportUsageError as e:
            print(f"vitserve export: error: {e}", file=sys.stderr)
            return 2
        except (ExportError, OSError, RuntimeError) as e:
            print(f"vitserve export: TensorRT engine for {path.name} failed: {e}", file=sys.stderr)
            rc = 1
            continue
        cos = " ".join(f"{k}={v:.4f}" for k, v in figures["mean_cosine"].items())
        status = "passed the gate" if failure is None else f"missed the gate: {failure}"
        print(f"{path.name}_trt (tensorrt_plan): {out or 'NOT written'}  cosine {cos}  {status}",
              file=sys.stdout if out else sys.stderr)
        rc = max(rc, 0 if failure is None else 1)
    return rc


def _export_variants_cli(a: argparse.Namespace, model: nn.Module, spec: EncoderSpec, model_dir: Path,
                         kinds: list[str]) -> int:
    """Variants of the model just exported; 1 when one missed its gate and was not written."""
    try:
        gate = VariantGate(n_eval=a.gate_images, n_knn_train=2 * a.gate_images, max_abs_err=a.gate_max_abs_err)
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
        knn_text = (f" knn_drop={knn['drop_points']:+.2f}pt (95% CI {knn['confidence']['ci_points'][0]:+.2f}.."
                    f"{knn['confidence']['ci_points'][1]:+.2f}, McNemar p={knn['confidence']['mcnemar_p']:.2g})"
                    if knn else "")
        where = str(r.path) if r.written else "NOT written"
        print(f"{r.name} ({r.kind}): {where}  cosine {cos}{knn_text}  {r.reason}"
              + ("  (forced)" if r.written and not r.passed else ""),
              file=sys.stdout if r.written else sys.stderr)
    return 0 if all(r.written for r in results) else 1
