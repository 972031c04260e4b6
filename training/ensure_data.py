"""Make sure Fashion-MNIST is present: ``python -m training.ensure_data`` (used by ``make demo/test``).

Looks where the loader looks (``--data-dir``, ``$VITSERVE_FASHION_MNIST``, the Debian package's
directory); when the files are missing, tries ``apt-get install dataset-fashion-mnist`` (as root, or
through non-interactive sudo); when that is impossible, exits 1 with a message saying how to get
the files or how to point the loader at them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from training.data import DataError, fashion_mnist_dir

DEBIAN_PACKAGE = "dataset-fashion-mnist"


def _apt_install() -> tuple[bool, str]:
    """Try to install the Debian package; returns (ok, what happened)."""
    if shutil.which("apt-get") is None:
        return False, "apt-get is not available on this machine"
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return False, "not root and sudo is not available"
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = prefix + ["apt-get", "install", "-y", "--no-install-recommends", DEBIAN_PACKAGE]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 and "Unable to locate package" in (r.stderr + r.stdout):
        subprocess.run(prefix + ["apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return False, f"`{' '.join(cmd)}` failed: " + " | ".join(tail)
    return True, f"installed {DEBIAN_PACKAGE}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.ensure_data", description=__doc__)
    p.add_argument("--data-dir", help="directory holding the four Fashion-MNIST IDX .gz files")
    p.add_argument("--no-install", action="store_true", help="only check, never run apt-get")
    a = p.parse_args(argv)
    try:
        print(f"Fashion-MNIST: {fashion_mnist_dir(a.data_dir)}")
        return 0
    except DataError as missing:
        if a.data_dir or a.no_install:
            print(f"error: {missing}", file=sys.stderr)
            return 1
        ok, what = _apt_install()
        if ok:
            try:
                print(f"Fashion-MNIST: {fashion_mnist_dir()} ({what})")
                return 0
            except DataError as still:
                missing = still
        print(f"error: {missing}\n(automatic install: {what})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
