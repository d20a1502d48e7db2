"""Mixed frame sizes for the generator (``pkt_size: imix``, or a list of ``[size, weight]``).

A rate measured at one frame size hides what the page pool does with mixed sizes, so the generator can
send the classic simple IMIX (7:4:1 of 64, 570 and 1518 bytes) or any weighted mix.  The sizes follow a
fixed pattern of period ``sum(weights) * m`` frames, each size in one run per period (`m` is chosen so a
period is about 256 frames: a link message then holds a few runs, each built in one call of that size's
`emu.net.packets.FrameFactory`).  So over any whole period the mix is exact, and frame ``seq``'s size is a
function of ``seq`` alone: the frames are the same from run to run, and each still carries its
sequence number and CRC, so sinks verify them exactly as single-size frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emu.net.packets import FrameBatch, FrameFactory

__all__ = ["ImixFactory", "imix_pattern"]

_PERIOD_TARGET = 256


def imix_pattern(mix: Sequence[tuple[int, int]]) -> np.ndarray:
    """Index into `mix` of each frame of one period (each size in one run, in the mix's order)."""
    total = sum(w for _, w in mix)
    m = max(1, _PERIOD_TARGET // total)
    return np.repeat(np.arange(len(mix)), [w * m for _, w in mix])


class ImixFactory:
    """Numbered test frames of mixed sizes; `build` is `FrameFactory.build`'s."""

    def __init__(self, mix: Sequence[tuple[int, int]], flows: int, src_mac: str, dst_mac: str,
                 port: int = 0) -> None:
        if not mix:
            raise ValueError("an imix needs at least one [size, weight]")
        self.mix = tuple(mix)
        self.factories = [FrameFactory(size, flows, src_mac, dst_mac, port=port) for size, _ in self.mix]
        self.pattern = imix_pattern(self.mix)
        self.period = len(self.pattern)
        self.pkt_size = max(size for size, _ in self.mix)

    def build(self, seq_start: int, n: int) -> FrameBatch:
        """`n` frames with sequence numbers ``seq_start .. seq_start + n - 1``, sized by the pattern."""
        kinds = self.pattern[(np.arange(n, dtype=np.int64) + seq_start) % self.period]
        if not n:
            return self.factories[0].build(seq_start, 0)
        cuts = np.flatnonzero(kinds[1:] != kinds[:-1]) + 1
        starts = [0, *cuts.tolist()]
        ends = [*cuts.tolist(), n]
        parts = [self.factories[int(kinds[a])].build(seq_start + a, b - a) for a, b in zip(starts, ends, strict=True)]
        return parts[0] if len(parts) == 1 else FrameBatch.concat(parts)
