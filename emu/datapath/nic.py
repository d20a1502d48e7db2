"""A NIC's core: what an emulated device does with the pages it is given, as a plain object without a
process.

* **RX.**  CPUs post empty pages to the device's RX queues.  Frames taken from the link are hashed
  across the RX queues (RSS on the flow's 5-tuple), "DMAed" into the next posted pages of the chosen
  queue (written into shared memory at the XDP headroom) and completed to the CPU that services the
  queue as one batch of descriptors.  Frames that find no posted buffer wait in the NIC's RX FIFO, in
  order per queue, and the device pauses its link (802.3x flow control: no link message is taken while
  frames wait); each buffer posted since takes the oldest waiting frame of its queue.  When the pause
  has lasted `pause_ms` without a waiting frame finding a buffer, the waiting frames are dropped
  (``rx_dropped``, the driver's missed/no-buffer count) and the link resumes.  So any RX ring size
  works with any link batch, a slow CPU loses nothing, and a queue that gets no buffers at all costs
  drops, never a hang.  A frame longer than the device's MTU allows (``mtu`` + 18) is dropped on arrival,
  before any DMA, as ``rx_length_errors``.  With ``rx-sg`` a frame longer than one buffer's room is
  scattered over 1 + N posted buffers of its queue (XDP multi-buffer: the head's shinfo lists the others)
  and waits in the FIFO while fewer are posted.
* **TX.**  One XDP TX queue per CPU (lockless, as in mlx5); with fewer queues than CPUs CPUs share
  them (``cpu % tx_queues``, as veth does).  Frames come from XDP_TX, from ``ndo_xdp_xmit`` (redirect
  bulks; only when the device has `xdp_xmit`) and from the normal skb path (copies); a multi-buffer frame
  takes a ring slot per buffer (a TX descriptor each, as i40e takes them) and goes on the wire head and
  fragments end to end.  A full TX ring
  refuses the excess back to the submitting CPU.  Queued pages are transmitted onto the link (frame
  bytes, never page ids), then after `tx_completion_us` their TX completion goes to the CPU servicing
  the queue, which returns each page to its pool.  Until then the page is ``TX_INFLIGHT`` and nobody may
  recycle it.
* **Down** (``ndo_stop``): the link stops, frames waiting in the RX FIFO are dropped, posted RX pages go
  back to their CPUs, frames not yet sent are freed, frames on the wire still complete when due, and
  new transmits are refused.

The core sees the world through small interfaces: the CPUs' channels (`CpuOutbox`), the sending end of
its link (`WireOut`, a `emu.net.link.LinkSender` in the process), the receiving end (`LinkIn`, or None for
a device whose link has no ingress here) and a clock (``time.monotonic_ns`` unless a test gives its own),
so `tests/test_nic_core.py` drives it over a real page memory without a process or a socket.  Every
change of a page's state is one of `emu.mem.pagepool`'s functions, and every descriptor handed in is checked
by its `check_descs`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from emu.datapath import Core
from emu.datapath.capture import CaptureTap
from emu.mem.page import DESC_DTYPE, PageState, concat_descs, descs, descs_from_bytes, shinfo_entries, shinfo_write
from emu.mem.pagemem import PageMemory
from emu.mem.pagepool import check_descs, frame_lens, page_hand_over, tx_dma_start
from emu.net import wire
from emu.net.link import msg_frames
from emu.net.packets import FrameBatch, rss_queue
from emu.net.protocol import (
    CPU_MASK,
    DEVICE_KINDS,
    FRAMES,
    LINK,
    LINK_DOWN_BIT,
    POST,
    RX,
    RXRET,
    TXC,
    TXDROP,
    refill_batch,
    transit_code,
)
from emu.topology.model import frame_room, max_frame, sg_buffers

if TYPE_CHECKING:
    from emu.topology.model import DeviceConfig

# Ring bytes a posted RX buffer takes (its descriptor; the message around it adds a little).
POST_BYTES = DESC_DTYPE.itemsize
# How long the link stays paused for want of buffers before a link message is taken whatever room the
# queues have (what does not fit then waits in the RX FIFO): long enough for the CPUs' refills to make
# room for a whole message when they keep up, short next to pause_ms when a queue gets few buffers.
XON_WAIT_NS = 20_000_000


def _sg_bufs(lens: Any, room: int) -> Any:
    """`sg_buffers` over frame lengths (an int or an array): the RX buffers of `room` bytes each takes."""
    return np.maximum(1, -(-lens // room))


class CpuOutbox(Protocol):
    """The device's channels to the CPUs of its host."""

    def send(self, cpu: int, kind: str, header: dict, descs: np.ndarray) -> None:
        """Send a batch of page descriptors of `kind` (rx, txc, txdrop, rxret) to CPU `cpu`."""


class WireOut(Protocol):
    """The sending end of the device's link."""

    @property
    def connected(self) -> bool: ...

    def connect(self, sock: Any, carrier: Any = None) -> None: ...

    def carrier(self) -> bool:
        """The link reaches its peer (for a cable to another host: zmq's handshake with it is done)."""

    def busy(self) -> bool: ...

    def send(self, frames: FrameBatch) -> int:
        """Put frames on the wire; returns how many the link lost."""

    def cut(self) -> int:
        """The peer is gone: drop what waits to leave; returns how many frames that was."""


class LinkIn(Protocol):
    """The receiving end of the device's link."""

    def take(self) -> bytes | None: ...


@dataclass(slots=True)
class TxQueue:
    queued: collections.deque = field(default_factory=collections.deque)  # (descs, kind, cpu)
    nqueued: int = 0
    # With multi-buffer frames: the ring slots their fragments take beyond one per frame (queued and in
    # flight), since a driver takes a TX descriptor per buffer; 0 on a host without multi-buffer devices.
    frag_slots: int = 0
    inflight: collections.deque = field(default_factory=collections.deque)  # (deadline_ns, descs)
    ninflight: int = 0


class NicCore(Core):
    """One device's rings, RX FIFO, DMA, TX queues and completions.

    `counters` is indexed by `index` (the names of `emu.run.stats.DEVICE_COUNTERS`); `warn(key, text)` reports a
    kind of problem once; `link_socket(addr)` opens a socket to a link peer (the ``link`` message) and
    returns it with its `emu.net.link.Carrier`."""

    def __init__(
        self, cfg: DeviceConfig, ncpus: int, pm: PageMemory, cpus: CpuOutbox, tx: WireOut, rx: LinkIn | None,
        counters: MutableSequence[int], index: dict[str, int], warn: Callable[[str, str], None],
        pause_ms: float = 1000, clock: Callable[[], int] = time.monotonic_ns,
        link_socket: Callable[[str], Any] | None = None, dev_index: int = 0,
    ) -> None:
        super().__init__(pm, counters, index, warn)
        self.dev_index = dev_index  # its number in the host's devices (the holder codes of `emu.net.protocol`)
        self.cfg = cfg
        self.name = cfg.name
        self.ncpus = ncpus
        self.cpus = cpus
        self.tx = tx
        self.rx = rx
        self.clock = clock
        self.link_socket = link_socket
        self.nrxq = cfg.rx_queues
        self.rx_cpus = list(cfg.rx_cpus)
        # Posted RX buffers per queue: a FIFO of descriptor arrays (the RX ring).
        self.posted: list[collections.deque] = [collections.deque() for _ in range(self.nrxq)]
        self.nposted = [0] * self.nrxq
        # The RX FIFO: per queue, frames taken from the link that found no posted buffer, oldest first.
        self.waiting: list[collections.deque[FrameBatch]] = [collections.deque() for _ in range(self.nrxq)]
        self.nwaiting = [0] * self.nrxq
        self.fifo = 0  # frames waiting, all queues
        # A paused device asks to be woken by as many posted buffers as a CPU refills this ring with at once.
        self.post_batch = refill_batch(cfg.rx_ring_size)
        self.txqs = [TxQueue() for _ in range(cfg.tx_queues)]
        self.tx_ring = cfg.tx_ring_size
        self.completion_ns = cfg.tx_completion_us * 1000
        self.pause_ns = int(pause_ms * 1e6)
        self.paused_since = 0  # when the link was paused, or last made progress while paused (0: not paused)
        self.xon_since = 0
        self.down = False
        self.cabled = False  # plugged into a peer on another host (the ``link`` message): link_up follows its carrier
        self.offline = 0  # CPUs declared dead by the coordinator
        self.rxq_online = [True] * self.nrxq
        self.all_online = True
        self.capture: CaptureTap | None = None  # xdpdump-style capture (emu.datapath.capture), when asked for
        self.txc_cpu = [cfg.tx_cpu(t, ncpus) for t in range(cfg.tx_queues)]  # tx_cpus: the TX IRQ affinity
        self.max_len = max_frame(cfg.mtu)  # the longest frame the MAC takes (validation makes it fit a buffer)
        # XDP multi-buffer: with rx-sg (on a host laid out for it) a frame longer than one buffer's room is
        # scattered over 1 + N posted buffers of its queue, `room` bytes each (`_scatter`).
        self.room = frame_room(pm.buf_size)
        self.sg = pm.multibuf and "rx-sg" in cfg.xdp_features and self.max_len > self.room
        # Nothing waits but a queue is short of a link message's worth of buffers (or of its whole ring,
        # when smaller): the link stays paused a little (XON_WAIT_NS at most) for the CPUs' refills, so
        # that frames are DMAed in large batches, as they are while the CPUs keep up.  The message is one
        # of the device's longest frames, counted in buffers (1 + N for a multi-buffer frame): a message
        # of 9018-byte frames holds 7 of them, and waiting for 256 buffers (or a small ring's all) before
        # taking it would hold every message the full XON_WAIT_NS.  The coalescing of messages in
        # `receive` takes another while this many are still free.
        per = sg_buffers(self.max_len, pm.buf_size) if self.sg else 1
        self.xon = min(cfg.rx_ring_size, msg_frames(self.max_len) * per)

    # -- messages from CPUs -----------------------------------------------------------------------

    def dispatch(self, msg: bytes) -> None:
        try:
            kind, hdr, blob = wire.unpack_msg(msg, DEVICE_KINDS)
            if kind == FRAMES:
                self.skb_xmit(wire.unpack_frames(msg))
                return
            if kind == LINK:
                self.cable(hdr["peer"])
                return
            if kind == "bell":
                return  # a CPU woke us up: its message is in our ring
            d = descs_from_bytes(blob)
            if kind == POST:
                q, cpu = int(hdr["q"]), int(hdr["cpu"])
                if not 0 <= q < self.nrxq or self.rx_cpus[q] != cpu:
                    raise ValueError(f"post to RX queue {q} from cpu {cpu}, which does not service it")
            else:
                txq, cpu = int(hdr["txq"]), int(hdr["cpu"])
                if not 0 <= txq < len(self.txqs) or not 0 <= cpu < self.ncpus:
                    raise ValueError(f"xmit to TX queue {txq} from cpu {cpu}")
                xkind = hdr["kind"]
                if xkind not in ("tx", "redirect"):
                    raise ValueError(f"unknown xmit kind {xkind!r}")
        except (wire.WireError, ValueError, KeyError, TypeError) as exc:
            self.c[self.i["bad_messages"]] += 1
            self.warn_once("badmsg", f"refused a message: {exc}")
            return
        if kind == POST:
            d = self._valid(d, PageState.RX_POSTED, owner=cpu)
            if not self.rxq_online[q]:
                return  # posted by a CPU declared dead: the coordinator reclaims the pages
            if self.down:
                self._send(cpu, RXRET, {"dev": self.name, "q": q}, d)
            elif len(d):
                self.posted[q].append(d)
                self.nposted[q] += len(d)
        else:
            self.xmit(txq, cpu, xkind, self._valid(d, PageState.TX_QUEUED))

    def cable(self, peer: object) -> None:
        """Plug the link into its peer's ingress (sent by the host agent once every host has reported
        where its devices listen)."""
        if not isinstance(peer, str) or not peer.startswith(("tcp://", "ipc://")):
            raise ValueError(f"link peer address {peer!r} is not a tcp:// or ipc:// endpoint")
        if self.offline >> LINK_DOWN_BIT & 1 or self.link_socket is None:
            return
        self.tx.connect(*self.link_socket(peer))
        self.cabled = True
        self.watch_carrier()

    def watch_carrier(self) -> None:
        """``link_up`` follows the cable's carrier: 1 once the connection to the peer is made (zmq's
        handshake done), not when its address is known; 0 while the connection is lost.  The host agent
        reports its cables plugged in only when all are up."""
        self.c[self.i["link_up"]] = int(self.tx.carrier())

    def _valid(self, d: np.ndarray, expect: PageState, owner: int | None = None) -> np.ndarray:
        """Keep the descriptors that name a page of this host in the state the message implies."""
        ok = check_descs(self.pm, d, expect, owner)
        if ok is None:
            return d
        self.refused(int(np.count_nonzero(~ok)), expect)
        return d[ok]

    def xmit(self, txq: int, cpu: int, kind: str, d: np.ndarray) -> None:
        """``ndo_xdp_xmit`` / the XDP TX ring: take what fits, refuse the rest back to the CPU."""
        if not len(d):
            return
        if kind == "redirect" and not self.cfg.xdp_xmit:
            # A CPU only redirects here through the skb fallback; descriptors mean a confused peer.
            self.c[self.i["bad_messages"]] += 1
            self._send(cpu, TXDROP, {"dev": self.name, "kind": kind}, d)
            return
        q = self.txqs[txq]
        # One ring slot per buffer (a TX descriptor each, as i40e and ice take them): a multi-buffer frame's
        # fragments take slots of their own.
        nf = self.pm.nfrags.take(d["page"]) if self.pm.multibuf else None
        extra = 0 if nf is None else int(np.add.reduce(nf, dtype=np.int64))
        if not self.down and q.nqueued + q.ninflight + q.frag_slots + len(d) + extra > self.tx_ring:
            # Hardware drains its rings while the CPUs fill them: send and complete what is due first.
            self.transmit()
            self.complete()
        room = 0 if self.down else max(0, self.tx_ring - q.nqueued - q.ninflight - q.frag_slots)
        if extra:
            w = np.cumsum(nf.astype(np.int64) + 1)  # type: ignore[union-attr]
            take = int(np.searchsorted(w, room, side="right"))
            q.frag_slots += int(w[take - 1]) - take if take else 0
        else:
            take = min(room, len(d))
        if take < len(d):
            self.c[self.i["xmit_full"]] += len(d) - take
            self._send(cpu, TXDROP, {"dev": self.name, "kind": kind}, d[take:])
        if take:
            q.queued.append(d[:take])
            q.nqueued += take
            self.c[self.i["xdp_xmit" if kind == "redirect" else "xdp_tx"]] += take

    def skb_xmit(self, frames: FrameBatch) -> None:
        """The normal transmit path for skbs (copies): straight onto the wire."""
        n = len(frames)
        self.c[self.i["skb_xmit"]] += n
        if self.down:
            self.c[self.i["tx_dropped"]] += n
            return
        self._wire_send(frames)

    def _send(self, cpu: int, kind: str, hdr: dict, d: np.ndarray) -> None:
        if len(d):
            # On their way to the receiving CPU from now on: if it dies, the coordinator finds them there; if
            # this device dies before the message is out, the CPU takes them back (`transit_code`).
            page_hand_over(self.pm, d["page"], transit_code(self.dev_index, cpu))
            self.cpus.send(cpu, kind, hdr, d)

    # -- the wire ---------------------------------------------------------------------------------

    def _wire_send(self, frames: FrameBatch, queues: list[tuple[int, int]] | None = None) -> None:
        """Frames onto the wire; `queues`: (TX queue, frames) in batch order, for a capture (None: the skb
        path, queue 0)."""
        if self.capture is not None:
            qs = np.repeat([q for q, _ in queues], [k for _, k in queues]) if queues else 0
            self.capture.tx(self.name, frames.data, frames.offsets, frames.lengths, qs)
        n = len(frames)
        self.c[self.i["tx_packets"]] += n
        self.c[self.i["tx_bytes"]] += int(np.add.reduce(frames.lengths))
        if not self.tx.connected:
            self.c[self.i["tx_dropped"]] += n
            return
        lost = self.tx.send(frames)
        if lost:
            self.c[self.i["link_lost"]] += lost

    def transmit(self) -> int:
        """Put every queued page's frame on the wire and start its completion timer.

        The queues share one wire: what they hold goes out as one batch, each queue's frames in order."""
        if self.tx.busy():
            return 0
        now = self.clock()
        # Every queue's frames in one batch, queue after queue: each queue's completions are then a
        # slice of it (one copy in all, not one per queue and another across them).
        parts: list[np.ndarray] = []
        sent: list[tuple[TxQueue, int]] = []
        for q in self.txqs:
            if q.queued:
                parts.extend(q.queued)
                sent.append((q, q.nqueued))
                q.queued.clear()
                q.nqueued = 0
        if not sent:
            return 0
        d = concat_descs(parts)
        frames = self._gather(d)
        # State first: should this process die in between, a page already counted as sent must not also
        # look like a frame still queued (the coordinator counts those as lost).
        tx_dma_start(self.pm, d["page"])
        self._wire_send(frames, None if self.capture is None else
                        [(self.txqs.index(q), k) for q, k in sent])
        start = 0
        for q, n in sent:
            q.inflight.append((now + self.completion_ns, d[start : start + n]))
            q.ninflight += n
            start += n
        return len(d)

    def _gather(self, d: np.ndarray) -> FrameBatch:
        """The frames' bytes out of their pages (one fancy-indexing copy when they are uniform); a
        multi-buffer frame's head and fragments end to end (the NIC's TX gather over its descriptors)."""
        if self.pm.multibuf and len(d) and np.logical_or.reduce(self.pm.nfrags.take(d["page"])):
            return self._gather_sg(d)
        pages = d["page"].astype(np.int64)
        offs = d["off"].astype(np.int64)
        lens = d["len"].astype(np.int64)
        n = len(d)
        if n and np.logical_and.reduce(lens == lens[0]) and np.logical_and.reduce(offs == offs[0]):
            ln, off = int(lens[0]), int(offs[0])
            data = self.spans.gather(pages, off, ln).reshape(-1)
            offsets = np.arange(n, dtype=np.uint32) * ln
            return FrameBatch._make(data, offsets, lens.astype(np.uint32), ln if ln else 0)
        spans = zip(pages.tolist(), offs.tolist(), lens.tolist(), strict=True)
        chunks = [self.data2d[p, o : o + ln] for p, o, ln in spans]
        data = np.concatenate(chunks) if chunks else np.empty(0, np.uint8)
        offsets = np.zeros(n, dtype=np.uint32)
        if n > 1:
            offsets[1:] = np.cumsum(lens[:-1])
        return FrameBatch(data, offsets, lens.astype(np.uint32))

    def _gather_sg(self, d: np.ndarray) -> FrameBatch:
        pm, data2d = self.pm, self.data2d
        pages = d["page"].astype(np.int64)
        nf = pm.nfrags.take(pages)
        si = pm.shinfo
        self.c[self.i["tx_sg_frames"]] += int(np.count_nonzero(nf))
        k = int(nf[0])
        if k and np.logical_and.reduce(nf == k) and np.logical_and.reduce(d["len"] == d["len"][0]) \
                and np.logical_and.reduce(d["off"] == d["off"][0]):
            # A generator's frames, scattered alike: one gather per buffer index over all frames.
            rows = si[pages.astype(np.intp), : 2 + 3 * k]
            ent = rows[:, 2:].reshape(len(d), k, 3)
            if np.logical_and.reduce((ent[:, :, 1:] == ent[:1, :, 1:]).ravel()):
                parts = [self.spans.gather(pages, int(d["off"][0]), int(d["len"][0]))]
                parts += [self.spans.gather(ent[:, m, 0], int(ent[0, m, 1]), int(ent[0, m, 2])) for m in range(k)]
                whole = np.concatenate(parts, axis=1)
                ln = whole.shape[1]
                return FrameBatch._make(whole.reshape(-1), np.arange(len(d), dtype=np.uint32) * ln,
                                        np.full(len(d), ln, dtype=np.uint32), ln)
        chunks = []
        for p, o, ln, k in zip(pages.tolist(), d["off"].tolist(), d["len"].tolist(), nf.tolist(), strict=True):
            chunks.append(data2d[p, o : o + ln])
            if k:
                chunks += [data2d[b, fo : fo + fl] for b, fo, fl in shinfo_entries(si, p, k)]
        lens = frame_lens(pm, pages)
        data = np.concatenate(chunks) if chunks else np.empty(0, np.uint8)
        offsets = np.zeros(len(d), dtype=np.uint32)
        if len(d) > 1:
            offsets[1:] = np.cumsum(lens[:-1])
        return FrameBatch(data, offsets, lens.astype(np.uint32))

    def complete(self, force: bool = False) -> int:
        """Deliver due TX completions to the CPUs that service the queues."""
        now = self.clock()
        done = 0
        for t, q in enumerate(self.txqs):
            while q.inflight and (force or q.inflight[0][0] <= now):
                _, d = q.inflight.popleft()
                q.ninflight -= len(d)
                if q.frag_slots:
                    q.frag_slots -= int(np.add.reduce(self.pm.nfrags.take(d["page"]), dtype=np.int64))
                done += len(d)
                self._send(self.txc_cpu[t], TXC, {"dev": self.name, "txq": t}, d)
        if done:
            self.c[self.i["tx_completions"]] += done
        return done

    def receive(self) -> int:
        """Take frames from the link into posted pages and complete them to the CPUs; while frames wait
        in the RX FIFO, only place them as buffers are posted (the link is paused)."""
        rx = self.rx
        if rx is None or self.down:
            return 0  # down (ndo_stop): the link is not read any more
        work = 0
        if self.fifo:
            work = self._drain()
            if self.fifo:
                now = self.clock()
                if work:
                    self.paused_since = now  # buffers came: the pause goes on, lossless
                    return work
                if now - self.paused_since < self.pause_ns:
                    return 0
                # No buffer for pause_ms: the NIC gives up on the frames it holds, the link resumes.
                self._drop_waiting()
            self.paused_since = 0
        room = self._low_water()
        if room >= self.xon:
            self.xon_since = 0
        else:
            now = self.clock()
            if not self.xon_since:
                self.xon_since = now
                self.c[self.i["tx_flow_control_xoff"]] += 1
            if now - self.xon_since < XON_WAIT_NS:
                return work
            # Waited long enough: take what comes (the pause ends with the next message taken).
        # Coalesce several link messages into one DMA pass (one RX completion message per queue), as
        # far as the posted buffers go: fewer, larger messages are what keep the CPUs busy with packets.
        # The first message is taken whatever room there is: what does not fit waits in the FIFO.
        batches: list[FrameBatch] = []
        for _ in range(16):
            msg = rx.take() if not batches or room >= self.xon else None
            if msg is None:
                break
            try:
                frames = wire.unpack_frames(msg)
            except wire.WireError as exc:
                self.c[self.i["bad_messages"]] += 1
                self.warn_once("badframes", f"refused a link message: {exc}")
                continue
            # Uniform frames (a generator's) carry their one length as the stride: no pass over the lengths.
            if (frames.stride or int(np.maximum.reduce(frames.lengths, initial=0))) > self.max_len:
                frames = self._too_long(frames)
                if not len(frames):
                    continue
            batches.append(frames)
            room -= self._bufs(frames) if self.sg else len(frames)
        if not batches:
            return work
        self.xon_since = 0
        frames = batches[0] if len(batches) == 1 else FrameBatch.concat(batches)
        c, i = self.c, self.i
        c[i["rx_packets"]] += len(frames)
        c[i["rx_bytes"]] += int(np.add.reduce(frames.lengths))
        return work + self.dma(frames)

    def _bufs(self, frames: FrameBatch) -> int:
        """The RX buffers `frames` take on an ``rx-sg`` device: 1 + N each (`sg_buffers`)."""
        if frames.stride:
            return len(frames) * int(_sg_bufs(frames.stride, self.room))
        return int(np.add.reduce(_sg_bufs(frames.lengths.astype(np.int64), self.room)))

    def _too_long(self, frames: FrameBatch) -> FrameBatch:
        """Drop the frames longer than the MTU allows, as a NIC's MAC does before any DMA (no buffer is
        used), counted as ``rx_length_errors``; the rest go on."""
        over = frames.lengths > self.max_len
        n = int(np.count_nonzero(over))
        self.c[self.i["rx_length_errors"]] += n
        self.warn_once("toolong", f"dropped frames longer than {self.max_len} bytes (mtu {self.cfg.mtu} + Ethernet "
                                  "header and a VLAN tag) on arrival (rx_length_errors): raise the device's 'mtu'")
        keep = ~over
        return FrameBatch(frames.data, frames.offsets[keep], frames.lengths[keep])

    def _low_water(self) -> int:
        """The fewest buffers posted on any online RX queue (offline queues take no part in pausing)."""
        if self.all_online:
            return min(self.nposted)
        return min((n for n, up in zip(self.nposted, self.rxq_online, strict=True) if up), default=0)

    def _hold(self, q: int, frames: FrameBatch, idx: np.ndarray, front: bool = False) -> None:
        """Frames of queue `q` that found no posted buffer: into the RX FIFO, which pauses the link (or
        dropped at once when the queue will never have a buffer again: it is offline).  `front`: they were
        the oldest waiting (taken from the FIFO for buffers too few for all of a multi-buffer frame's)."""
        n = len(idx)
        if not self.rxq_online[q]:
            self.c[self.i["rx_dropped"]] += n
            return
        fb = FrameBatch(frames.data, frames.offsets[idx], frames.lengths[idx])
        if front:
            self.waiting[q].appendleft(fb)
        else:
            self.waiting[q].append(fb)
        self.nwaiting[q] += n
        self.fifo += n
        if not self.paused_since:
            self.paused_since = self.clock()

    def _drain(self) -> int:
        """Place waiting frames, oldest first, in the buffers posted since they came."""
        done = 0
        for q in range(self.nrxq):
            k = min(self.nposted[q], self.nwaiting[q])
            if not k:
                continue
            parts, have = [], 0
            dq = self.waiting[q]
            while have < k:
                fb = dq[0]
                if len(fb) <= k - have:
                    parts.append(dq.popleft())
                    have += len(fb)
                else:
                    parts.append(fb.slice(0, k - have))
                    dq[0] = fb.slice(k - have, len(fb))
                    have = k
            self.nwaiting[q] -= k
            self.fifo -= k
            done += self.dma(parts[0] if len(parts) == 1 else FrameBatch.concat(parts), only=q)
        return done

    def _drop_waiting(self, q: int | None = None) -> None:
        """Drop what waits in the RX FIFO (of queue `q`, or of every queue): ``rx_dropped``."""
        for k in range(self.nrxq) if q is None else (q,):
            if self.nwaiting[k]:
                self.c[self.i["rx_dropped"]] += self.nwaiting[k]
                self.fifo -= self.nwaiting[k]
                self.nwaiting[k] = 0
                self.waiting[k].clear()

    def dma(self, frames: FrameBatch, only: int | None = None) -> int:
        """Write `frames` into buffers posted on the queues RSS picks (or all on queue `only`) and
        complete them to the CPUs; frames without a buffer go to the RX FIFO."""
        n = len(frames)
        c, i = self.c, self.i
        qs = rss_queue(frames, self.nrxq) if only is None and self.nrxq > 1 else None
        # Each queue's frames and the buffers posted for them; written into the pages all at once when
        # every frame found a buffer at the same offset (one scatter, no per-queue gather of rows).
        filled: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        dest = np.empty(n, dtype=np.int64)  # the page each frame goes to
        sg_taken = 0  # frames of queues that received multi-buffer frames (`_scatter` completed them)
        for q in range(self.nrxq) if only is None else (only,):
            idx = np.flatnonzero(qs == q) if qs is not None else np.arange(n)
            if not len(idx):
                continue
            if self.sg and int(np.maximum.reduce(frames.lengths[idx])) > self.room:
                sg_taken += self._scatter(q, frames, idx, front=only is not None)
                continue
            bufs = self._take_posted(q, len(idx))
            k = len(bufs)
            if k < len(idx):
                self._hold(q, frames, idx[k:])
            if not k:
                continue
            idx = idx[:k]
            pages = bufs["page"].astype(np.int64)
            dest[idx] = pages
            filled.append((q, idx, pages, bufs))
        taken = sum(len(idx) for _, idx, _, _ in filled)
        if not taken:
            return sg_taken
        rows = frames.rows()
        off = int(filled[0][3]["off"][0])
        if (taken == n and rows is not None
                and all(np.logical_and.reduce(b["off"] == off) for _, _, _, b in filled)):
            self.spans.scatter(dest, off, rows)
        else:
            for _, idx, pages, bufs in filled:
                self._write(frames, idx, pages, bufs["off"].astype(np.int64), frames.lengths[idx])
        for q, idx, pages, bufs in filled:
            lens = frames.lengths[idx]
            self.pm.len.put(pages, lens)
            bufs = bufs.copy()
            bufs["len"] = lens
            c[i["rx_completed"]] += len(idx)
            self._send(self.rx_cpus[q], RX, {"dev": self.name, "q": q}, bufs)
        return taken + sg_taken

    def _scatter(self, q: int, frames: FrameBatch, idx: np.ndarray, front: bool) -> int:
        """RX scatter-gather (``rx-sg``): queue `q`'s frames `idx`, some longer than one buffer's `room`,
        each into 1 + N posted buffers (N <= MAX_SKB_FRAGS), in order, as far as the posted buffers go (the
        rest wait in the RX FIFO, the first of them a frame whose buffers are not all posted yet).  Each
        buffer gets up to `room` bytes at its headroom; the head's shinfo lists the others
        (``xdp_buff_add_frag``) and its descriptor completes with the linear length, as a driver builds a
        multi-buffer xdp_buff from its RX descriptors.  Returns the frames completed."""
        lens = frames.lengths[idx].astype(np.int64)
        room = self.room
        need = _sg_bufs(lens, room)
        cum = np.cumsum(need)
        k = int(np.searchsorted(cum, self.nposted[q], side="right"))
        if k < len(idx):
            self._hold(q, frames, idx[k:], front)
        if not k:
            return 0
        bufs = self._take_posted(q, int(cum[k - 1]))
        pm, data2d, data = self.pm, self.data2d, frames.data
        pages = bufs["page"].astype(np.int64)
        offs = bufs["off"].astype(np.int64)
        rows = frames.rows()
        if rows is not None and np.logical_and.reduce(offs == offs[0]):
            self._scatter_uniform(rows[idx[:k]], pages, int(offs[0]), int(need[0]))
            d = bufs[:: int(need[0])].copy()
            d["len"] = min(int(lens[0]), room)
            return self._rx_sg_done(q, d, k, int(need[0]) - 1)
        starts = (cum[:k] - need[:k]).tolist()
        foffs = frames.offsets[idx[:k]].astype(np.int64).tolist()
        heads = pages[cum[:k] - need[:k]]
        lin = np.minimum(lens[:k], room)
        nfr = 0
        for j, (s0, fo, ln) in enumerate(zip(starts, foffs, lens[:k].tolist(), strict=True)):
            nb = int(need[j])
            b = pages[s0 : s0 + nb].tolist()
            o = offs[s0 : s0 + nb].tolist()
            chunk = [min(room, ln - m * room) for m in range(nb)]
            pos = fo
            for bb, oo, cl in zip(b, o, chunk, strict=True):
                data2d[bb, oo : oo + cl] = data[pos : pos + cl]
                pos += cl
            if nb > 1:
                fr = pages[s0 + 1 : s0 + nb]
                pm.len.put(fr, chunk[1:])
                shinfo_write(pm.shinfo, b[0], fr, o[1:], chunk[1:])
                nfr += nb - 1
            pm.nfrags[b[0]] = nb - 1
        pm.len.put(heads, lin)
        d = bufs[cum[:k] - need[:k]].copy()
        d["len"] = lin
        c, i = self.c, self.i
        c[i["rx_completed"]] += k
        multi = int(np.count_nonzero(need[:k] > 1))
        if multi:
            c[i["rx_sg_frames"]] += multi
            c[i["rx_sg_frags"]] += nfr
        self._send(self.rx_cpus[q], RX, {"dev": self.name, "q": q}, d)
        return k

    def _scatter_uniform(self, rows: np.ndarray, pages: np.ndarray, off: int, nb: int) -> None:
        """`_scatter` for frames of one length (a generator's), `nb` buffers each, every posted buffer at
        offset `off`: one scatter per buffer index over all frames, and the shinfo rows in a few stores."""
        pm, room = self.pm, self.room
        k, ln = rows.shape
        grid = pages.reshape(k, nb)
        chunks = [min(room, ln - m * room) for m in range(nb)]
        for m in range(nb):
            self.spans.scatter(grid[:, m], off, rows[:, m * room : m * room + chunks[m]])
        heads = grid[:, 0]
        pm.len.put(heads, chunks[0])
        pm.nfrags.put(heads, nb - 1)
        if nb > 1:
            fr = grid[:, 1:]
            pm.len.put(fr, np.broadcast_to(np.array(chunks[1:], dtype=np.uint32), fr.shape))
            si = pm.shinfo[heads.astype(np.intp)]
            si[:, 0] = nb - 1
            si[:, 1] = ln - chunks[0]
            si[:, 2 : 2 + 3 * (nb - 1) : 3] = fr
            si[:, 3 : 3 + 3 * (nb - 1) : 3] = off
            si[:, 4 : 4 + 3 * (nb - 1) : 3] = chunks[1:]
            pm.shinfo[heads.astype(np.intp)] = si

    def _rx_sg_done(self, q: int, d: np.ndarray, k: int, nfrags: int) -> int:
        """Complete `k` frames of `nfrags` fragments each (their heads' descriptors `d`) to the CPU."""
        c, i = self.c, self.i
        c[i["rx_completed"]] += k
        if nfrags:
            c[i["rx_sg_frames"]] += k
            c[i["rx_sg_frags"]] += k * nfrags
        self._send(self.rx_cpus[q], RX, {"dev": self.name, "q": q}, d)
        return k

    def _write(self, frames: FrameBatch, idx: np.ndarray, pages: np.ndarray, offs: np.ndarray,
               lens: np.ndarray) -> None:
        rows = frames.rows()
        if rows is not None and len(idx) and np.logical_and.reduce(offs == offs[0]):
            # Uniform frames back to back: one row gather and one scatter into the pages.
            self.spans.scatter(pages, int(offs[0]), rows if len(idx) == len(frames) else rows[idx])
            return
        data, foffs = frames.data, frames.offsets[idx].astype(np.int64)
        if len(idx) and np.logical_and.reduce(lens == lens[0]) and np.logical_and.reduce(offs == offs[0]):
            ln, off = int(lens[0]), int(offs[0])
            self.spans.scatter(pages, off, data[foffs[:, None] + np.arange(ln)])
            return
        for p, o, fo, ln in zip(pages.tolist(), offs.tolist(), foffs.tolist(), lens.tolist(), strict=True):
            self.data2d[p, o : o + ln] = data[fo : fo + ln]

    def _take_posted(self, q: int, n: int) -> np.ndarray:
        out, have = [], 0
        dq = self.posted[q]
        while dq and have < n:
            d = dq[0]
            need = n - have
            if len(d) <= need:
                out.append(dq.popleft())
                have += len(d)
            else:
                out.append(d[:need])
                dq[0] = d[need:]
                have += need
        self.nposted[q] -= have
        if not out:
            return descs()
        return concat_descs(out)

    def apply_offline(self, mask: int) -> None:
        """CPUs died: their RX queues go offline (posted buffers are abandoned to the coordinator, which
        reclaims them; frames hashed there are dropped) and their TX completions move to a live CPU."""
        self.offline = mask
        if mask >> LINK_DOWN_BIT & 1 and self.tx.connected:
            # The peer at the other end of the cable is gone: carrier lost, frames are dropped here.
            self.warn_once("linkdown", "link peer is gone: carrier down")
            self.c[self.i["tx_dropped"]] += self.tx.cut()
            self.c[self.i["link_up"]] = 0
            self.cabled = False
        mask &= CPU_MASK
        live = [c for c in range(self.ncpus) if not mask >> c & 1]
        for q in range(self.nrxq):
            if mask >> self.rx_cpus[q] & 1 and self.rxq_online[q]:
                self.rxq_online[q] = False
                self.all_online = False
                self.posted[q].clear()
                self.nposted[q] = 0
                self._drop_waiting(q)
                self.warn_once(f"rxq{q}", f"RX queue {q} offline: cpu {self.rx_cpus[q]} is gone")
        for t in range(len(self.txc_cpu)):
            if mask >> self.txc_cpu[t] & 1 and live:
                self.txc_cpu[t] = live[t % len(live)]

    def go_down(self) -> None:
        """``ndo_stop``: posted buffers back to their CPUs; completions delivered now."""
        self.down = True
        self._drop_waiting()
        self.paused_since = self.xon_since = 0
        for q in range(self.nrxq):
            d = self._take_posted(q, self.nposted[q])
            self._send(self.rx_cpus[q], RXRET, {"dev": self.name, "q": q}, d)
        for q in self.txqs:
            if q.queued:
                d = concat_descs(list(q.queued))
                q.queued.clear()
                q.nqueued = 0
                tx_dma_start(self.pm, d["page"])
                q.inflight.appendleft((0, d))  # never sent: completed (freed) at once
                q.ninflight += len(d)
                self.c[self.i["tx_dropped"]] += len(d)
        # Frames already on the wire complete when their DMA does, down or not: until then their pages
        # are in flight and the pools' shutdown waits for them.
        self.complete()


    # -- what the process's loop asks ---------------------------------------------------------------

    def next_completion_ns(self) -> int | None:
        """When the earliest TX completion is due (None: nothing is in flight)."""
        pending = [q.inflight[0][0] for q in self.txqs if q.inflight]
        return min(pending) if pending else None

    def post_bell(self) -> int | None:
        """While the link is paused for want of RX buffers: the bytes of posts worth being woken for (a
        refill's worth, or all that wait; or, holding the link for the refills, what lets it resume), not
        every post; None while the link is not paused."""
        if self.fifo:
            return min(self.fifo, self.post_batch) * POST_BYTES
        if self.xon_since and self.clock() - self.xon_since < XON_WAIT_NS:
            return max(1, self.xon - self._low_water()) * POST_BYTES
        return None
