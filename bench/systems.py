"""Systems under test: the running service (gRPC), in-process ONNX Runtime on the same ``model.onnx``
and in-process PyTorch on any device. Each computes, for sample indices, what the request asks for:
CLS embeddings ``[n, D]`` (``Embed``) or dense patch tokens ``[n, h*w, D]`` (``Features``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench.samples import SampleSet

REQUESTS = ("embed", "features")  # Embed -> CLS; Features -> patch tokens (layout "tokens")
ORT_OUTPUT = {"embed": "cls", "features": "patch_tokens"}


class System(Protocol):
    """One system under test: ``run(idx)`` computes the outputs of samples ``idx`` (blocking)."""

    name: str
    max_batch: int

    def run(self, idx: np.ndarray, request: str) -> np.ndarray: ...

    def close(self) -> None: ...


class ServiceSystem:
    """The running service over gRPC: one ``Embed``/``Features`` call per chunk, on one shared channel."""

    def __init__(self, target: str, model: str, samples: SampleSet, max_batch: int, timeout: float = 120.0) -> None:
        from clients.client import VitServeClient

        self.name, self.target, self.model, self.samples, self.max_batch = "service", target, model, samples, max_batch
        self.client = VitServeClient(target, timeout=timeout)

    def run(self, idx: np.ndarray, request: str) -> np.ndarray:
        images = self.samples.request_images(idx)
        if request == "embed":
            return self.client.embed(images, model=self.model)
        return self.client.features(images, model=self.model, layout="tokens").features

    def close(self) -> None:
        self.client.close()


class HttpSystem:
    """The running service over its HTTP API (``vitserve serve --http-port``): ``POST /v1/embeddings``
    (base64 float32 out) and ``POST /v1/features`` (layout tokens), one keep-alive HTTP/1.1 connection
    per worker thread. The HTTP API takes image files, so the samples must be encoded (``--input encoded``)."""

    def __init__(self, url: str, model: str, samples: SampleSet, max_batch: int, timeout: float = 120.0) -> None:
        import threading
        from urllib.parse import urlsplit

        if samples.kind != "encoded":
            raise ValueError("the http system sends image files: use --input encoded")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--http-url must be http(s)://HOST:PORT, got {url!r}")
        self.name, self.url, self.model, self.samples, self.max_batch = "http", url, model, samples, max_batch
        self._parts, self._timeout, self._local = parts, timeout, threading.local()

    def _connection(self):
        import http.client

        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = cls(self._parts.hostname, self._parts.port, timeout=self._timeout)
        return conn

    def _post(self, path: str, body: dict) -> dict:
        import json

        conn = self._connection()
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            text = response.read()
        except OSError:
            conn.close()
            self._local.conn = None
            raise
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status} from {path}: {text[:300]!r}")
        return json.loads(text)

    def run(self, idx: np.ndarray, request: str) -> np.ndarray:
        import base64

        assert self.samples.encoded is not None
        images = [base64.b64encode(self.samples.encoded[i]).decode("ascii") for i in idx]
        if request == "embed":
            doc = self._post("/v1/embeddings", {"model": self.model, "input": images, "encoding_format": "base64"})
            return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in doc["data"]])
        from serving.http_json import tensor_from_json

        doc = self._post("/v1/features", {"model": self.model, "input": images, "layout": "tokens"})
        return tensor_from_json(doc["features"])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


class OrtSystem:
    """In-process ONNX Runtime on the served ``model.onnx`` with the served intra-op thread count."""

    def __init__(self, onnx_path: str | Path, samples: SampleSet, max_batch: int, intra_op_threads: int = 0) -> None:
        from export.model import make_session

        self.name, self.samples, self.max_batch = "onnxruntime", samples, max_batch
        self.threads = intra_op_threads
        self.session = make_session(str(onnx_path), intra_op_threads)
        self.input_name = self.session.get_inputs()[0].name

    def run(self, idx: np.ndarray, request: str) -> np.ndarray:
        return self.session.run([ORT_OUTPUT[request]], {self.input_name: self.samples.input_frames(idx)})[0]

    def close(self) -> None:
        self.session = None


class TorchSystem:
    """In-process PyTorch ``forward_features`` on ``device``: CLS = token 0, patch tokens after the prefix."""

    def __init__(self, model: Any, spec: Any, samples: SampleSet, max_batch: int, device: str = "cpu") -> None:
        import torch

        self.name = f"torch-{device}"
        self.samples, self.max_batch, self.device, self.spec = samples, max_batch, torch.device(device), spec
        self.model = model.eval().to(self.device)

    def run(self, idx: np.ndarray, request: str) -> np.ndarray:
        import torch

        from training.data import to_float_nchw

        frames = self.samples.input_frames(idx)
        with torch.inference_mode():
            x = to_float_nchw(frames, self.spec.mean, self.spec.std).to(self.device)
            tokens = self.model.forward_features(x)
            out = tokens[:, 0] if request == "embed" else tokens[:, self.spec.num_prefix_tokens:]
            return out.float().cpu().numpy()

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class ColdStart:
    """The first request after load (``first_ms``) and the median of the next few (``warm_ms``)."""

    first_ms: float
    warm_ms: float


def warm_up(system: System, request: str, n: int = 5) -> ColdStart:
    """Time the first request of one sample (cold), then ``n`` more (warm) before any measurement."""
    idx = np.array([0])
    t0 = time.perf_counter()
    system.run(idx, request)
    first = (time.perf_counter() - t0) * 1e3
    warm = []
    for i in range(n):
        t0 = time.perf_counter()
        system.run(np.array([i % len(system.samples)]), request)  # type: ignore[attr-defined]
        warm.append((time.perf_counter() - t0) * 1e3)
    return ColdStart(round(first, 3), round(float(np.median(warm)), 3))
