"""The job: check everything, then run the Ray Data pipeline and commit each shard as it completes.

    shards (from_items) -> decode_shards (Ray tasks: read, decode, preprocess)
        -> OrtEmbedder | ServiceEmbedder (map_batches, compute=ActorPoolStrategy(size=workers))
        -> the driver: rows gathered per shard, each complete shard committed atomically

Every check that a user can fail (options, model, source, OUTDIR) runs before Ray starts or OUTDIR is
written. The pool is sized so that it never holds every CPU: on a 2-CPU machine an actor pool with
one CPU per actor and two actors leaves nothing for the read tasks and Ray Data waits forever
(ray-project/ray#44687); here actors get ``(CPUs - reserve) / workers`` CPUs each, the reserve (up to
one CPU) stays for the decode tasks, and Ray Data's no-progress timeout turns any stall into an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from embed_dataset.decode import Batch, decode_shards
from embed_dataset.inference import EmbedSettings, OrtEmbedder, ServiceEmbedder, peak_rss_mb
from embed_dataset.model import EmbedModel, resolve_model
from embed_dataset.options import EmbedOptions, JobError, UsageError
from embed_dataset.output import FORMAT_VERSION, OutputDir, ShardBuffer, shard_tables
from embed_dataset.sources import SourcePlan, scan_source
from serving.orphan_reaper import start_reaper
from serving.process_table import ProcessInfo, descendants, end_survivors

log = logging.getLogger(__name__)
DECODE_MEMORY_BASE = 192 * 2**20  # a worker process with numpy, PIL and the decoder imported: ~110 MiB
BLOCK_PIXEL_BYTES = 2**20       # a block (one actor task) holds about this many bytes of pixels ...
MAX_BATCHES_PER_BLOCK = 8        # ... and at most this many batches
BLOCK_SIZE_FRACTION = 0.9        # target_max_block_size per block's pixel bytes: one decode yield, one block
INSTALL_HINT = "Ray Data is not installed; install the dataset extra: pip install 'vitserve[dataset]'"


@dataclass
class JobResult:
    """What a run did (this run only, except the ``total_*`` figures, which cover OUTDIR)."""

    embedded: int = 0
    errors: int = 0
    shards_committed: int = 0
    shards_already_done: int = 0
    total_embedded: int = 0
    total_errors: int = 0
    wall_s: float = 0.0
    ray_start_s: float = 0.0
    pipeline_s: float = 0.0
    steady_img_s: float = 0.0
    driver_peak_rss_mb: float = 0.0
    actor_peak_rss_mb: dict[int, float] = field(default_factory=dict)

    @property
    def img_s(self) -> float:
        return self.embedded / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        done = f"; {self.shards_already_done} shard(s) were already done" if self.shards_already_done else ""
        return (f"embedded {self.embedded} images, {self.errors} errors, {self.img_s:.1f} img/s, wall "
                f"{self.wall_s:.1f} s (Ray start-up {self.ray_start_s:.1f} s){done}; OUTDIR holds "
                f"{self.total_embedded} embeddings and {self.total_errors} errors")


def pool_sizing(cluster_cpus: float, workers: int) -> tuple[float, float]:
    """``(CPUs per actor, CPUs per decode task)``: the pool leaves up to one CPU for the tasks."""
    reserve = min(1.0, cluster_cpus / 2)
    return min(1.0, (cluster_cpus - reserve) / workers), reserve


def block_rows(batch_size: int, image_bytes: int) -> int:
    """Rows per block: whole batches, as many as fill about ``BLOCK_PIXEL_BYTES`` of pixels (at most
    ``MAX_BATCHES_PER_BLOCK``)."""
    batches = max(1, min(MAX_BATCHES_PER_BLOCK, BLOCK_PIXEL_BYTES // max(1, batch_size * image_bytes)))
    return batch_size * batches


def job_identity(options: EmbedOptions, model: EmbedModel, plan: SourcePlan) -> dict[str, Any]:
    """What a rerun into the same OUTDIR must repeat: model, output options, source."""
    return {"format_version": FORMAT_VERSION, "model": model.identity(), "outputs": options.outputs_identity,
            "source": plan.identity()}


def output_metadata(options: EmbedOptions, model: EmbedModel) -> dict[str, str]:
    """The Parquet schema metadata of every output file."""
    meta = {"model": model.name, "version": model.version, "weights_sha256": model.weights_sha256,
            "pooling": options.pooling, "l2_normalize": json.dumps(options.l2_normalize), "dtype": options.dtype,
            "preprocessing": json.dumps(model.preprocessing()),
            "embedding_dim": str(model.embed_dim * (2 if options.pooling == "both" else 1))}
    if options.features:
        meta["grid"] = json.dumps(list(model.grid))
        meta["patch_features"] = "patch tokens of the last block after the final norm, row-major grid"
    return meta


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[float]:
    """Connected Ray for the block; yields the start-up seconds. A Ray already initialised is reused."""
    import ray

    if ray.is_initialized():
        yield 0.0
        return
    t0 = time.perf_counter()
    if address is None:
        with local_ray():
            yield time.perf_counter() - t0
        return
    try:
        ray.init(address=address)
    except (ConnectionError, ValueError) as e:
        raise UsageError(f"cannot connect to the Ray cluster at --address {address}: {e}") from e
    try:
        yield time.perf_counter() - t0
    finally:
        ray.shutdown()


@contextlib.contextmanager
def local_ray(**init_options: Any) -> Iterator[None]:
    """A local Ray (``ray.init(address="local", ...)``) of which no process outlives the block, nor
    this process if it is killed (``serving.orphan_reaper`` watches for that)."""
    import ray

    reaper = start_reaper(_ray_dir(), 0.25)  # before ray.init: a kill during start-up is covered too
    try:
        ray.init(address="local", include_dashboard=False, **init_options)
        yield
    finally:
        reaper.kill()  # we end Ray ourselves now
        reaper.wait()
        shutdown_local_ray()


RAY_EXIT_WAIT_S = 10.0


def _ray_dir() -> str:
    """The ``ray`` package's directory: Ray's head processes run programs from it."""
    import ray

    return os.path.dirname(ray.__file__) + os.sep


def local_ray_processes() -> list[ProcessInfo]:
    """The processes of the local Ray this process started: its children that run Ray's own programs
    (GCS, raylet, monitors, dashboard) and everything below them (agents, workers)."""
    ray_dir = _ray_dir()
    mine = descendants(os.getpid())
    roots = {p.pid for p in mine if p.ppid == os.getpid() and any(a.startswith(ray_dir) for a in p.cmdline)}
    found = []
    for p in mine:  # parents come before their children
        if p.pid in roots or p.ppid in roots:
            roots.add(p.pid)
            found.append(p)
    return found


def shutdown_local_ray() -> None:
    """``ray.shutdown()`` of a local Ray this process started, and no process of it left afterwards.

    Ray stops its head processes itself; a worker or agent still running ``RAY_EXIT_WAIT_S`` seconds
    later (one was seen alive for minutes, re-parented to init) is killed.
    """
    import ray

    ours = local_ray_processes()
    if ray.is_initialized():
        ray.shutdown()
    killed = end_survivors(ours, RAY_EXIT_WAIT_S)
    if killed:
        log.warning("killed %d Ray process(es) that outlived ray.shutdown() by %.0fs: %s", len(killed),
                    RAY_EXIT_WAIT_S, ", ".join(f"{p.pid} {p.cmdline[0][:60]}" for p in killed))


class Collector:
    """The driver's end of the pipeline: gathers rows per shard and commits each complete shard."""

    def __init__(self, out: OutputDir, options: EmbedOptions, model: EmbedModel, result: JobResult) -> None:
        self.out, self.options, self.result = out, options, result
        self.metadata = output_metadata(options, model)
        self.buffers: dict[int, ShardBuffer] = {}
        h, w = model.grid
        dim = model.embed_dim * (2 if options.pooling == "both" else 1)
        self.empty = {"id": np.zeros(0, object), "error": np.zeros(0, object),
                      "embedding": np.zeros((0, dim), options.dtype),
                      "patch_features": np.zeros((0, h * w, model.embed_dim), options.dtype)}
        self.arrivals: list[tuple[float, int]] = []

    def add(self, batch: Batch) -> None:
        images = int((batch["seq"] >= 0).sum())
        if images:
            self.arrivals.append((time.perf_counter(), images))
        for pid, rss in zip(batch["pid"], batch["rss_mb"]):
            self.result.actor_peak_rss_mb[int(pid)] = max(self.result.actor_peak_rss_mb.get(int(pid), 0.0),
                                                          float(rss))
        for index in np.unique(batch["shard"]):
            mask = batch["shard"] == index
            buffer = self.buffers.setdefault(int(index), ShardBuffer())
            buffer.add({k: v[mask] for k, v in batch.items() if k not in ("pixels", "pid", "rss_mb")})
            if buffer.complete:
                self._commit(int(index), self.buffers.pop(int(index)))

    def _commit(self, index: int, buffer: ShardBuffer) -> None:
        embeddings, errors = shard_tables(buffer.rows(self.empty), self.metadata, self.options.features)
        self.out.commit(index, embeddings, errors)
        self.result.embedded += embeddings.num_rows
        self.result.errors += 0 if errors is None else errors.num_rows
        self.result.shards_committed += 1

    def steady_img_s(self) -> float:
        """Images per second between 10 % and 90 % of the rows received (start-up and tail excluded)."""
        if len(self.arrivals) < 3:
            return 0.0
        times = np.array([t for t, _ in self.arrivals])
        cum = np.cumsum([n for _, n in self.arrivals])
        lo, hi = np.searchsorted(cum, 0.1 * cum[-1]), np.searchsorted(cum, 0.9 * cum[-1])
        if hi <= lo or times[hi] <= times[lo]:
            return 0.0
        return float((cum[hi] - cum[lo]) / (times[hi] - times[lo]))


def _pipeline(options: EmbedOptions, model: EmbedModel, plan: SourcePlan, todo: list[Any]) -> Any:
    """The Ray Data dataset of embedding rows for the shards in ``todo``."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.execution_no_progress_timeout_s = options.stall_timeout_s
    ctx.enable_progress_bars = options.progress
    # Ray Data merges what a task yields into blocks of up to target_max_block_size (128 MiB by
    # default), so a decode task's output would leave it as one block at the end of its shard and the
    # actors would wait for whole shards. A decode task yields ``rows`` at a time instead, and the
    # target (a little under one yield, so that Ray Data neither merges nor splits it) makes each
    # yield one block, streamed. Each block is one actor task (``rows // batch_size`` model runs):
    # every task costs an actor 15-20 ms besides its model runs, which at 64 small images a task
    # was a fifth of the actor's time.
    g = model.geometry
    image_bytes = g.height * g.width * g.channels
    rows = block_rows(options.batch_size, image_bytes)
    ctx.target_max_block_size = max(1, int(BLOCK_SIZE_FRACTION * rows * image_bytes))
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    actor_cpus, decode_cpus = pool_sizing(cpus, options.workers)
    log.info("Ray has %g CPUs: %d worker(s) at %.2g CPU each, decode tasks at %.2g CPU",
             cpus, options.workers, actor_cpus, decode_cpus)
    settings = EmbedSettings(options.pooling, options.l2_normalize, options.features, options.dtype,
                             options.threads, options.workers)
    bare = dataclasses.replace(plan, shards=())  # each task gets its shard, not the whole plan
    ds = ray.data.from_items([{"shard": s.to_json()} for s in todo], override_num_blocks=len(todo))
    # A memory estimate of one decode task (its block of pixels a few times over): it also keeps Ray Data
    # from fusing the decode tasks into the actors (it fuses only equal resource requests), where
    # decoding would wait for inference instead of running beside it.
    decode_memory = 4 * rows * image_bytes + DECODE_MEMORY_BASE
    ds = ds.map_batches(decode_shards, batch_size=1, num_cpus=decode_cpus, memory=decode_memory,
                        fn_kwargs={"plan": bare, "model": model, "block_rows": rows,
                                   "max_pixels": options.max_pixels})
    if options.service:
        embedder: type = ServiceEmbedder
        kwargs: dict[str, Any] = {"targets": options.service}
    else:
        assert model.onnx_path is not None
        embedder, kwargs = OrtEmbedder, {"onnx": [ray.put(model.onnx_path.read_bytes())]}
    return ds.map_batches(embedder, batch_size=options.batch_size, compute=ActorPoolStrategy(size=options.workers),
                          num_cpus=actor_cpus, udf_modifying_row_count=False,
                          fn_constructor_kwargs={"model": model, "settings": settings, **kwargs})


def _root_cause(e: BaseException) -> str:
    """The innermost error's message (Ray wraps a task's exception in its own, with a traceback)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if inner is None or not isinstance(inner, BaseException):
            break
        e = inner
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _run(options: EmbedOptions, model: EmbedModel, plan: SourcePlan, todo: list[Any], out: OutputDir,
         result: JobResult) -> None:
    from ray.data.exceptions import ExecutionTimeoutError
    from ray.exceptions import RayError

    collector = Collector(out, options, model, result)
    t0 = time.perf_counter()
    try:
        for batch in _pipeline(options, model, plan, todo).iter_batches(batch_size=None, batch_format="numpy"):
            collector.add(batch)
    except ExecutionTimeoutError as e:
        raise JobError(f"no progress for {options.stall_timeout_s:.0f} s (--stall-timeout), so the job stopped; "
                       f"{result.shards_committed} shard(s) were committed and a rerun resumes from them. "
                       f"Ray Data said: {e}") from e
    except RayError as e:  # a task or actor failed for good (e.g. the gateways stayed unreachable)
        raise JobError(f"the job stopped after committing {result.shards_committed} shard(s); a rerun resumes "
                       f"from them: {_root_cause(e)}") from e
    result.pipeline_s = time.perf_counter() - t0
    result.steady_img_s = collector.steady_img_s()
    if collector.buffers:
        raise JobError(f"the pipeline ended with {len(collector.buffers)} shard(s) incomplete "
                       f"({sorted(collector.buffers)[:5]}); rerun the same command to finish them")


def embed_dataset(options: EmbedOptions) -> JobResult:
    """Embed ``options.source`` into ``options.out``; resumes a job that is there already.

    ``UsageError`` (before any work, OUTDIR untouched) or ``JobError`` (the job stopped; a rerun resumes).
    """
    t0 = time.perf_counter()
    try:
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UsageError(INSTALL_HINT) from e
    model = resolve_model(options)
    plan = scan_source(options)
    identity = job_identity(options, model, plan)
    out = OutputDir(options.out)
    resume = out.check(identity, plan.shards)
    done = out.done() if resume else {}
    todo = [s for s in plan.shards if s.index not in done]
    result = JobResult(shards_already_done=len(plan.shards) - len(todo))
    if todo:
        out.prepare(identity, plan.shards, resume)
        try:
            with ray_session(options.address) as start_s:
                result.ray_start_s = start_s
                _run(options, model, plan, todo, out, result)
        finally:
            out.release()
    records = out.done().values()
    result.total_embedded = sum(int(r["embedded"]) for r in records)
    result.total_errors = sum(int(r["errors"]) for r in records)
    result.wall_s = time.perf_counter() - t0
    result.driver_peak_rss_mb = peak_rss_mb()
    return result
