"""``vitserve embed``, ``vitserve features`` and ``vitserve admin``: query and manage a running service.

Exit codes: 0 success, 1 the server refused or failed the call (its message is printed), 2 usage
errors (bad arguments, unreadable files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clients.client import ModelDescription, VitServeClient, VitServeError, channel_credentials
from clients.targets import TargetError, parse_target, replica_addresses

DEFAULT_TARGET = "127.0.0.1:50051"


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"gateway HOST:PORT, several as HOST:PORT,HOST:PORT (balanced round-robin, UNAVAILABLE "
                        f"retried on another), ipv4:A:P,B:P or dns:///NAME:PORT (default {DEFAULT_TARGET})")
    p.add_argument("--no-retries", action="store_true",
                   help="do not retry UNAVAILABLE on another replica (the first failure is the answer)")
    p.add_argument("--timeout", type=float, default=60.0, help="call deadline in seconds")
    p.add_argument("--token-file", type=Path, help="file holding the bearer token the server requires")
    p.add_argument("--tls-ca", type=Path, help="use TLS, trusting this PEM CA (see --tls for system roots)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's trusted roots")
    p.add_argument("--tls-cert", type=Path, help="client certificate for mutual TLS (PEM)")
    p.add_argument("--tls-key", type=Path, help="private key of --tls-cert (PEM)")


def _common(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG/JPEG/WebP/BMP)")
    p.add_argument("--model", default="", help="model name (may be omitted when only one is served)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="dtype the server sends back")
    p.add_argument("--out", type=Path, help="save the array to this .npy file")
    p.add_argument("--lane", choices=("throughput", "latency"), default="",
                   help="run on the model's throughput or latency lane (its manifest must declare it)")
    p.add_argument("--resize-op", choices=("resize", "center_crop", "letterbox"), default="",
                   help="how images of another size reach the model's input (default: the model's)")
    p.add_argument("--bucket", choices=("auto",), default="",
                   help="auto: run on the model's resolution bucket that fits the images best (a model "
                        "exported with --resolutions); default: the named model itself")
    p.add_argument("--version", default="", help="a version the server has loaded, e.g. 2 (default: the newest)")
    _connection(p)
    return p


def _client_options(prog: str, args: argparse.Namespace) -> tuple[str | None, object] | None:
    """(token, TLS credentials) from the connection flags; prints the problem and returns None."""
    try:
        token = args.token_file.read_text().strip() if args.token_file is not None else None
        tls = None
        if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
            tls = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except OSError as e:
        print(f"{prog}: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return None
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
    return token, tls


def _with_client(prog: str, args: argparse.Namespace, act: Callable[[VitServeClient], Any]) -> tuple[int, Any]:
    """``(0, act(client))`` with a client built from the connection flags; ``(2, None)`` when those
    flags are unusable, ``(1, "CODE: message")`` when the server answers with an error (printed)."""
    connection = _client_options(prog, args)
    if connection is None:
        return 2, None
    token, tls = connection
    try:
        with VitServeClient(args.target, timeout=args.timeout, token=token, tls=tls,  # type: ignore[arg-type]
                            retries=not args.no_retries) as client:
            return 0, act(client)
    except TargetError as e:
        print(f"{prog}: --target: {e}", file=sys.stderr)
        return 2, None
    except VitServeError as e:
        print(f"{prog}: server error {e.code.name}: {e.details}", file=sys.stderr)
        return 1, f"{e.code.name}: {e.details}"


def _run(parser: argparse.ArgumentParser, argv: list[str] | None,
         call: Callable[[VitServeClient, argparse.Namespace, list[bytes]], np.ndarray]) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0)
    if args.out is not None and args.out.suffix != ".npy":
        print(f"{parser.prog}: --out must name a .npy file, got {args.out}", file=sys.stderr)
        return 2
    if args.version and (not args.version.isdigit() or int(args.version) < 1):
        print(f"{parser.prog}: --version must be an integer >= 1, got {args.version!r}", file=sys.stderr)
        return 2
    try:
        data = [p.read_bytes() for p in args.images]
    except OSError as e:
        print(f"{parser.prog}: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    code, array = _with_client(parser.prog, args, lambda client: call(client, args, data))
    if code:
        return code
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out, array)
        print(f"saved {args.out}")
    return 0


def embed_main(argv: list[str] | None = None) -> int:
    """``vitserve embed IMG... [--target HOST:PORT] [--model M] [--pooling cls|mean|both] [--normalize]
    [--out FILE.npy]``."""
    parser = _common("vitserve embed", "Global embeddings of image files from a running service.")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    parser.add_argument("--pooling", choices=("cls", "mean", "both"), default="cls",
                        help="CLS token [N, D] (default), mean of patch tokens [N, D], or both "
                             "concatenated [N, 2D]")

    def call(client: VitServeClient, args: argparse.Namespace, data: list[bytes]) -> np.ndarray:
        emb = client.embed(data, model=args.model, l2_normalize=args.normalize, dtype=args.dtype,
                           pooling=args.pooling, lane=args.lane, resize_op=args.resize_op,
                           bucket=args.bucket, version=args.version)
        print(f"embeddings: shape {list(emb.shape)} {emb.dtype}")
        for path, row in zip(args.images, emb):
            print(f"  {path}: norm {float(np.linalg.norm(row.astype(np.float32))):.4f}")
        return emb

    return _run(parser, argv, call)


def features_main(argv: list[str] | None = None) -> int:
    """``vitserve features IMG... [--layout grid|tokens] [--cls] [--out FILE.npy]``."""
    parser = _common("vitserve features", "Patch features of image files from a running service.")
    parser.add_argument("--layout", choices=("grid", "tokens"), default="grid",
                        help="grid [N, h, w, D] (default) or tokens [N, h*w, D]")
    parser.add_argument("--cls", action="store_true",
                        help="also fetch the CLS token (saved next to --out as FILE.cls.npy)")
    parser.add_argument("--output", action="append",
                        help="patch-token output to fetch, e.g. patch_tokens_l-2 (repeatable; the first is "
                             "saved to --out; default patch_tokens); cls_attention (a model exported with "
                             "--attention) also fetches the CLS attention [N, heads, h*w] (saved as FILE.cls_attention.npy)")

    def call(client: VitServeClient, args: argparse.Namespace, data: list[bytes]) -> np.ndarray:
        res = client.features(data, model=args.model, layout=args.layout, include_cls=args.cls,
                              dtype=args.dtype, lane=args.lane, resize_op=args.resize_op,
                              outputs=args.output or (), bucket=args.bucket, version=args.version)
        print(f"features: shape {list(res.features.shape)} {res.features.dtype} "
              f"(grid {res.grid[0]}x{res.grid[1]}, patch {res.patch_size}, "
              f"model {res.model['name']} v{res.model['version']})")
        for name, array in (("cls", res.cls), ("cls_attention", res.cls_attention)):
            if array is not None:
                print(f"{name}: shape {list(array.shape)}")
                if args.out is not None:  # beside --out: FILE.cls.npy, FILE.cls_attention.npy
                    path = args.out.with_suffix(f".{name}.npy")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, array)
                    print(f"saved {path}")
        return res.features

    return _run(parser, argv, call)


def _model_summary(m: ModelDescription) -> dict[str, object]:
    return {"name": m.name, "version": m.version, "weights_sha256": m.weights_sha256,
            "input": [*m.input_size, m.input_channels], "embed_dim": m.embed_dim, "grid": list(m.grid),
            "patch_size": m.patch_size, "outputs": list(m.outputs), "max_batch_size": m.max_batch_size,
            "precision": m.precision, "base_model": m.base_model, "variants": list(m.variants),
            "lane": m.lane, "lanes": m.lanes, "preferred_batch_sizes": list(m.preferred_batch_sizes),
            "max_queue_delay_us": m.max_queue_delay_us, "default_resize_op": m.default_resize_op,
            "probe_scores": m.probe_scores, "versions": list(m.versions), "buckets": list(m.buckets)}


def admin_main(argv: list[str] | None = None) -> int:
    """``vitserve admin models|get|repository|load|unload|reload [MODEL]``: inspect and manage the
    served models (load/unload/reload/repository need `vitserve serve --enable-admin`). A target of
    several replicas (a list, or ``dns:///`` resolved now) runs the action on each and reports each."""
    parser = argparse.ArgumentParser(
        prog="vitserve admin", description="Inspect the served models; load, unload or reload them "
        "(the server must run with --enable-admin for load/unload/reload/repository). With a --target of "
        "several replicas the action runs on every one and each outcome is reported; exit 1 if any failed.")
    parser.add_argument("action", choices=("models", "get", "repository", "load", "unload", "reload"),
                        help="models: ListModels; get MODEL: GetModel; repository: every model in "
                             "Triton's repository with its state; load/unload/reload MODEL")
    parser.add_argument("model", nargs="?", default="", help="model name (get/load/unload/reload)")
    _connection(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.action in ("load", "unload", "reload") and not args.model:
        print(f"vitserve admin: {args.action} needs a MODEL name", file=sys.stderr)
        return 2
    def act(client: VitServeClient) -> object:
        if args.action == "models":
            return [_model_summary(m) for m in client.list_models()]
        if args.action == "get":
            return _model_summary(client.get_model(args.model))
        if args.action == "repository":
            return client.list_repository()
        result = getattr(client, f"{args.action}_model")(args.model)
        return {"model": result.model, "state": result.state, "elapsed_ms": round(result.elapsed_ms, 1),
                "served_models": list(result.served_models)}

    try:
        replicas = replica_addresses(parse_target(args.target))
    except TargetError as e:
        print(f"vitserve admin: --target: {e}", file=sys.stderr)
        return 2
    if len(replicas) == 1:
        code, out = _with_client(parser.prog, args, act)
        if code:
            return code
        print(json.dumps(out, indent=2))
        return 0
    return _admin_each(parser.prog, args, replicas, act)


def _admin_each(prog: str, args: argparse.Namespace, replicas: tuple[str, ...],
                act: Callable[[VitServeClient], Any]) -> int:
    """``vitserve admin`` on every replica of a listed target, one after the other, each on its own
    connection without retries (a retry would land on another replica); prints
    ``{"replicas": [{"target", "ok", "result" | "error"}], "failed": N}``. Exit 0 when every replica
    succeeded, 1 when any failed (the others were still done), 2 for unusable connection flags."""
    outcomes: list[dict[str, object]] = []
    for replica in replicas:
        one = argparse.Namespace(**{**vars(args), "target": replica, "no_retries": True})
        code, out = _with_client(f"{prog} [{replica}]", one, act)
        if code == 2:
            return 2
        outcomes.append({"target": replica, "ok": code == 0, **({"result": out} if code == 0 else
                                                               {"error": out})})
    failed = sum(not o["ok"] for o in outcomes)
    print(json.dumps({"replicas": outcomes, "failed": failed}, indent=2))
    return 1 if failed else 0
