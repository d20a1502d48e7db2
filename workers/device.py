"""A device: one process per emulated NIC, around the NIC's core (`emu.datapath.nic.NicCore`).

What the device does with pages (RX rings and the RX FIFO, DMA, TX queues, completions, ``ndo_stop``) is
the core's; this module is the process: its inbox (shared-memory rings from the CPUs and a socket) and
doorbell, its link's sockets and rings (`emu.net.link`, CURVE on links that leave the machine), its
channels to the CPUs (the core's `CpuOutbox`), the loop that feeds the core and sleeps until the next
completion is due, and the control words (commands, the offline mask).
"""

from __future__ import annotations

import time

import numpy as np
import zmq

from emu.datapath.capture import CaptureTap
from emu.datapath.nic import NicCore
from emu.mem.pagemem import PageMemory
from emu.net import doorbell, security, wire
from emu.net.link import Carrier, LinkReceiver, LinkSender
from emu.net.netem import LinkShaper
from emu.net.protocol import CMD, OFFLINE, Cmd, ProcState
from emu.net.shmring import BELL_FILL, IDLE_POLL_MS, Channel, Inbox, MsgRing
from emu.net.sockets import LINK_HWM, new_context, pull, push
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


class CpuChannels:
    """The core's `CpuOutbox` over this process's channels to the CPUs."""

    def __init__(self, channels: list[Channel]) -> None:
        self.channels = channels

    def send(self, cpu: int, kind: str, header: dict, descs: np.ndarray) -> None:
        self.channels[cpu].send(wire.pack_msg(kind, header, np.ascontiguousarray(descs).tobytes()))

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


class Device:
    def __init__(self, spec: ProcSpec, row: StatsRow) -> None:
        self.spec = spec
        self.row = row
        self.c = row.c
        self.i = row.index
        host = spec.host
        self.name = spec.device
        self.pm = PageMemory.attach(spec.host_prefix)
        self.zctx = new_context()
        ep = spec.endpoints
        self.bell = doorbell.Doorbell()  # rung by the rings from the CPUs and by the link's ring
        self.inbox = Inbox(pull(self.zctx, ep["device"][self.name]), attach_rings(spec, to=self.name), self.bell)
        # CURVE on links that leave the machine (keys given): a peer without the cluster's key is refused
        # by the handshake and counted in link_refused.
        self.keys = security.load_keys(spec.options.get("keys_dir"))
        self.gatekeeper: security.Gatekeeper | None = None
        self.link_in = None
        self.rx: LinkReceiver | None = None
        if ep.get("link_bind"):
            secure = self.keys is not None and ep["link_bind"].startswith("tcp://")
            if secure:
                self.gatekeeper = security.Gatekeeper(self.zctx, self.keys).start()
            self.link_in = pull(self.zctx, ep["link_bind"], hwm=LINK_HWM,
                                setup=lambda s: security.make_server(s, self.keys) if secure else None)
            if secure:
                self.gatekeeper.watch(self.link_in)
            bound = self.link_in.getsockopt_string(zmq.LAST_ENDPOINT)
            if bound.startswith("tcp://"):
                self.c[self.i["link_port"]] = int(bound.rsplit(":", 1)[1])
            ring_in = ep.get("link_ring_in")
            self.rx = LinkReceiver(self.link_in, MsgRing.attach(ring_in) if ring_in else None, self.bell)
        imp = spec.options.get("impair")
        ring_out = ep.get("link_ring_out")
        self.tx = LinkSender(None, LinkShaper(imp) if imp is not None else None,
                             MsgRing.attach(ring_out) if ring_out else None)
        if ep.get("link_peer"):
            self.tx.connect(*self._link_socket(ep["link_peer"], watch=False))
        self.cpus = CpuChannels([channel(self.zctx, spec, self.name, f"cpu{c}", ep["cpu"][c])
                                 for c in range(host.cpus)])
        self.core = NicCore(host.devices[self.name], host.cpus, self.pm, self.cpus, self.tx, self.rx,
                            row.c, row.index, WarnOnce(spec.key), pause_ms=spec.options.get("pause_ms", 1000),
                            link_socket=self._link_socket, dev_index=list(host.devices).index(self.name))
        if "capture" in spec.options:  # xdpdump-style capture of what this device transmits
            self.core.capture = CaptureTap.from_options(spec.options["capture"], 0, row.c, row.index)

    def _link_socket(self, addr: str, watch: bool = True) -> tuple[zmq.Socket, Carrier | None]:
        """A socket to the link peer at `addr` (CURVE over TCP when keys are given) and, for a cable to
        another host (`watch`), its carrier, watched from before the connect."""
        secure = self.keys is not None and addr.startswith("tcp://")
        carrier: list[Carrier] = []

        def setup(s: zmq.Socket) -> None:
            if secure:
                security.make_client(s, self.keys)
            if watch:
                carrier.append(Carrier(s))

        sock = push(self.zctx, addr, hwm=LINK_HWM, setup=setup)
        return sock, carrier[0] if carrier else None

    # -- main loop --------------------------------------------------------------------------------

    def run(self) -> None:
        live = Liveness(self.row, self.spec.parent_pid)
        c = self.c
        core = self.core
        self.row.set_state(ProcState.READY)
        bell = self.bell
        poller = zmq.Poller()
        poller.register(self.inbox.sock, zmq.POLLIN)
        poller.register(bell.fd, zmq.POLLIN)
        if self.link_in is not None:
            poller.register(self.link_in, zmq.POLLIN)
        # While the link is paused for want of RX buffers, frames waiting on it must not wake us (the
        # poll would return at once, again and again): only the CPUs' posts may.  (The doorbell stays:
        # the link's ring does not ring it then, as the receiver is not asleep on it.)
        paused_poller = zmq.Poller()
        paused_poller.register(self.inbox.sock, zmq.POLLIN)
        paused_poller.register(bell.fd, zmq.POLLIN)
        while True:
            cmd = c[CMD]
            if cmd >= Cmd.EXIT or not live.tick():
                break
            if c[OFFLINE] != core.offline:
                core.apply_offline(c[OFFLINE])
                self.row.ack_offline(core.offline)
            if cmd >= Cmd.DOWN and not core.down:
                core.go_down()
                self.row.set_state(ProcState.DOWN)
            work = 0
            for _ in range(256):
                msg = self.inbox.take()
                if msg is None:
                    break
                core.dispatch(msg)
                work += 1
            work += core.receive()
            work += core.transmit()
            if self.tx.backlog:
                self.tx.flush()
            work += core.complete()
            if core.cabled:
                core.watch_carrier()
            c[self.i["rx_posted_now"]] = sum(core.nposted)
            if self.gatekeeper is not None:
                c[self.i["link_refused"]] = self.gatekeeper.refused
            if not work:
                timeout = IDLE_POLL_MS
                due_ns = core.next_completion_ns()
                if due_ns is not None:
                    timeout = max(0, min(timeout, (due_ns - time.monotonic_ns()) // 1_000_000))
                due = self.tx.next_due_ms()
                if due is not None:
                    timeout = min(timeout, max(due, 1))
                # Paused: be woken by the posts that let waiting frames in or that let the link resume,
                # not by every one, nor by frames on the link.
                bell_at = core.post_bell()
                paused = bell_at is not None
                if not paused:
                    bell_at = BELL_FILL
                if timeout and self.inbox.idle(bell_at):
                    if paused or self.rx is None or self.rx.idle():
                        events = doorbell.wait(paused_poller if paused else poller, timeout, bell)
                        self.inbox.awake(self.inbox.sock in events)
                        if not paused and self.rx is not None:
                            self.rx.awake(self.link_in in events)
                    else:
                        self.inbox.awake(False)  # frames came in meanwhile
        self.close()

    def close(self) -> None:
        self.tx.close()
        self.inbox.close()
        self.bell.close()
        if self.rx is not None:
            self.rx.close()
        self.cpus.close()
        if self.gatekeeper is not None:
            self.c[self.i["link_refused"]] = self.gatekeeper.refused
            self.gatekeeper.stop()
        self.zctx.term()


def _body(spec: ProcSpec, table: StatsTable, row: StatsRow) -> None:
    pin(spec.core)
    Device(spec, row).run()


def main(spec: ProcSpec) -> None:
    """Process entry point."""
    run_process(spec, _body)
