"""Counters and control words in shared memory: how the coordinator watches a run without touching it.

Every process of a run (CPU worker, device, traffic port) owns one row of int64 words in one
``<prefix>-stats`` segment: a few control words (the coordinator's command, the process's state, its pid,
a heartbeat and the offline mask; what each means is the protocol's, `emu.net.protocol`) followed by its
counters.  A process bumps its own counters with plain stores (one
writer per row, like the kernel's per-CPU counters); the coordinator reads every row whenever it wants,
for the xdp-bench-style interval lines, heartbeats and the final report.  So the coordinator is never on
the per-packet path and no message is spent on statistics.

Counter names follow the kernel where one exists: the XDP verdict totals are what the ``xdp:*``
tracepoints would show (XDP itself keeps no counters), device counters are ``ip -s link``'s and
ethtool's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from emu.mem.shm import Segment
from emu.net.protocol import CMD, CONTROL, HEARTBEAT_NS, OFFLINE, OFFLINE_ACK, STATE, Cmd, ProcState

CPU_COUNTERS = (
    "rx_packets",  # packets the XDP program ran on
    "rx_bytes",
    "xdp_aborted",
    "xdp_drop",
    "xdp_pass",
    "xdp_tx",
    "xdp_redirect",
    "redirect_err",  # xdp:xdp_redirect_err (unknown target, or -EOPNOTSUPP with the drop fallback)
    # ...by errno, as xdp-bench's redirect_err breakdown shows them (REDIRECT_ERRNOS):
    "redirect_err_einval",  # no device with that ifindex (or no such cpumap entry or devmap)
    "redirect_err_enetdown",  # the target device is gone
    "redirect_err_eopnotsupp",  # the target's XDP features lack ndo-xmit (a veth whose peer has no program)
    "redirect_err_enomem",  # a broadcast's clone could not be made (frame past a page, allocator empty)
    "redirect_err_emsgsize",  # the frame is longer than the target's MTU allows (xdp_ok_fwd_dev)
    "xdp_exception",  # xdp:xdp_exception: the program raised or returned an unknown verdict
    "xdp_tx_full",  # XDP_TX frames dropped because the TX ring was full
    "xmit_drops",  # redirected frames the target's ndo_xdp_xmit did not take (devmap_xmit drops)
    "xmit_bulks",  # ndo_xdp_xmit calls (devmap bulk flushes)
    "redirect_skb",  # redirects copied into an skb for a target without ndo_xdp_xmit
    "stack_rx",  # skbs consumed by the emulated network stack (XDP_PASS)
    "skb_remote_free",  # skbs freed on this CPU for pages of another CPU's pool
    "tx_completions",  # TX-completion descriptors handled by this CPU
    "remote_returns",  # pages this CPU returned to another CPU's ring
    "rx_posted",  # RX buffers posted to devices
    "rx_alloc_fail",  # RX refills short of pages
    "polls",  # NAPI polls that did work
    "tx_ring_waits",  # passes that left RX waiting: an XDP TX queue of this CPU's had no room for a poll
    "bad_descriptors",  # refused descriptors (stale, wrong state, out of range)
    "bad_messages",  # refused messages (garbled, foreign, unknown kind)
    "capture_packets",  # frames copied into the capture ring (XDP entry and exit; emu.datapath.capture)
    "capture_drops",  # frames the capture ring had no room for (the writer fell behind)
    # devmap broadcast (BPF_F_BROADCAST):
    "xdpf_clone",  # frames copied into a page from the page allocator, one per extra target (xdpf_clone)
    "redirect_bcast_empty",  # broadcasts with no target left (the kernel frees the frame and reports success)
    # cpumap (xdp:xdp_cpumap_enqueue on the redirecting CPU, xdp:xdp_cpumap_kthread on the target):
    "cpumap_enqueue",  # frames this CPU produced into cpumap ptr_rings
    "cpumap_enqueue_drop",  # frames dropped because the target's ptr_ring was full
    "cpumap_enqueue_bulks",  # bulk flushes (of up to CPU_MAP_BULK_SIZE = 8 frames) into the ptr_rings
    "cpumap_kthread_processed",  # frames this CPU's cpumap kthread took off its rings
    "cpumap_kthread_drop",  # of those, dropped (the second program's XDP_DROP, ABORTED, TX, or errors)
    "cpumap_kthread_pass",  # of those, built into skbs for the stack (counted in stack_rx too)
    "cpumap_kthread_redirect",  # of those, redirected by the second program
    "cpumap_kthread_sched",  # times the kthread found its rings empty and slept (schedule())
    "cpumap_gro_flush",  # GRO flushes of the kthread's skbs (every 64, and when its ring empties)
    # XDP multi-buffer (frames over 1 + N buffers: rx-sg):
    "rx_frags_frames",  # frames with fragments the XDP program ran on (XDP_FLAGS_HAS_FRAGS)
    "rx_frags",  # their fragment buffers
    "xdp_frags_released",  # fragment buffers bpf_xdp_adjust_tail released (bpf_xdp_frags_shrink_tail)
    "xmit_sg_drop",  # multi-buffer frames redirected to a device without ndo-xmit-sg (-EOPNOTSUPP, freed)
)

DEVICE_COUNTERS = (
    "rx_packets",
    "rx_bytes",
    "rx_dropped",  # no RX buffer posted on the queue RSS chose within pause_ms (or it is offline, or down)
    "rx_completed",  # frames written into pages and completed to a CPU
    # frames longer than the device's MTU allows (mtu + Ethernet header + a VLAN tag), dropped on arrival as a
    # NIC's MAC drops them (ethtool's rx_length_errors, folded into the netdev's rx_errors)
    "rx_length_errors",
    # XDP multi-buffer (rx-sg): frames scattered over more than one RX buffer, and their fragment buffers
    "rx_sg_frames",
    "rx_sg_frags",
    "tx_sg_frames",  # frames gathered from more than one buffer onto the wire (ndo-xmit-sg, XDP_TX)
    # pauses of the link for want of RX buffers (802.3x XOFF sent; ixgbe's name): frames waited in the
    # RX FIFO until buffers were posted, or until pause_ms passed and they were dropped (rx_dropped)
    "tx_flow_control_xoff",
    "tx_packets",
    "tx_bytes",
    "tx_dropped",  # frames that could not go on the wire (no link)
    "tx_completions",
    "xdp_xmit",  # frames taken through ndo_xdp_xmit (redirect target)
    "xdp_tx",  # frames taken on the XDP TX queues (XDP_TX)
    "skb_xmit",  # frames sent through the normal (skb) transmit path
    "xmit_full",  # frames refused because the TX ring was full
    "rx_posted_now",  # gauge: RX buffers currently posted
    "link_lost",  # frames the link's loss impairment dropped after this device sent them
    "link_refused",  # connection attempts to this device's link ingress refused by CURVE
    "link_port",  # gauge: TCP port of the link ingress (links between hosts), 0 for local links
    "link_up",  # gauge: 1 while a link between hosts is connected to its peer (zmq's handshake done)
    "bad_descriptors",
    "bad_messages",
    "capture_packets",  # transmitted frames copied into the capture ring (emu.datapath.capture)
    "capture_drops",  # frames the capture ring had no room for (the writer fell behind)
)

TRAFFIC_COUNTERS = (
    "generated",
    "tx_bytes",
    "received",
    "rx_bytes",
    "verified",
    "corrupted",
    "foreign",  # frames that are not ours (no magic)
    "duplicates",
    "link_down",  # generated while the link's peer was gone (counted as lost on the wire)
    "link_lost",  # frames the link's loss impairment dropped after this port sent them
    "pacer_lag",  # packets a paced generator fell too far behind its rate to send (emu.net.packets.Pacer.lag)
    "bad_messages",
    "first_rx_ns",  # CLOCK_MONOTONIC time of the first frame received (for the start-up measurement)
    "replayed",  # received frames a replay port sent (recognised by content, emu.net.replay): delivered
    "replay_oversize",  # replayed frames longer than the devices take: generated and dropped, never sent
    "replay_runt",  # replayed frames shorter than an Ethernet header: likewise
)

KINDS = {"cpu": CPU_COUNTERS, "device": DEVICE_COUNTERS, "traffic": TRAFFIC_COUNTERS}


@dataclass(frozen=True, slots=True)
class RowSpec:
    kind: str
    key: str  # e.g. "h1/cpu0", "h1/eth0", "gen0"
    offset: int  # in int64 words

    @property
    def names(self) -> tuple[str, ...]:
        return CONTROL + KINDS[self.kind]


class StatsTable:
    """All rows of a run's stats segment."""

    def __init__(self, seg: Segment, rows: list[RowSpec]) -> None:
        self.seg = seg
        self.rows = {r.key: r for r in rows}
        words = sum(len(r.names) for r in rows)
        self.words = seg.array(np.int64, words, 0)

    @classmethod
    def create(cls, name: str, rows: list[tuple[str, str]]) -> StatsTable:
        specs, pos = [], 0
        for kind, key in rows:
            specs.append(RowSpec(kind, key, pos))
            pos += len(CONTROL) + len(KINDS[kind])
        return cls(Segment.create(name, 8 * max(pos, 1)), specs)

    @classmethod
    def attach(cls, name: str, rows: list[RowSpec]) -> StatsTable:
        return cls(Segment.attach(name), rows)

    def specs(self) -> list[RowSpec]:
        return list(self.rows.values())

    def row(self, key: str) -> StatsRow:
        return StatsRow(self, self.rows[key])

    def read(self, key: str) -> dict[str, int]:
        r = self.rows[key]
        vals = self.words[r.offset : r.offset + len(r.names)].tolist()
        return dict(zip(r.names, vals, strict=True))

    def command(self, key: str, cmd: Cmd) -> None:
        r = self.rows[key]
        self.words[r.offset + CMD] = max(int(self.words[r.offset + CMD]), int(cmd))

    def set_word(self, key: str, name: str, value: int) -> None:
        r = self.rows[key]
        self.words[r.offset + r.names.index(name)] = value

    def command_all(self, cmd: Cmd, kind: str | None = None) -> None:
        for key, r in self.rows.items():
            if kind is None or r.kind == kind:
                self.command(key, cmd)

    def close(self) -> None:
        self.seg.close()

    def unlink(self) -> None:
        self.seg.unlink()


class StatsRow:
    """One process's row: `c` is a memoryview of its words for cheap ``c[i] += n`` on the hot path."""

    def __init__(self, table: StatsTable, spec: RowSpec) -> None:
        self.spec = spec
        self.array = table.words[spec.offset : spec.offset + len(spec.names)]
        self.c = memoryview(self.array)
        self.index = {n: i for i, n in enumerate(spec.names)}

    def i(self, name: str) -> int:
        return self.index[name]

    @property
    def cmd(self) -> int:
        return self.c[CMD]

    @property
    def offline(self) -> int:
        return self.c[OFFLINE]

    def ack_offline(self, mask: int) -> None:
        self.c[OFFLINE_ACK] = mask

    def set_state(self, state: ProcState) -> None:
        self.c[STATE] = int(state)

    def beat(self) -> None:
        self.c[HEARTBEAT_NS] = time.monotonic_ns()
