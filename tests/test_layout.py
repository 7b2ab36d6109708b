"""The package's layout rule (DESIGN.md, "Layout"): data flows down the list, nothing imports upward, and no
module grows past ~400 lines. Checked on the source, imports inside functions included."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "distmeta"
# Lowest first; a module may import only from its own level or below.
LEVELS = [
    {"labels", "config", "io", "metrics", "report", "tracking", "cluster"},
    {"data"},
    {"models"},
    {"features"},
    {"training"},
    {"listener"},
    {"speaker"},
    {"sweep"},
    {"jobs", "profiles"},
    {"cli"},
]


def level(module: str) -> int:
    top = module.split(".")[1] if module.startswith("distmeta.") else module
    return next(i for i, names in enumerate(LEVELS) if top in names)


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "distmeta":
            yield name, path


@pytest.mark.parametrize("name, path", list(modules()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_no_upward_imports_and_no_long_modules(name, path):
    own = level(name)
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module]
        for target in targets:
            if target.startswith("distmeta."):
                assert level(target) <= own, f"{name} (line {node.lineno}) imports {target}, which is above it"
    assert len(path.read_text().splitlines()) <= 420, f"{name} has grown past ~400 lines: two concepts?"
