"""The project's import graph: no module import cycle, no package importing a higher layer, and workers/
holding processes only, none of which imports another.

The graph is read from the source with `ast`, not by importing anything, so a cycle that Python happens
to survive today (one side importing lazily, inside a function) is found as well: a function-level import
is an edge like any other, since the two modules still cannot be understood, tested or moved apart.  Only
imports under ``if TYPE_CHECKING:`` are left out: they exist for the type checker and never run.

A module is a node named by its dotted name (``emu.mem.pagepool``); ``from emu.net import wire`` is an edge
to ``emu.net.wire`` when that is a module, else to the package ``emu.net`` itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("emu", "workers")

# The layers of the project, lowest first: a module may import its own layer and the layers below it,
# never one above (a function-level import counts; ``if TYPE_CHECKING:`` ones do not, as for cycles).
# Each unit is a package of emu (every module under it), a top-level module of emu, or workers/.  The
# units of one layer import each other (not in a module cycle, which the test above forbids):
# - errors: the exception tree, imported by everything; `emu` itself is only the version.
# - mem, net: page memory and pools, and transport.  `pagemem` and `pagepool` take the holder codes from
#   the protocol (`emu.net.protocol`), and the message rings (`emu.net.shmring`) live in `emu.mem.shm`
#   segments; neither knows of topologies, XDP or processes.
# - topology, xdp, ebpf, programs, datapath: what to emulate, the XDP programs' world (Python programs and
#   clang-built eBPF objects), and the process-free cores of a CPU and a device.  The topology's model is
#   below XDP (`emu.xdp.runtime` attaches programs per `DeviceConfig`, `load_program` resolves
#   ``module:function`` names through it) and reading a file is above it (`emu.topology.file` and `schema`
#   load the programs a file names, and their maps).
# - run, workers: a run on one machine and its processes.  The coordinator starts the worker modules
#   (their ``main``), and the workers take their `ProcSpec`, pinning and stats rows from `emu.run`.
# - cluster: a run over several machines, each one a `Run`.
# - sweep: experiments, a grid of runs (each one a `Run`) and their metrics, tables and plots.
# - deploy: a topology as containers (compose files, swarm stacks, named deployments of them).
# - cli: the ``emu`` command, over everything.
LAYERS: list[set[str]] = [
    {"emu", "emu.errors"},
    {"emu.mem", "emu.net"},
    {"emu.topology", "emu.xdp", "emu.ebpf", "emu.programs", "emu.datapath"},
    {"emu.run", "workers"},
    {"emu.cluster"},
    {"emu.sweep"},
    {"emu.deploy"},
    {"emu.cli"},
]


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
    processes = {m for m in graph if m.startswith("workers.")}
    bad = {m: sorted(graph[m] & processes) for m in sorted(processes) if graph[m] & processes}
    assert not bad, f"worker processes importing other workers: {bad}"


def _is_process(tree: ast.Module) -> bool:
    """Whether a module has a process's entry point: a module-level ``def main(spec)``."""
    return any(
        isinstance(node, ast.FunctionDef) and node.name == "main"
        and [a.arg for a in node.args.posonlyargs + node.args.args] == ["spec"]
        for node in tree.body
    )


def test_workers_holds_processes_only() -> None:
    """Every module under workers/ is a process the coordinator starts, with a ``main(spec)``; libraries
    live in emu (`emu.run.process`, `emu.net.link`)."""
    not_processes = [
        name for name, path in _modules().items()
        if name.startswith("workers.") and not _is_process(ast.parse(path.read_text(), str(path)))
    ]
    assert not not_processes, f"modules in workers/ without a main(spec) entry point: {not_processes}"


def layer_of(module: str) -> int | None:
    """The index in `LAYERS` of the unit `module` belongs to (the longest unit it is or lies in)."""
    name = module
    while name:
        for i, layer in enumerate(LAYERS):
            if name in layer:
                return i
        name = name.rpartition(".")[0]
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for every import of a module in a higher layer than the importer's."""
    return [
        f"{m} -> {d}" for m in sorted(graph) for d in sorted(graph[m])
        if (lm := layer_of(m)) is not None and (ld := layer_of(d)) is not None and ld > lm
    ]


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in import_graph() if layer_of(m) is None)
    assert not unplaced, f"modules in no layer of LAYERS (add their package to one): {unplaced}"


def test_no_upward_import() -> None:
    found = upward_imports(import_graph())
    assert not found, "imports of a higher layer: " + "; ".join(found)


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


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ({"emu.mem.pagepool": "from emu.run.stats import StatsRow", "emu.run.stats": "from emu.mem import shm"},
         ["emu.mem.pagepool -> emu.run.stats"]),
        ({"emu.mem.shm": "def f():\n    from emu.cli import main", "emu.cli": ""}, ["emu.mem.shm -> emu.cli"]),
        ({"emu.net.netem": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from emu.topology import T",
          "emu.topology": ""}, []),
        ({"emu.mem.pagemem": "from emu.net.protocol import NO_HOLDER", "emu.net.protocol": ""}, []),
        ({"workers.cpu": "from emu.run.process import ProcSpec", "emu.run.coordinator": "from workers import cpu",
          "emu.run.process": ""}, []),
    ],
    ids=["upward", "function-level", "type-checking-only", "same-layer", "run-and-workers"],
)
def test_layer_checker(sources: dict[str, str], expected: list[str]) -> None:
    assert upward_imports(_graph_of(sources)) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [("def main(spec):\n    pass", True), ("def main(spec: ProcSpec) -> None:\n    pass", True),
     ("def main():\n    pass", False), ("class Link:\n    def main(self, spec): pass", False), ("X = 1", False)],
)
def test_process_finder(source: str, expected: bool) -> None:
    assert _is_process(ast.parse(source)) is expected
