"""Packet capture taps on the data path, as xdpdump's: frames at XDP entry, after the program (with its
verdict) at XDP exit, and as transmitted.

A `CaptureTap` belongs to one worker process (a CPU worker for entry and exit, a device for what it
transmits) and copies the captured frames of one batch, with their metadata, into one record of its
capture ring, a single-producer ring in shared memory (`emu.net.shmring.MsgRing`) that the run drains into
pcapng files (`emu.run.capture`).  The ring bounds what capture costs: a record that does not fit (the
writer fell behind) is not written and its frames are counted as capture drops (``capture_drops``, and
the next record carries the count, which the file shows as the next packet's ``epb_dropcount``); the
data path never waits for the writer.  A core without a tap (`capture` None) pays one check per batch.

A multi-buffer frame (XDP multi-buffer: a head buffer and the fragments its shinfo lists) is captured
whole at XDP entry and exit: its linear part then its fragments, up to the snap length, with the whole
frame's length as its ``len``, as an fentry/fexit program captures it with ``bpf_xdp_output`` given
``bpf_xdp_get_buff_len`` in ``BPF_F_CTXLEN_MASK`` (the kernel's ``bpf_xdp_event_output`` copies across the
fragments, ``bpf_xdp_copy_buf``; the kernel's own fentry selftest, test_xdp_bpf2bpf.c, does so).  xdpdump
itself (xdp-tools) still asks for ``data_end - data``, the linear part only, which would write a
truncated 3,520-byte frame for a 9,018-byte one.  What a device transmits is already whole (its TX gather).

A record is ``RECORD_HDR`` (magic, frame count, drops since the last record), then one `CAP_DTYPE` entry
per frame, then the captured bytes of every frame back to back (each at most the snap length).
"""

from __future__ import annotations

import struct
import time
from collections.abc import MutableSequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from emu.mem.page import SI_NR_FRAGS, shinfo_entries
from emu.net.shmring import MsgRing

if TYPE_CHECKING:
    from emu.mem.pagemem import PageMemory

__all__ = ["CAP_DTYPE", "ENTRY", "EXIT", "RECORD_HDR", "TX", "CaptureTap", "Record", "TapDevice", "decode_record"]

ENTRY, EXIT, TX = 0, 1, 2  # capture points: XDP entry (xdpdump's fentry), XDP exit (fexit), transmitted
POINT_NAMES = ("entry", "exit", "tx")
RECORD_MAGIC = 0x50434150  # "PACP"
# magic, frames, drops since the last record, this record's number, and (XDP exit) its entry record's
RECORD_HDR = struct.Struct("<IIQQQ")
NO_REF = (1 << 64) - 1
CAP_DTYPE = np.dtype([("ts", "<u8"), ("ifindex", "<u4"), ("len", "<u4"), ("caplen", "<u4"), ("target", "<i4"),
                      ("queue", "<u2"), ("cpu", "<u2"), ("point", "u1"), ("verdict", "i1"), ("pad", "<u2")])
CAPTURE_RING_BYTES = 1 << 23  # 8 MiB per producer: a few thousand full-size frames behind the writer


@dataclass(frozen=True, slots=True)
class TapDevice:
    """What a tap captures of one device: its ifindex, whether XDP exit too, and the snap length."""

    ifindex: int
    exit: bool
    snaplen: int


class CaptureTap:
    """One process's capture of the devices in `devices` (by name) into the ring `ring`; counts into
    `counters` at ``capture_packets`` / ``capture_drops`` (the names in `index`)."""

    def __init__(self, ring: MsgRing, devices: dict[str, TapDevice], cpu: int,
                 counters: MutableSequence[int], index: dict[str, int]) -> None:
        self.ring = ring
        self.devices = devices
        self.cpu = cpu
        self.c = counters
        self.i_packets = index["capture_packets"]
        self.i_drops = index["capture_drops"]
        self.unreported = 0  # drops the next record tells the writer about
        self.seq = 0  # records put
        self.entry_ref = NO_REF  # the last XDP-entry record put, which the exit record of its batch names

    @classmethod
    def from_options(cls, opts: dict, cpu: int, counters: MutableSequence[int], index: dict[str, int]) -> CaptureTap:
        """A tap from a worker's ``options["capture"]`` (`emu.run.capture.CaptureSession.options_for`)."""
        devices = {name: TapDevice(int(d["ifindex"]), bool(d["exit"]), int(d["snaplen"]))
                   for name, d in opts["devices"].items()}
        return cls(MsgRing.attach(opts["ring"]), devices, cpu, counters, index)

    def close(self) -> None:
        self.ring.close()

    # -- the hooks: one call per batch ----------------------------------------------------------------

    def xdp(self, dev: str, q: int, data2d: np.ndarray, pages: np.ndarray, offs: np.ndarray, lens: np.ndarray,
            point: int, verdicts: np.ndarray | None = None, targets: np.ndarray | None = None,
            pm: PageMemory | None = None) -> None:
        """Frames of RX queue `q` of `dev` in their pages, at XDP `point` (entry, or exit with the
        verdicts and redirect targets).  `pm`: the page memory of a host laid out for multi-buffer, whose
        frames are captured whole (their fragments after their linear parts; None: linear frames only)."""
        tap = self.devices.get(dev)
        if tap is None or (point == EXIT and not tap.exit) or not len(pages):
            return
        n = len(pages)
        lens = np.asarray(lens, dtype=np.int64)
        offs = np.asarray(offs, dtype=np.int64)
        nf = pm.nfrags.take(pages) if pm is not None and pm.shinfo is not None else None
        if nf is not None and np.logical_or.reduce(nf):
            blob, lens, cap = self._whole(pm, data2d, pages, offs, lens, nf, tap.snaplen)  # type: ignore[arg-type]
        else:
            cap = np.minimum(lens, tap.snaplen)
            blob = self._linear(data2d, pages, offs, cap)
        recs = np.zeros(n, CAP_DTYPE)
        recs["ifindex"], recs["queue"], recs["cpu"], recs["point"] = tap.ifindex, q, self.cpu, point
        recs["len"], recs["caplen"] = lens, cap
        recs["target"] = -1
        if verdicts is not None:
            recs["verdict"] = verdicts
            if targets is not None:
                recs["target"] = targets
        if point == ENTRY:
            self.entry_ref = self.seq if self._put(recs, blob) else NO_REF
        else:
            self._put(recs, blob, self.entry_ref)

    @staticmethod
    def _linear(data2d: np.ndarray, pages: np.ndarray, offs: np.ndarray, cap: np.ndarray) -> bytes:
        """The first `cap` bytes of each frame's linear part, back to back."""
        c0, o0 = int(cap[0]), int(offs[0])
        if np.logical_and.reduce(cap == c0) and np.logical_and.reduce(offs == o0):
            return data2d[pages.astype(np.intp), o0 : o0 + c0].tobytes()  # uniform frames: one gather
        return b"".join(data2d[p, o : o + c].tobytes()
                        for p, o, c in zip(pages.tolist(), offs.tolist(), cap.tolist(), strict=True))

    @staticmethod
    def _whole(pm: PageMemory, data2d: np.ndarray, pages: np.ndarray, offs: np.ndarray, lens: np.ndarray,
               nf: np.ndarray, snaplen: int) -> tuple[bytes, np.ndarray, np.ndarray]:
        """Frames some of which have fragments: each one's linear part (`lens` bytes at `offs`) and then its
        fragments in shinfo order, up to `snaplen` bytes (``bpf_xdp_copy_buf`` over the frame); returns the
        bytes and each frame's whole length (``xdp_get_buff_len``) and captured length."""
        si = pm.shinfo
        assert si is not None
        whole = lens.copy()
        parts: list[bytes] = []
        caps = np.empty(len(pages), dtype=np.int64)
        for j, (p, o, ln, k) in enumerate(zip(pages.tolist(), offs.tolist(), lens.tolist(), nf.tolist(), strict=True)):
            left = snaplen
            c = min(ln, left)
            parts.append(data2d[p, o : o + c].tobytes())
            left -= c
            total = ln
            if k:
                for b, fo, fl in shinfo_entries(si, p, min(int(k), int(si[p, SI_NR_FRAGS]))):
                    total += fl
                    if left > 0:
                        c2 = min(fl, left)
                        parts.append(data2d[b, fo : fo + c2].tobytes())
                        left -= c2
            whole[j] = total
            caps[j] = snaplen - left
        return b"".join(parts), whole, caps

    def tx(self, dev: str, data: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
           queues: np.ndarray | int) -> None:
        """Frames `dev` puts on the wire (a `FrameBatch`'s arrays), from TX queue(s) `queues`."""
        tap = self.devices.get(dev)
        n = len(lengths)
        if tap is None or not n:
            return
        lens = np.asarray(lengths, dtype=np.int64)
        cap = np.minimum(lens, tap.snaplen)
        offs = np.asarray(offsets, dtype=np.int64)
        recs = np.zeros(n, CAP_DTYPE)
        recs["ifindex"], recs["queue"], recs["cpu"], recs["point"] = tap.ifindex, queues, self.cpu, TX
        recs["len"], recs["caplen"] = lens, cap
        recs["target"], recs["verdict"] = -1, -1
        total = int(lens.sum())
        if np.array_equal(cap, lens) and offs[0] == 0 and (n == 1 or np.array_equal(offs[1:], np.cumsum(lens[:-1]))):
            blob = data[:total].tobytes()  # whole frames back to back: one copy
        else:
            blob = b"".join(data[o : o + c].tobytes() for o, c in zip(offs.tolist(), cap.tolist(), strict=True))
        self._put(recs, blob)

    def _put(self, recs: np.ndarray, blob: bytes, ref: int = NO_REF) -> bool:
        n = len(recs)
        recs["ts"] = time.time_ns()
        self.seq += 1
        msg = RECORD_HDR.pack(RECORD_MAGIC, n, self.unreported, self.seq, ref) + recs.tobytes() + blob
        if len(msg) <= self.ring.max_msg and self.ring.put(msg):
            self.c[self.i_packets] += n
            self.unreported = 0
            return True
        self.c[self.i_drops] += n
        self.unreported += n
        return False


@dataclass(frozen=True, slots=True)
class Record:
    """A decoded ring record."""

    recs: np.ndarray  # CAP_DTYPE, one per frame
    frames: list[bytes]  # each frame's captured bytes
    drops: int  # frames the producer could not put just before this record
    seq: int  # the producer's record number
    ref: int  # for an XDP-exit record, its batch's entry record (NO_REF: none was captured)


def decode_record(msg: bytes) -> Record:
    """A ring record (see the module docstring); ValueError when it is not one."""
    if len(msg) < RECORD_HDR.size:
        raise ValueError(f"capture record of {len(msg)} bytes is too short")
    magic, n, drops, seq, ref = RECORD_HDR.unpack_from(msg)
    if magic != RECORD_MAGIC:
        raise ValueError(f"not a capture record (magic 0x{magic:08x})")
    start = RECORD_HDR.size
    recs = np.frombuffer(msg, CAP_DTYPE, n, start)
    pos = start + n * CAP_DTYPE.itemsize
    frames = []
    for c in recs["caplen"].tolist():
        frames.append(msg[pos : pos + c])
        pos += c
    return Record(recs, frames, drops, seq, ref)
