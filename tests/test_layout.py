"""The package's layout rule: data flows down the list, nothing imports upward, no two modules import each
other (directly or round a longer cycle), and no module grows past ~400 lines. Checked on the source,
imports inside functions included."""

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
    {"meta"},
    {"listener"},
    {"speaker"},
    {"sweep"},
    {"settings", "profiles"},
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


def imported(path) -> list[tuple[str, int]]:
    """(distmeta module, line) of every import in the file, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("distmeta.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("distmeta."):
            found += [(node.module, node.lineno)]
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]  # a submodule imported by name
    return found


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


def test_no_import_cycles():
    known = dict(modules())
    graph = {name: sorted({target for target, _ in imported(path) if target in known and target != name})
             for name, path in known.items()}
    # a package's __init__ importing its own modules is how it re-exports them, not a dependency of theirs
    graph = {name: [t for t in targets if not (name == t.rsplit(".", 1)[0] and known[name].name == "__init__.py")]
             for name, targets in graph.items()}
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in graph[name]:
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
