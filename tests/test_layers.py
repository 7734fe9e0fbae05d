"""The import structure of chainlora is what pyproject.toml says: the layers of ``[tool.importlinter]`` hold, and
no import cycle remains anywhere (inside a layer or a package too), function-local imports included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]


def test_the_layers_contract_holds():
    """``lint-imports`` with the project's contract, as CI runs it (in its own process: it reconfigures
    logging)."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every group of modules that import each other, directly or through others (Tarjan's strongly connected
    components of size > 1, or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1 or module in graph.find_modules_directly_imported_by(module):
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_module_of_chainlora_is_part_of_an_import_cycle():
    graph = grimp.build_graph("chainlora", cache_dir=None)
    # function-local imports are part of the graph (the CLI reads the run directory's names inside a function)
    assert graph.direct_import_exists(importer="chainlora.cli", imported="chainlora.rundir")
    assert _import_cycles(graph) == []


def test_a_cycle_would_be_found():
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(module)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    assert _import_cycles(graph) == []
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert _import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
