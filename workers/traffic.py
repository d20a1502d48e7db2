"""A traffic port: pktgen on one end of a link, and a verifying sink for whatever comes back.

A port with ``generate`` sends real Ethernet/IPv4/UDP frames (pktgen's knobs: count, rate in pps,
pkt_size, flows, burst; or, instead of one rate, a ``schedule`` of phases of rate and length, paced by
`emu.net.packets.ScheduledPacer`) whose payload carries a sequence number and a CRC; every port checks every frame
it receives (magic, length, CRC) and tracks sequence numbers, so a page reused before its TX completion,
a frame written into the wrong page or a duplicate shows up as ``corrupted`` or ``duplicates``.  Frames
travel as batches (a burst per message, or several back-to-back bursts when unpaced), never one message
per packet.

Generation waits for the coordinator's START, so the first packet leaves only when every device and CPU
is ready, and stops at QUIESCE, after `count` packets or at the end of its schedule, whichever comes
first.  A full link (the device paused it) makes the generator wait: packets are counted as generated
once they are handed to the link, and at most one batch waits for a paused link.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import zmq

from emu.net import doorbell, wire
from emu.net.imix import ImixFactory
from emu.net.link import LinkReceiver, LinkSender
from emu.net.netem import LinkShaper
from emu.net.packets import FrameBatch, FrameFactory, Pacer, ScheduledPacer, SeqTracker, verify_batch
from emu.net.pcap import PcapError, read_frames
from emu.net.protocol import CMD, LINK_BATCH, LINK_DOWN_BIT, OFFLINE, OFFLINE_ACK, Cmd, ProcState
from emu.net.replay import ReplayIndex, ReplaySource, compare, prepare_frames
from emu.net.shmring import IDLE_POLL_MS, MsgRing
from emu.net.sockets import LINK_HWM, new_context, pull, push
from emu.run.process import Liveness, ProcSpec, pin, run_process
from emu.run.stats import StatsRow, StatsTable

# Frames a sink with ``expect`` keeps for the golden comparison (a golden file is a unit test's worth of
# frames; past this the comparison fails, as the extra frames are unexpected anyway).
MAX_KEPT = 1_000_000


class TrafficPort:
    def __init__(self, spec: ProcSpec, row: StatsRow) -> None:
        self.spec = spec
        self.row = row
        self.c = row.c
        self.i = row.index
        self.port = spec.port
        gen = self.port.generate
        self.gen = gen
        count = spec.options.get("count")
        self.count = gen.count if gen is not None and count is None else (count or 0)
        self.zctx = new_context()
        ep = spec.endpoints
        self.link_in = pull(self.zctx, ep["link_bind"], hwm=LINK_HWM)
        ring_in, ring_out = ep.get("link_ring_in"), ep.get("link_ring_out")
        self.bell = doorbell.Doorbell() if ring_in else None  # rung by the link's ring
        self.rx = LinkReceiver(self.link_in, MsgRing.attach(ring_in) if ring_in else None, self.bell)
        imp = spec.options.get("impair")
        self.tx = LinkSender(
            push(self.zctx, ep["link_peer"], hwm=LINK_HWM) if ep.get("link_peer") else None,
            LinkShaper(imp) if imp is not None else None,
            MsgRing.attach(ring_out) if ring_out and ep.get("link_peer") else None,
        )
        # One bitmap per generator heard: each numbers its frames from 0 (see emu.net.packets, PORT_SHIFT).
        self.trackers: dict[int, SeqTracker] = {}
        self.factory = None
        if gen is not None:
            self.factory: FrameFactory | ImixFactory = (
                ImixFactory(gen.imix, gen.flows, gen.src_mac, gen.dst_mac, port=gen.port_id) if gen.imix
                else FrameFactory(gen.pkt_size, gen.flows, gen.src_mac, gen.dst_mac, port=gen.port_id))
            self.pacer: Pacer | ScheduledPacer | ReplaySource = (
                ScheduledPacer(gen.schedule, gen.burst) if gen.schedule else Pacer(gen.rate, gen.burst))
        self.seq = 0
        self.replay: ReplaySource | None = None
        self.index: ReplayIndex | None = None
        self.expect = None
        self.setup_replay(spec)

    # -- replay and golden files (emu.net.replay) ---------------------------------------------------

    def setup_replay(self, spec: ProcSpec) -> None:
        """This port's replay source, the index of every replay port's frames (to recognise them when
        they arrive here) and, with ``expect``, the golden frames and a place for what arrives."""
        rp = self.port.replay
        if rp is not None:
            prep = prepare_frames(read_frames(rp.pcap), rp.max_frame, rp.dst_mac, rp.src_mac)
            self.replay = ReplaySource(prep, rp.loop, rp.timing, rp.rate, rp.burst)
            self.pacer = self.replay
        replays = spec.options.get("replays") or []
        ex = self.port.expect
        if not replays and ex is None:
            return
        self.index = ReplayIndex()
        for path, loop, dst, src in replays:
            # By content after the MACs, so the rewrite does not matter; but runts are never sent.
            try:
                pcap = read_frames(path)
            except PcapError as e:
                # Another machine's port (a multi-host run): its file is not here, so its frames will
                # count as foreign at this port (and the run as unaccounted), which the message explains.
                print(f"emu: {self.spec.key}: cannot recognise replayed frames: {e}", file=sys.stderr, flush=True)
                continue
            prep = prepare_frames(pcap, 1 << 30, dst, src)
            self.index.add([f for f, ok in zip(prep.frames, prep.fits.tolist(), strict=True) if ok], loop or None)
        if ex is not None:
            self.expect = (read_frames(ex.pcap).frames, ex.ordered, spec.options.get("expect_out"))
            self.kept: list[bytes] = []
            # Golden frames are the run's too: a program may rewrite more than the MACs.
            self.index.add(self.expect[0], None)

    def account_replayed(self, frames: FrameBatch, good: np.ndarray, foreign: int) -> int:
        """Of a batch's frames that are not our generators', those a replay port sent (counted
        ``replayed``; duplicates counted too); keeps them for the golden comparison.  Returns how many
        of the `foreign` frames were replayed ones."""
        if good.all():
            return 0
        rest = frames.to_list() if not good.any() else [frames.frame(k).tobytes() for k in np.flatnonzero(~good)]
        if self.expect is not None and len(self.kept) < MAX_KEPT:
            self.kept += rest[: MAX_KEPT - len(self.kept)]
        if self.index is None or not foreign:
            return 0
        known, dups = self.index.classify(rest)
        known = min(known, foreign)
        c, i = self.c, self.i
        c[i["replayed"]] += known
        c[i["duplicates"]] += dups
        return known

    def finish_expect(self) -> None:
        """Compare what arrived with the golden file and leave the result for the report."""
        if self.expect is None:
            return
        expected, ordered, out = self.expect
        res = compare(expected, self.kept, ordered)
        if out:
            with open(out, "w") as f:
                json.dump(res, f)

    def replay_step(self) -> int:
        """Send the replayed frames due now if the link allows; returns frames handed out (sent or
        skipped for not fitting)."""
        assert self.replay is not None
        if self.link_full():
            return 0
        left = self.count - self.seq if self.count else LINK_BATCH
        batch, k, skipped = self.replay.next_batch(min(left, LINK_BATCH))
        if not k:
            return 0
        c, i = self.c, self.i
        self.seq += k
        c[i["generated"]] += k
        if skipped:  # the source counts them since the start, and this port is their only writer
            c[i["replay_oversize"]] = self.replay.skipped["oversize"]
            c[i["replay_runt"]] = self.replay.skipped["runt"]
        if batch is None:
            return k
        if c[OFFLINE] >> LINK_DOWN_BIT & 1:
            c[i["link_down"]] += len(batch)
            return k
        self.put_on_link(batch)
        return k

    def link_full(self) -> bool:
        """Flush what waits for the link; True while it is still full (the device paused it): wait."""
        if self.tx.backlog:
            self.tx.flush()
            return self.tx.blocked() or self.tx.busy()
        return False

    def put_on_link(self, batch: FrameBatch) -> None:
        c, i = self.c, self.i
        c[i["tx_bytes"]] += int(np.add.reduce(batch.lengths))
        lost = self.tx.send(batch)
        if lost:
            c[i["link_lost"]] += lost

    def receive(self) -> int:
        """Take what the link brought (several messages verified as one batch) and check every frame."""
        batches = []
        for _ in range(16):
            msg = self.rx.take()
            if msg is None:
                break
            try:
                batches.append(wire.unpack_frames(msg))
            except wire.WireError:
                self.c[self.i["bad_messages"]] += 1
        if not batches:
            return 0
        frames = batches[0] if len(batches) == 1 else FrameBatch.concat(batches)
        c, i = self.c, self.i
        n = len(frames)
        if not c[i["first_rx_ns"]]:
            c[i["first_rx_ns"]] = time.monotonic_ns()
        c[i["received"]] += n
        c[i["rx_bytes"]] += int(np.add.reduce(frames.lengths))
        res = verify_batch(frames)
        c[i["verified"]] += res.ok
        c[i["corrupted"]] += res.corrupted
        c[i["foreign"]] += res.foreign - (self.account_replayed(frames, res.good, res.foreign)
                                          if self.index is not None else 0)  # with `expect` too
        c[i["duplicates"]] += self.record(res.seqs, res.ports)
        return n

    def record(self, seqs: np.ndarray, ports: np.ndarray) -> int:
        """Record the sequence numbers of good frames, each with its generator's bitmap; returns how many
        were duplicates."""
        if not len(ports):
            return 0
        first = int(ports[0])
        if np.logical_and.reduce(ports == first):  # the usual case: one generator per batch
            return self.tracker(first).record(seqs)
        return sum(self.tracker(int(p)).record(seqs[ports == p]) for p in np.unique(ports))

    def tracker(self, port: int) -> SeqTracker:
        t = self.trackers.get(port)
        if t is None:
            t = self.trackers[port] = SeqTracker(self.count or None)
        return t

    def generate(self) -> int:
        """Send one burst if the pacer and the link allow; returns packets sent."""
        if self.replay is not None:
            return self.replay_step()
        if self.link_full():
            return 0
        left = self.count - self.seq if self.count else LINK_BATCH
        burst = self.gen.burst
        # Behind its rate, a paced generator catches up with several bursts in one message (a link
        # message's worth at most); what it owes past its backlog is counted, not silently lost.
        n = min(self.pacer.next_burst(max(burst, LINK_BATCH // burst * burst)), left)
        self.c[self.i["pacer_lag"]] = self.pacer.lag
        if n <= 0:
            return 0
        if not self.gen.rate and not self.gen.schedule:
            # Unpaced: back-to-back bursts share one link message (up to LINK_BATCH frames), as pktgen's
            # bursts share one doorbell; paced, every burst leaves on its own schedule.
            n = min(left, max(n, LINK_BATCH // n * n))
        c, i = self.c, self.i
        self.seq += n
        c[i["generated"]] += n
        if c[OFFLINE] >> LINK_DOWN_BIT & 1:
            # Carrier down: pktgen's transmit fails; the packets are counted, as generated and lost.
            c[i["link_down"]] += n
            return n
        self.put_on_link(self.factory.build(self.seq - n, n))
        return n

    def run(self) -> None:
        live = Liveness(self.row, self.spec.parent_pid)
        c = self.c
        generating = (self.factory is not None or self.replay is not None) and self.tx.connected
        self.row.set_state(ProcState.READY)
        bell = self.bell
        poller = zmq.Poller()
        poller.register(self.link_in, zmq.POLLIN)
        out_poller = zmq.Poller()
        out_poller.register(self.link_in, zmq.POLLIN)
        if bell is not None:
            poller.register(bell.fd, zmq.POLLIN)
            out_poller.register(bell.fd, zmq.POLLIN)
        if self.tx.sock is not None:
            out_poller.register(self.tx.sock, zmq.POLLOUT)
        while True:
            cmd = c[CMD]
            if cmd >= Cmd.EXIT or not live.tick():
                break
            work = self.receive()
            if c[OFFLINE] != c[OFFLINE_ACK]:
                c[OFFLINE_ACK] = c[OFFLINE]  # link down noticed: nothing more goes on the wire (see generate)
                if c[OFFLINE] >> LINK_DOWN_BIT & 1 and self.tx.connected:
                    out_poller.unregister(self.tx.sock)
                    c[self.i["link_down"]] += self.tx.cut()
            if self.tx.backlog:
                self.tx.flush()
            if generating and Cmd.START <= cmd < Cmd.QUIESCE:
                if (self.count and self.seq >= self.count) or self.pacer.finished:
                    generating = False
                    self.row.set_state(ProcState.DONE)
                else:
                    self.row.set_state(ProcState.RUNNING)
                    work += self.generate()
            if not work:
                due = self.tx.next_due_ms()
                if due == 0 and self.tx.connected:
                    # The link is full (the device paused it): sleep until it takes a message or a
                    # frame arrives, instead of spinning.  A ring says nothing when it has room again:
                    # look again after a moment.
                    if self.tx.ring is not None:
                        doorbell.wait(poller, IDLE_POLL_MS, bell)
                    else:
                        doorbell.wait(out_poller, 5, bell)
                    continue
                wait = 5.0 if due is None else float(max(due, 1))
                if generating and cmd >= Cmd.START:
                    wait = min(wait, max(0.0, self.pacer.wait_hint() * 1000), 1.0)
                if self.rx.inbox is not None:
                    wait = min(wait, float(IDLE_POLL_MS))  # frames below the bell's fill wait no longer
                if wait >= 0.2:
                    if self.rx.idle():
                        self.rx.awake(self.link_in in doorbell.wait(poller, wait, bell))
                    else:
                        self.rx.awake(False)
                else:
                    time.sleep(wait / 1000)
        self.finish_expect()
        self.rx.close()
        self.tx.close()
        if bell is not None:
            bell.close()
        self.zctx.term()


def _body(spec: ProcSpec, table: StatsTable, row: StatsRow) -> None:
    pin(spec.core)
    TrafficPort(spec, row).run()


def main(spec: ProcSpec) -> None:
    """Process entry point."""
    run_process(spec, _body)
