"""The ``vitserve`` command: a thin dispatcher over each stage's ``main(argv) -> int``.

Subcommand modules are imported lazily so that the client commands (``embed``, ``features``) start
without importing torch.
"""

from __future__ import annotations

import importlib
import logging
import sys
from importlib.metadata import PackageNotFoundError, version

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("training.train", "main", "train a self-supervised ViT encoder into a run directory"),
    "export": ("export.repository", "main", "export a run directory into a Triton model repository"),
    "serve": ("serving.server", "main", "start Triton and the gRPC gateway on a model repository"),
    "embed": ("clients.commands", "embed_main", "CLS embeddings of image files from a running service"),
    "features": ("clients.commands", "features_main", "patch features of image files from a running service"),
    "admin": ("clients.commands", "admin_main", "list/describe served models; load, unload, reload (--enable-admin)"),
    "demo": ("clients.demo", "main", "train, export, serve and query Fashion-MNIST end to end"),
    "bench": ("clients.bench", "main", "service vs in-process throughput/latency sweep (JSON, table, PNG)"),
    "probe": ("probes.cli", "main", "k-NN, linear and dense probe quality of a run, ONNX model or service"),
    "embed-dataset": ("embed_dataset.cli", "main",
                      "embed a folder, Parquet table or WebDataset shards on Ray Data (resumable)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vitserve COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {helptext}" for name, (_, _, helptext) in COMMANDS.items()]
    lines += ["", "`vitserve COMMAND --help` describes each command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
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
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
