"""The ``vitserve`` command: a thin dispatcher over each stage's ``main(argv) -> int``.

Subcommand modules are imported lazily, so the client commands (``embed``, ``features``, ``admin``)
run on a plain ``pip install vitserve`` (grpcio, numpy, protobuf). A command whose extra is not
installed says which one to install and exits 2 instead of a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
from importlib.metadata import PackageNotFoundError, version

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("training.train", "main", "train a self-supervised ViT encoder into a run directory"),
    "export": ("export.cli", "main", "export a run directory into a Triton model repository"),
    "serve": ("serving.server", "main", "start Triton and the gRPC gateway on a model repository"),
    "embed": ("clients.commands", "embed_main", "CLS embeddings of image files from a running service"),
    "features": ("clients.commands", "features_main", "patch features of image files from a running service"),
    "admin": ("clients.commands", "admin_main", "list/describe served models; load, unload, reload (--enable-admin)"),
    "viz": ("vitserve.viz_cli", "main", "PCA / foreground / CLS attention views of image files from a running service (PNG)"),
    "demo": ("vitserve.demo", "main", "train, export, serve and query Fashion-MNIST end to end"),
    "bench": ("bench.cli", "main", "MLPerf LoadGen scenarios, service vs in-process, many models in one leaderboard"),
    "probe": ("probes.cli", "main", "k-NN, linear and dense probe quality of a run, ONNX model or service"),
    "embed-dataset": ("embed_dataset.cli", "main",
                      "embed a folder, Parquet table or WebDataset shards on Ray Data (resumable)"),
}

# name -> the extra (pyproject.toml [project.optional-dependencies]) its module needs; None: the client.
EXTRAS: dict[str, str | None] = {
    "train": "train", "export": "export", "serve": "serve", "embed": None, "features": None, "admin": None,
    "viz": "viz", "demo": "all", "bench": "bench", "probe": "probe", "embed-dataset": "dataset",
}
# Top-level packages of this project: a missing one is a broken install, not a missing extra.
PROJECT_PACKAGES = frozenset({"contract", "protos", "training", "export", "serving", "clients", "probes",
                              "embed_dataset", "bench", "vitserve", "benchmarks"})


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vitserve COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {helptext}" for name, (_, _, helptext) in COMMANDS.items()]
    lines += ["", "`vitserve COMMAND --help` describes each command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``vitserve COMMAND ARGS...``; its exit code (2: usage, unknown command or a missing extra)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        try:
            print(f"vitserve {version('vitserve')}")
        except PackageNotFoundError:
            print("vitserve (not installed)")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vitserve: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module_name, func_name, _ = COMMANDS[name]
    try:
        return int(getattr(importlib.import_module(module_name), func_name)(rest) or 0)
    except ModuleNotFoundError as e:
        extra = EXTRAS[name]
        missing = e.name or ""
        if extra is None or not missing or missing.split(".")[0] in PROJECT_PACKAGES:
            raise
        print(missing_extra_message(name, extra, missing), file=sys.stderr)
        return 2


def missing_extra_message(command: str, extra: str, module: str) -> str:
    """What ``vitserve COMMAND`` prints when a module of its extra is not installed."""
    return f"vitserve {command}: needs the '{extra}' extra: pip install 'vitserve[{extra}]' (missing module {module})"


if __name__ == "__main__":
    sys.exit(main())
