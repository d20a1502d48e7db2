"""A CPU's NAPI core: what one emulated CPU does with packets, as a plain object without a process.

What one poll does, in the kernel's order (drivers' ``napi_poll`` + ``xdp_do_flush``):

1. take the RX-completion descriptors the devices sent for the RX queues bound to this CPU, at most
   `napi_budget` (64) packets per queue per poll;
2. run the ingress device's XDP program on each packet through a writable zero-copy view of its page
   (or its vectorised form, `emu.xdp.XdpBatch`), once per pass over the packets its polls will take
   (`run_programs`);
3. act on the verdicts: DROP and ABORTED (and a program that raised or returned nonsense, counted as
   ``xdp_exception``) recycle the page directly into this CPU's cache; PASS hands the page to the
   emulated stack as an skb, freed at the end of the poll (or on `stack_cpu`, through the owner's
   ring); TX puts it on the same device's XDP TX queue for this CPU; REDIRECT bulks it per target device
   (16 frames per ``ndo_xdp_xmit`` call), or, for a target without XDP transmit, copies it into an skb
   (``redirect_fallback: skb``) or drops it (``drop``: -EOPNOTSUPP, ``redirect_err``);
4. refill the RX rings from the pool (inside the poll when it freed pages into the cache, else once for
   the pass's polls: the same pages either way); the bulks and the refilled buffers go to the devices in
   one message per device for up to `POLLS_PER_FLUSH` polls (counters such as ``xmit_bulks`` stay per
   poll).

A pass takes no more packets than this CPU's XDP TX queues have room for (`tx_room`): a frame holds its
ring slot until its completion comes back here, as a driver's slot stays taken until NAPI reaps it.

TX completions for the TX queues this CPU services (the device's ``tx_cpus``) come back here; each page
goes back to the pool that allocated it: directly when that is this CPU's, through that CPU's recycle
ring otherwise.  A page is never recycled before its completion: the return path checks that it is
``TX_INFLIGHT``.  A device completes a whole pass of frames (up to 16 polls' worth) in one message,
where a driver's NAPI poll cleans its TX completions a budget at a time, each time just before the RX
refill that reuses their pages; recycling such a message at once would overflow the 128-page alloc cache
on every batch.  So this CPU's own completions wait (``txc_release: deferred``, the default: still
``TX_INFLIGHT``, held by this CPU, their ring slots free) and each RX refill first reaps as many of them
as it takes and the cache has room for (`_reap_for`), so they reach the RX rings through the cache, as
in the kernel; the rest are reaped once no packet has been polled for `TXC_IDLE_NS` (traffic stopped),
at ``ndo_stop`` and at shutdown.  ``immediate`` recycles a whole message as it arrives: what overflows
the cache goes to the ring (`recycle_cache_full`), and the refill takes it back from there.

A multi-buffer frame (XDP multi-buffer, a device with ``rx-sg``) is named by its head buffer throughout:
every verdict moves it whole (`emu.mem.pagepool` moves its fragments), a redirect of one to a device
without ``ndo-xmit-sg`` fails with -EOPNOTSUPP, and the fragments a program released with
``bpf_xdp_adjust_tail`` go home after it ran.

Every change of a page's state is one of `emu.mem.pagepool`'s functions, and every descriptor handed in is
checked by its `check_descs`.  The core sends through an `Outbox` (the CPU worker's channels, or a test's
fake) and counts into a counter array indexed by name (the worker's stats row, or a test's array), so
`tests/test_napi_core.py` drives it in milliseconds over a real page memory.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from emu.datapath import Core
from emu.datapath.capture import ENTRY, EXIT, CaptureTap
from emu.mem.page import DESC_DTYPE, SI_NR_FRAGS, PageState, concat_descs, descs_from_bytes, shinfo_entries
from emu.mem.pagemem import PageMemory
from emu.mem.pagepool import (
    PagePool,
    check_descs,
    frame_frags,
    frame_lens,
    page_hand_over,
    page_pool_dev_alloc_pages,
    return_pages,
    xdp_build_skb,
    xdp_frags_release,
    xdp_prepare_buff,
    xdp_xmit_queue,
    xdpf_clone,
)
from emu.mem.reclaim import heads_only
from emu.net import wire
from emu.net.protocol import (
    CPU_KINDS,
    CPUMAP,
    DEVICE_BIT,
    POST,
    REFILL_MIN,
    RX,
    RXRET,
    SKB,
    TXC,
    TXDROP,
    XMIT,
    device_code,
    refill_batch,
    transit_code,
)
from emu.topology.model import max_frame
from emu.xdp.bpfmaps import CPU_MAP_BULK_SIZE, CPUMAP_BATCH, REDIRECT_BROADCAST, REDIRECT_CPUMAP, BroadcastMap, CpuMap
from emu.xdp.context import (
    XDP_ABORTED,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    XDP_TX,
    XdpBatch,
    classify_verdict,
    classify_verdicts,
)

if TYPE_CHECKING:
    from emu.topology.model import HostConfig

# NAPI polls (of napi_budget packets per queue each) whose TX/redirect bulks go out in one message: up
# to 1,024 packets a pass at the kernel's budget of 64, half an RX ring of the bundled topologies.  A pass
# costs about the same whatever it carries; 16 forwarded 9 % more l2fwd than 8 (interleaved A/B).
POLLS_PER_FLUSH = 16
# Passes in a row waiting on full TX queues, with completions still coming in, before `tx_resync`
# checks the page table anyway.
TX_RESYNC_WAITS = 64
# The kernel's PAGE_SIZE: xdpf_clone copies a frame (its headroom with it) into one page of this size, so a
# frame whose end lies past it cannot be cloned (-ENOMEM), whatever page size the emulated host uses.
PAGE_SIZE = 4096
# GRO_NORMAL_BATCH-like: the cpumap kthread flushes GRO every this many skbs (and when its ring empties).
GRO_FLUSH_SKBS = 64
# net.core.netdev_budget: the packets one NET_RX softirq (net_rx_action) polls before it yields.  A cpumap
# kthread on a CPU whose NAPI has work runs one round (CPUMAP_BATCH frames) per this many polled packets:
# each round's local_bh_enable() runs the pending NET_RX softirq (cpu_map_kthread_run).
NETDEV_BUDGET = 300
# txc_release: deferred.  Own TX completions wait for the RX refills that take their pages; once no packet
# has been polled for this long, traffic has stopped (rather than paused between two of the emulator's
# batches, which on a loaded machine can be milliseconds apart) and the rest are reaped at once.
TXC_IDLE_NS = 50_000_000
# What else makes a descriptor handed to a CPU invalid, in its one warning.
_REFUSED_WHY = " (or stale, foreign or named twice)"


class Outbox(Protocol):
    """Where a CPU's messages go: its channels to the devices (by name) and the other CPUs (by number)."""

    def send(self, to: str | int, kind: str, header: dict, descs: np.ndarray) -> None:
        """Send a batch of page descriptors of `kind` (a `emu.net.protocol` kind) to device or CPU `to`."""

    def send_frames(self, to: str, frames: list[bytes]) -> None:
        """Send frame bytes (the skb path) to device `to`."""


@dataclass(slots=True)
class RxQueue:
    """One RX queue of one device, bound to this CPU."""

    dev: str
    ifindex: int
    q: int
    ring_size: int
    program: object  # the XDP callable, or None (no program: every packet is passed)
    ctx: object
    batch: object = None  # the program's vectorised form, when it has one and the topology allows it
    refill_min: int = REFILL_MIN  # see refill_batch
    posted: int = 0  # buffers posted and not yet completed
    pending: list[np.ndarray] = field(default_factory=list)  # RX completions the program has not seen
    # This pass's packets the program has already run over, acted on poll by poll: page ids, verdicts,
    # redirect targets (or None), whether they were acted on already (None: not yet; else the device
    # whose devmap bulk queue they went to, "" for XDP_TX), and how many of them the polls have taken.
    ready: tuple[np.ndarray, np.ndarray, np.ndarray | None, str | None] | None = None
    taken: int = 0
    # The device's XDP features include `redirect` (else its driver takes XDP_REDIRECT for an unknown
    # action: bpf_warn_invalid_xdp_action, an xdp_exception, and the packet is dropped).
    can_redirect: bool = True
    # The device handed this ring's posted buffers back (``ndo_stop``): it is never refilled again.  A
    # pass that began before this CPU saw DOWN must not post them right back, since the coordinator may
    # already have seen every page home and told everyone to exit.
    stopped: bool = False


@dataclass(slots=True)
class Target:
    """A device of this host as seen by a CPU: where to send frames for it and how it transmits."""

    name: str
    index: int
    ifindex: int
    xdp_xmit: bool
    fallback: str
    tx_queues: int
    tx_ring: int
    # This CPU's XDP TX queue on the device is its own (as many queues as CPUs): its completions come
    # back here, so this CPU knows how much of the ring its frames hold.
    own_txq: bool
    profile: str = "nic"  # the driver it behaves like ("veth": ndo-xmit only while its peer has XDP)
    peer: str = ""  # the far end of its cable, for the messages that explain a veth's rule
    down: bool = False  # the device process died
    mtu: int = 1500
    max_len: int = 0  # the longest frame it transmits (`max_frame` of its mtu): a longer redirect is -EMSGSIZE
    xmit_sg: bool = False  # its XDP features include ndo-xmit-sg: it takes multi-buffer frames by redirect
    # TX ring slots (a buffer each: a multi-buffer frame takes 1 + N) of the frames this CPU queued on its TX
    # queue whose completion (or refusal) it has not seen
    tx_used: int = 0


def load_rx_queues(host: HostConfig, cpu: int, mapsets: dict[str, str]) -> list[RxQueue]:
    """The RX queues of `host` bound to `cpu`, each with its device's XDP program, maps and context."""
    from emu.xdp.runtime import make_context, program_for

    ifindex_of = {name: dev.ifindex for name, dev in host.devices.items()}
    mtus = host_mtus(host)
    out = []
    for name, dev in host.devices.items():
        prog, maps = program_for(dev, mapsets.get(name), host.cpus, cpu)
        for q in range(dev.rx_queues):
            if dev.rx_cpus[q] != cpu:
                continue
            ctx = make_context(prog, maps, dev, q, cpu, ifindex_of, mtus)
            fn = None if prog is None else prog.fn
            batch = prog.batch if prog is not None and dev.xdp.vectorised else None
            out.append(RxQueue(name, dev.ifindex, q, dev.rx_ring_size, fn, ctx, batch,
                               refill_batch(dev.rx_ring_size), can_redirect="redirect" in dev.xdp_features))
    return out


def host_mtus(host: HostConfig) -> dict[int, int]:
    """The MTU of each device of `host` by ifindex: what ``bpf_check_mtu`` reads (``dev->mtu``)."""
    return {dev.ifindex: dev.mtu for dev in host.devices.values()}


def load_cpumaps(host: HostConfig, cpu: int, mapsets: dict[str, str]) -> dict[tuple[str, int], CpuMap]:
    """Every cpumap of the host's programs as seen from `cpu`, by (device, the map's ordinal in its map
    set): a CPU redirects into those of the devices it polls, and its kthread consumes from any of them."""
    from emu.xdp.runtime import program_for

    out: dict[tuple[str, int], CpuMap] = {}
    for name, dev in host.devices.items():
        _, maps = program_for(dev, mapsets.get(name), host.cpus, cpu)
        for m in maps.values():
            if isinstance(m, CpuMap):
                out[(name, (m.redirect_base - REDIRECT_CPUMAP) >> 16)] = m
    return out


class NapiCore(Core):
    """One CPU's data path: its RX queues, XDP verdicts, TX ring accounting and page pool.

    `counters` is indexed by `index` (the names of `emu.run.stats.CPU_COUNTERS`); `warn(key, text)` reports
    a kind of problem once.  The core owns `pool` (this process is its owner)."""

    def __init__(
        self, host: HostConfig, cpu: int, pm: PageMemory, pool: PagePool, rxqs: list[RxQueue], out: Outbox,
        counters: MutableSequence[int], index: dict[str, int], warn: Callable[[str, str], None],
        cpumaps: dict[tuple[str, int], CpuMap] | None = None,
    ) -> None:
        super().__init__(pm, counters, index, warn)
        self.host = host
        self.cpu = cpu
        self.ncpus = host.cpus
        # NAPI's budget per poll, frames per ndo_xdp_xmit call, frames per ring-lock round trip of a return
        self.budget, self.bulk, self.tx_bulk_size = host.napi_budget, host.redirect_bulk, host.tx_bulk
        self.stack_cpu = cpu if host.stack_cpu is None else host.stack_cpu
        self.pool = pool
        self.out = out
        self.buf = pm.data_seg.buf
        self.targets: dict[int, Target] = {}
        self.by_name: dict[str, Target] = {}
        for index_, (name, dev) in enumerate(host.devices.items()):
            # Its own TX queue, whose completions come back here (tx_cpus), so that it sees its ring slots free.
            own = dev.tx_queues >= self.ncpus and dev.tx_cpu(cpu % dev.tx_queues, self.ncpus) == cpu
            t = Target(name, index_, dev.ifindex, dev.xdp_xmit, dev.redirect_fallback, dev.tx_queues,
                       dev.tx_ring_size, own, dev.profile, dev.peer, mtu=dev.mtu,
                       max_len=max_frame(dev.mtu), xmit_sg="ndo-xmit-sg" in dev.xdp_features)
            self.targets[dev.ifindex] = t
            self.by_name[name] = t
        self.rxqs: dict[tuple[str, int], RxQueue] = {(r.dev, r.q): r for r in rxqs}
        # The TX queues of its own this CPU can fill: XDP_TX's (the devices it receives on) and
        # ndo_xdp_xmit's.  A pass runs once they have room for a poll (or for a whole ring smaller than one).
        rx_devs = {rxq.dev for rxq in self.rxqs.values()}
        self.tx_limited = [t for t in self.by_name.values() if t.own_txq and (t.xdp_xmit or t.name in rx_devs)]
        self.tx_poll_min = min([self.budget] + [t.tx_ring for t in self.tx_limited])
        # This pass's bulks: (device, kind) -> list of page-id arrays to transmit.
        self.tx_bulk: dict[tuple[str, str], list[np.ndarray]] = {}
        self.bulked: dict[str, int] = {}  # frames this poll redirected into each device's bulk queue
        self.posts: dict[tuple[str, int], list[np.ndarray]] = {}  # refilled RX buffers not yet posted
        self.skb_local: list[np.ndarray] = []
        self.skb_remote: list[np.ndarray] = []
        self.offline = 0
        self.waits = 0  # passes in a row that found the TX queues too full to poll
        self.capture: CaptureTap | None = None  # xdpdump-style capture (emu.datapath.capture), when asked for
        # cpumap: the host's cpumaps by (device, ordinal); this pass's per-CPU bulks by (device, ordinal,
        # target CPU); this CPU's kthread's backlog (frames taken off the message rings, still in its
        # ptr_ring) as (device, ordinal, page ids); the second programs it runs, by (device, name); skbs
        # since its last GRO flush.
        self.cpumaps = cpumaps or {}
        self.cpu_bulk: dict[tuple[str, int, int], list[np.ndarray]] = {}
        self.kq: list[tuple[str, int, np.ndarray]] = []
        self.kprogs: dict[tuple[str, str], RxQueue] = {}
        self.gro_held = 0
        # The devmaps of the programs of the queues this CPU polls, by (device, ordinal): broadcasts (a
        # Python program's DevMap, or an eBPF object's devmap, ordinal its index in the object).
        self.devmaps: dict[tuple[str, int], BroadcastMap] = {}
        for rxq in self.rxqs.values():
            for m in getattr(rxq.ctx, "maps", {}).values():
                if isinstance(m, BroadcastMap):
                    self.devmaps[(rxq.dev, (m.bcast_base - REDIRECT_BROADCAST) >> 16)] = m
        # TX completions of this CPU's own pages not reaped yet (txc_release: deferred), oldest first.
        self.txc_deferred = host.txc_release == "deferred"
        self.txc_pending: deque[np.ndarray] = deque()
        self.clock: Callable[[], int] = time.monotonic_ns  # replaceable (tests)
        # XDP multi-buffer: a host laid out for it gives its programs' contexts the frames' fragments.
        self.multibuf = pm.multibuf
        if self.multibuf:
            for rxq in self.rxqs.values():
                self._frags_context(rxq.ctx)
        self.last_rx_ns = 0  # when a pass last polled packets
        # Devices declared dead whose pages on their way here `reclaim_transit` has not looked for yet.
        self.transit_dead: list[Target] = []

    def _frags_context(self, ctx: object) -> None:
        """Let a per-packet program's context reach a frame's fragments (``get_buff_len``, ``load_bytes``,
        ``store_bytes``, ``adjust_tail``)."""
        if hasattr(ctx, "attach_frames"):
            ctx.attach_frames(self.data2d, self.pm.shinfo, self.buf)  # type: ignore[attr-defined]

    def describe(self, ids: np.ndarray) -> np.ndarray:
        """Descriptors of pages `ids`, from the page table, as this CPU hands them on."""
        d = np.empty(len(ids), dtype=DESC_DTYPE)
        pm = self.pm
        d["page"] = ids
        d["gen"] = pm.gen.take(ids)
        d["off"] = pm.off.take(ids)
        d["len"] = pm.len.take(ids)
        d["owner"] = pm.owner.take(ids)
        d["aux"] = self.cpu
        return d

    def send_descs(self, to: str | int, kind: str, header: dict, ids: np.ndarray) -> None:
        """Describe pages `ids` from the page table and send them to `to`."""
        self.out.send(to, kind, header, self.describe(ids))

    # -- messages from devices and other CPUs -----------------------------------------------------

    def dispatch(self, msg: bytes) -> None:
        """One message from the inbox: RX completions, TX completions and refusals, posted buffers handed
        back, skbs to free; anything else is refused and counted."""
        try:
            kind, hdr, blob = wire.unpack_msg(msg, CPU_KINDS)
            if kind == "bell":
                return  # a producer woke us up: its message is in our ring
            d = descs_from_bytes(blob)
        except (wire.WireError, ValueError) as exc:
            self.c[self.i["bad_messages"]] += 1
            self.warn_once("badmsg", f"refused a message: {exc}")
            return
        if kind == RX:
            rxq = self.rxqs.get((hdr.get("dev"), hdr.get("q")))
            if rxq is None:
                self.c[self.i["bad_messages"]] += 1
                self.warn_once("badq", f"RX descriptors for a queue not bound here: {hdr!r}")
                return
            n = len(d)
            # Only this CPU's own posted buffers, each once, become its XDP buffers.
            ok = check_descs(self.pm, d, PageState.RX_POSTED, owner=self.cpu, unique=True)
            if ok is not None:
                d = d[ok]
                self.refused(n - len(d), PageState.RX_POSTED, _REFUSED_WHY)
            # A completed descriptor keeps its ring slot until NAPI processes it (see napi_poll); only
            # refused ones free theirs now.  So the pool lends out no more than the ring holds.
            rxq.posted -= n - len(d)
            if len(d) and self.multibuf:
                # A multi-buffer frame's fragments took ring slots of their own: free them now (the head's
                # stays taken until NAPI processes the frame).
                rxq.posted -= len(frame_frags(self.pm, d["page"]))
            if len(d):
                xdp_prepare_buff(self.pm, d["page"], self.cpu)
                rxq.pending.append(d)
        elif kind == RXRET:
            # Posted buffers a device hands back at ndo_stop; screened like any return, so a forged one
            # naming pages in flight moves nothing.  ndo_stop frees them in process context, not in the
            # pool's NAPI softirq, so they go through the ring (page_pool_put_full_page, allow_direct false).
            rxq = self.rxqs.get((hdr.get("dev"), hdr.get("q")))
            n = self._return(d, PageState.RX_POSTED, direct=False)
            if rxq is not None:
                rxq.posted -= n
                rxq.stopped = True
        elif kind == TXC:
            slots = self._slots(d)  # (before the frames go home: a frame's fragments take slots too)
            if self.txc_deferred and check_descs(self.pm, d, PageState.TX_INFLIGHT, owner=self.cpu) is None:
                # All this CPU's own: the NAPI polls reap them (reap_tx), before their RX refills.  This CPU
                # holds them now (they were on their way to it).
                page_hand_over(self.pm, d["page"], self.cpu)
                self.txc_pending.append(d)
                self.c[self.i["tx_completions"]] += len(d)
            else:
                # xdp_return_frame_bulk: another pool's pages go back tx_bulk (16) per ring-lock round trip.
                self.c[self.i["tx_completions"]] += self._return(d, PageState.TX_INFLIGHT, bulk=self.tx_bulk_size)
            # The ring slots are free now, where a driver frees them as it reaps: the pass that reaps them
            # may then fill them again.
            self._tx_reaped(hdr, slots)
        elif kind == TXDROP:
            what = "xdp_tx_full" if hdr.get("kind") == "tx" else "xmit_drops"
            slots = self._slots(d)
            self.c[self.i[what]] += self._return(d, PageState.TX_QUEUED)
            self._tx_reaped(hdr, slots)
        elif kind == SKB:
            n = self._return(d, PageState.SKB)
            self.c[self.i["stack_rx"]] += n
            self.c[self.i["skb_remote_free"]] += n
        elif kind == CPUMAP:
            key = (hdr.get("dev"), hdr.get("map"))
            m = self.cpumaps.get(key)  # type: ignore[arg-type]
            if m is None:
                self.c[self.i["bad_messages"]] += 1
                self.warn_once("badcpumap", f"cpumap frames for a map this host does not have: {hdr!r}")
                return
            n = len(d)
            ok = check_descs(self.pm, d, PageState.XDP, unique=True)
            # Only frames handed over to this CPU: another CPU's XDP buffers are not ours to free.
            mine = self.pm.holder.take(d["page"]) == self.cpu
            if ok is not None or not np.logical_and.reduce(mine):
                d = d[mine if ok is None else ok & mine]
                self.refused(n - len(d), PageState.XDP, " held by this CPU" + _REFUSED_WHY)
                m.ring_consumed(self.cpu, n - len(d))  # they held ring slots: give them back
            if len(d):
                self.kq.append((key[0], key[1], d["page"].astype(np.int64)))  # type: ignore[arg-type]

    def _free(self, ids: np.ndarray, expect: PageState, direct: bool = True) -> int:
        """Free frames on this CPU, in softirq: this CPU's own pages go straight to its cache (NAPI-local
        direct recycling, 6.4; not `direct`: through its ring too), every other pool's through that pool's
        ring (``xdp_return_frame``)."""
        if not len(ids):
            return 0
        owners = self.pm.owner.take(ids)
        remote = int(np.count_nonzero((owners != self.cpu) & (owners >= 0)))
        if remote:
            self.c[self.i["remote_returns"]] += remote
        return return_pages(self.pm, self.pool if direct else None, ids, expect=expect)

    def reap_tx(self, limit: int | None = None) -> int:
        """Recycle up to `limit` (None: all) of this CPU's own TX completions not reaped yet, oldest
        first, as a driver's NAPI poll cleans its TX ring before its RX work; returns how many.  `limit`
        counts buffers: a multi-buffer frame's completion returns its head and every fragment (at least
        one frame is reaped)."""
        pending = self.txc_pending
        n = 0
        while pending and (limit is None or n < limit):
            d = pending[0]
            k, bufs = (len(d), len(d)) if limit is None else self._frames_within(d, limit - n)
            if k < len(d):
                pending[0] = d[k:]
                d = d[:k]
            else:
                pending.popleft()
            n += bufs
            self._return(d, PageState.TX_INFLIGHT)  # counted in tx_completions when they came in
        return n

    def _frames_within(self, d: np.ndarray, limit: int) -> tuple[int, int]:
        """How many of frames `d`, from the first, fit `limit` (> 0) buffers (at least one frame), and the
        buffers they take: a multi-buffer frame takes 1 + N (a TX ring slot, a reaped page each)."""
        if not self.multibuf:
            k = min(len(d), limit)
            return k, k
        w = np.cumsum(self.pm.nfrags.take(d["page"]).astype(np.int64) + 1)
        k = len(d) if int(w[-1]) <= limit else max(1, int(np.searchsorted(w, limit, side="right")))
        return k, int(w[k - 1])

    def _reap_for(self, want: int) -> None:
        """Before a refill of `want` buffers, reap the TX completions the kernel's finer polls would
        have put into the cache since the last refill: as many as the refill takes and the cache has
        room for, and at least what the pool lacks (so a completed page never leaves a refill to the
        page allocator)."""
        pool = self.pool
        # `want` counts buffers, the cache and ring count pages: with `pool.frag_size` fragments a page
        # serves `frags` buffers, and a reaped completion returns a buffer (the refill's pages, in buffers).
        f = self.pm.frags
        pages = -(-want // f)
        have = pool.cache_count
        room = pool.cache_size - have
        short = pages - have - pool.ring_count
        self.reap_tx(max(min(pages, room), short) * f)

    def _return(self, d: np.ndarray, expect: PageState, bulk: int | None = None, direct: bool = True) -> int:
        """Return pages a peer handed back to whichever pools own them; returns how many were valid.
        `direct`: freed in this CPU's softirq, so its own pages may go straight to its cache (else every
        page goes through its pool's ring).

        Descriptors are checked first (`check_descs`: range, generation, state) so that a forged or
        stale message moves no counter: counters count packets, and only real pages are packets."""
        pm = self.pm
        ids = d["page"]
        # Usually every page is this CPU's own and exactly as expected: one check, then the cache.
        n = self.pool.recycle_direct_if_valid(ids, d["gen"], expect) if direct else None
        if n is not None:
            return n
        ok = check_descs(pm, d, expect)
        if ok is not None:
            self.refused(len(d) - int(np.count_nonzero(ok)), expect, _REFUSED_WHY)
            d = d[ok]
            ids = d["page"]
        owners = pm.owner.take(ids)
        remote = int(np.count_nonzero((owners != self.cpu) & (owners >= 0)))  # (not page-allocator clones)
        if remote:
            self.c[self.i["remote_returns"]] += remote
        return return_pages(pm, self.pool if direct else None, ids, d["gen"], expect=expect, bulk=bulk)

    # -- the TX rings this CPU fills --------------------------------------------------------------

    def _slots(self, d: np.ndarray) -> int:
        """The TX ring slots frames `d` take: one per buffer, a multi-buffer frame's fragments included."""
        if not self.multibuf or not len(d):
            return len(d)
        ids = d["page"]
        ids = ids[ids < self.pm.nbufs]
        return len(d) + int(np.add.reduce(self.pm.nfrags.take(ids), dtype=np.int64))

    def _tx_reaped(self, hdr: dict, n: int) -> None:
        """Frames of this CPU's TX queue came back (completed or refused): their ring slots are free."""
        t = self.by_name.get(hdr.get("dev"))
        # (A txdrop names no queue: it always answers this CPU's own xmit.)
        if t is not None and t.own_txq and hdr.get("txq", self.cpu % t.tx_queues) == self.cpu % t.tx_queues:
            t.tx_used = max(0, t.tx_used - n)

    def tx_room(self) -> int:
        """Frames this pass may take: the least room left in any XDP TX queue of this CPU's (its ring
        size less what it holds), since any packet may be sent to any of them.

        A driver's ring slot stays taken until its NAPI poll reaps the completion; the kernel's
        ndo_xdp_xmit then drops what does not fit.  Here the "hardware" is a process that may not run
        for milliseconds on a loaded machine, so instead of dropping the CPU polls no more than fits and
        leaves the rest in the RX ring (the device then pauses its link, as flow control does): the pages
        out of the pool stay bounded by the rings, as on a real NIC, instead of piling up in messages
        while the TX side waits for a core."""
        room = POLLS_PER_FLUSH * self.budget * max(1, len(self.rxqs))
        for t in self.tx_limited:
            if not t.down:
                room = min(room, t.tx_ring - t.tx_used)
        return room

    def tx_resync(self) -> None:
        """Never wait on frames the page table says are no longer out: a completion that never comes
        (a device that refused descriptors as stale, say) must not hold this CPU's RX back for good.
        Only this CPU transmits its own pages, so those of them queued or awaiting completion anywhere
        bound what its TX queues can hold."""
        pm = self.pm
        st = pm.state
        out = (st == PageState.TX_QUEUED) | (st == PageState.TX_INFLIGHT)
        held = int(np.count_nonzero(out & (pm.owner == self.cpu)))
        for t in self.tx_limited:
            if t.tx_used > held:
                t.tx_used = held

    # -- a pass: the NAPI polls between two flushes -----------------------------------------------

    def poll_pass(self, got: int, refilling: bool) -> int:
        """Up to `POLLS_PER_FLUSH` NAPI polls and one flush, and this CPU's cpumap kthread's share of the
        CPU (`cpumap_kthread`); returns the packets the polls and the kthread took.

        `got` is how many messages came in before this pass (none: no completion is on its way);
        `refilling` is False once the device is going down (``ndo_stop``: nothing more is posted).
        Several polls, then one flush: the kernel flushes (xdp_do_flush) at the end of each poll, which
        hands the bulks to the driver's rings for free; here a flush is a message, so the polls of one
        pass share it (as xmit_more defers the doorbell).  Counters stay per poll."""
        done = 0
        pool = self.pool
        room = self.tx_room()
        if room >= self.tx_poll_min:
            self.waits = 0
            self.run_programs(room)
        elif any(rxq.pending for rxq in self.rxqs.values()):
            self.c[self.i["tx_ring_waits"]] += 1
            self.waits += 1
            # A scan of the whole page table: only once no message came in this pass (so no
            # completion is on its way), or after many waits in a row, not on every waiting pass.
            if not got or self.waits % TX_RESYNC_WAITS == 0:
                self.tx_resync()
        softirq = 0  # packets polled since this CPU's cpumap kthread last had a round
        taken = 0  # frames that kthread took in its rounds between the polls
        for _ in range(POLLS_PER_FLUSH):
            recycles = pool.direct_recycles
            n = self.napi_poll()
            done += n
            if refilling and (pool.direct_recycles != recycles or (n and self.txc_pending)):
                # The refill inside each poll, as drivers do, so that pages this poll freed (or TX
                # completions it reaps, `refill`) are reused from the cache.  A poll that freed none
                # left the pool as it was: its refill would take the same pages at the end of the
                # pass, which does it for all of them at once.
                self.refill()
            if not n:
                break
            softirq += n
            if self.kq and softirq >= NETDEV_BUDGET and self.napi_scheduled():
                # A cpumap kthread sharing the CPU with a busy NAPI: one round of CPUMAP_BATCH frames
                # per NET_RX softirq (each round's local_bh_enable runs the pending softirq), its frees
                # NAPI-local as the NAPI is still on this CPU's poll list.
                softirq = 0
                taken += self.cpumap_kthread(CPUMAP_BATCH, napi_local=True)
        polled = done
        done += taken
        if polled and self.txc_deferred:
            self.last_rx_ns = self.clock()
        if self.txc_pending and (not refilling or (not polled and self.clock() - self.last_rx_ns >= TXC_IDLE_NS)):
            # The device is going down, or traffic stopped (no packet for TXC_IDLE_NS, not a gap between
            # two batches): NAPI cleans the rest of its TX ring before it completes.
            self.reap_tx()
        if refilling:
            self.refill()
        if self.kq:
            busy = self.napi_scheduled()
            if not busy or not polled:
                # NAPI completed (napi_complete_done: list_owner is -1), or could poll nothing (its TX
                # queues full): the kthread has the CPU to itself, its frees NAPI-local only while the
                # NAPI is still on this CPU's poll list.
                done += self.cpumap_kthread(POLLS_PER_FLUSH * self.budget, napi_local=busy)
        self.xdp_do_flush()
        self.post_flush()
        return done

    # -- the NAPI poll ----------------------------------------------------------------------------

    def run_programs(self, room: int) -> None:
        """Run each queue's XDP program, once, over every packet this pass's polls will take.

        A program sees its packets in the order the polls would give them, and nothing it can observe
        (its packet, its maps) depends on the polls in between, so its verdicts are those of running it
        poll by poll; what the verdicts do to the pages (`act`) and the RX refill still happen poll by
        poll, as in the kernel, except when all they do is append pages to one bulk queue (`act` is then
        done once; the polls still count themselves and their bulks).  One call instead of one per
        poll: a vectorised program's cost is mostly per call."""
        per_queue = POLLS_PER_FLUSH * self.budget
        for rxq in self.rxqs.values():
            pending = rxq.pending
            if rxq.ready is not None or not pending:
                continue
            limit = min(per_queue, room)
            if limit <= 0:
                break
            d = pending[0]
            if len(d) > limit:
                pending[0] = d[limit:]
                d = d[:limit]
            else:
                parts, have = [pending.pop(0)], len(d)
                while pending and have + len(pending[0]) <= limit:
                    have += len(pending[0])
                    parts.append(pending.pop(0))
                d = concat_descs(parts)
            if self.multibuf:
                # A multi-buffer frame takes a TX ring slot per buffer: no more frames than their buffers fit.
                k, bufs = self._frames_within(d, limit)
                if k < len(d):
                    pending.insert(0, d[k:])
                    d = d[:k]
                room -= bufs - len(d)
            pages = d["page"]
            cap = self.capture
            if cap is not None:
                cap.xdp(rxq.dev, rxq.q, self.data2d, pages, d["off"], d["len"], ENTRY,
                        pm=self.pm if self.multibuf else None)
            verdicts, targets = self.run_xdp(rxq, d)
            if cap is not None:
                cap.xdp(rxq.dev, rxq.q, self.data2d, pages, d["off"], d["len"], EXIT, verdicts, targets,
                        pm=self.pm if self.multibuf else None)
            ahead = self._only_bulked(rxq, verdicts, targets, pages)
            if ahead is not None:
                # Every verdict only appends its page to a bulk queue, which the pass flushes once
                # anyway: act on all of them now; the polls still count themselves and their bulks.
                self.act(rxq, pages, verdicts, targets)
                self.bulked.clear()
            rxq.ready = (pages, verdicts, targets, ahead)
            rxq.taken = 0
            room -= len(pages)

    def _only_bulked(self, rxq: RxQueue, verdicts: np.ndarray, targets: np.ndarray | None,
                     pages: np.ndarray) -> str | None:
        """When every packet is XDP_TX on a live device, or XDP_REDIRECT to one live device with
        ``ndo_xdp_xmit`` whose MTU they fit, all `act` does is append them to that bulk queue (no page goes
        back to a pool): the device's name ("" for XDP_TX).  Else None."""
        if not len(verdicts):
            return None
        v0 = int(verdicts[0])
        if int(np.minimum.reduce(verdicts)) != v0 or int(np.maximum.reduce(verdicts)) != v0:
            return None
        if v0 == XDP_TX:
            return None if self.by_name[rxq.dev].down else ""
        if v0 != XDP_REDIRECT or targets is None or not rxq.can_redirect:
            return None
        t0 = int(targets[0])
        t = self.targets.get(t0)
        if t is None or t.down or not t.xdp_xmit or not np.logical_and.reduce(targets == t0):
            return None
        if int(np.maximum.reduce(self.pm.len.take(pages))) > t.max_len:
            return None  # some are too long for it: -EMSGSIZE (redirect)
        if self.multibuf and np.logical_or.reduce(self.pm.nfrags.take(pages)):
            return None  # multi-buffer frames: their whole length and the target's ndo-xmit-sg decide
        return t.name

    def napi_poll(self) -> int:
        done = 0
        budget = self.budget
        for rxq in self.rxqs.values():
            if rxq.ready is None:
                continue
            pages, verdicts, targets, ahead = rxq.ready
            k = rxq.taken
            n = min(budget, len(pages) - k)
            if ahead:
                self.bulked[ahead] = self.bulked.get(ahead, 0) + n
            elif ahead is None:
                if n == len(pages):
                    self.act(rxq, pages, verdicts, targets)
                else:
                    sl = slice(k, k + n)
                    self.act(rxq, pages[sl], verdicts[sl], None if targets is None else targets[sl])
            rxq.taken = k + n
            if rxq.taken == len(pages):
                rxq.ready = None
            rxq.posted -= n
            done += n
        # The stack freed the poll's skbs on this CPU within the poll (before its refill), as in NAPI.
        self.free_local_skbs()
        if done:
            self.c[self.i["polls"]] += 1
            # The devmap bulk queue: one ndo_xdp_xmit call per `bulk` frames, and a partial one at the
            # end of the poll.
            if self.bulked:
                self.c[self.i["xmit_bulks"]] += sum(-(-k // self.bulk) for k in self.bulked.values())
                self.bulked.clear()
        return done

    def run_xdp(self, rxq: RxQueue, d: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The program's verdict on each packet of `d`, and each one's redirect target (None when the
        program redirected none)."""
        c, i = self.c, self.i
        c[i["rx_packets"]] += len(d)
        if self.multibuf:
            nf = self.pm.nfrags.take(d["page"])
            if np.logical_or.reduce(nf):
                c[i["rx_frags_frames"]] += int(np.count_nonzero(nf))
                c[i["rx_frags"]] += int(np.add.reduce(nf, dtype=np.int64))
                c[i["rx_bytes"]] += int(np.add.reduce(frame_lens(self.pm, d["page"])))
                return self.run_program(rxq, d)
        c[i["rx_bytes"]] += int(np.add.reduce(d["len"]))
        return self.run_program(rxq, d)

    def run_program(self, rxq: RxQueue, d: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`run_xdp` without the RX counters: the cpumap kthread's second program runs through it too."""
        n = len(d)
        pages = d["page"]
        lens = d["len"]
        prog = rxq.program
        if prog is None:
            return np.full(n, XDP_PASS, dtype=np.int64), None
        if rxq.batch is not None:
            return self.run_batch(rxq, d)
        if self.multibuf:
            return self.run_frames(rxq, d)
        starts = (pages.astype(np.int64) * self.ps + d["off"]).tolist()
        ln = lens.tolist()
        ctx = rxq.ctx
        buf = self.buf
        out = [0] * n
        redirects: dict[int, int] = {}
        errors = bad = 0
        for k in range(n):
            s = starts[k]
            ctx.data = buf[s : s + ln[k]]
            ctx.redirect_ifindex = -1
            try:
                v = prog(ctx)
            except Exception as exc:
                errors += 1
                self.warn_once("raise", f"XDP program raised {type(exc).__name__}: {exc} (counted ABORTED)")
                v = XDP_ABORTED
            if type(v) is not int or not XDP_ABORTED <= v <= XDP_REDIRECT:
                # Not an action: None from a missing return, 42, True (or a numpy integer, which is one).
                v, wrong = classify_verdict(v)
                bad += wrong
            if v == XDP_REDIRECT:
                redirects[k] = ctx.redirect_ifindex
            out[k] = v
        ctx.data = None
        return self._per_packet_verdicts(out, bad, errors, redirects)

    def _per_packet_verdicts(self, out: list[int], bad: int, errors: int,
                             redirects: dict[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """The per-packet loops' (`run_program`, `run_frames`) result: their verdicts, with what was not an
        action and what raised counted ``xdp_exception``, and the redirect targets (None: none)."""
        n = len(out)
        verdicts = np.fromiter(out, dtype=np.int64, count=n)
        if bad:
            self.warn_once("verdict", "XDP program returned something that is not an action (counted ABORTED)")
        if bad or errors:
            self.c[self.i["xdp_exception"]] += bad + errors
        targets = None
        if redirects:
            targets = np.full(n, -1, dtype=np.int64)
            targets[list(redirects)] = list(redirects.values())
        return verdicts, targets

    def run_frames(self, rxq: RxQueue, d: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`run_program`'s per-packet loop on a host with multi-buffer devices: the context also knows each
        frame's head buffer and fragments, and what the program did to them (``bpf_xdp_adjust_tail``: a new
        data_end, fragments shrunk or released) is stored back after the loop; released fragments go home."""
        n = len(d)
        pages = d["page"].astype(np.int64)
        pm = self.pm
        nfr = pm.nfrags.take(pages)
        starts = (pages * self.ps + d["off"]).tolist()
        ln = d["len"].tolist()
        ctx = rxq.ctx
        prog = rxq.program
        buf = self.buf
        out = [0] * n
        newlen = list(ln)
        redirects: dict[int, int] = {}
        errors = bad = 0
        # (run_program's loop, with the frame's buffers and length: kept apart so that a host without
        # multi-buffer devices pays nothing per packet for them)
        for k, (p, nf) in enumerate(zip(pages.tolist(), nfr.tolist(), strict=True)):
            s = starts[k]
            ctx.data = buf[s : s + ln[k]]
            ctx.frame_start(p, s, nf)
            ctx.redirect_ifindex = -1
            try:
                v = prog(ctx)
            except Exception as exc:
                errors += 1
                self.warn_once("raise", f"XDP program raised {type(exc).__name__}: {exc} (counted ABORTED)")
                v = XDP_ABORTED
            if type(v) is not int or not XDP_ABORTED <= v <= XDP_REDIRECT:
                v, wrong = classify_verdict(v)
                bad += wrong
            if v == XDP_REDIRECT:
                redirects[k] = ctx.redirect_ifindex
            out[k] = v
            newlen[k] = len(ctx.data)
        ctx.data = None
        if newlen != ln:
            pm.len.put(pages, newlen)
        if np.logical_or.reduce(nfr):
            self._release_frags(pages, pm.shinfo[pages.astype(np.intp), SI_NR_FRAGS].astype(np.uint8) * (nfr != 0))
        return self._per_packet_verdicts(out, bad, errors, redirects)

    def _release_frags(self, pages: np.ndarray, nfrags: np.ndarray) -> None:
        """Fragments a program released (``bpf_xdp_adjust_tail``): home now, from this CPU's softirq."""
        freed = xdp_frags_release(self.pm, self.pool, pages, nfrags)
        if freed:
            self.c[self.i["xdp_frags_released"]] += freed

    def run_batch(self, rxq: RxQueue, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The program's vectorised form over all of `d`; anything but one verdict per packet aborts them
        all (each an ``xdp_exception``, as a raise per packet would be)."""
        n = len(d)
        pkts = XdpBatch(self.data2d, d["page"], d["off"], d["len"], self.spans)
        if self.multibuf:
            nf = self.pm.nfrags.take(d["page"])
            if np.logical_or.reduce(nf):
                pkts.nfrags = nf  # (a copy: the program may change it)
        try:
            ret = rxq.batch(rxq.ctx, pkts)
        except Exception as exc:
            self.warn_once("raise", f"XDP program raised {type(exc).__name__}: {exc} (counted ABORTED)")
            ret = None
        if pkts.moved:  # a native program's adjust_head/tail: the frames' new place in their pages
            self.pm.off.put(d["page"], pkts.offs)
            self.pm.len.put(d["page"], pkts.lens)
        if pkts.nfrags is not None:
            self._release_frags(d["page"].astype(np.int64), pkts.nfrags)
        if pkts.exceptions:  # a native program's faults (emu.ebpf.engine): ABORTED, each an xdp_exception
            self.warn_once("fault", f"XDP program faulted: {pkts.fault} (counted ABORTED)")
            self.c[self.i["xdp_exception"]] += pkts.exceptions
        if type(ret) is np.ndarray and ret.dtype == np.int64 and ret.shape == (n,) and n:
            lo, hi = int(np.minimum.reduce(ret)), int(np.maximum.reduce(ret))
            if lo >= XDP_ABORTED and hi <= XDP_REDIRECT:  # the usual case: one check, no copy
                return ret, pkts.redirect_ifindex
        res = None if ret is None else classify_verdicts(ret, n)
        if res is None:
            self.warn_once("batchverdict", "vectorised XDP program did not return one verdict per packet "
                                           "(counted ABORTED)")
            self.c[self.i["xdp_exception"]] += n
            return np.full(n, XDP_ABORTED, dtype=np.int64), pkts.redirect_ifindex
        verdicts, bad = res
        if bad:
            self.warn_once("verdict", "XDP program returned an unknown verdict (counted ABORTED)")
            self.c[self.i["xdp_exception"]] += bad
        return verdicts, pkts.redirect_ifindex

    def act(self, rxq: RxQueue, pages: np.ndarray, v: np.ndarray, targets: np.ndarray | None) -> None:
        """What one poll's verdicts do to its pages."""
        c, i = self.c, self.i
        aborted, drop, passed, tx, redirect = np.bincount(v, minlength=5).tolist()
        if aborted:
            c[i["xdp_aborted"]] += aborted
        if drop:
            c[i["xdp_drop"]] += drop
        if aborted or drop:
            self.pool.recycle_direct(pages[v <= XDP_DROP], errors="count", expect=PageState.XDP)
        if passed:
            c[i["xdp_pass"]] += passed
            ids = pages[v == XDP_PASS]
            xdp_build_skb(self.pm, ids)
            (self.skb_local if self.stack_cpu == self.cpu else self.skb_remote).append(ids)
        if tx:
            c[i["xdp_tx"]] += tx
            if self.by_name[rxq.dev].down:
                c[i["xdp_tx_full"]] += tx
                self.pool.recycle_direct(pages[v == XDP_TX], errors="count", expect=PageState.XDP)
            else:
                self.tx_bulk.setdefault((rxq.dev, "tx"), []).append(pages if tx == len(v) else pages[v == XDP_TX])
        if redirect and not rxq.can_redirect:
            self.warn_once(f"noredirect{rxq.dev}", f"{rxq.dev}'s XDP features lack 'redirect': its driver takes "
                           "XDP_REDIRECT for an unknown action (bpf_warn_invalid_xdp_action): dropped, counted "
                           "xdp_aborted and xdp_exception")
            c[i["xdp_aborted"]] += redirect
            c[i["xdp_exception"]] += redirect
            self.pool.recycle_direct(pages[v == XDP_REDIRECT], errors="count", expect=PageState.XDP)
        elif redirect:
            c[i["xdp_redirect"]] += redirect
            if redirect == len(v):
                self.redirect(pages, targets, rxq.dev)
            else:
                sel = v == XDP_REDIRECT
                self.redirect(pages[sel], None if targets is None else targets[sel], rxq.dev)

    def redirect(self, pages: np.ndarray, targets: np.ndarray | None, dev: str = "") -> None:
        """``xdp_do_redirect`` for each page, to the ifindex the program chose (-1: none was chosen) or to
        the cpumap entry it chose (a `REDIRECT_CPUMAP` code; the map is one of `dev`'s program)."""
        if targets is None:
            targets = np.full(len(pages), -1, dtype=np.int64)
        first = int(targets[0])
        if np.logical_and.reduce(targets == first):
            groups = [(first, pages)]
        else:
            groups = [(int(ifx), pages[targets == ifx]) for ifx in np.unique(targets)]
        for ifindex, ids in groups:
            if ifindex >= REDIRECT_BROADCAST:
                self.broadcast(dev, ifindex, ids)
                continue
            if ifindex >= REDIRECT_CPUMAP:
                self.cpumap_enqueue(dev, ifindex, ids)
                continue
            t = self.targets.get(ifindex)
            if t is not None and not t.down and t.xdp_xmit and self.multibuf and not t.xmit_sg:
                # __xdp_enqueue: a multi-buffer frame to a device without ndo-xmit-sg is -EOPNOTSUPP.
                sg = self.pm.nfrags.take(ids) != 0
                if np.logical_or.reduce(sg):
                    self.c[self.i["xmit_sg_drop"]] += int(np.count_nonzero(sg))
                    self.redirect_err(ids[sg], "eopnotsupp", f"nosg{t.name}", f"redirect of multi-buffer frames "
                                      f"to {t.name} failed with -EOPNOTSUPP: its XDP features lack ndo-xmit-sg "
                                      "(__xdp_enqueue); give it ndo-xmit-sg, or keep frames within one buffer")
                    ids = ids[~sg]
                    if not len(ids):
                        continue
            if t is not None and not t.down and t.xdp_xmit:
                # xdp_ok_fwd_dev: a frame longer than the target's MTU (+ header and a VLAN tag) fails; its
                # whole length (xdp_get_frame_len) for a multi-buffer frame.
                lens = frame_lens(self.pm, ids) if self.multibuf else self.pm.len.take(ids)
                if int(np.maximum.reduce(lens)) > t.max_len:
                    big = lens > t.max_len
                    self.redirect_err(ids[big], "emsgsize", f"msgsize{t.name}", f"redirect to {t.name} of "
                                      f"frames longer than its mtu {t.mtu} allows ({t.max_len} bytes): "
                                      "-EMSGSIZE")
                    ids = ids[~big]
                    if not len(ids):
                        continue
                self._bq_enqueue(t, ids)
            elif t is not None and not t.down and t.fallback == "skb":
                self.redirect_skb(t, ids)
            elif t is None:
                # The kernel frees the frame and counts a redirect error (xdp:xdp_redirect_err): -EINVAL
                # for an ifindex with no device (xdp_do_redirect), -ENETDOWN for a device that is gone
                # (xdp_ok_fwd_dev), -EOPNOTSUPP for one whose features lack ndo-xmit (__xdp_enqueue).
                self.redirect_err(ids, "einval", f"noif{ifindex}", f"redirect to ifindex {ifindex}: no such "
                                  "device on this host: -EINVAL")
            elif t.down:
                self.redirect_err(ids, "enetdown", f"down{t.name}", f"redirect to {t.name}: the device is "
                                  "gone: -ENETDOWN")
            else:
                if t.profile == "veth":
                    why = (f"{t.name} is a veth, which advertises ndo-xmit only while the peer of its pair has "
                           "an XDP program attached, as the kernel's veth does; ")
                    if ":" in t.peer:
                        why += f"attach one to {t.peer} (xdp_pass will do)"
                    else:
                        why += (f"its peer {t.peer or '(none: it is not cabled)'} is no device and runs no "
                                "program: cable it to a device that has one, or set redirect_fallback: skb")
                else:
                    why = (f"{t.name} does not implement ndo_xdp_xmit (xdp_xmit: false, or xdp_features "
                           "without ndo-xmit); set redirect_fallback: skb to copy into an skb instead")
                self.redirect_err(ids, "eopnotsupp", f"noxmit{t.name}", f"redirect to {t.name} failed with "
                                  f"-EOPNOTSUPP: its XDP features lack ndo-xmit: {why}")

    def redirect_err(self, ids: np.ndarray, errno_name: str, key: str, text: str) -> None:
        """A failed ``xdp_do_redirect``: the frames are freed here and counted as ``redirect_err`` and by
        errno (`emu.run.report.REDIRECT_ERRNOS`), and the reason is said once (`key`)."""
        self.warn_once(key, f"{text} (redirect_err)")
        self.c[self.i["redirect_err"]] += len(ids)
        self.c[self.i[f"redirect_err_{errno_name}"]] += len(ids)
        self._free(ids, PageState.XDP)

    def redirect_skb(self, t: Target, ids: np.ndarray) -> None:
        """The fallback for a target without ``ndo_xdp_xmit``: build an skb (a copy of the frame) and
        use the normal transmit path; the page itself is recycled at once."""
        pm = self.pm
        offs = pm.off.take(ids)
        lens = pm.len.take(ids)
        spans = zip(ids.tolist(), offs.tolist(), lens.tolist(), strict=True)
        frames = [bytes(self.data2d[p, o : o + n]) for p, o, n in spans]
        if self.multibuf:
            # A multi-buffer frame's skb carries its fragments: the copy is the whole frame.
            for k, (p, nf) in enumerate(zip(ids.tolist(), pm.nfrags.take(ids).tolist(), strict=True)):
                if nf:
                    frames[k] += b"".join(bytes(self.data2d[b, o : o + n])
                                          for b, o, n in shinfo_entries(pm.shinfo, p, nf))
        self.out.send_frames(t.name, frames)
        self.c[self.i["redirect_skb"]] += len(ids)
        self._free(ids, PageState.XDP)

    # -- devmap broadcast: BPF_F_BROADCAST (kernel/bpf/devmap.c dev_map_enqueue_multi) ---------------

    def broadcast(self, dev: str, code: int, ids: np.ndarray) -> None:
        """``dev_map_enqueue_multi``: each frame to every device of the devmap that can take it (has
        ``ndo_xdp_xmit`` and is up), but the ingress device with ``BPF_F_EXCLUDE_INGRESS``.  Every target
        but the last gets a clone (``xdpf_clone``: a page from the page allocator, not from the pool);
        the last gets the frame itself.  So N targets cost the pool page and N-1 page-allocator pages,
        each freed by its own path at its TX completion.

        No target left: the kernel frees the frame and reports success (``redirect_bcast_empty`` here, so
        that the packet is accounted for).  A frame that cannot be cloned (its end past the kernel's
        PAGE_SIZE) or no page to clone into: -ENOMEM, the frame is freed, a ``redirect_err``; the kernel
        may have sent some clones by then, the emulator sends none (all or nothing per batch).  A target
        whose MTU a frame exceeds does not get that frame (``is_valid_dst``), again silently."""
        ordinal, exclude = (code - REDIRECT_BROADCAST) >> 16, code & 1
        m = self.devmaps.get((dev, ordinal))
        if m is None:
            self.redirect_err(ids, "einval", f"nobcast{code}", f"broadcast to an unknown devmap {code:#x}: -EINVAL")
            return
        ingress = self.by_name[dev].ifindex if dev in self.by_name else -1
        # is_valid_dst: devices without ndo_xdp_xmit or down are skipped silently, and so, frame by frame,
        # is a device whose MTU the frame exceeds (xdp_ok_fwd_dev).
        dsts = [t for ifx in m.ifindexes if ifx and not (exclude and ifx == ingress)
                and (t := self.targets.get(ifx)) is not None and not t.down and t.xdp_xmit]
        if dsts:
            # A multi-buffer frame also skips the devices without ndo-xmit-sg, and its MTU check takes its
            # whole length (xdp_get_frame_len).
            sg = self.pm.nfrags.take(ids) != 0 if self.multibuf else None
            if sg is not None and not np.logical_or.reduce(sg):
                sg = None
            lens = self.pm.len.take(ids) if sg is None else frame_lens(self.pm, ids)
            if sg is not None or int(np.maximum.reduce(lens)) > min(t.max_len for t in dsts):
                # Some frames cannot go to some targets: the frames with the same targets together.
                fits = np.zeros(len(ids), dtype=np.int64)
                for j, t in enumerate(dsts):
                    ok = lens <= t.max_len
                    if sg is not None and not t.xmit_sg:
                        ok &= ~sg
                    fits |= ok.astype(np.int64) << j
                for key in np.unique(fits).tolist():
                    self._flood(dev, m.name, ordinal, ids[fits == key],
                                [t for j, t in enumerate(dsts) if key >> j & 1])
                return
        self._flood(dev, m.name, ordinal, ids, dsts)

    def _flood(self, dev: str, mname: str, ordinal: int, ids: np.ndarray, dsts: list[Target]) -> None:
        """`broadcast`'s frames `ids` to their valid targets `dsts`: clones to all but the last, the frames
        themselves to the last; none: freed, counted ``redirect_bcast_empty``."""
        c, i = self.c, self.i
        if not dsts:
            self.warn_once(f"bcastempty{dev}{ordinal}", f"broadcast from {dev} through devmap {mname!r} has no "
                           "target (only the ingress device, excluded, devices without ndo_xdp_xmit, or "
                           "frames longer than their mtu allows): nothing is sent, as in the kernel "
                           "(counted redirect_bcast_empty)")
            c[i["redirect_bcast_empty"]] += len(ids)
            self._free(ids, PageState.XDP)
            return
        pm = self.pm
        if len(dsts) > 1 and self.multibuf:
            # dev_map_enqueue_clone: "Frags live outside the linear frame and cannot be cloned safely" (the
            # 2026 fix to xdpf_clone's callers): a multi-buffer frame with more than one target fails with
            # -EOPNOTSUPP before any copy is made, and is freed.
            sg = pm.nfrags.take(ids) != 0
            if np.logical_or.reduce(sg):
                self.redirect_err(ids[sg], "eopnotsupp", "bcastsg", "broadcast of multi-buffer frames to more "
                                  "than one device: a frame with fragments cannot be cloned "
                                  "(dev_map_enqueue_clone): -EOPNOTSUPP")
                ids = ids[~sg]
                if not len(ids):
                    return
        if len(dsts) > 1:
            clonable = pm.off.take(ids).astype(np.int64) + pm.len.take(ids) <= PAGE_SIZE
            if not np.logical_and.reduce(clonable):
                self.redirect_err(ids[~clonable], "enomem", "bcastbig", "broadcast of frames too large to clone "
                                  f"into a {PAGE_SIZE}-byte page (xdpf_clone): -ENOMEM")
                ids = ids[clonable]
                if not len(ids):
                    return
            clones = []
            for t in dsts[:-1]:
                new = xdpf_clone(pm, ids, self.cpu)
                if len(new) < len(ids):
                    for _, cl in clones:
                        self._free(cl, PageState.XDP)
                    self.redirect_err(ids, "enomem", "bcastnomem", "no page left in the page allocator for a "
                                      "broadcast's clone (xdpf_clone): -ENOMEM")
                    return
                self.data2d[new] = self.data2d[ids]
                clones.append((t, new))
            c[i["xdpf_clone"]] += len(ids) * len(clones)
            for t, new in clones:
                self._bq_enqueue(t, new)
        self._bq_enqueue(dsts[-1], ids)

    def _bq_enqueue(self, t: Target, ids: np.ndarray) -> None:
        """Frames into this CPU's bulk queue for device `t` (``bq_enqueue``), sent at the flush."""
        self.tx_bulk.setdefault((t.name, "redirect"), []).append(ids)
        self.bulked[t.name] = self.bulked.get(t.name, 0) + len(ids)

    # -- cpumap: XDP_REDIRECT to another CPU (kernel/bpf/cpumap.c) --------------------------------

    def cpumap_enqueue(self, dev: str, code: int, ids: np.ndarray) -> None:
        """``cpu_map_enqueue``: the frames join this CPU's bulk queue for the entry (``bq_enqueue``), which
        `xdp_do_flush` produces into the entry's ptr_ring (``__cpu_map_flush``)."""
        ordinal, cpu = (code - REDIRECT_CPUMAP) >> 16, code & 0xFFFF
        if (dev, ordinal) not in self.cpumaps or cpu >= self.ncpus:
            self.redirect_err(ids, "einval", f"nocpumap{code}", f"redirect to an unknown cpumap entry {code:#x}: "
                              "-EINVAL")
            return
        self.cpu_bulk.setdefault((dev, ordinal, cpu), []).append(ids)

    def cpumap_flush(self) -> None:
        """``__cpu_map_flush``: each target's bulk into its ptr_ring, in bulks of `CPU_MAP_BULK_SIZE`; what
        does not fit is dropped and freed here (``xdp_return_frame_rx_napi``), counted as enqueue drops,
        as ``xdp-bench redirect-cpu`` shows them.  The frames that fit go to the target CPU (a ``cpumap``
        message; its kthread takes them off the ring)."""
        c, i = self.c, self.i
        for (dev, ordinal, cpu), parts in self.cpu_bulk.items():
            ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
            n = len(ids)
            c[i["cpumap_enqueue_bulks"]] += -(-n // CPU_MAP_BULK_SIZE)
            # A dead target CPU's kthread is gone: nothing more goes into its ring.
            k = 0 if self.offline >> cpu & 1 else self.cpumaps[(dev, ordinal)].ring_produce(cpu, n)
            if k < n:
                c[i["cpumap_enqueue_drop"]] += n - k
                self._free(ids[k:], PageState.XDP)
            if not k:
                continue
            c[i["cpumap_enqueue"]] += k
            ids = ids[:k]
            if cpu == self.cpu:
                self.kq.append((dev, ordinal, ids))
            else:
                page_hand_over(self.pm, ids, cpu)
                self.send_descs(cpu, CPUMAP, {"cpu": self.cpu, "dev": dev, "map": ordinal}, ids)
        self.cpu_bulk.clear()

    def napi_scheduled(self) -> bool:
        """Whether this CPU's NAPI is still on its poll list (``napi->list_owner`` is this CPU): some RX
        queue it polls has packets its polls have not taken yet, so the poll that took a full budget
        will be repolled; with none left, ``napi_complete_done`` took it off (list_owner -1)."""
        for rxq in self.rxqs.values():
            if rxq.ready is not None or rxq.pending:
                return True
        return False

    def cpumap_kthread(self, limit: int, napi_local: bool) -> int:
        """This CPU's cpumap kthread (``cpu_map_kthread_run``): up to `limit` frames off its ptr_rings,
        in rounds of `CPUMAP_BATCH` (8) with BH disabled; returns the frames taken.

        How it shares the CPU with NAPI: while this CPU's NAPI has work, each round's ``local_bh_enable``
        runs the pending NET_RX softirq, so `poll_pass` gives the kthread one round per `NETDEV_BUDGET`
        polled packets (`napi_local`: the NAPI is on this CPU's poll list meanwhile).  Once NAPI has
        completed, the kthread has the CPU to itself: up to a pass's worth of NAPI polls (1,024 frames)
        a pass, a chunk after which the worker reads its messages (and NAPI gets the CPU when traffic is
        back).  The rounds of one call are processed as one batch, with the counters of its rounds
        (``cpumap_kthread_sched`` when the ring empties and the kthread sleeps)."""
        if not self.kq:
            return 0
        c, i = self.c, self.i
        done = 0
        while self.kq and done < limit:
            dev, ordinal, ids = self.kq[0]
            take = min(len(ids), limit - done)
            if take < len(ids):
                self.kq[0] = (dev, ordinal, ids[take:])
                ids = ids[:take]
            else:
                self.kq.pop(0)
            m = self.cpumaps[(dev, ordinal)]
            m.ring_consumed(self.cpu, len(ids))
            done += len(ids)
            self._kthread_frames(dev, m, ids, napi_local)
        c[i["cpumap_kthread_processed"]] += done
        if not self.kq:
            # The ring is empty: the last GRO flush, and the kthread sleeps until a producer wakes it.
            if self.gro_held:
                c[i["cpumap_gro_flush"]] += 1
                self.gro_held = 0
            c[i["cpumap_kthread_sched"]] += 1
        return done

    def _kthread_free(self, ids: np.ndarray, expect: PageState, napi_local: bool) -> None:
        """Frees in the kthread (``xdp_return_frame`` of a dropped frame, the stack freeing an skb's page
        through ``napi_pp_put_page``), with BH disabled: ``page_pool_put_unrefed_netmem`` without
        allow_direct, so ``page_pool_napi_local`` decides.  In softirq context, it recycles into the
        alloc cache when the pool's ``cpuid`` is this CPU (only the per-CPU system pools) or the pool's
        NAPI is scheduled on this CPU (``napi->list_owner``).  Here a CPU's pool is its NAPI's: this CPU's
        own pages go to its cache while its NAPI has work (`napi_local`), else through its ring like every
        other pool's pages."""
        self._free(ids, expect, direct=napi_local)

    def _kthread_frames(self, dev: str, m: CpuMap, ids: np.ndarray, napi_local: bool) -> None:
        """One stretch of frames of one entry: the entry's second program (if any) over them, then
        ``cpu_map_bpf_prog_run_xdp``'s verdicts: XDP_PASS builds skbs for the stack, XDP_REDIRECT goes
        through ``xdp_do_redirect``, anything else is dropped (XDP_TX is not allowed there: a warning and
        an ``xdp_exception``).  Every free is on this CPU, by `_kthread_free`'s rule."""
        c, i = self.c, self.i
        name = m.program(self.cpu)
        if name is None:
            verdicts = np.full(len(ids), XDP_PASS, dtype=np.int64)
            targets = None
        else:
            verdicts, targets = self.run_program(self._kprog(dev, name), self.describe(ids))
        passed = verdicts == XDP_PASS
        npass = int(np.count_nonzero(passed))
        redir = verdicts == XDP_REDIRECT
        nredir = int(np.count_nonzero(redir))
        ndrop = len(ids) - npass - nredir
        if ndrop:
            tx = int(np.count_nonzero(verdicts == XDP_TX))
            if tx:
                self.warn_once("cpumaptx", f"cpumap program {name} returned XDP_TX, which a cpumap program "
                                           "cannot do (dropped, counted as xdp_exception)")
                c[i["xdp_exception"]] += tx
            c[i["cpumap_kthread_drop"]] += ndrop
            self._kthread_free(ids[~(passed | redir)], PageState.XDP, napi_local)
        if nredir:
            c[i["cpumap_kthread_redirect"]] += nredir
            self.redirect(ids[redir], None if targets is None else targets[redir], dev)
        if npass:
            skbs = ids if npass == len(ids) else ids[passed]
            # __xdp_build_skb_from_frame, then the stack (GRO) consumes and frees them on this CPU.
            xdp_build_skb(self.pm, skbs)
            c[i["cpumap_kthread_pass"]] += npass
            c[i["stack_rx"]] += npass
            held = self.gro_held + npass
            c[i["cpumap_gro_flush"]] += held // GRO_FLUSH_SKBS
            self.gro_held = held % GRO_FLUSH_SKBS
            self._kthread_free(skbs, PageState.SKB, napi_local)

    def _kprog(self, dev: str, name: str) -> RxQueue:
        """The second program `name` as this CPU's kthread runs it for frames of `dev` (loaded once)."""
        rq = self.kprogs.get((dev, name))
        if rq is None:
            from emu.xdp.context import load_program

            prog = load_program(name)
            cfg = self.host.devices[dev]
            ifindexes = {n: dv.ifindex for n, dv in self.host.devices.items()}
            # The frame's rxq is its ingress device's (xdpf->dev_rx), queue 0: an xdp_frame keeps no queue.
            ctx = prog.new_context(cfg.ifindex, 0, self.cpu, {}, {}, ifindexes, host_mtus(self.host))
            batch = prog.batch if cfg.xdp is None or cfg.xdp.vectorised else None
            rq = RxQueue(dev, cfg.ifindex, 0, 0, prog.fn, ctx, batch)
            if self.multibuf:
                self._frags_context(ctx)
            self.kprogs[(dev, name)] = rq
        return rq

    def xdp_do_flush(self) -> None:
        """End of a pass: hand every bulk to its device (``__dev_flush``) and to its CPU's ptr_ring
        (``__cpu_map_flush``), and free the pass's skbs."""
        if self.cpu_bulk:
            self.cpumap_flush()
        if self.tx_bulk:
            for (dev, kind), parts in self.tx_bulk.items():
                ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
                t = self.by_name[dev]
                xdp_xmit_queue(self.pm, ids, device_code(t.index))
                hdr = {"txq": self.cpu % t.tx_queues, "cpu": self.cpu, "kind": kind}
                self.send_descs(dev, XMIT, hdr, ids)
                if t.own_txq:
                    t.tx_used += len(ids) + (len(frame_frags(self.pm, ids)) if self.multibuf else 0)
            self.tx_bulk.clear()
        self.free_local_skbs()
        if self.skb_remote:
            ids = np.concatenate(self.skb_remote)
            self.skb_remote.clear()
            page_hand_over(self.pm, ids, self.stack_cpu)
            self.send_descs(self.stack_cpu, SKB, {"cpu": self.cpu}, ids)

    def free_local_skbs(self) -> None:
        """The skbs this CPU's stack consumed in this poll: their pages go straight back into its alloc
        cache (NAPI-local recycling, 6.4's ``page_pool_napi_local``), before the poll's RX refill takes
        them out again."""
        if self.skb_local:
            ids = self.skb_local[0] if len(self.skb_local) == 1 else np.concatenate(self.skb_local)
            self.skb_local.clear()
            self.c[self.i["stack_rx"]] += len(ids)
            self.pool.recycle_direct(ids, errors="count", expect=PageState.SKB)

    def refill(self) -> None:
        """Keep every bound RX ring full of pages from this CPU's pool (the driver's RX refill).  Called
        after each poll that freed pages into the pool and once at the end of a pass; ``rx_alloc_fail``
        counts the buffers an attempt could not get."""
        for rxq in self.rxqs.values():
            want = rxq.ring_size - rxq.posted
            if want < rxq.refill_min or rxq.stopped or self.by_name[rxq.dev].down:
                continue
            if self.txc_pending:
                self._reap_for(want)
            ids = page_pool_dev_alloc_pages(self.pool, want, device_code(self.by_name[rxq.dev].index))
            if len(ids) < want:
                self.c[self.i["rx_alloc_fail"]] += want - len(ids)
            if len(ids) == 0:
                continue
            rxq.posted += len(ids)
            self.c[self.i["rx_posted"]] += len(ids)
            self.posts.setdefault((rxq.dev, rxq.q), []).append(ids)

    def post_flush(self) -> None:
        """Ring the RX doorbells: the buffers refilled during this pass go to their devices."""
        for (dev, q), parts in self.posts.items():
            ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
            self.send_descs(dev, POST, {"q": q, "cpu": self.cpu}, ids)
        self.posts.clear()

    def apply_offline(self, mask: int) -> None:
        """CPUs or devices died (mask: CPUs in bits 0..31, devices from bit 32): free skbs here instead of
        on a dead stack CPU, post and transmit nothing more to a dead device."""
        self.offline = mask
        if mask >> self.stack_cpu & 1:
            self.stack_cpu = self.cpu
        for t in self.by_name.values():
            if mask >> (DEVICE_BIT + t.index) & 1:
                if not t.down:
                    self.transit_dead.append(t)
                t.down = True
                t.tx_used = 0

    def reclaim_transit(self) -> int:
        """Once this CPU has taken every message of a dead device (its inbox ran dry after the device was
        declared dead: nothing more can come from it), the pages that device handed to this CPU in a
        message it never sent (killed between the hand-over and the send, `NicCore._send`) are still on
        their way here (`transit_code`) and nobody else will return them: back to their pools, from process
        context (through the rings).  Returns how many frames."""
        if not self.transit_dead:
            return 0
        pm = self.pm
        codes = np.array([transit_code(t.index, self.cpu) for t in self.transit_dead], dtype=np.int64)
        names = ", ".join(t.name for t in self.transit_dead)
        self.transit_dead.clear()
        ids = heads_only(pm, np.flatnonzero(np.isin(pm.holder, codes)))  # each frame by its head
        n = 0
        for state in (PageState.RX_POSTED, PageState.TX_INFLIGHT, PageState.TX_QUEUED):
            some = ids[pm.state.take(ids) == state]
            if len(some):
                n += return_pages(pm, None, some, pm.gen.take(some), expect=state)
        if n:
            self.warn_once(f"transit{names}", f"{names} died with {n} frames it had handed to this CPU in a message "
                                              "it never sent: their pages are back in their pools")
        return n

    def shutdown(self) -> None:
        """``page_pool_destroy``: the pages this CPU still has as XDP buffers go home, then the cache's
        and ring's pages go back to the allocator; what is still out is reported by the coordinator
        ("stalled pool shutdown")."""
        for rxq in self.rxqs.values():
            if rxq.ready is not None:
                # (A pass's polls take all of it, so this is only for a pass cut short; pages acted on
                # ahead are in the TX bulks already.)
                rest = rxq.ready[0][rxq.taken :]
                if rxq.ready[3] is None:
                    self.pool.recycle_direct(rest, errors="count", expect=PageState.XDP)
                rxq.posted -= len(rest)
                rxq.ready = None
            for d in rxq.pending:
                self.pool.recycle_direct(d["page"], errors="count", expect=PageState.XDP)
                rxq.posted -= len(d)
            rxq.pending.clear()
        if self.cpu_bulk:
            self.cpumap_flush()
        for dev, ordinal, ids in self.kq:
            # The kthread is stopped with frames in its ring: they are freed (``__cpu_map_ring_cleanup``).
            self.cpumaps[(dev, ordinal)].ring_consumed(self.cpu, len(ids))
            self._free(ids, PageState.XDP)
        self.kq.clear()
        self.reap_tx()
        self.pool.drain()
