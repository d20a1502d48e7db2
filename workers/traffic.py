"""A traffic port: pktgen on one end of a link, and a verifying sink for whatever comes back.

A port with ``generate`` sends real Ethernet/IPv4/UDP frames (pktgen's knobs: count, rate in pps,
pkt_size, flows, burst) whose payload carries a sequence number and a CRC; every port checks every frame
it receives (magic, length, CRC) and tracks sequence numbers, so a page reused before its TX completion,
a frame written into the wrong page or a duplicate shows up as ``corrupted`` or ``duplicates``.  Frames
travel as batches (at most `burst` per message), never one message per packet.

Generation waits for the coordinator's START, so the first packet leaves only when every device and CPU
is ready, and stops at QUIESCE or after `count` packets.  A full link (the device paused it) makes the
generator wait: packets are counted as generated only once they are on the wire.
"""

from __future__ import annotations

import time

import zmq

from emu import wire
from emu.packets import FrameFactory, Pacer, SeqTracker, verify_batch
from emu.stats import Cmd, ProcState, StatsRow, StatsTable
from workers.common import LINK_HWM, Liveness, ProcSpec, new_context, pin, pull, push, run_process
from workers.cpu import LINK_DOWN_BIT


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
        self.link_out = push(self.zctx, ep["link_peer"], hwm=LINK_HWM) if ep.get("link_peer") else None
        self.tracker = SeqTracker(self.count or None)
        self.factory = None
        if gen is not None:
            self.factory = FrameFactory(gen.pkt_size, gen.flows, gen.src_mac, gen.dst_mac)
            self.pacer = Pacer(gen.rate, gen.burst)
        self.seq = 0
        self.pending = None  # a built batch the link has not taken yet

    def receive(self) -> int:
        got = 0
        for _ in range(16):
            try:
                msg = self.link_in.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            try:
                frames = wire.unpack_frames(msg)
            except wire.WireError:
                self.c[self.i["bad_messages"]] += 1
                continue
            c, i = self.c, self.i
            n = len(frames)
            if not c[i["first_rx_ns"]]:
                c[i["first_rx_ns"]] = time.monotonic_ns()
            c[i["received"]] += n
            c[i["rx_bytes"]] += int(frames.lengths.sum())
            res = verify_batch(frames)
            c[i["verified"]] += res.ok
            c[i["corrupted"]] += res.corrupted
            c[i["foreign"]] += res.foreign
            c[i["duplicates"]] += self.tracker.record(res.seqs)
            got += n
        return got

    def generate(self) -> int:
        """Send one burst if the pacer and the link allow; returns packets sent."""
        if self.pending is None:
            left = self.count - self.seq if self.count else self.gen.burst
            n = min(self.pacer.next_burst(), left)
            if n <= 0:
                return 0
            batch = self.factory.build(self.seq, n)
            self.pending = (n, int(batch.lengths.sum()), wire.pack_frames(batch))
        n, nbytes, msg = self.pending
        if self.c[self.i["offline"]] >> LINK_DOWN_BIT & 1:
            # Carrier down: pktgen's transmit fails; the packets are counted, as generated and lost.
            self.pending = None
            self.seq += n
            self.c[self.i["generated"]] += n
            self.c[self.i["link_down"]] += n
            return n
        try:
            self.link_out.send(msg, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return 0
        self.pending = None
        self.seq += n
        self.c[self.i["generated"]] += n
        self.c[self.i["tx_bytes"]] += nbytes
        return n

    def run(self) -> None:
        live = Liveness(self.row, self.spec.parent_pid)
        c = self.c
        generating = self.factory is not None and self.link_out is not None
        self.row.set_state(ProcState.READY)
        poller = zmq.Poller()
        poller.register(self.link_in, zmq.POLLIN)
        out_poller = zmq.Poller()
        out_poller.register(self.link_in, zmq.POLLIN)
        if self.link_out is not None:
            out_poller.register(self.link_out, zmq.POLLOUT)
        while True:
            cmd = c[0]
            if cmd >= Cmd.EXIT or not live.tick():
                break
            work = self.receive()
            if c[4] != c[5]:
                c[5] = c[4]  # link down noticed: nothing more goes on the wire (see generate)
            if generating and Cmd.START <= cmd < Cmd.QUIESCE:
                if self.count and self.seq >= self.count:
                    generating = False
                    self.row.set_state(ProcState.DONE)
                else:
                    self.row.set_state(ProcState.RUNNING)
                    work += self.generate()
            if not work:
                if generating and Cmd.START <= cmd < Cmd.QUIESCE and self.pending is not None:
                    # The link is full (the device paused it): sleep until it takes a message or a
                    # frame arrives, instead of spinning.
                    if out_poller.poll(5):
                        continue
                    poller.poll(0)
                    continue
                wait = 5.0
                if generating and cmd >= Cmd.START:
                    wait = min(wait, max(0.0, self.pacer.wait_hint() * 1000), 1.0)
                if wait >= 0.2:
                    poller.poll(wait)
                else:
                    time.sleep(wait / 1000)
        self.link_in.close(0)
        if self.link_out is not None:
            self.link_out.close(0)
        self.zctx.term()


def _body(spec: ProcSpec, table: StatsTable, row: StatsRow) -> None:
    pin(spec.core)
    TrafficPort(spec, row).run()


def main(spec: ProcSpec) -> None:
    """Process entry point."""
    run_process(spec, _body)
