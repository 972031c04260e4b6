"""``vitserve serve`` as a real subprocess: one ready line, queries work, SIGTERM exits 0."""

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from clients.client import VitServeClient

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"^vitserve ready: gateway (127\.0\.0\.1:\d+), triton grpc (127\.0\.0\.1:\d+), "
                   r"models: (.+)$")


def test_serve_prints_ready_line_and_exits_0_on_sigterm(exported, fmnist_test_images):
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--model-repository", str(exported.repository),
         "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    drain = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    drain.start()
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = READY.match(line.strip())
        assert match, f"unexpected first line {line!r}; stderr:\n{''.join(stderr)}"
        assert match.group(3) == exported.name
        with VitServeClient(match.group(1)) as client:
            emb = client.embed(fmnist_test_images[:2])
        assert emb.shape == (2, exported.spec.embed_dim) and np.isfinite(emb).all()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read() == ""  # type: ignore[union-attr]  # exactly one line on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    drain.join(5)
    assert "stopping tritonserver" in "".join(stderr)
