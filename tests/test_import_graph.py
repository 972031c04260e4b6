"""The project's imports run one way: no cycle between files and nothing up the layer table
(``vitserve/import_graph.py``; module-level and function-level imports alike)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitserve.import_graph import build, cycles, main, unknown_packages, upward


@pytest.fixture(scope="module")
def graph():
    return build()


def test_no_import_cycle_between_files(graph) -> None:
    found = [" <-> ".join(graph.files[m] for m in c) for c in cycles(graph)]
    assert not found, "import cycles between files:\n  " + "\n  ".join(found)


def test_imports_only_go_down_the_layers(graph) -> None:
    found = upward(graph)
    assert not found, "imports up the layer table:\n  " + "\n  ".join(found)


def test_every_package_has_a_layer(graph) -> None:
    assert unknown_packages(graph) == []


def test_the_graph_covers_the_project(graph) -> None:
    for module in ("clients.client", "training.losses.dino", "vitserve.cli", "benchmarks.serving_bench"):
        assert module in graph.files
    assert not any(m.startswith("tests") for m in graph.files)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_function_level_and_relative_imports_make_a_cycle(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "export/__init__.py": "",
        "export/a.py": "from export.b import f\n",
        "export/b.py": "def f():\n    from . import c\n",
        "export/c.py": "def g():\n    import export.a\n",
        "export/d.py": "from .a import x\n",
    })
    assert cycles(build(root)) == [["export.a", "export.b", "export.c"]]


def test_from_package_import_submodule_resolves_the_submodule(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "training/__init__.py": "",
        "training/losses/__init__.py": "from training.losses.dino import loss\n",
        "training/losses/dino.py": "from training.losses import precision\nloss = 1\n",
        "training/losses/precision.py": "",
        "training/train.py": "from training.losses import loss, dino\n",
    })
    g = build(root)
    assert cycles(g) == []  # dino -> precision, not dino -> losses/__init__ -> dino
    assert {(e.importer, e.imported) for e in g.edges} == {
        ("training.losses", "training.losses.dino"), ("training.losses.dino", "training.losses.precision"),
        ("training.train", "training.losses"), ("training.train", "training.losses.dino")}


def test_an_upward_import_names_both_files_and_layers(tmp_path: Path, capsys) -> None:
    root = _tree(tmp_path, {
        "export/__init__.py": "",
        "export/pre.py": "def spec():\n    from serving.preprocess import Spec\n",
        "serving/__init__.py": "",
        "serving/preprocess.py": "import export.pre\nclass Spec: ...\n",
        "probes/__init__.py": "import embed_dataset\n",
        "embed_dataset/__init__.py": "",
        "nowhere/__init__.py": "",
    })
    g = build(root)
    assert upward(g) == [
        "export/pre.py:2 (export, layer 2) imports serving/preprocess.py (serving, layer 3)",
        "probes/__init__.py:1 (probes, layer 5) imports embed_dataset/__init__.py (embed_dataset, layer 5)"]
    assert unknown_packages(g) == ["nowhere"]
    assert main(["--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "export (2) -> serving (3): 1   UP" in out and "export/pre.py <-> serving/preprocess.py" in out


def test_imports_guarded_by_import_error_are_optional(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "export/__init__.py": "",
        "export/model.py": ("import numpy\ntry:\n    import triton_python_backend_utils\n"
                            "except ImportError:\n    pass\ndef f():\n    import onnx\n"),
    })
    g = build(root)
    assert g.external["export.model"] == {"numpy": False, "triton_python_backend_utils": True, "onnx": False}
    assert g.needs(["export.model"]) == {"numpy", "onnx"}
