"""Suite-wide: how ``make test`` spreads the suite over two pytest-xdist workers (``--dist loadgroup``).

Every test module is one group, so a module's server (Triton, a gateway, a replica fleet) starts once,
in one worker, as the module's fixtures promise. The modules that start a local Ray share one group:
two Ray clusters on one 2-core machine would starve each other (ray-project/ray#44687), and those
tests look at the process table for Ray's processes. Without xdist (plain ``pytest``) the marks do
nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Modules that start a local Ray (embed-dataset jobs, its benchmark, the process-fate checks of it).
RAY_MODULES = ("embed_dataset/", "benchmarks/test_embed_dataset_bench.py", "reliability/test_process_fate.py")


def xdist_group_of(path: Path) -> str:
    relative = path.resolve().relative_to(TESTS).as_posix()
    return "ray" if relative.startswith(RAY_MODULES) else relative


def pytest_itemcollected(item: pytest.Item) -> None:
    # At collection of each item, so the mark is there before xdist's own collection hooks read it.
    if item.get_closest_marker("xdist_group") is None:
        item.add_marker(pytest.mark.xdist_group(xdist_group_of(Path(item.fspath))))
