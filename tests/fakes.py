"""Helpers for tests that drive a data-path core (`emu.datapath`) or a control loop without a process: a
host's config from a few YAML lines, counters without a stats segment, an outbox that records messages, a
program whose verdicts the frames choose, and a clock the test moves."""

from __future__ import annotations

import textwrap

import numpy as np

from emu.run.stats import RowSpec
from emu.topology.file import validate_topology_text
from emu.topology.model import HostConfig
from emu.xdp.context import XDP_REDIRECT


def one_cpu_host(devices: str, page_size: int | None = None) -> HostConfig:
    """Host h1 of a topology with one CPU (and `page_size`, when given) and the devices given as YAML lines
    (``eth0: {ifindex: 2}``), every default resolved as a worker sees them."""
    lines = textwrap.indent(textwrap.dedent(devices).strip("\n") + "\n", " " * 6)
    size = f"    page_size: {page_size}\n" if page_size else ""
    topo = validate_topology_text(f"name: t\nhosts:\n  h1:\n    cpus: 1\n{size}    devices:\n{lines}", "t.yaml")
    return topo.hosts["h1"]


class Counters:
    """A process's counters without a stats segment: the array and name index a core counts into."""

    def __init__(self, kind: str) -> None:
        names = RowSpec(kind, "test", 0).names
        self.array = np.zeros(len(names), dtype=np.int64)
        self.index = {n: i for i, n in enumerate(names)}

    def __getitem__(self, name: str) -> int:
        return int(self.array[self.index[name]])


class FakeOutbox:
    """A NAPI core's outbox (`emu.datapath.napi.Outbox`) that records every message: (to, kind, header,
    descriptors) and (to, "frames", frames)."""

    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send(self, to, kind, header, descs) -> None:
        self.sent.append((to, kind, dict(header), descs.copy()))

    def send_frames(self, to, frames) -> None:
        self.sent.append((to, "frames", list(frames)))

    def take(self, kind: str) -> list[tuple]:
        """The messages of `kind` sent so far, removed from the record."""
        out = [m for m in self.sent if m[1] == kind]
        self.sent = [m for m in self.sent if m[1] != kind]
        return out


def byte_verdict_program(ctx) -> int:
    """An XDP program for core tests: the verdict is the frame's first byte; a redirect's ifindex its second."""
    v = ctx.data[0]
    if v == XDP_REDIRECT:
        ctx.redirect_ifindex = ctx.data[1]
    return v


class FakeClock:
    """A clock (``time.monotonic``'s stand-in) that moves only when the test sets `t`."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
