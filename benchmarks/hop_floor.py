"""The floor of one Python gRPC unary hop on this machine, for reading ``vitserve bench``'s batch-1 overhead.

A server whose handler returns its request unchanged (``grpc.aio`` as the gateway uses, and the
thread-pool server for comparison) runs in its own process; a sync client sends ~1 KB requests (a
28x28 frame and its envelope) one at a time and reports the p50 round trip. Every call to vitserve
crosses one such hop (client -> gateway) on top of the gateway's call into Triton, so this is a
lower bound on what the gateway adds. Run: ``python -m benchmarks.hop_floor``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time
from concurrent import futures
from typing import Sequence

import grpc
import numpy as np

_SERVICE, _METHOD = "vitserve.floor.Echo", "Echo"


def _handler(fn) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(_SERVICE, {_METHOD: grpc.unary_unary_rpc_method_handler(fn)})


def _aio_server(port: int, ready) -> None:
    async def main() -> None:
        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handler(echo),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _sync_server(port: int, ready) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((_handler(lambda request, context: request),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    ready.set()
    server.wait_for_termination()


def _p50_ms(port: int, calls: int, payload: bytes) -> float:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{_SERVICE}/{_METHOD}")
        for _ in range(min(300, calls)):
            call(payload)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call(payload)
            times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--bytes", type=int, default=900, help="request size (default ~ one 28x28 frame)")
    args = p.parse_args(argv)
    payload = b"x" * args.bytes
    ctx = mp.get_context("spawn")
    for name, target in (("grpc.aio server", _aio_server), ("thread-pool server", _sync_server)):
        port, ready = _free_port(), ctx.Event()
        proc = ctx.Process(target=target, args=(port, ready), daemon=True)
        proc.start()
        try:
            if not ready.wait(30):
                print(f"{name}: did not start")
                return 1
            print(f"{name}, sync client, {args.bytes} B echo: p50 {_p50_ms(port, args.calls, payload):.3f} ms")
        finally:
            proc.terminate()
            proc.join(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
