"""The ``tritonserver`` tree the ``nvidia-pytriton`` wheel ships, made runnable: a writable copy with a stub.

The wheel's server tree is read-only inside site-packages and lacks the Python-backend stub in
``backends/python/``, so a writable copy with the stub for this interpreter is prepared once under
``~/.cache/vitserve/`` (atomically, so concurrent launches never see a half-written copy).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from serving.errors import TritonLaunchError

log = logging.getLogger(__name__)

STUB_NAME = "triton_python_backend_stub"


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def pytriton_paths() -> tuple[Path, Path, str]:
    """The wheel's ``tritonserver`` tree, its bundled shared-library directory, and its version."""
    try:
        import pytriton
    except ImportError as e:
        raise TritonLaunchError(
            "nvidia-pytriton is not installed; `pip install nvidia-pytriton` provides tritonserver") from e
    package_dir = Path(pytriton.__file__).resolve().parent
    server_dir = package_dir / "tritonserver"
    libs_dir = package_dir.parent / "nvidia_pytriton.libs"
    try:
        wheel_version = version("nvidia-pytriton")
    except PackageNotFoundError:
        wheel_version = "unknown"
    if not (server_dir / "bin" / "tritonserver").is_file():
        raise TritonLaunchError(f"no tritonserver binary in {server_dir}; reinstall nvidia-pytriton")
    return server_dir, libs_dir, wheel_version


def cache_root() -> Path:
    """``$VITSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/vitserve``, else ``~/.cache/vitserve``."""
    if os.environ.get("VITSERVE_CACHE_DIR"):
        return Path(os.environ["VITSERVE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vitserve"


def prepare_server_tree(cache_dir: Path | None = None) -> Path:
    """A writable copy of the wheel's server with this Python's backend stub, created once.

    The copy is assembled in a temporary sibling directory and renamed into place: rename is atomic,
    so a concurrent launch either sees the finished tree or builds its own and discards it.
    """
    server_dir, _, wheel_version = pytriton_paths()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    # The stub links libpython<major.minor>, so the interpreter version is part of the cache key.
    target = (cache_dir or cache_root()) / f"tritonserver-{wheel_version}-py{py}"
    if (target / "backends" / "python" / STUB_NAME).is_file():
        return target
    stub = server_dir / "python_backend_stubs" / py / STUB_NAME
    if not stub.is_file():
        available = sorted(p.name for p in (server_dir / "python_backend_stubs").iterdir())
        raise TritonLaunchError(
            f"nvidia-pytriton {wheel_version} has no Python-backend stub for Python {py} "
            f"(it ships {available}); run vitserve with one of those Python versions")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # not made by us (ours appear complete, by rename): rebuild it
        log.warning("replacing incomplete tritonserver copy %s", target)
        shutil.rmtree(target, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tree = tmp / "tritonserver"
        shutil.copytree(server_dir, tree, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        shutil.copy2(stub, tree / "backends" / "python" / STUB_NAME)
        try:
            os.rename(tree, target)
            log.info("prepared tritonserver %s for Python %s in %s", wheel_version, py, target)
        except OSError:
            if not (target / "backends" / "python" / STUB_NAME).is_file():
                raise
            log.debug("another process prepared %s first", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def server_env(libs_dir: Path) -> dict[str, str]:
    """The environment ``tritonserver`` runs in: the wheel's libraries, and this venv for ``model.py``."""
    env = os.environ.copy()
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (env.get("LD_LIBRARY_PATH", ""), str(libs_dir)) if p)
    # model.py runs inside the stub's embedded interpreter: give it this venv's packages and the repo.
    site_packages = sysconfig.get_paths()["purelib"]
    platlib = sysconfig.get_paths()["platlib"]
    paths = dict.fromkeys([site_packages, platlib, str(_repo_root())])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
