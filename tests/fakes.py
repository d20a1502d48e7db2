"""Helpers for tests that drive a data-path core (`emu.datapath`) without a process: a host's config from
a few YAML lines, and counters without a stats segment."""

from __future__ import annotations

import textwrap

import numpy as np

from emu.run.stats import RowSpec
from emu.topology.file import validate_topology_text
from emu.topology.model import HostConfig


def one_cpu_host(devices: str) -> HostConfig:
    """Host h1 of a topology with one CPU and the devices given as YAML lines (``eth0: {ifindex: 2}``),
    every default resolved as a worker sees them."""
    lines = textwrap.indent(textwrap.dedent(devices).strip("\n") + "\n", " " * 6)
    topo = validate_topology_text(f"name: t\nhosts:\n  h1:\n    cpus: 1\n    devices:\n{lines}", "t.yaml")
    return topo.hosts["h1"]


class Counters:
    """A process's counters without a stats segment: the array and name index a core counts into."""

    def __init__(self, kind: str) -> None:
        names = RowSpec(kind, "test", 0).names
        self.array = np.zeros(len(names), dtype=np.int64)
        self.index = {n: i for i, n in enumerate(names)}

    def __getitem__(self, name: str) -> int:
        return int(self.array[self.index[name]])
