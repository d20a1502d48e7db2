"""XDP and maps: the programs' view of a packet, BPF maps, and attaching programs to a host's devices.

`context` holds the verdicts, the program context (`XdpContext`), the vectorised `XdpBatch` and program
loading; `bpfmaps` the BPF maps in shared memory; `runtime` attaching programs to a host's devices (their
maps and one context per RX queue).

This package is the program author's API: an XDP program imports what it needs from here
(``from emu.xdp import XDP_TX, XdpContext, xdp_program, MapSpec``), as the bundled `emu.programs` do.
`runtime` is the emulator's, not the author's, and is not re-exported.
"""

# Everything `context` exports (its __all__), and the maps a program declares and uses; `MapSet` and
# `populate` are the emulator's, not the author's.
from emu.xdp import context as _context
from emu.xdp.bpfmaps import (
    BPF_ANY,
    BPF_EXIST,
    BPF_F_BROADCAST,
    BPF_F_EXCLUDE_INGRESS,
    BPF_NOEXIST,
    ArrayMap,
    BpfMap,
    CpuMap,
    DevMap,
    HashMap,
    MapError,
    MapSpec,
    PerCpuArrayMap,
    PerCpuHashMap,
)
from emu.xdp.context import *  # noqa: F403

__all__ = [*_context.__all__, "BPF_ANY", "BPF_EXIST", "BPF_F_BROADCAST", "BPF_F_EXCLUDE_INGRESS", "BPF_NOEXIST",
           "ArrayMap", "BpfMap", "CpuMap", "DevMap", "HashMap", "MapError", "MapSpec", "PerCpuArrayMap",
           "PerCpuHashMap"]
