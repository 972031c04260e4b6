"""Generate protos/vitserve_pb2*.py from protos/vitserve.proto with the pinned grpcio-tools.

Run ``python -m protos.generate`` from the repository root; ``--check`` exits 1 when the committed
files differ from what would be generated (a test runs it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/vitserve.proto"
OUTPUTS = ("protos/vitserve_pb2.py", "protos/vitserve_pb2.pyi", "protos/vitserve_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) on the proto into ``out_dir`` (same relative layout)."""
    from grpc_tools import protoc

    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    a = p.parse_args(argv)
    if not a.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [o for o in OUTPUTS
                 if not (ROOT / o).is_file() or (ROOT / o).read_bytes() != (Path(tmp) / o).read_bytes()]
    if stale:
        print(f"stale generated files: {stale}; run `python -m protos.generate`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
