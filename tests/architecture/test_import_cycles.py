"""No import cycle among the project's modules.

Every module under services/ is parsed (ast, nothing imported) and each import of a smallfirst
module is an edge, wherever it stands: at module level, inside a function (a deferred import hides
a cycle without removing it) or under `if TYPE_CHECKING:` (a cycle in annotations is still a
cycle a reader has to hold in their head). `from package import name` counts as an import of
`package.name` when that is a module, else of `package`.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.deploy.manifests import REPO_ROOT

SERVICES = REPO_ROOT / "services"


def project_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for path in SERVICES.glob("*/smallfirst/**/*.py"):
        root = path.parts.index("smallfirst", len(SERVICES.parts))
        parts = list(path.with_suffix("").parts[root:])
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            # The nearest enclosing project module (`import a.b.c` also runs a.b; a package's
            # __init__ that imports nothing adds no edge of its own).
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {module: imports_of(module, path, known) for module, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_reports_a_cycle_hidden_in_a_function() -> None:
    # given: a -> b at module level, b -> a inside a function
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}

    # then
    assert find_cycles(graph) == [["a", "b"]]


def test_function_level_and_type_checking_imports_count_as_edges(tmp_path: Path) -> None:
    # given
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from smallfirst.x import y\n"
                      "def f():\n    import smallfirst.z\n", encoding="utf-8")

    # when
    found = imports_of("smallfirst.m", source, {"smallfirst.m", "smallfirst.x", "smallfirst.z"})

    # then
    assert found == {"smallfirst.x", "smallfirst.z"}


def test_no_import_cycle_among_the_projects_modules() -> None:
    # given
    graph = import_graph()
    assert len(graph) > 50, "the walk found too few modules to mean anything"

    # when
    cycles = find_cycles(graph)

    # then
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)
