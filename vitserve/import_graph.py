"""The project's import graph, read with ``ast``: file-level cycles and imports that go up the layers.

``python -m vitserve.import_graph`` prints the package-level graph (with the number of file-level
imports behind each edge), the file-level cycles and the upward imports; exit 1 when there are any.
Every import statement counts, at module level or inside a function, class or ``if`` block.
``import a.b`` and ``from a import b`` depend on the file that defines ``a.b`` (the submodule when
``b`` is one, else ``a/__init__.py``); the parent packages' ``__init__`` files are not counted.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# The layer table of DESIGN.md: a package imports only packages of a lower layer, or of its own
# layer when the pair is not in SEPARATE.
LAYERS: dict[str, int] = {
    "protos": 0, "contract": 0,
    "training": 1,
    "export": 2,
    "serving": 3,
    "clients": 4,
    "probes": 5, "embed_dataset": 5, "bench": 5,
    "vitserve": 6, "benchmarks": 6,
}
SEPARATE: frozenset[tuple[str, str]] = frozenset({("probes", "embed_dataset"), ("embed_dataset", "probes"),
                                                  ("bench", "probes"), ("probes", "bench"),
                                                  ("bench", "embed_dataset"), ("embed_dataset", "bench")})
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Edge:
    """One import: ``importer`` (a file) depends on ``imported`` (a file), at ``line``."""

    importer: str
    imported: str
    line: int


@dataclass
class ImportGraph:
    """Files (module name -> path relative to the root) and the imports between them."""

    files: dict[str, str]
    edges: list[Edge] = field(default_factory=list)
    # module -> {outside top-level module (``google.protobuf`` for google's): only imported optionally}
    external: dict[str, dict[str, bool]] = field(default_factory=dict)

    def package(self, module: str) -> str:
        """The top-level package of a project module."""
        return module.split(".")[0]

    def successors(self) -> dict[str, set[str]]:
        """Module -> the project modules it imports (self-imports dropped)."""
        out: dict[str, set[str]] = {m: set() for m in self.files}
        for e in self.edges:
            if e.importer != e.imported:
                out[e.importer].add(e.imported)
        return out

    def closure(self, roots: list[str]) -> set[str]:
        """The project modules that the roots import, directly or through each other (roots included)."""
        succ = self.successors()
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(succ[m])
        return seen

    def needs(self, roots: list[str]) -> set[str]:
        """The outside modules (not the standard library, not optional) that the roots' closure imports."""
        return {name for m in self.closure(roots) for name, optional in self.external.get(m, {}).items()
                if not optional and name.split(".")[0] not in sys.stdlib_module_names}

    def package_edges(self) -> Counter[tuple[str, str]]:
        """(importer package, imported package) -> how many file-level imports cross it."""
        return Counter((self.package(e.importer), self.package(e.imported)) for e in self.edges
                       if self.package(e.importer) != self.package(e.imported))


def module_name(path: Path, root: Path) -> str:
    """``export/cli.py`` -> ``export.cli``; ``training/losses/__init__.py`` -> ``training.losses``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(root: Path = ROOT) -> dict[str, str]:
    """Module name -> relative path of every .py file in the root's packages (top-level dirs with
    ``__init__.py``; ``tests`` is not a project package)."""
    files: dict[str, str] = {}
    for init in sorted(root.glob("*/__init__.py")):
        if init.parent.name == "tests":
            continue
        for path in sorted(init.parent.rglob("*.py")):
            if all((root / d / "__init__.py").is_file() for d in path.relative_to(root).parents if d != Path(".")):
                files[module_name(path, root)] = str(path.relative_to(root))
    return files


def _resolve(name: str, files: dict[str, str]) -> str | None:
    """The longest prefix of a dotted name that is a project module, or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in files:
            return candidate
    return None


def _guards_import_error(node: ast.Try) -> bool:
    """Whether a ``try`` has a handler for ImportError or ModuleNotFoundError."""
    names = []
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names += [k.id for k in kinds if isinstance(k, ast.Name)]
    return bool({"ImportError", "ModuleNotFoundError"} & set(names))


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str], int, bool]]:
    """Each import in the tree as (base module, imported names or [] for ``import base``, line,
    optional: inside the body of a ``try`` that catches ImportError)."""
    out: list[tuple[str, list[str], int, bool]] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, optional: bool) -> None:
        if isinstance(node, ast.Import):
            out.extend((alias.name, [], node.lineno, optional) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.append((base, [alias.name for alias in node.names], node.lineno, optional))
        elif isinstance(node, ast.Try) and _guards_import_error(node):
            for child in node.body:
                visit(child, True)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, optional)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, optional)

    visit(tree, False)
    return out


def build(root: Path = ROOT) -> ImportGraph:
    """Read every project file and record its imports of project files and of outside modules."""
    files = discover(root)
    graph = ImportGraph(files)
    for module, rel in files.items():
        tree = ast.parse((root / rel).read_text(), filename=rel)
        seen: set[tuple[str, int]] = set()
        for base, names, line, optional in _imports(tree, module, rel.endswith("__init__.py")):
            top = base.split(".")[0]
            if top not in LAYERS:
                if top and top != "__future__":
                    external = ".".join(base.split(".")[:2]) if top == "google" else top
                    known = graph.external.setdefault(module, {})
                    known[external] = known.get(external, True) and optional
                continue
            # ``from a import b``: the file a/b.py when b is a submodule, else the file defining a.
            targets = [f"{base}.{n}" if f"{base}.{n}" in files else _resolve(base, files) for n in names]
            for target in targets or [_resolve(base, files)]:
                if target is not None and (target, line) not in seen:
                    seen.add((target, line))
                    graph.edges.append(Edge(module, target, line))
    return graph


def cycles(graph: ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one file (Tarjan), each sorted."""
    succ = graph.successors()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(succ) + 100))
    for v in sorted(succ):
        if v not in index:
            visit(v)
    return sorted(found)


def unknown_packages(graph: ImportGraph) -> list[str]:
    """Top-level packages that the layer table does not place."""
    return sorted({graph.package(m) for m in graph.files} - set(LAYERS))


def upward(graph: ImportGraph) -> list[str]:
    """One line per import that goes up the layers or between SEPARATE packages."""
    out = []
    for e in graph.edges:
        a, b = graph.package(e.importer), graph.package(e.imported)
        if a == b or a not in LAYERS or b not in LAYERS:
            continue
        if LAYERS[b] > LAYERS[a] or (a, b) in SEPARATE:
            out.append(f"{graph.files[e.importer]}:{e.line} ({a}, layer {LAYERS[a]}) imports "
                       f"{graph.files[e.imported]} ({b}, layer {LAYERS[b]})")
    return out


def report(graph: ImportGraph) -> str:
    """The package graph, the file-level cycles and the upward imports as text."""
    lines = ["package graph (importer -> imported: file-level imports):"]
    for (a, b), n in sorted(graph.package_edges().items(), key=lambda kv: (LAYERS.get(kv[0][0], 99), kv[0])):
        mark = "" if LAYERS.get(b, 99) <= LAYERS.get(a, -1) and (a, b) not in SEPARATE else "   UP"
        lines.append(f"  {a} ({LAYERS.get(a, '?')}) -> {b} ({LAYERS.get(b, '?')}): {n}{mark}")
    found = cycles(graph)
    lines.append(f"file-level cycles: {len(found)}")
    lines += ["  " + " <-> ".join(graph.files[m] for m in c) for c in found]
    up = upward(graph)
    lines.append(f"upward imports: {len(up)}")
    lines += ["  " + u for u in up]
    unknown = unknown_packages(graph)
    if unknown:
        lines.append(f"packages without a layer: {', '.join(unknown)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the report for a project root; 1 when it has a cycle, an upward import or an unplaced package."""
    p = argparse.ArgumentParser(prog="python -m vitserve.import_graph", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=ROOT, help="project root (default: this checkout)")
    args = p.parse_args(argv)
    graph = build(args.root)
    print(report(graph))
    return 1 if cycles(graph) or upward(graph) or unknown_packages(graph) else 0


if __name__ == "__main__":
    sys.exit(main())
