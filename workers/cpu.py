"""A CPU worker: one pinned process per emulated CPU, running its NAPI poll loop over its own page pool.

The data path itself (the NAPI poll, XDP verdicts, the TX ring accounting, the RX refill) is the CPU's
core, `emu.datapath.napi.NapiCore`; this module is the process around it: its inbox (shared-memory rings
and a socket) and doorbell, its channels to the devices and the other CPUs (the core's `Outbox`), the
loop that feeds the core messages and runs its passes, the control words (commands, the offline mask)
and sleeping when there is nothing to do (interrupt moderation).
"""

from __future__ import annotations

import numpy as np
import zmq

from emu.datapath.capture import CaptureTap
from emu.datapath.napi import NapiCore, load_cpumaps, load_rx_queues
from emu.mem.page import DESC_DTYPE
from emu.mem.pagemem import PageMemory
from emu.mem.pagepool import pool_of
from emu.net import doorbell, wire
from emu.net.protocol import CMD, OFFLINE, Cmd, ProcState
from emu.net.shmring import IDLE_POLL_MS, Channel, Inbox
from emu.net.sockets import new_context, pull
from emu.run.process import (
    Liveness,
    ProcSpec,
    WarnOnce,
    attach_rings,
    channel,
    pin,
    run_process,
)
from emu.run.stats import StatsRow, StatsTable

# A sleeping CPU is woken once this many polls' worth of RX descriptors wait (measured: 1 wakes it too
# often; with rings of 1,024 l2fwd and xdp-drop both did best at 4; with the bundled rings of 4,096, 8
# gave l2fwd 8 % more and xdp-drop 1 % less, which would leave xdp-drop's 1.5x-l2fwd target at the edge).
RX_BELL_POLLS = 4


class Channels:
    """The core's `Outbox` over this process's channels, each opened on first use."""

    def __init__(self, zctx: zmq.Context, spec: ProcSpec) -> None:
        self.zctx = zctx
        self.spec = spec
        self.me = f"cpu{spec.cpu}"
        self.open: dict[str | int, Channel] = {}

    def channel(self, to: str | int) -> Channel:
        ch = self.open.get(to)
        if ch is None:
            ep = self.spec.endpoints
            if isinstance(to, int):
                ch = channel(self.zctx, self.spec, self.me, f"cpu{to}", ep["cpu"][to])
            else:
                ch = channel(self.zctx, self.spec, self.me, to, ep["device"][to])
            self.open[to] = ch
        return ch

    def send(self, to: str | int, kind: str, header: dict, descs: np.ndarray) -> None:
        self.channel(to).send(wire.pack_msg(kind, header, descs.tobytes()))

    def send_frames(self, to: str, frames: list[bytes]) -> None:
        self.channel(to).send(wire.pack_frames(frames))

    def close(self) -> None:
        for ch in self.open.values():
            ch.close()


class CpuWorker:
    def __init__(self, spec: ProcSpec, table: StatsTable, row: StatsRow) -> None:
        self.spec = spec
        self.row = row
        self.c = row.c
        self.cpu = spec.cpu
        self.pm = PageMemory.attach(spec.host_prefix)
        self.zctx = new_context()
        self.bell = doorbell.Doorbell()
        self.inbox = Inbox(pull(self.zctx, spec.endpoints["cpu"][self.cpu]),
                           attach_rings(spec, to=f"cpu{self.cpu}"), self.bell)
        self.channels = Channels(self.zctx, spec)
        self.core = NapiCore(spec.host, self.cpu, self.pm, pool_of(self.pm, self.cpu, owner=True),
                             load_rx_queues(spec.host, self.cpu, spec.maps), self.channels,
                             row.c, row.index, WarnOnce(spec.key),
                             load_cpumaps(spec.host, self.cpu, spec.maps))
        if "capture" in spec.options:  # xdpdump-style capture of some device's RX queues here
            self.core.capture = CaptureTap.from_options(spec.options["capture"], self.cpu, row.c, row.index)
        # Interrupt moderation (ethtool -C rx-frames): a sleeping CPU is woken once RX_BELL_POLLS polls'
        # worth of descriptors wait for it, else by its poll timeout (rx-usecs).  Never more than half
        # its smallest RX ring: waiting for more than a device can complete before the ring runs dry
        # would leave both asleep until the timeout.
        budget = spec.host.napi_budget
        rings = [rxq.ring_size for rxq in self.core.rxqs.values()]
        frames = min(RX_BELL_POLLS * budget, min(rings) // 2 if rings else budget)
        self.rx_bell = max(1, frames) * DESC_DTYPE.itemsize

    def run(self) -> None:
        live = Liveness(self.row, self.spec.parent_pid)
        c = self.c
        core = self.core
        inbox = self.inbox
        bell = self.bell
        poller = zmq.Poller()
        poller.register(inbox.sock, zmq.POLLIN)
        poller.register(bell.fd, zmq.POLLIN)
        self.row.set_state(ProcState.READY)
        down = False
        while True:
            cmd = c[CMD]
            if cmd >= Cmd.EXIT or not live.tick():
                break
            if cmd >= Cmd.DOWN and not down:
                # From this pass on nothing is refilled: saying so lets the coordinator wait for it
                # before it trusts "every page home" (a pass begun earlier may still have posted).
                down = True
                self.row.set_state(ProcState.DOWN)
            if c[OFFLINE] != core.offline:
                core.apply_offline(c[OFFLINE])
                self.row.ack_offline(core.offline)
            got = 0
            while got < 256:
                msg = inbox.take()
                if msg is None:
                    # Every message sent here so far is taken: a dead device's can all be looked for now.
                    if core.transit_dead:
                        core.reclaim_transit()
                    break
                core.dispatch(msg)
                got += 1
            done = core.poll_pass(got, refilling=cmd < Cmd.DOWN)
            if not got and not done and inbox.idle(self.rx_bell):
                inbox.awake(inbox.sock in doorbell.wait(poller, IDLE_POLL_MS, bell))
        self.shutdown()

    def shutdown(self) -> None:
        """``page_pool_destroy`` (the core gives its pages back), then the sockets."""
        self.core.shutdown()
        if self.core.capture is not None:
            self.core.capture.close()
        self.inbox.close()
        self.bell.close()
        self.channels.close()
        self.zctx.term()


def _body(spec: ProcSpec, table: StatsTable, row: StatsRow) -> None:
    pin(spec.core)
    CpuWorker(spec, table, row).run()


def main(spec: ProcSpec) -> None:
    """Process entry point."""
    run_process(spec, _body)
