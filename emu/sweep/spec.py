"""An experiment file (``emu sweep SPEC.yaml``): a base topology, a grid of its keys, repeats, the length of
each run and the plots to draw; read and checked in full before anything runs.

Its top-level keys::

    topology: l2fwd.yaml                        # a topology file, relative to this file
    grid:                                       # key path -> the values it takes (the runs: every combination)
      hosts.h1.pool.pool_size: [64, 256, 1024]
      traffic.gen0.generate.burst: [16, 64]
      links.0.delay: [0us, 100us]               # a number in a path indexes a list
    repeats: 2                                  # runs of every grid point (default 1)
    run: {count: 20000}                         # or {duration: 2}: how long each run is
    plots:                                      # one PNG each: y against x, a line per value of `lines`
      - {x: hosts.h1.pool.pool_size, y: hit_ratio, lines: traffic.gen0.generate.burst}
      - {x: time, y: pool_bytes, lines: hosts.h1.pool.pool_size}   # a time series of the runs' samples

A key path names a key of the topology's YAML tree, dot by dot; the value replaces the one there (or is
added, when its mapping exists or can be made).  Each grid point is applied to the topology's tree and
the result validated exactly as ``emu validate`` would, so a value the topology refuses, an unknown key
or a path through something that is not a mapping or a list is refused here, with ``SPEC:LINE`` of the
grid key, before any run starts.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, SequenceNode

from emu.errors import FileLineError
from emu.mem.pagepool import POOL_COUNTERS
from emu.run.report import METRICS, SAMPLE_SERIES
from emu.topology.file import validate_topology_text
from emu.topology.model import Topology, TopologyError

TOP_KEYS = ("topology", "grid", "repeats", "run", "plots")
PLOT_KEYS = ("x", "y", "lines")
# What a plot's y may name: a metric, or any page-pool counter summed over CPUs (the CSV's columns).
PLOTTABLE = METRICS + POOL_COUNTERS
# A plot's x that is no grid key: the run's time since START, for y one of the report's sample series
# (``pages.samples``: `emu.run.report.SAMPLE_SERIES`), e.g. ``{x: time, y: pool_bytes, lines: KEY}``.
TIME = "time"


class SweepSpecError(FileLineError):
    """An experiment file is invalid; ``str()`` is ``"file:line: message"``, like a topology's."""


@dataclass(frozen=True)
class PlotSpec:
    x: str  # a grid key
    y: str  # a metric or page-pool counter
    lines: str | None  # a grid key, one line per value (None: one line)
    line: int  # where in the spec, for messages


@dataclass
class Point:
    """One grid point: its parameter values (in the grid's key order) and the topology they make."""

    params: dict[str, Any]
    topology: Topology

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items())


def run_id(params: dict[str, Any], repeat: int) -> str:
    """A run's identity in ``results.json``: its parameters and repeat number (what makes resuming exact)."""
    return json.dumps({"params": params, "repeat": repeat}, sort_keys=True)


@dataclass
class SweepSpec:
    path: str
    topology_path: str
    topology_sha256: str  # of the base topology file: results of another topology are not resumed into
    grid: dict[str, list[Any]]
    repeats: int
    count: int | None
    duration: float | None
    plots: list[PlotSpec]
    points: list[Point] = field(default_factory=list)

    def runs(self) -> list[tuple[Point, int]]:
        """Every run, in order: each point, each repeat (repeats of one point together)."""
        return [(p, r) for p in self.points for r in range(self.repeats)]

    def run_settings(self) -> dict[str, Any]:
        return {"count": self.count, "duration": self.duration}


def _construct(node: Node) -> Any:
    return SafeConstructor().construct_document(node)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _mapping(node: Node) -> list[tuple[str, Node, Node]]:
    return [(str(_construct(k)), k, v) for k, v in node.value] if isinstance(node, MappingNode) else []


def load_spec(path: str) -> SweepSpec:
    """Read and check an experiment file and every grid point it makes; `SweepSpecError` naming the key
    (``SPEC:LINE: message``) if anything is wrong.  OSError from reading a file propagates."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise SweepSpecError(path, (mark.line + 1) if mark else 1, f"YAML syntax error: {e.problem}") from None

    def fail(at: Node | int, message: str) -> SweepSpecError:
        return SweepSpecError(path, at if isinstance(at, int) else _line(at), message)

    if not isinstance(root, MappingNode):
        raise fail(root if root is not None else 1, "an experiment file is a mapping of topology, grid, repeats, "
                   "run and plots")
    top: dict[str, tuple[Node, Node]] = {}
    for name, knode, vnode in _mapping(root):
        if name not in TOP_KEYS:
            raise fail(knode, f"unknown key {name!r} (expected one of {', '.join(TOP_KEYS)})")
        if name in top:
            raise fail(knode, f"duplicate key {name!r}")
        top[name] = (knode, vnode)
    for name in ("topology", "grid", "run"):
        if name not in top:
            raise fail(root, f"missing key {name!r}")

    knode, vnode = top["topology"]
    topo_rel = _construct(vnode)
    if not isinstance(topo_rel, str) or not topo_rel:
        raise fail(vnode, "topology: a path to a topology file, relative to this file")
    topo_path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), topo_rel))
    try:
        with open(topo_path, encoding="utf-8-sig") as f:
            topo_text = f.read()
    except OSError as e:
        raise fail(vnode, f"topology: cannot read {topo_path}: {e.strerror or e}") from None
    try:
        validate_topology_text(topo_text, topo_path)
        tree = yaml.safe_load(topo_text)
    except TopologyError as e:
        raise fail(vnode, f"topology {topo_rel}: invalid: {e}") from None

    grid, grid_lines = _grid(top["grid"], fail)
    repeats = 1
    if "repeats" in top:
        repeats = _construct(top["repeats"][1])
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise fail(top["repeats"][1], f"repeats: a whole number >= 1, not {repeats!r}")
    count, duration = _run(top["run"][1], fail)

    spec = SweepSpec(path, topo_path, hashlib.sha256(topo_text.encode()).hexdigest(), grid, repeats, count,
                     duration, [])
    # Every point up front: a value the topology refuses must stop the sweep before its first run.
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values, strict=True))
        point_tree = copy.deepcopy(tree)
        for key, value in params.items():
            try:
                apply_key(point_tree, key, value)
            except KeyError as e:
                raise fail(grid_lines[key], f"grid key {key!r}: {e.args[0]}") from None
        try:
            topo = validate_topology_text(yaml.safe_dump(point_tree, sort_keys=False), topo_path)
        except TopologyError as e:
            # The validator's line is of the generated text: blame the grid keys of this point instead.
            key = _blame(e.message, params)
            raise fail(grid_lines[key], f"grid point {', '.join(f'{k}={v!r}' for k, v in params.items())}: "
                       f"the topology refuses it: {e.message}") from None
        spec.points.append(Point(params, topo))
    # After the grid: a plot naming a key is checked against keys known to be good.
    spec.plots = _plots(top.get("plots"), grid, fail)
    return spec


def _blame(message: str, params: dict[str, Any]) -> str:
    """The grid key a validator's message is most likely about: the one whose last part it names, else
    the first."""
    for key in params:
        if key.rsplit(".", 1)[-1] in message:
            return key
    return next(iter(params))


def _grid(item: tuple[Node, Node], fail) -> tuple[dict[str, list[Any]], dict[str, int]]:
    knode, vnode = item
    if not isinstance(vnode, MappingNode) or not vnode.value:
        raise fail(vnode if vnode.value else knode, "grid: a mapping of key paths to lists of values, not empty")
    grid: dict[str, list[Any]] = {}
    lines: dict[str, int] = {}
    for key, kn, vn in _mapping(vnode):
        if not key or any(not part for part in key.split(".")):
            raise fail(kn, f"grid key {key!r}: a key path like hosts.h1.pool.pool_size")
        if key in grid:
            raise fail(kn, f"grid key {key!r}: given twice")
        if not isinstance(vn, SequenceNode) or not vn.value:
            raise fail(vn, f"grid key {key!r}: a list of one or more values")
        values = _construct(vn)
        seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
        if len(set(seen)) != len(seen):
            raise fail(vn, f"grid key {key!r}: a value is given twice")
        grid[key] = values
        lines[key] = _line(kn)
    return grid, lines


def _run(node: Node, fail) -> tuple[int | None, float | None]:
    fields = _mapping(node)
    if not isinstance(node, MappingNode) or len(fields) != 1 or fields[0][0] not in ("count", "duration"):
        raise fail(node, "run: exactly one of {count: N} (packets per generator) or {duration: S} (seconds)")
    name, _, vn = fields[0]
    value = _construct(vn)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise fail(vn, f"run.{name}: a number > 0, not {value!r}")
    if name == "count":
        if not isinstance(value, int):
            raise fail(vn, f"run.count: a whole number of packets, not {value!r}")
        return value, None
    return None, float(value)


def _plots(item: tuple[Node, Node] | None, grid: dict[str, list[Any]], fail) -> list[PlotSpec]:
    if item is None:
        return []
    vnode = item[1]
    if not isinstance(vnode, SequenceNode):
        raise fail(vnode, "plots: a list of {x: KEY, y: METRIC, lines: KEY}")
    plots = []
    for pn in vnode.value:
        fields = {name: (kn, vn) for name, kn, vn in _mapping(pn)}
        if not isinstance(pn, MappingNode):
            raise fail(pn, "a plot is a mapping {x: KEY, y: METRIC, lines: KEY}")
        for name, (kn, _) in fields.items():
            if name not in PLOT_KEYS:
                raise fail(kn, f"plot: unknown key {name!r} (expected x, y and optionally lines)")
        for name in ("x", "y"):
            if name not in fields:
                raise fail(pn, f"plot: missing {name!r}")
        got = {name: _construct(vn) for name, (_, vn) in fields.items()}
        if got["x"] == TIME:
            # Over time: y is one of the report's sample series, drawn against the seconds since START.
            if got["y"] not in SAMPLE_SERIES:
                raise fail(fields["y"][1], f"plot y: {got['y']!r} is not a time series of the report (with x: "
                           f"{TIME}: {', '.join(SAMPLE_SERIES)})")
            if "lines" in got and got["lines"] not in grid:
                raise fail(fields["lines"][1], f"plot lines: {got['lines']!r} is not a key of the grid "
                           f"({', '.join(grid)})")
            plots.append(PlotSpec(TIME, got["y"], got.get("lines"), _line(pn)))
            continue
        for name in ("x", "lines"):
            if name in got and got[name] not in grid:
                raise fail(fields[name][1], f"plot {name}: {got[name]!r} is not a key of the grid "
                           f"({', '.join(grid)})")
        if got["y"] not in PLOTTABLE:
            raise fail(fields["y"][1], f"plot y: unknown metric {got['y']!r} (metrics: {', '.join(METRICS)}; "
                       "or a page-pool counter)")
        if got.get("lines") == got["x"]:
            raise fail(fields["lines"][1], "plot lines: the same key as x")
        plots.append(PlotSpec(got["x"], got["y"], got.get("lines"), _line(pn)))
    return plots


def _named(path: list[str]) -> bool:
    """Whether the mapping at `path` holds named things (hosts, traffic ports, a host's devices): a
    missing name there is a typo of the path, not a section to make."""
    return path in (["hosts"], ["traffic"]) or (len(path) == 3 and path[0] == "hosts" and path[2] == "devices")


def apply_key(tree: Any, key: str, value: Any) -> None:
    """Set `key` (a dotted path; a number indexes a list) in a topology's YAML tree to `value`.  A missing
    mapping on the way is made (the validator then says whether the key exists), except a host, traffic
    port or device that the topology does not have; KeyError with the
    reason when the path runs through something else or past the end of a list."""
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the topology"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise KeyError(f"{where} is a list of {len(node)}: {part!r} is not an index of it")
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            elif part not in node and _named(parts[:depth]):
                raise KeyError(f"{where} has no {part!r} (it has {', '.join(map(str, node)) or 'nothing'})")
            elif node.get(part) is None:
                node[part] = {}
                node = node[part]
            else:
                node = node[part]
        else:
            raise KeyError(f"{where} is {node!r}, which has no key {part!r}")


__all__ = ["PLOTTABLE", "PlotSpec", "Point", "SweepSpec", "SweepSpecError", "apply_key", "load_spec", "run_id"]
