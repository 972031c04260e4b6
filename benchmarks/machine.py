"""The machine a benchmark ran on, measured in the same run: CPU model and SIMD flags (lscpu), cores,
load average, and the fp32 matmul rate numpy reaches here (the limit other figures are a fraction of)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Any

import numpy as np


def machine() -> dict[str, Any]:
    """CPU model and flags (lscpu), cores, load, and the fp32 matmul rate numpy reaches here."""
    facts: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        facts["cpu"] = fields.get("Model name", "").strip()
        flags = fields.get("Flags", "").split()
        facts["flags"] = [f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))]
    except (OSError, subprocess.SubprocessError):
        facts["cpu"] = platform.processor()
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    a @ a  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        a @ a
        n += 1
    facts["fp32_matmul_gflops"] = round(2 * 1024**3 * n / (time.perf_counter() - t0) / 1e9, 1)
    facts["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return facts
