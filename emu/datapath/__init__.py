"""The data path of a host without its processes: a CPU's NAPI core (`napi`) and a NIC's core (`nic`).

Each core is a plain object that the process around it (`workers/cpu.py`, `workers/device.py`) feeds with
messages and drives from its loop, and that sends through a small interface the process implements over
its channels; a unit test drives it the same way with fakes, over a real page memory, without a process.
"""

from __future__ import annotations

from collections.abc import Callable, MutableSequence

from emu.mem.page import PageState
from emu.mem.pagemem import PageMemory, PageSpans


class Core:
    """What both cores keep: the host's page memory and its bytes seen per buffer, the counters they count
    into (a process's stats row, or a test's array) by name, and how they report a problem once."""

    def __init__(
        self, pm: PageMemory, counters: MutableSequence[int], index: dict[str, int],
        warn: Callable[[str, str], None],
    ) -> None:
        self.pm = pm
        self.c = counters
        self.i = index
        self.warn_once = warn
        # One row per buffer (a page, or a fragment of one: `emu.mem.page`): a descriptor's offset is from
        # its buffer's start, so the cores address every buffer alike.
        self.ps = pm.buf_size
        self.data2d = pm.data.reshape(pm.nbufs, self.ps)
        self.spans = PageSpans(self.data2d)

    def refused(self, n: int, expect: PageState, why: str = "") -> None:
        """Count `n` descriptors refused for not naming a page in state `expect` (`why`: what else makes one
        invalid here) and say so once per state."""
        self.c[self.i["bad_descriptors"]] += n
        self.warn_once(f"bad{expect}", f"refused descriptors not in state {expect.name}{why}")
