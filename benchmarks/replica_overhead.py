"""What balancing costs a batch-1 call: three replicas behind one target against one direct address.

Starts ``vitserve serve --replicas 3`` on a model repository and sends batch-1 ``Embed`` calls (one
28x28 frame, or the model's input size) from three clients in turn, call by call, so all three see
the same moment of the machine:

- ``balanced``: ``VitServeClient("A,B,C")`` (round_robin with health checking, retries, big buffer);
- ``direct``: ``VitServeClient("A")`` (the same client on one address);
- ``bare``: a plain ``grpc.insecure_channel("A")`` without the service config (the client before
  replicas existed), the same request bytes.

Prints one JSON object: p50 / p90 of each in ms and the p50 differences. Run::

    python -m benchmarks.replica_overhead --model-repository REPO [--calls 2000]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import grpc
import numpy as np

from clients.client import VitServeClient
from clients.messages import embed_request
from protos import vitserve_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def _percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p90_ms": round(float(np.percentile(a, 90)), 4)}


def measure(targets: list[str], model: str, image: np.ndarray, calls: int, warmup: int = 100) -> dict[str, object]:
    """Interleaved batch-1 Embed round trips of the three clients (see the module docstring)."""
    balanced = VitServeClient(",".join(targets))
    direct = VitServeClient(targets[0])
    channel = grpc.insecure_channel(targets[0])
    stub = vitserve_pb2_grpc.VisionEncoderStub(channel)
    request = embed_request(image, model, False, "float32", "cls", "", "", "", "")
    kinds = {"balanced": lambda: balanced.embed(image, model=model),
             "direct": lambda: direct.embed(image, model=model),
             "bare": lambda: stub.Embed(request, timeout=60)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for i in range(warmup + calls):
            for name, call in kinds.items():
                t0 = time.perf_counter()
                call()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    finally:
        balanced.close()
        direct.close()
        channel.close()
    result: dict[str, object] = {k: _percentiles(v) for k, v in times.items()}
    p50 = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    result["balanced_minus_direct_p50_ms"] = round(p50["balanced"] - p50["direct"], 4)
    result["direct_minus_bare_p50_ms"] = round(p50["direct"] - p50["bare"], 4)
    result["calls_each"] = calls
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replica_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--model-repository", required=True, type=Path)
    p.add_argument("--calls", type=int, default=2000, help="measured calls per client (default 2000)")
    args = p.parse_args(argv)
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "--model-repository", str(args.model_repository),
                             "--replicas", "3", "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip() if proc.stdout else ""
        match = re.match(r"^vitserve ready: replicas (\S+)$", line)
        if match is None:
            print(f"replica_overhead: the replicas did not start ({line!r})", file=sys.stderr)
            return 1
        targets = match.group(1).split(",")
        with VitServeClient(targets[0]) as client:
            info = client.get_model()
        h, w = info.input_size
        image = np.random.default_rng(0).integers(0, 256, (1, h, w, info.input_channels), dtype=np.uint8)
        print(json.dumps({"model": info.name, "image": [h, w, info.input_channels],
                          **measure(targets, info.name, image, args.calls)}, indent=2))
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
