"""embed-dataset throughput: the Ray Data job against one in-process ONNX Runtime loop, in one run.

``python -m benchmarks.embed_dataset [--fmnist-images 20000] [--vit-images 2000] [--workers 1,2]``

Data: Fashion-MNIST as a PNG folder and as Parquet (the 10,000 test images, then training images to
reach the count), and 224x224 RGB JPEGs (Fashion-MNIST upscaled) for ViT-S/16. Models: random-init
encoders exported with the real exporter (weights do not change the cost). One local Ray is started
here and timed (Ray's start-up, reported apart); each job then runs as its own driver process
connected to it (``--address``), so its peak RSS is the driver's alone. The baseline decodes every
image first with the job's own decoder (not timed) and then runs one ONNX Runtime session with all
the threads over the decoded batches; the job gets the same total threads (workers x threads per
worker) and must also read and decode while it embeds. Throughput is steady state: images per
second between 10 % and 90 % of the rows received (the baseline: after one warm-up batch).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.machine import machine as base_machine

log = logging.getLogger("benchmarks.embed_dataset")
TARGET = 0.85
ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """``benchmarks.machine.machine()`` plus the versions of the engines this benchmark runs."""
    facts = base_machine()
    import onnxruntime
    import pyarrow
    import ray

    facts.update(ray=ray.__version__, onnxruntime=onnxruntime.__version__, pyarrow=pyarrow.__version__)
    return facts


# -- data and models ----------------------------------------------------------------------------


def fashion_mnist(n: int) -> np.ndarray:
    """``n`` Fashion-MNIST images ``[n, 28, 28, 1]``: the test split first, then training images."""
    from training.data import load_fashion_mnist

    test = load_fashion_mnist("test").images
    if n <= len(test):
        return test[:n]
    return np.concatenate([test, load_fashion_mnist("train").images[:n - len(test)]])


def encode(images: np.ndarray, fmt: str, size: int | None = None) -> list[bytes]:
    from PIL import Image

    out = []
    for a in images:
        img = Image.fromarray(a[..., 0])
        if size:
            img = img.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def write_sources(work: Path, fmnist: int, vit: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = fashion_mnist(max(fmnist, vit))
    sources = {}
    pngs = encode(images[:fmnist], "PNG")
    folder = work / "fmnist_png"
    for i, data in enumerate(pngs):
        (folder / f"{i // 1000:03d}").mkdir(parents=True, exist_ok=True)
        (folder / f"{i // 1000:03d}" / f"{i:05d}.png").write_bytes(data)
    sources["fmnist_folder"] = folder
    table = pa.table({"key": [f"{i:05d}" for i in range(fmnist)], "image": pa.array(pngs, pa.binary())})
    pq.write_table(table, work / "fmnist.parquet", row_group_size=1000)
    sources["fmnist_parquet"] = work / "fmnist.parquet"
    if vit:
        folder = work / "vit_jpeg"
        folder.mkdir()
        for i, data in enumerate(encode(images[:vit], "JPEG", 224)):
            (folder / f"{i:05d}.jpg").write_bytes(data)
        sources["vit_folder"] = folder
    return sources


def export_models(repository: Path, vit: bool) -> dict[str, str]:
    """Random-init encoders exported with the real exporter (weights do not change the cost)."""
    import torch

    from export.options import ExportOptions, TritonOptions
    from export.repository import export_entries
    from export.sources import EncoderSource
    from training.backbone import FASHION_MNIST_MEAN, FASHION_MNIST_STD, create_encoder

    options = ExportOptions(triton=TritonOptions(max_batch_size=64))
    torch.manual_seed(0)
    model, spec = create_encoder(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    export_entries(EncoderSource(model.eval(), spec), repository, "fmnist_tiny", options)
    names = {"fmnist": "fmnist_tiny"}
    if vit:
        torch.manual_seed(0)
        model, spec = create_encoder("vit_small_patch16_224", {})
        export_entries(EncoderSource(model.eval(), spec), repository, "vit_s16", options)
        names["vit"] = "vit_s16"
    return names


# -- the two sides (each in its own process) -----------------------------------------------------


def baseline(source: str, repository: str, model: str, threads: int, batch_size: int) -> dict[str, Any]:
    """One ORT session with ``threads`` over the source's images, decoded beforehand by the job's decoder."""
    from embed_dataset.decode import decode_item
    from embed_dataset.model import from_repository
    from embed_dataset.options import EmbedOptions
    from embed_dataset.sources import read_shard, scan_source
    from export.model import make_session

    m = from_repository(Path(repository), model)
    plan = scan_source(EmbedOptions(source=source, out=Path("/nonexistent"), model=model,
                                    model_repository=Path(repository)))
    bare = replace(plan, shards=())
    pixels = [p for s in plan.shards for item in read_shard(bare, s)
              for p, _ in [decode_item(item, m, 8192 * 8192)] if p is not None]
    images = np.stack(pixels)
    assert m.onnx_path is not None
    session = make_session(str(m.onnx_path), threads)
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    session.run(["cls"], {"images": batches[0]})  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        session.run(["cls"], {"images": b})
    elapsed = time.perf_counter() - t0
    from embed_dataset.inference import peak_rss_mb

    return {"images": len(images), "seconds": elapsed, "img_s": len(images) / elapsed, "threads": threads,
            "peak_rss_mb": peak_rss_mb(), "load_average": [round(v, 2) for v in os.getloadavg()]}


def job(source: str, repository: str, model: str, out: str, address: str, workers: int, threads: int,
        batch_size: int) -> dict[str, Any]:
    """One embed-dataset run as its own driver, connected to the benchmark's Ray."""
    from embed_dataset.job import embed_dataset
    from embed_dataset.options import EmbedOptions

    result = embed_dataset(EmbedOptions(source=source, out=Path(out), model=model,
                                        model_repository=Path(repository), workers=workers, threads=threads,
                                        batch_size=batch_size, address=address, progress=False))
    return {**asdict(result), "img_s": result.img_s, "load_average": [round(v, 2) for v in os.getloadavg()]}


def _in_process(kind: str, **kwargs: Any) -> dict[str, Any]:
    """Run ``baseline`` or ``job`` in a fresh interpreter; its JSON result."""
    code = (f"import json, sys; from benchmarks.embed_dataset import {kind}; "
            f"print('RESULT ' + json.dumps({kind}(**json.loads(sys.argv[1]))))")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    from serving.tied_process import popen_tied

    # Tied: a benchmark killed by any signal takes this driver (and so its Ray job) with it.
    with popen_tied([sys.executable, "-c", code, json.dumps(kwargs)], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=3600)
        except BaseException:
            proc.kill()
            raise
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} failed ({proc.returncode}):\n{stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# -- report --------------------------------------------------------------------------------------


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# embed-dataset benchmark", "", f"Command: `{report['command']}`", "",
             f"Machine: {m.get('cpu')}, {m['cpus']} CPUs, flags {' '.join(m.get('flags', []))}; numpy fp32 matmul "
             f"{m['fp32_matmul_gflops']} GFLOP/s; load average at start {m['load_average']}; Ray {m['ray']}, "
             f"ONNX Runtime {m['onnxruntime']}, pyarrow {m['pyarrow']}.", "",
             f"Ray start-up (`ray.init`, a local Ray on this machine): **{report['ray_start_s']:.1f} s**, "
             f"paid once per command run and in none of the figures below.", "",
             f"In-process ONNX Runtime, img/s ({report['threads']} threads before the jobs / after them; "
             f"1 thread):", ""]
    for row in report["rows"]:
        b, after, one = row["baseline"], row["baseline_after"], row["baseline_1_thread"]
        lines.append(f"- {row['label']}: {b['img_s']:.1f} / {after['img_s']:.1f}; {one['img_s']:.1f} "
                     f"(load average {b['load_average'][0]} / {after['load_average'][0]})")
    lines += ["", "| data | images | workers x threads | job steady img/s | ratio to in-process "
                  f"(target >= {TARGET}) | job wall s | driver peak MB | actor peak MB |",
              "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        base = min(row["baseline"]["img_s"], row["baseline_after"]["img_s"])
        best = max(row["baseline"]["img_s"], row["baseline_after"]["img_s"])
        for j in row["jobs"]:
            actor = max(j["actor_peak_rss_mb"].values()) if j["actor_peak_rss_mb"] else 0
            lo, hi = j["steady_img_s"] / best, j["steady_img_s"] / base
            verdict = "met" if lo >= TARGET else ("not met" if hi < TARGET else "within the noise")
            lines.append(f"| {row['label']} | {j['embedded']} | {j['workers']} x {j['threads']} | "
                         f"{j['steady_img_s']:.1f} | {lo:.2f}-{hi:.2f} {verdict} | {j['pipeline_s']:.1f} | "
                         f"{j['driver_peak_rss_mb']:.0f} | {actor:.0f} |")
    lines += ["", "Ratio: the job's steady state over the in-process loop with the same total threads, against "
                  "the faster and the slower of its two measurements (before and after the jobs: other "
                  "agents share this machine's 2 CPUs). Job wall s: from the first task to the last commit "
                  "(actor start-up included, Ray's start-up not). Peaks are VmHWM: the job's driver process, "
                  "and the largest of the inference actors (each reports its own with its rows).", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print and write the Markdown report and its JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.embed_dataset", description=__doc__.split("\n")[0])
    p.add_argument("--fmnist-images", type=int, default=20000)
    p.add_argument("--vit-images", type=int, default=2000, help="224 px images for ViT-S/16 (0: skip)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="total threads")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--vit-batch-size", type=int, default=16)
    p.add_argument("--out", default="docs/EMBED_DATASET_BENCHMARK.md")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import ray

    from embed_dataset.job import local_ray

    facts = machine()
    workers = [int(w) for w in a.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="vitserve-embed-bench-") as tmp:
        work = Path(tmp)
        log.info("writing sources and exporting models under %s", work)
        sources = write_sources(work, a.fmnist_images, a.vit_images)
        names = export_models(work / "repo", a.vit_images > 0)
        t0 = time.perf_counter()
        rows = []
        with local_ray():
            ray_start_s = time.perf_counter() - t0
            address = ray.get_runtime_context().gcs_address
            for label, key, model, batch in (("Fashion-MNIST PNG folder", "fmnist_folder", names["fmnist"], a.batch_size),
                                             ("Fashion-MNIST Parquet", "fmnist_parquet", names["fmnist"], a.batch_size),
                                             ("ViT-S/16 224 px JPEG folder", "vit_folder", names.get("vit"), a.vit_batch_size)):
                if key not in sources:
                    continue
                common = {"source": str(sources[key]), "repository": str(work / "repo"), "model": model,
                          "batch_size": batch}
                log.info("%s: in-process baseline", label)
                base = _in_process("baseline", threads=a.threads, **common)
                one = _in_process("baseline", threads=1, **common)
                jobs = []
                for w in workers:
                    log.info("%s: job with %d worker(s)", label, w)
                    out = work / f"out_{key}_{w}"
                    r = _in_process("job", out=str(out), address=address, workers=w,
                                    threads=max(1, a.threads // w), **common)
                    jobs.append({**r, "workers": w, "threads": max(1, a.threads // w)})
                    log.info("%s, %d worker(s): %.0f img/s steady vs %.0f in process", label, w,
                             r["steady_img_s"], base["img_s"])
                after = _in_process("baseline", threads=a.threads, **common)
                rows.append({"label": label, "baseline": base, "baseline_after": after, "baseline_1_thread": one,
                             "jobs": jobs})
    command = "python -m benchmarks.embed_dataset " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command.strip(), "machine": facts, "ray_start_s": ray_start_s, "threads": a.threads,
              "rows": rows}
    text = to_markdown(report)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
