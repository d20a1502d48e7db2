"""Packet capture taps on the data path, as xdpdump's: frames at XDP entry, after the program (with its
verdict) at XDP exit, and as transmitted.

A `CaptureTap` belongs to one worker process (a CPU worker for entry and exit, a device for what it
transmits) and copies the captured frames of one batch, with their metadata, into one record of its
capture ring, a single-producer ring in shared memory (`emu.net.shmring.MsgRing`) that the run drains into
pcapng files (`emu.run.capture`).  The ring bounds what capture costs: a record that does not fit (the
writer fell behind) is not written and its frames are counted as capture drops (``capture_drops``, and
the next record carries the count, which the file shows as the next packet's ``epb_dropcount``); the
data path never waits for the writer.  A core without a tap (`capture` None) pays one check per batch.

A record is ``RECORD_HDR`` (magic, frame count, drops since the last record), then one `CAP_DTYPE` entry
per frame, then the captured bytes of every frame back to back (each at most the snap length).
"""

from __future__ import annotations

import struct
import time
from collections.abc import MutableSequence
from dataclasses import dataclass

import numpy as np

from emu.net.shmring import MsgRing

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
            point: int, verdicts: np.ndarray | None = None, targets: np.ndarray | None = None) -> None:
        """Frames of RX queue `q` of `dev` in their pages, at XDP `point` (entry, or exit with the
        verdicts and redirect targets)."""
        tap = self.devices.get(dev)
        if tap is None or (point == EXIT and not tap.exit) or not len(pages):
            return
        n = len(pages)
        lens = np.asarray(lens, dtype=np.int64)
        cap = np.minimum(lens, tap.snaplen)
        offs = np.asarray(offs, dtype=np.int64)
        c0, o0 = int(cap[0]), int(offs[0])
        if np.logical_and.reduce(cap == c0) and np.logical_and.reduce(offs == o0):
            blob = data2d[pages.astype(np.intp), o0 : o0 + c0].tobytes()  # uniform frames: one gather
        else:
            blob = b"".join(data2d[p, o : o + c].tobytes()
                            for p, o, c in zip(pages.tolist(), offs.tolist(), cap.tolist(), strict=True))
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
