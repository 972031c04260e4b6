"""``vitserve bench``: served and in-process encoders through MLPerf LoadGen's scenarios, many models in
one leaderboard (Markdown, CSV with timm's columns, JSON, throughput-vs-p99 PNG), LoadGen's logs kept.

Scenarios are our users: single-stream = one robot camera per control step (p90 latency, dense patch
tokens); multi-stream = ``--cameras N`` frames per step (p99 of the step, patch tokens); server = online
VLM calls, Poisson arrivals at ``--target-qps`` under a p99 ``--latency-bound`` (CLS embeddings;
``--find-peak``: LoadGen searches the highest QPS that stays under it); offline = embedding a dataset
(samples/s, CLS). docs/BENCHMARKS.md explains every column.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from typing import Sequence

from bench.scenarios import EARLY_STOPPING_QUERIES, SCENARIOS

log = logging.getLogger(__name__)
CLI_SYSTEMS = ("service", "http", "onnxruntime")


def _list(choices: Sequence[str] | None = None):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if choices is not None and values == ["all"]:
            return list(choices)
        bad = [v for v in values if choices is not None and v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices or ['names'])}"
                                             f"{' (or all)' if choices else ''}, got {text!r}")
        return values
    return parse


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return v
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitserve bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", required=True, help="the model repository: its model.onnx files are the "
                   "in-process systems; served by this command (Triton + gateway) when --target is absent")
    p.add_argument("--target", help="HOST:PORT of a running gateway serving the same repository")
    p.add_argument("--http-url", help="http://HOST:PORT of that gateway's HTTP API (the http system; without "
                   "--target the command starts the API itself)")
    p.add_argument("--models", type=_list(), help="comma list of models (default: every model of the repository)")
    p.add_argument("--scenario", type=_list(SCENARIOS), default=["single-stream", "multi-stream", "server", "offline"],
                   help=f"comma list of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--systems", type=_list(CLI_SYSTEMS), default=["service", "onnxruntime"],
                   help="comma list: service (gRPC), http (the HTTP API; needs --input encoded), onnxruntime "
                   "(in-process, same model.onnx and threads; default: service,onnxruntime); "
                   "PyTorch needs the module in memory: bench.run.run_models(torch_models=...)")
    p.add_argument("--input", choices=("raw", "encoded"), default="raw",
                   help="raw uint8 frames (a robot) or PNG bytes decoded in every timed request (a VLM pipeline)")
    p.add_argument("--images", help="folder of JPEG/PNG images (default: Fashion-MNIST test)")
    p.add_argument("--num-samples", type=_positive(int), default=64, help="images in LoadGen's sample library")
    p.add_argument("--cameras", type=_positive(int), default=4, help="multi-stream: frames per query (step)")
    p.add_argument("--target-qps", type=_positive(float),
                   help="server: Poisson arrival rate (default: half of what the system sustains, measured first)")
    p.add_argument("--latency-bound", type=_positive(float), default=200.0, help="server: p99 bound in ms")
    p.add_argument("--find-peak", action="store_true",
                   help="server: LoadGen's FindPeakPerformance, the highest QPS whose p99 meets the bound (slow)")
    p.add_argument("--control-hz", type=_positive(float),
                   help="single/multi-stream: report the fraction of steps slower than 1/HZ")
    p.add_argument("--min-duration-ms", type=_positive(int), default=3000, help="LoadGen min_duration_ms per run")
    p.add_argument("--min-queries", type=_positive(int), help="LoadGen min_query_count for every scenario "
                   f"(default: early stopping's minimum, {EARLY_STOPPING_QUERIES})")
    p.add_argument("--mlperf-strict", action="store_true", help="MLPerf's durations (600 s) and query counts")
    p.add_argument("--accuracy", action="store_true", help="also LoadGen accuracy mode: every system's outputs "
                   "for the same samples, compared (max abs error)")
    p.add_argument("--service-workers", type=_positive(int), default=8, help="concurrent requests to the service")
    p.add_argument("--intra-op-threads", type=int, help="in-process ORT threads (default: the served config's)")
    p.add_argument("--out", default="bench-out", help="report directory (bench.md/.csv/.json/.png, loadgen/)")
    p.add_argument("--triton-timeout", type=float, default=300.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    from bench.repository import UnknownModelError, select_models

    try:
        models = select_models(args.model_repository, args.models)
    except (UnknownModelError, FileNotFoundError) as e:
        p.error(str(e))  # exit 2
    if "http" in args.systems and args.input != "encoded":
        p.error("--systems http sends image files: add --input encoded")
    if "http" in args.systems and args.target is not None and args.http_url is None:
        p.error("--systems http with --target needs --http-url http://HOST:PORT of the same gateway")
    if args.target is not None:
        from clients.targets import TargetError, parse_target
        try:
            parse_target(args.target)
        except TargetError as e:
            p.error(f"--target: {e}")
    from bench.machine import machine
    from bench.report import text_table, write_report
    from bench.run import BenchOptions, run_models

    counts = {s: args.min_queries for s in SCENARIOS} if args.min_queries else {}
    opts = BenchOptions(scenarios=args.scenario, systems=args.systems, input_kind=args.input, images=args.images,
                        num_samples=args.num_samples, cameras=args.cameras, target_qps=args.target_qps,
                        latency_bound_ms=args.latency_bound, find_peak=args.find_peak, control_hz=args.control_hz,
                        min_duration_ms=args.min_duration_ms, min_query_count=counts, strict=args.mlperf_strict,
                        accuracy=args.accuracy, service_workers=args.service_workers,
                        intra_op_threads=args.intra_op_threads)
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            conditions = {"machine": machine(int8=True)}
            target, http_url = args.target, args.http_url
            started = {"service", "http"} & set(args.systems) and target is None
            if started:
                from serving.gateway import embedded_service
                from serving.grpc_server import ServerOptions

                options = ServerOptions(http_port=0 if "http" in args.systems else None)
                gateway = stack.enter_context(embedded_service(args.model_repository, options, args.triton_timeout))
                target = gateway.target
                http_url = gateway.http_url if "http" in args.systems else None
            conditions.update(describe_conditions(opts, target, bool(started)))
            conditions["command"] = "vitserve bench " + " ".join(argv)
            runs = run_models(models, args.model_repository, opts, args.out, target=target, http_url=http_url,
                              progress=lambda line: print(line, flush=True))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"vitserve bench: {e}", file=sys.stderr)
        return 1
    conditions["wall_s"] = round(time.perf_counter() - t0, 1)
    paths = write_report(runs, conditions, args.out, opts.scenarios)
    from bench.report import rows
    print(text_table(rows(runs, conditions), opts.scenarios))
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


def describe_conditions(opts, target: str | None, started: bool) -> dict:
    """Transport, input kind, batching, requests and LoadGen settings, as the report's header states them."""
    from bench.flops import CONVENTION

    transport = []
    if "service" in opts.systems:
        transport.append(f"gRPC to {target} ({'Triton + gateway started by this command; first request = cold start' if started else 'a running service'}), "
                         f"{opts.service_workers} concurrent requests")
    if "http" in opts.systems:
        transport.append(f"HTTP/1.1 JSON (base64 images and tensors), keep-alive, {opts.service_workers} concurrent requests")
    transport += [f"{s} in-process" for s in opts.systems if s not in ("service", "http")]
    strict = "MLPerf strict (min_duration 600 s, mlperf.conf query counts)" if opts.strict else (
        f"min_duration {opts.min_duration_ms} ms, min_query_count {opts.min_query_count or EARLY_STOPPING_QUERIES}")
    return {
        "transport": "; ".join(transport),
        "input": f"{opts.input_kind} ({'PNG bytes' if opts.input_kind == 'encoded' else 'uint8 frames'} at the model's "
                 f"input size), {opts.num_samples} real images ({opts.images or 'Fashion-MNIST test'})",
        "decoding_timed": "yes (PNG decoded in every request, by the gateway, or in process by the same decoder, serving.images)"
                          if opts.input_kind == "encoded" else "no decoding (raw frames)",
        "batching": "service: Triton dynamic batching as the model's config.pbtxt sets it, queries cut into requests "
                    "of <= max_batch_size images; in-process: one worker that batches the waiting queries up to "
                    "max_batch_size; offline: chunks of max_batch_size",
        "requests": "single-stream, multi-stream: Features (patch tokens, layout tokens); server, offline: Embed (CLS)",
        "loadgen": f"{strict}; multi-stream {opts.cameras} samples/query; server latency bound {opts.latency_bound_ms} ms"
                   f" at p99, target QPS {opts.target_qps or 'auto (half of min(offline calibration, 1/warm latency))'}"
                   f"{', FindPeakPerformance' if opts.find_peak else ''}; offline expected QPS = 3 x a calibration run",
        "flop_convention": CONVENTION,
        "control_hz": opts.control_hz,
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
