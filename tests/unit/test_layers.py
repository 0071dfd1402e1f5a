"""The product's import graph has floors and no circles: schemas <- actors <- pipelines <- jobs, a lower
floor never imports a higher one, and no modules import each other, directly or round a circle. Every
import counts, those inside functions too (they still tie the modules together). bench/ and tests/ are
not product code."""

import ast
from pathlib import Path

from tests.helpers import REPO

FLOORS = ("schemas", "actors", "pipelines", "jobs")  # lowest first

# Circles not untied yet (issue 26 item 3 takes schemas/ apart; jobs' checkpoint makers share helpers both ways).
KNOWN_CIRCLES = [
    ["jobs.full_size_model", "jobs.make_tiny_model", "jobs.transformers_model"],
    ["schemas.annotation", "schemas.multitask", "schemas.rows"],
]


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for floor in FLOORS for p in sorted((REPO / floor).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The product modules ``name`` imports anywhere in its file: ``from a import b`` names ``a.b`` when
    that is a module, else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _floor(module: str) -> int:
    return FLOORS.index(module.split(".")[0])


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_the_graph_sees_imports_inside_functions():
    graph = _graph()
    assert "pipelines.phi4mm" in graph["pipelines"]  # pipelines/__init__.py imports it in a function
    assert len(graph) > 50


def test_no_module_imports_a_higher_floor():
    upward = sorted((a, b) for a, targets in _graph().items() for b in targets if _floor(b) > _floor(a))
    assert upward == []


def test_no_import_circles():
    assert [circle for circle in _circles(_graph()) if circle not in KNOWN_CIRCLES] == []
