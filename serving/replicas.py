"""``vitserve serve --replicas N``: N gateway + embedded Triton pairs on one host, one client target.

Each replica is its own ``vitserve serve`` process (its own Triton, ports, supervisor), started with
the same flags; ``--port``, ``--http-port``, ``--health-port`` and ``--metrics-port`` are the first
replica's and the others take the next ports (0: each a free port). Once every replica is ready one
line goes to stdout::

    vitserve ready: replicas 127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3

which is the target a client balances over (``VitServeClient("127.0.0.1:P1,...")``); stderr gets one
``replica I: pid PID: <its ready line>`` per replica. SIGTERM/SIGINT go to every replica (each drains
as it would alone); the command returns when all have exited: 0 when all exited 0, else 1. A replica
that dies is reported and not restarted (its Triton is supervised by the replica itself). On a host
with several GPUs, give each replica its own GPU with ``CUDA_VISIBLE_DEVICES`` (not done here).
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PORT_FLAGS = ("--port", "--http-port", "--health-port", "--metrics-port")
_READY = re.compile(r"^vitserve ready: gateway (\S+?),")


def replica_argv(argv: list[str], args: argparse.Namespace, index: int) -> list[str]:
    """``argv`` of replica ``index`` (0-based): without ``--replicas``, each port flag shifted by ``index``."""
    dropped = {"--replicas", *PORT_FLAGS}
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in dropped:
            skip = "=" not in token
            continue
        out.append(token)
    for flag in PORT_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            out += [flag, str(value + index if value else 0)]
    return out


def serve_replicas(n: int, argv: list[str], args: argparse.Namespace) -> int:
    """Run ``n`` replicas until a signal (see the module docstring); the process exit code."""
    procs: list[subprocess.Popen[str]] = []
    stopping = threading.Event()

    def forward(signum: int, frame: object) -> None:
        stopping.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(n):
            procs.append(subprocess.Popen([sys.executable, "-m", "serving.server", *replica_argv(argv, args, i)],
                                          cwd=ROOT, stdout=subprocess.PIPE, text=True))
        targets = []
        for i, p in enumerate(procs):
            line = p.stdout.readline().strip() if p.stdout is not None else ""  # blocks until ready or exit
            match = _READY.match(line)
            if match is None:
                if not stopping.is_set():
                    print(f"vitserve serve: replica {i} did not start (exit code {p.wait()}); stopping the "
                          f"others", file=sys.stderr)
                forward(signal.SIGTERM, None)
                for q in procs:
                    q.wait()
                return 0 if stopping.is_set() else 1
            targets.append(match.group(1))
            print(f"replica {i}: pid {p.pid}: {line}", file=sys.stderr, flush=True)
        print(f"vitserve ready: replicas {','.join(targets)}", flush=True)
        codes: dict[int, int] = {}
        while len(codes) < n:
            for i, p in enumerate(procs):
                if i not in codes and p.poll() is not None:
                    codes[i] = p.returncode
                    if not stopping.is_set():
                        print(f"vitserve serve: replica {i} ({targets[i]}, pid {p.pid}) exited with code "
                              f"{p.returncode}; {n - len(codes)} replica(s) still serve", file=sys.stderr,
                              flush=True)
            time.sleep(0.2)
        return 0 if all(code == 0 for code in codes.values()) else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
