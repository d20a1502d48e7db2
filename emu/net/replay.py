"""Replaying capture files through the emulator, accounting for their frames, and golden-file checks.

A traffic port with ``replay`` sends the frames of a pcap/pcapng file (`emu.net.pcap`) instead of
generating its own, as tcpreplay or DPDK's pcap PMD would: `ReplaySource` hands out the frames due now,
``loop`` times over the file, either at the file's own timing (``original``: frame *i* of loop *L* leaves
at its timestamp's offset from the first frame, loop after loop) or paced at a ``rate`` (token bucket,
`emu.net.packets.Pacer`; 0 = as fast as the link takes them).  MAC rewrites (``dst_mac``, ``src_mac``)
are applied once, when the file is read.  A frame the emulated devices cannot take is counted, not sent:
``replay_oversize`` for one longer than the smallest buffer on its way (a page less the XDP headroom:
the emulator has no multi-buffer XDP), ``replay_runt`` for one shorter than an Ethernet header (14
bytes).  Both count as generated and dropped, so the run's accounting stays exact.

A replayed frame carries no sequence number or CRC of ours, so a sink recognises it by content
(`ReplayIndex`): a 64-bit BLAKE2b digest of everything after the two MAC addresses (which a rewrite, and
programs such as ``xdp_tx`` and ``l2fwd``, legitimately change).  The index holds every frame each replay
port of the topology may send, with how many times it may arrive (its occurrences in the file times the
loop count); a frame seen more often than that is a duplicate.  A frame that is neither ours nor in the
index stays ``foreign`` (not the run's), so ``generated == delivered + dropped + consumed`` holds for
replayed traffic too.  With a golden file (``expect``), the expected frames are in the index as well, so
a program that rewrites more than MACs still has its frames accounted for.

`compare` checks what a sink received against an expected capture, as a multiset or in order, and
describes the first differences: frame index, byte offset, expected and actual bytes.
"""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from emu.net.packets import ETH_HLEN, FrameBatch, Pacer, mac_to_bytes
from emu.net.pcap import PcapFrames

__all__ = ["ReplayIndex", "ReplaySource", "compare", "content_key", "prepare_frames"]

RUNT_LEN = ETH_HLEN  # shorter than an Ethernet header: not a frame a device can receive
_MAC_SPAN = 12  # destination and source MAC: rewritten by `rewrite` and by MAC-swapping programs
DIFF_LIMIT = 5  # differences described in full


def content_key(frame: bytes | memoryview) -> int:
    """A frame's identity for a sink: 64 bits of BLAKE2b over everything after the MAC addresses."""
    return int.from_bytes(hashlib.blake2b(bytes(frame[_MAC_SPAN:]), digest_size=8).digest(), "little")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A capture file's frames as a replay port sends them: rewritten, with which ones fit."""

    frames: list[bytes]
    ts_ns: list[int]
    fits: np.ndarray  # bool per frame: sent, or counted as oversize/runt
    oversize: int  # frames of one pass over the file that are too long
    runts: int  # ... and too short


def prepare_frames(pcap: PcapFrames, max_frame: int, dst_mac: str | None = None,
                   src_mac: str | None = None) -> Prepared:
    """`pcap`'s frames with their MACs rewritten (the runts, which have none, left alone) and whether
    each fits a device (``RUNT_LEN`` .. `max_frame` bytes)."""
    dst = mac_to_bytes(dst_mac) if dst_mac else None
    src = mac_to_bytes(src_mac) if src_mac else None
    out = []
    for f in pcap.frames:
        if len(f) >= RUNT_LEN and (dst or src):
            f = (dst or f[0:6]) + (src or f[6:12]) + f[12:]
        out.append(f)
    lens = np.fromiter(map(len, out), dtype=np.int64, count=len(out))
    over = lens > max_frame
    runt = lens < RUNT_LEN
    return Prepared(out, list(pcap.ts_ns), ~(over | runt), int(over.sum()), int(runt.sum()))


class ReplaySource:
    """The frames of a `Prepared` file due now, `loop` times over it (0: until stopped).

    `next_batch` returns the frames to send and how many frames of the file were skipped for not
    fitting (counted by the caller as ``replay_oversize``/``replay_runt``, apportioned by `skipped`)."""

    def __init__(self, prep: Prepared, loop: int, timing: str, rate: int, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if timing not in ("original", "rate"):
            raise ValueError(f"timing must be 'original' or 'rate', not {timing!r}")
        self.prep = prep
        self.loop = loop
        self.timing = timing
        self.burst = burst
        self.clock = clock
        self.n = len(prep.frames)
        self.pos = 0  # frames of the file handed out (or skipped) in this loop
        self.loops_done = 0
        ts = np.asarray(prep.ts_ns, dtype=np.int64)
        self.offsets_ns = ts - ts[0] if self.n else ts
        # A loop lasts as long as the file, plus one mean gap so that its last frame and the next loop's
        # first are not sent at the same instant.
        span = int(self.offsets_ns[-1]) if self.n else 0
        self.period_ns = span + (span // (self.n - 1) if self.n > 1 else 0) + 1
        self.t0: float | None = None
        self.pacer = Pacer(rate, burst, clock) if timing == "rate" else None
        self.skipped = collections.Counter[str]()

    @property
    def finished(self) -> bool:
        return self.n == 0 or (self.loop > 0 and self.loops_done >= self.loop)

    def wait_hint(self) -> float:
        """Seconds until the next frame is due."""
        if self.finished:
            return 1.0
        if self.pacer is not None:
            return self.pacer.wait_hint()
        if self.t0 is None:
            return 0.0
        due = self.t0 + (self.loops_done * self.period_ns + int(self.offsets_ns[self.pos])) / 1e9
        return max(0.0, due - self.clock())

    def _due(self, limit: int) -> int:
        """How many of the next frames may leave now (at most `limit`, and not past the loop's end)."""
        left = min(limit, self.n - self.pos)
        if self.pacer is not None:
            return self.pacer.next_burst(left)
        now = self.clock()
        if self.t0 is None:
            self.t0 = now
        elapsed_ns = int((now - self.t0) * 1e9) - self.loops_done * self.period_ns
        # Frames of this loop whose offset has passed.
        due = int(np.searchsorted(self.offsets_ns, elapsed_ns, side="right"))
        return max(0, min(left, due - self.pos))

    def next_batch(self, limit: int) -> tuple[FrameBatch | None, int, int]:
        """(the frames due now, or None; how many frames this takes off `limit`, sent or skipped;
        how many of them were skipped)."""
        if self.finished or limit <= 0:
            return None, 0, 0
        k = self._due(limit)
        if k <= 0:
            return None, 0, 0
        sl = slice(self.pos, self.pos + k)
        fits = self.prep.fits[sl]
        frames = self.prep.frames[sl]
        skipped = k - int(fits.sum())
        if skipped:
            for f, ok in zip(frames, fits.tolist(), strict=True):
                if not ok:
                    self.skipped["runt" if len(f) < RUNT_LEN else "oversize"] += 1
            frames = [f for f, ok in zip(frames, fits.tolist(), strict=True) if ok]
        self.pos += k
        if self.pos >= self.n:
            self.pos = 0
            self.loops_done += 1
        return (FrameBatch.from_frames(frames) if frames else None), k, skipped


@dataclass
class ReplayIndex:
    """The frames a sink may receive from replay ports (and golden files), by `content_key`, with how
    many times each may arrive (None: any number, for a replay that loops until stopped)."""

    allowed: dict[int, int | None] = field(default_factory=dict)
    seen: collections.Counter[int] = field(default_factory=collections.Counter)

    def add(self, frames: Iterable[bytes], times: int | None) -> None:
        """Frames that may each arrive `times` more times per occurrence (None: unbounded)."""
        for key, k in collections.Counter(content_key(f) for f in frames).items():
            have = self.allowed.get(key, 0)
            self.allowed[key] = None if times is None or have is None else have + k * times

    def __bool__(self) -> bool:
        return bool(self.allowed)

    def classify(self, frames: Sequence[bytes | memoryview]) -> tuple[int, int]:
        """(how many of `frames` are known, how many of those arrived more often than they may)."""
        known = dups = 0
        for f in frames:
            key = content_key(f)
            if key not in self.allowed:
                continue
            known += 1
            self.seen[key] += 1
            cap = self.allowed[key]
            if cap is not None and self.seen[key] > cap:
                dups += 1
        return known, dups


def _hex(b: bytes) -> str:
    return b.hex(" ") if b else "(none)"


def _first_diff(exp: bytes, act: bytes) -> str:
    """Where two frames first differ: the offset, and 16 bytes of each from there."""
    off = next((k for k in range(min(len(exp), len(act))) if exp[k] != act[k]), min(len(exp), len(act)))
    what = f"offset {off}"
    if len(exp) != len(act):
        what += f" (lengths {len(exp)} expected, {len(act)} actual)"
    return f"{what}: expected {_hex(exp[off : off + 16])}, actual {_hex(act[off : off + 16])}"


_PAIR_SEARCH = 1000  # unexpected frames searched for the one closest to a missing frame


def _likeness(a: bytes, b: bytes) -> tuple[bool, int]:
    """How alike two frames are: the same length first, then the bytes equal at the same offsets."""
    n = min(len(a), len(b))
    same = int(np.count_nonzero(np.frombuffer(a, np.uint8, n) == np.frombuffer(b, np.uint8, n)))
    return len(a) == len(b), same


def compare(expected: Sequence[bytes], actual: Sequence[bytes], ordered: bool) -> dict:
    """What arrived (`actual`) against a golden file (`expected`): ``match``, ``missing`` and
    ``unexpected`` (counts), and ``differences``, lines describing the first ones."""
    diffs: list[str] = []
    if ordered:
        n = min(len(expected), len(actual))
        bad = [k for k in range(n) if expected[k] != actual[k]]
        for k in bad[:DIFF_LIMIT]:
            diffs.append(f"frame {k}: {_first_diff(expected[k], actual[k])}")
        missing = len(bad) + max(0, len(expected) - len(actual))
        unexpected = len(bad) + max(0, len(actual) - len(expected))
        if len(expected) > n and len(diffs) < DIFF_LIMIT:
            diffs.append(f"frame {n}: expected {len(expected) - n} more frames than arrived")
        if len(actual) > n and len(diffs) < DIFF_LIMIT:
            diffs.append(f"frame {n}: {len(actual) - n} frames arrived after the last expected one")
    else:
        exp_c, act_c = collections.Counter(expected), collections.Counter(actual)
        miss_c, extra_c = exp_c - act_c, act_c - exp_c
        missing, unexpected = sum(miss_c.values()), sum(extra_c.values())
        # Pair each missing frame (in expected order) with the unexpected frame closest to it (the usual
        # cause is a frame the program changed other than expected, and the pair shows where).
        miss = [(k, f) for k, f in enumerate(expected) if miss_c[f] and not miss_c.subtract({f: 1})]
        extra = [(k, f) for k, f in enumerate(actual) if extra_c[f] and not extra_c.subtract({f: 1})]
        unpaired = dict(extra[:_PAIR_SEARCH])
        for ke, fe in miss:
            if len(diffs) >= DIFF_LIMIT:
                break
            if not unpaired:
                diffs.append(f"expected frame {ke}: never arrived")
                continue
            ka = max(unpaired, key=lambda k: _likeness(fe, unpaired[k]))
            diffs.append(f"expected frame {ke} vs arrived frame {ka}: {_first_diff(fe, unpaired.pop(ka))}")
        for ka in list(unpaired)[: DIFF_LIMIT - len(diffs)]:
            diffs.append(f"arrived frame {ka}: not expected")
    return {"match": missing == 0 and unexpected == 0, "missing": missing, "unexpected": unexpected,
            "expected": len(expected), "received": len(actual), "ordered": ordered, "differences": diffs}
