"""Pure helpers of the request layer: enum checks, the outputs a pooling needs, pooling and L2 norm.

No Triton and no gRPC server: the dataset embedder pools Triton's outputs with the same functions,
so its vectors match the gateway's ``Embed``.
"""

from __future__ import annotations

import grpc
import numpy as np

from contract.names import CLS_OUTPUT, MEAN_PATCH_OUTPUT, PATCH_OUTPUT
from contract.tensors import NUMPY_DTYPES
from protos import vitserve_pb2
from serving.errors import RequestError

POOLING = vitserve_pb2.EmbedRequest.Pooling
# EmbedResponse.source of each pooling: "cls", "mean_patch", "cls+mean_patch"
POOLING_SOURCE = {POOLING.CLS: CLS_OUTPUT, POOLING.MEAN_PATCH: MEAN_PATCH_OUTPUT,
                  POOLING.CLS_AND_MEAN_PATCH: f"{CLS_OUTPUT}+{MEAN_PATCH_OUTPUT}"}


def check_enums(dtype: int, layout: int = 0, pooling: int = 0, lane: int = 0) -> None:
    """Refuse enum values this gateway does not know (INVALID_ARGUMENT ``RequestError``).

    proto3 enums are open: a newer client may send values added after this gateway was built.
    """
    if lane not in vitserve_pb2.Lane.values():
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown lane {lane}; use THROUGHPUT or LATENCY")
    if dtype not in NUMPY_DTYPES:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown dtype {dtype}; use FLOAT32 or FLOAT16")
    if layout not in vitserve_pb2.FeaturesRequest.Layout.values():
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown layout {layout}; use GRID or TOKENS")
    if pooling not in POOLING.values():
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"unknown pooling {pooling}; use CLS, MEAN_PATCH or CLS_AND_MEAN_PATCH")


def pooling_outputs(pooling: int) -> list[str]:
    """The model outputs ``pooling`` reads (``POOLING_UNSPECIFIED`` is CLS)."""
    if pooling == POOLING.MEAN_PATCH:
        return [PATCH_OUTPUT]
    if pooling == POOLING.CLS_AND_MEAN_PATCH:
        return [CLS_OUTPUT, PATCH_OUTPUT]
    return [CLS_OUTPUT]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``[N, D]`` scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps)


def pool_embeddings(cls: np.ndarray | None, patches: np.ndarray | None, pooling: int,
                    normalize: bool) -> tuple[np.ndarray, str]:
    """Global vectors from CLS ``[N, D]`` and patch tokens ``[N, h*w, D]``: ``([N, D or 2D], source)``.

    ``CLS_AND_MEAN_PATCH`` concatenates ``[CLS | mean]``; with ``normalize`` each half is unit-norm.
    """
    parts: list[np.ndarray] = []
    if pooling in (POOLING.CLS, POOLING.CLS_AND_MEAN_PATCH):
        assert cls is not None
        parts.append(cls.astype(np.float32, copy=False))
    if pooling in (POOLING.MEAN_PATCH, POOLING.CLS_AND_MEAN_PATCH):
        assert patches is not None
        parts.append(patches.astype(np.float32, copy=False).mean(axis=1))
    if normalize:
        parts = [l2_normalize(p) for p in parts]
    return np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0], POOLING_SOURCE[pooling]
