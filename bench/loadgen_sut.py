"""A LoadGen system under test over a ``bench.systems.System``: queries are cut into chunks of at most
``max_batch`` samples and run by ``workers`` threads; with ``coalesce`` a worker also takes the chunks
waiting behind the one it got (up to ``max_batch`` samples), the job Triton's dynamic batcher does for
the service. LoadGen issues the queries, times them and judges the run; this class only answers them,
and records each query's issue-to-completion time for the deadline-miss fraction (``--control-hz``)."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.systems import System


@dataclass
class _Query:
    issued: float
    remaining: int


@dataclass
class _Chunk:
    samples: list[Any]  # mlperf_loadgen.QuerySample
    query: _Query


@dataclass
class SutStats:
    """Issue-to-completion seconds of each query, and the errors raised by the system (first few)."""

    query_latency_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    samples: int = 0


class LoadGenSUT:
    """Answer LoadGen's queries with ``system``; ``keep_outputs`` returns the output bytes to LoadGen
    (its accuracy log); otherwise responses carry no data."""

    def __init__(self, system: System, request: str, workers: int = 1, coalesce: bool = False,
                 keep_outputs: bool = False) -> None:
        import mlperf_loadgen as lg

        self.lg, self.system, self.request = lg, system, request
        self.coalesce, self.keep_outputs = coalesce, keep_outputs
        self.stats = SutStats()
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Chunk | None] = queue.Queue()
        self._workers = [threading.Thread(target=self._work, daemon=True, name=f"sut-{system.name}-{i}")
                         for i in range(workers)]
        for w in self._workers:
            w.start()
        self.handle = lg.ConstructSUT(self.issue_queries, self.flush_queries)

    def issue_queries(self, query_samples: list[Any]) -> None:
        query = _Query(time.perf_counter(), len(query_samples))
        step = self.system.max_batch
        for i in range(0, len(query_samples), step):
            self._queue.put(_Chunk(list(query_samples[i:i + step]), query))

    def flush_queries(self) -> None:
        pass

    def _take(self, first: _Chunk) -> list[_Chunk]:
        chunks, n = [first], len(first.samples)
        while self.coalesce and n < self.system.max_batch:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None or n + len(nxt.samples) > self.system.max_batch:
                self._queue.put(nxt)  # the sentinel or a chunk that does not fit goes back for the next turn
                break
            chunks.append(nxt)
            n += len(nxt.samples)
        return chunks

    def _work(self) -> None:
        lg = self.lg
        while True:
            first = self._queue.get()
            if first is None:
                return
            chunks = self._take(first)
            samples = [s for c in chunks for s in c.samples]
            idx = np.fromiter((s.index for s in samples), dtype=np.int64, count=len(samples))
            try:
                out = np.ascontiguousarray(self.system.run(idx, self.request), dtype=np.float32)
            except Exception as e:  # the query still completes (LoadGen would wait forever), empty-handed
                with self._lock:
                    if len(self.stats.errors) < 5:
                        self.stats.errors.append(f"{type(e).__name__}: {e}")
                out = None
            if out is not None and self.keep_outputs:
                per = out.reshape(len(samples), -1)
                responses = [lg.QuerySampleResponse(s.id, per[i].ctypes.data, per[i].nbytes)
                             for i, s in enumerate(samples)]
            else:
                responses = [lg.QuerySampleResponse(s.id, 0, 0) for s in samples]
            lg.QuerySamplesComplete(responses)  # copies the bytes before returning (accuracy mode)
            now = time.perf_counter()
            with self._lock:
                self.stats.samples += len(samples)
                for c in chunks:
                    c.query.remaining -= len(c.samples)
                    if c.query.remaining == 0:
                        self.stats.query_latency_s.append(now - c.query.issued)

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = SutStats()

    def close(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join(timeout=60)
        self.lg.DestroySUT(self.handle)
