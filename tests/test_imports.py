"""The project's import graph: no module import cycle, and no worker process imports another.

The graph is read from the source with `ast`, not by importing anything, so a cycle that Python happens
to survive today (one side importing lazily, inside a function) is found as well: a function-level import
is an edge like any other, since the two modules still cannot be understood, tested or moved apart.  Only
imports under ``if TYPE_CHECKING:`` are left out: they exist for the type checker and never run.

A module is a node named by its dotted name (``emu.mem.pagepool``); ``from emu import wire`` is an edge to
``emu.net.wire`` when that is a module, else to the package ``emu`` itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("emu", "workers")

# The libraries workers/ still holds besides its processes (to move out of workers/ later); a process
# module may import these, and nothing else of workers/.
WORKER_LIBRARIES = {"emu.run.process", "emu.net.link"}


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports anywhere in its body, except under ``if TYPE_CHECKING:``."""
    own = set(PACKAGES)
    found: set[str] = set()

    def resolve(name: str) -> None:
        # The longest project module that `name` names or lies in (``emu.xdp.Program`` -> ``emu.xdp``).
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in own:
                    resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            if origin.split(".")[0] in own:
                for alias in node.names:
                    resolve(f"{origin}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: _imports(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", modules)
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_one_cycle(graph, set(comp)) for comp in components]


def _one_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, to name in a failure."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(comp)} is not strongly connected")


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_worker_imports_another_worker() -> None:
    graph = import_graph()
    processes = {m for m in graph if m.startswith("workers.") and m not in WORKER_LIBRARIES}
    bad = {m: sorted(graph[m] & processes) for m in sorted(processes) if graph[m] & processes}
    assert not bad, f"worker processes importing other workers: {bad}"


# -- the checker itself ------------------------------------------------------------------------------


def _graph_of(sources: dict[str, str]) -> dict[str, set[str]]:
    modules = {name: Path(name) for name in sources}
    return {name: _imports(ast.parse(src), name, False, modules) for name, src in sources.items()}


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ({"emu.a": "from emu.b import x", "emu.b": "import emu.a"}, [["emu.a", "emu.b", "emu.a"]]),
        ({"emu.a": "def f():\n    from emu import b", "emu.b": "from emu.a import f"}, [["emu.a", "emu.b", "emu.a"]]),
        (
            {"emu.a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from emu.b import x",
             "emu.b": "from emu.a import y"},
            [],
        ),
        ({"emu.a": "from emu.b import x", "emu.b": "from emu.c import y", "emu.c": "from emu import a"},
         [["emu.a", "emu.b", "emu.c", "emu.a"]]),
        ({"emu.a": "import numpy\nfrom emu.b import x", "emu.b": "import os"}, []),
    ],
    ids=["module-level", "function-level", "type-checking-only", "three-modules", "acyclic"],
)
def test_cycle_finder(sources: dict[str, str], expected: list[list[str]]) -> None:
    assert cycles(_graph_of(sources)) == expected
