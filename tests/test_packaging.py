"""``pip install .`` is the client alone (grpcio, numpy, protobuf); every ``vitserve`` command's imports
are covered by the extra the dispatcher names for it, and a missing extra is named, not a traceback."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from typing import Iterator
from pathlib import Path

import pytest

from vitserve import cli
from vitserve.import_graph import LAYERS, build

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BASE = {"grpcio", "numpy", "protobuf"}
# distribution (as pyproject.toml names it) -> the modules it provides
DISTRIBUTION_MODULES = {
    "numpy": {"numpy"}, "grpcio": {"grpc"}, "protobuf": {"google.protobuf"},
    "torch": {"torch"}, "torchvision": {"torchvision"}, "timm": {"timm"}, "safetensors": {"safetensors"},
    "pillow": {"PIL"}, "pyyaml": {"yaml"}, "tqdm": {"tqdm"}, "onnx": {"onnx"}, "onnxruntime-gpu": {"onnxruntime"},
    "tritonclient": {"tritonclient"}, "huggingface_hub": {"huggingface_hub"}, "nvidia-pytriton": {"pytriton"},
    "grpcio-health-checking": {"grpc_health"}, "grpcio-reflection": {"grpc_reflection"},
    "prometheus_client": {"prometheus_client"}, "matplotlib": {"matplotlib"},
    "pytest": {"pytest"}, "pytest-timeout": {"pytest_timeout"}, "pytest-xdist": {"xdist"}, "grpcio-tools": {"grpc_tools"},
    "hypothesis": {"hypothesis"}, "ray": {"ray"}, "pyarrow": {"pyarrow"},
    "aiohttp": {"aiohttp"}, "openai": {"openai"}, "selenium": {"selenium"},
    "kubernetes-validate": {"kubernetes_validate"}, "mlcommons-loadgen": {"mlperf_loadgen"},
}
# Imported only where present, behind a check that reports its absence (export --tensorrt).
OPTIONAL = {"tensorrt"}
# Modules of the client install: the client, the dispatcher, the contract and the stubs
# (protos.generate regenerates the stubs with grpcio-tools, a dev tool).
CLIENT_ROOTS = ["vitserve.cli", "clients.client", "clients.commands"]


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def _extra_distributions(extra: str) -> set[str]:
    """The distributions an extra installs, through ``vitserve[...]`` references, plus the base ones."""
    names = set(BASE)
    for requirement in PYPROJECT["project"]["optional-dependencies"][extra]:
        if _name(requirement) == "vitserve":
            for inner in re.search(r"\[(.*)\]", requirement).group(1).split(","):
                names |= _extra_distributions(inner.strip())
        else:
            names.add(_name(requirement))
    return names


def _modules(distributions: set[str]) -> set[str]:
    return set().union(*(DISTRIBUTION_MODULES[d] for d in distributions))


def test_the_base_install_is_grpcio_numpy_protobuf() -> None:
    assert {_name(r) for r in PYPROJECT["project"]["dependencies"]} == BASE
    assert PYPROJECT["project"]["scripts"] == {"vitserve": "vitserve.cli:main"}


def test_every_requirement_is_known_here() -> None:
    names = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    for requirements in PYPROJECT["project"]["optional-dependencies"].values():
        names |= {_name(r) for r in requirements} - {"vitserve"}
    assert names <= set(DISTRIBUTION_MODULES), names - set(DISTRIBUTION_MODULES)


def test_client_imports_only_grpc_numpy_protobuf() -> None:
    graph = build(ROOT)
    roots = CLIENT_ROOTS + [m for m in graph.files if m.split(".")[0] in ("contract", "protos") and m != "protos.generate"]
    assert graph.needs(roots) <= _modules(BASE), graph.needs(roots)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_each_command_is_covered_by_its_extra(command: str) -> None:
    extra = cli.EXTRAS[command]
    provided = _modules(BASE if extra is None else _extra_distributions(extra))
    missing = build(ROOT).needs([cli.COMMANDS[command][0]]) - provided - OPTIONAL
    assert not missing, f"vitserve {command} (extra {extra!r}) imports {sorted(missing)}"


def test_all_holds_every_extra_but_dev() -> None:
    extras = set(PYPROJECT["project"]["optional-dependencies"]) - {"all", "dev"}
    assert set().union(*map(_extra_distributions, extras)) <= _extra_distributions("all")
    assert set(cli.EXTRAS) == set(cli.COMMANDS) and set(cli.EXTRAS.values()) - {None} <= extras | {"all"}
    assert cli.PROJECT_PACKAGES == set(LAYERS)


def _blocked(modules: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    """``vitserve ARGV`` in a fresh interpreter in which importing ``modules`` fails."""
    code = (f"import sys\nfor m in {modules!r}:\n    sys.modules[m] = None\n"
            f"from vitserve.cli import main\nsys.exit(main({argv!r}))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_missing_extra_is_named_with_exit_2() -> None:
    done = _blocked(["torch"], ["train", "--help"])
    assert done.returncode == 2, done.stderr
    assert done.stderr == ("vitserve train: needs the 'train' extra: pip install 'vitserve[train]' "
                           "(missing module torch)\n")
    done = _blocked(["tritonclient"], ["serve", "--help"])
    assert done.returncode == 2 and "needs the 'serve' extra" in done.stderr and "Traceback" not in done.stderr


def test_client_commands_run_without_the_extras() -> None:
    heavy = ["torch", "timm", "onnx", "onnxruntime", "tritonclient", "pytriton", "PIL", "matplotlib", "yaml"]
    for command in ("embed", "features", "admin"):
        done = _blocked(heavy, [command, "--help"])
        assert done.returncode == 0, done.stderr


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@dataclass
class CleanVenv:
    """A fresh virtualenv with ``pip install .`` (the client alone) and what pip listed right after."""
    py: Path
    bin: Path
    env: dict[str, str]
    cwd: Path
    client_installed: set[str]


def _copy(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CleanVenv]:
    """One fresh virtualenv for the slow install tests: the client first (its package list recorded
    before anything else is installed), then the gateway image's install line goes on top. Removed
    afterwards: with the gateway's install line it is about 1 GB, and pytest keeps its temporary
    directories after the run (a CI machine ran out of disk during `make test`)."""
    if not _pypi_reachable():
        pytest.skip("pypi.org is not reachable: the clean install needs the index")
    tmp_path = tmp_path_factory.mktemp("clean-venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = tmp_path / "source"  # a copy: setuptools builds in the source tree (build/, *.egg-info)
    for name in ["pyproject.toml", "README.md", *LAYERS]:
        if (ROOT / name).exists():
            _copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", str(source)], check=True, env=env, cwd=tmp_path, timeout=600)
    listing = subprocess.run([py, "-m", "pip", "list", "--format", "json"], check=True, env=env, cwd=tmp_path,
                             capture_output=True, text=True).stdout
    installed = {d["name"].lower().replace("_", "-") for d in json.loads(listing)}
    try:
        yield CleanVenv(py, venv / "bin", env, tmp_path, installed)
    finally:
        shutil.rmtree(venv, ignore_errors=True)


@pytest.mark.slow
def test_a_clean_virtualenv_installs_the_client_alone(clean_venv: CleanVenv) -> None:
    py, vitserve, env, tmp_path = clean_venv.py, clean_venv.bin / "vitserve", clean_venv.env, clean_venv.cwd
    grpcio_needs = subprocess.run(
        [py, "-c", "import importlib.metadata as m, re; print(' '.join(re.match(r'[A-Za-z0-9_.-]+', r).group(0) "
         "for r in m.requires('grpcio') or [] if 'extra' not in r))"],
        check=True, env=env, cwd=tmp_path, capture_output=True, text=True).stdout.split()
    allowed = BASE | {"vitserve", "pip", "setuptools"} | {n.lower().replace("_", "-") for n in grpcio_needs}
    assert clean_venv.client_installed <= allowed, clean_venv.client_installed - allowed

    run = dict(env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert subprocess.run([vitserve, "embed", "--help"], **run).returncode == 0
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([vitserve, "embed", str(image), "--target", f"127.0.0.1:{port}", "--timeout", "5"], **run)
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr, done.stderr
    done = subprocess.run([vitserve, "train", "--help"], **run)
    assert done.returncode == 2 and done.stderr.startswith("vitserve train: needs the 'train' extra"), done.stderr


def _dockerfile() -> dict[str, list[str]]:
    """deploy/Dockerfile as {INSTRUCTION: [arguments, ...]} (continuation lines joined)."""
    out: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n", " ", (ROOT / "deploy" / "Dockerfile").read_text()).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.setdefault(instruction.upper(), []).append(rest.strip())
    return out


@pytest.mark.slow
def test_the_gateway_images_install_line_gives_a_working_gateway(clean_venv: CleanVenv) -> None:
    """deploy/Dockerfile, without Docker: its COPY lines and its ``pip install`` line, as written, into
    a fresh virtualenv; then its ENTRYPOINT runs (no Docker engine exists here to build the image)."""
    dockerfile = _dockerfile()
    assert dockerfile["FROM"] == ["python:3.11-slim"] and dockerfile["WORKDIR"][0] == "/src"
    image_src = clean_venv.cwd / "image-src"
    for line in dockerfile["COPY"]:
        *sources, dest = shlex.split(line)
        for src in sources:
            target = image_src / dest
            if dest.endswith("/") or len(sources) > 1:
                target = target / Path(src).name
            _copy(ROOT / src, target)
    [install] = [line for line in dockerfile["RUN"] if "pip install" in line]
    argv = shlex.split(install)
    assert argv[:2] == ["pip", "install"], f"the install line is not a plain pip install: {install}"
    # As written, but with pip's cache: an image build wants no cache in its layer; this test wants the
    # wheels `make test` just installed (onnxruntime-gpu and nvidia-pytriton are ~400 MB to download).
    argv = [a for a in argv if a != "--no-cache-dir"]
    done = subprocess.run([clean_venv.py, "-m", *argv], env=clean_venv.env, cwd=image_src, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"{install} (in {image_src}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"

    entrypoint = json.loads(dockerfile["ENTRYPOINT"][0])
    assert entrypoint[:1] == ["vitserve"]
    command = [str(clean_venv.bin / entrypoint[0]), *entrypoint[1:]]
    run = dict(env=clean_venv.env, cwd=clean_venv.cwd, capture_output=True, text=True, timeout=120)
    done = subprocess.run([*command, *json.loads(dockerfile["CMD"][0])], **run)
    assert done.returncode == 0 and "--triton-url" in done.stdout, done.stderr
    with socket.socket() as s:  # a Triton that is not there: the gateway starts, waits 1 s, says so
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([*command, "--triton-url", f"127.0.0.1:{port}", "--triton-timeout", "1", "--port", "0",
                           "--http-port", "0", "--metrics-port", "0"], **run)
    assert done.returncode == 1 and done.stderr.startswith(f"vitserve serve: Triton at 127.0.0.1:{port} was not "
                                                           "ready within 1s"), done.stderr
