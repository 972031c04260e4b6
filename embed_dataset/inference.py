"""The actor pool's work: decoded rows in, embedding rows out, on ONNX Runtime or running gateways.

``OrtEmbedder`` holds one ONNX Runtime session (``export.model.make_session``) of the model file,
whose bytes reach every actor through Ray's object store (so a cluster's nodes need no copy of the
repository). ``ServiceEmbedder`` sends each batch, as raw frames already at the model's input size,
to ``--service``'s gateways (one channel, gRPC's round_robin). Both pool with the gateway's ``pool_embeddings``,
so cls / mean / both and the L2 normalisation are the service's own arithmetic.

Rows that carry an ``error`` (or are a shard's marker) pass through untouched with zero vectors; a
batch the model cannot run becomes error rows. Every output row also carries the actor's process id
and peak RSS, which the driver reports.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from clients.client import VitServeClient, VitServeError
from clients.messages import POOLINGS
from contract.names import CLS_OUTPUT, INPUT_NAME, PATCH_OUTPUT
from serving.pooling import pool_embeddings

from embed_dataset.decode import Batch
from embed_dataset.model import EmbedModel
from embed_dataset.options import JobError, service_target

log = logging.getLogger(__name__)

_RETRIED = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
SERVICE_ATTEMPTS = 5
SERVICE_TIMEOUT_S = 120.0


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``; ``ru_maxrss`` would include a forking parent's)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class EmbedSettings:
    """What each actor computes: the pooling, normalisation, output dtype and whether patch features."""

    pooling: str = "cls"
    l2_normalize: bool = False
    features: bool = False
    dtype: str = "float32"
    threads: int = 0
    workers: int = 1

    @property
    def embedding_dim_factor(self) -> int:
        return 2 if self.pooling == "both" else 1

    def ort_threads(self) -> int:
        """Intra-op threads of one actor's session: as asked, else this node's CPUs shared by the workers."""
        if self.threads:
            return self.threads
        return max(1, len(os.sched_getaffinity(0)) // self.workers)


class _Embedder:
    """Shared row handling of both actor kinds; subclasses provide ``_embed``."""

    def __init__(self, model: EmbedModel, settings: EmbedSettings) -> None:
        self.model, self.settings = model, settings
        self.dtype = np.dtype(settings.dtype)
        self.pooling = POOLINGS[settings.pooling]

    def _embed(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(embeddings [n, E] fp32, patch tokens [n, h*w, D] fp32 or None)`` of ``pixels [n, H, W, C]``."""
        raise NotImplementedError

    def _outputs(self, n: int) -> dict[str, np.ndarray]:
        h, w = self.model.grid
        out = {"embedding": np.zeros((n, self.model.embed_dim * self.settings.embedding_dim_factor), self.dtype)}
        if self.settings.features:
            out["patch_features"] = np.zeros((n, h * w, self.model.embed_dim), self.dtype)
        return out

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["seq"])
        errors = np.asarray(batch["error"], dtype=object).copy()
        ok = np.flatnonzero((batch["seq"] >= 0) & (errors == ""))
        out = self._outputs(n)
        if len(ok):
            try:
                embeddings, patches = self._embed(np.ascontiguousarray(batch["pixels"][ok]))
            except JobError:
                raise
            except Exception as e:  # noqa: BLE001 - this batch could not be embedded; the job goes on
                log.warning("a batch of %d images failed: %s", len(ok), e)
                errors[ok] = f"cannot embed ({type(e).__name__}): {e}"
            else:
                out["embedding"][ok] = embeddings
                if patches is not None:
                    out["patch_features"][ok] = patches
        return {"shard": batch["shard"], "seq": batch["seq"], "id": batch["id"], "error": errors,
                "count": batch["count"], **out, "pid": np.full(n, os.getpid(), np.int64),
                "rss_mb": np.full(n, peak_rss_mb(), np.float64)}


class OrtEmbedder(_Embedder):
    """Ray Data actor: one ONNX Runtime session of the exported model."""

    def __init__(self, model: EmbedModel, settings: EmbedSettings, onnx: list[Any]) -> None:
        import ray

        from export.model import make_session

        super().__init__(model, settings)
        model_bytes = ray.get(onnx[0])  # the ObjectRef travels in a list so Ray hands it over unresolved
        self.session = make_session(model_bytes, settings.ort_threads())
        need_cls = settings.pooling in ("cls", "both")
        need_patches = settings.pooling in ("mean", "both") or settings.features
        self.names = [name for name, need in ((CLS_OUTPUT, need_cls), (PATCH_OUTPUT, need_patches)) if need]

    def _embed(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        result = dict(zip(self.names, self.session.run(self.names, {INPUT_NAME: pixels})))
        patches = result.get(PATCH_OUTPUT)
        embeddings, _ = pool_embeddings(result.get(CLS_OUTPUT), patches, self.pooling, self.settings.l2_normalize)
        return embeddings, patches if self.settings.features else None


class ServiceEmbedder(_Embedder):
    """Ray Data actor: batches go to the running gateways (raw frames at the model's input size) over
    one channel that balances them with gRPC's round_robin and retries UNAVAILABLE on another one."""

    def __init__(self, model: EmbedModel, settings: EmbedSettings, targets: tuple[str, ...]) -> None:
        super().__init__(model, settings)
        self.target = service_target(targets)
        self.client = VitServeClient(self.target, timeout=SERVICE_TIMEOUT_S)

    def _call(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        client = self.client
        if not self.settings.features:
            return client.embed(pixels, model=self.model.name, l2_normalize=self.settings.l2_normalize,
                                pooling=self.settings.pooling, version=self.model.version), None
        res = client.features(pixels, model=self.model.name, layout="tokens", include_cls=True,
                              version=self.model.version)
        embeddings, _ = pool_embeddings(res.cls, res.features, self.pooling, self.settings.l2_normalize)
        return embeddings, res.features

    def _embed(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        # The channel already retried UNAVAILABLE on other replicas; what is left (every replica down
        # or full, a deadline) gets a slower back-off here before the job gives up.
        for attempt in range(1, SERVICE_ATTEMPTS + 1):
            try:
                return self._call(pixels)
            except VitServeError as e:
                if e.code.name not in _RETRIED:
                    raise
                log.warning("gateways %s: %s (attempt %d of %d)", self.target, e, attempt, SERVICE_ATTEMPTS)
                if attempt == SERVICE_ATTEMPTS:
                    raise JobError(f"gateways {self.target} failed {SERVICE_ATTEMPTS} times: {e}; "
                                   f"rerun the same command to resume") from e
                time.sleep(min(8.0, 0.5 * 2 ** (attempt - 1)))
        raise AssertionError("unreachable")
