"""The floors of the code: schemas <- actors <- pipelines <- jobs. A floor never imports one above it,
not even inside a function (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOORS = ["schemas", "actors", "pipelines", "jobs"]


def upward_imports(root: Path, floor: str) -> list[str]:
    """``file:line module`` for each import in ``floor`` of a package on a floor above it."""
    above = FLOORS[FLOORS.index(floor) + 1 :]
    found = []
    for path in sorted((root / floor).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [
                f"{path.relative_to(root)}:{node.lineno} {n}" for n in names if n.split(".")[0] in above
            ]
    return found


@pytest.mark.parametrize("floor", FLOORS[:-1])
def test_no_floor_imports_one_above_it(floor):
    assert upward_imports(ROOT, floor) == []
