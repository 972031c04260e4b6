"""The service under a load test and its data: ``vitserve serve`` as a subprocess (gRPC and HTTP ports),
its memory, in-process ONNX Runtime references, and the images and model the load uses."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


class Service:
    """``vitserve serve`` as a subprocess (gateway + its own Triton, gRPC and HTTP ports); always stopped
    on exit."""

    def __init__(self, repository: Path, max_in_flight: int = 64, extra: list[str] | None = None) -> None:
        self.repository = repository
        self.args = ["--max-in-flight", str(max_in_flight), *(extra or [])]
        self.proc: subprocess.Popen | None = None
        self.target = ""
        self.http_url = ""  # the HTTP API (--http-port 0)
        self.log: list[str] = []

    def start(self, timeout: float = 300.0) -> "Service":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vitserve.cli", "serve", "--model-repository", str(self.repository),
             "--port", "0", "--http-port", "0", *self.args], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True, start_new_session=True)
        # One thread reads the log from the start (so the server never blocks on a full pipe) and
        # signals the ready line; the wait is bounded even if the server prints nothing.
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(ready,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                what = (f"exited with code {self.proc.returncode}" if self.proc.poll() is not None
                        else f"was not ready within {timeout:.0f} s")
                self.stop()
                time.sleep(0.2)  # the reader thread takes the last lines
                raise RuntimeError(f"vitserve serve {what}; its last log lines:\n{''.join(self.log[-40:])}")
        return self

    def _drain(self, ready: threading.Event) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            if not ready.is_set() and line.startswith("vitserve ready: gateway "):
                self.target = line.split("gateway ", 1)[1].split(",", 1)[0]
                self.http_url = line.split(", http ", 1)[1].split(",", 1)[0]
                ready.set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def triton_pid(self) -> int | None:
        """The tritonserver child of the gateway process."""
        children = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):  # a restart is spawned by another thread
            try:
                children += (task / "children").read_text().split()
            except OSError:
                continue
        for pid in children:
            try:
                # The executable itself: the gateway's orphan reaper names tritonserver in its arguments.
                argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
                if Path(argv0).name == "tritonserver":
                    return int(pid)
            except OSError:
                continue
        return None

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (VmRSS), or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def onnx_reference(model_dir: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CLS ``[N, D]`` and patch tokens ``[N, h*w, D]`` from ONNX Runtime on the served ``model.onnx``."""
    import onnxruntime as ort

    (onnx_path,) = sorted(model_dir.glob("*/model.onnx"))[:1]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    cls, tokens = session.run(["cls", "patch_tokens"], {name: images})
    return cls, tokens


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()



def fashion_mnist_pool(n: int = 256) -> np.ndarray:
    from training.data import DataError, load_fashion_mnist

    try:
        return np.ascontiguousarray(load_fashion_mnist("test").images[:n])
    except DataError:
        return np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def export_test_model(repository: Path, name: str = "loadtest") -> Path:
    """A freshly initialised default encoder (28x28 grey, patch 4) exported with the real exporter."""
    import torch

    from export.options import ExportOptions, TritonOptions
    from export.repository import export_entries
    from export.sources import EncoderSource
    from training.backbone import FASHION_MNIST_MEAN, FASHION_MNIST_STD, create_encoder

    torch.manual_seed(0)
    model, spec = create_encoder(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    return export_entries(EncoderSource(model.eval(), spec), repository, name,
                          ExportOptions(triton=TritonOptions(max_batch_size=16)))[0]
