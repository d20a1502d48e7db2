"""The bundled XDP programs, Python ports of the kernel's ``samples/bpf`` and ``xdp-bench`` programs.

The bundled topologies name them as ``emu.programs:<name>``:

``xdp_drop``    XDP_DROP everything, counting packets and bytes per CPU (samples/bpf ``xdp1``).
``xdp_pass``    XDP_PASS everything.
``xdp_tx``      swap the Ethernet MACs in place and bounce with XDP_TX (``xdp2``, ``xdp-bench tx``).
``l2fwd``       swap MACs and ``bpf_redirect`` to ``params.egress`` (``xdp_redirect``).
``l2fwd_frags`` ``l2fwd`` for XDP multi-buffer (``SEC("xdp.frags")``, declared ``frags=True``): jumbo frames
                over 1 + N buffers; ``rxcnt`` counts frames and their whole length (``bpf_xdp_get_buff_len``),
                and a frame shorter than an Ethernet header over all its buffers is dropped.
``l2fwd_cost``  ``l2fwd`` that also spends ``params.cost_ns`` of CPU per packet (busy work, not a sleep:
                a program's processing time occupies its CPU), so that processing time can be swept
                (issue 19: the knob against processing time, Little's law).
``l2fwd_map``   the same through the devmap ``tx_port`` (``xdp_redirect_map``), populated from
                ``params: {tx_port: {0: eth1}}``.
``l2fwd_filter`` parse each frame with dpkt, drop UDP/TCP to ``params.deny_ports`` (``xdp-filter``'s
                port filter), forward the rest like ``l2fwd``.  Per packet only, and about 10 us a
                packet: the kind of program a Python user writes with a packet library, and one where
                the CPU workers, not the devices, are the bottleneck (what the scaling benchmark needs).
``redirect_cpu`` spread frames over the CPUs of the cpumap ``cpu_map`` (``xdp-bench redirect-cpu``,
                its ``l4-sport`` mode: the UDP source port picks the CPU), populated from
                ``params: {cpu_map: {1: 2048, 2: {qsize: 2048, program: "emu.programs:cpumap_drop"}}}``
                (each entry its ptr_ring's qsize and an optional second program the target's kthread
                runs, xdp-bench's ``--remote-action``).
``cpumap_drop`` a second program for a cpumap entry: drop every frame on the target CPU (no maps, as a
                cpumap entry's program here has none); ``xdp_pass`` is the ``pass`` one.
``xdp_broadcast`` flood every frame to all devices of the devmap ``tx_ports`` but the ingress one
                (``bpf_redirect_map(&tx_ports, 0, BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS)``, the kernel
                selftests' ``xdp_redirect_multi``); ``params.exclude_ingress: false`` drops the second flag.
``buggy_*``     six programs that misbehave on purpose, for the fault tests: ``buggy_raise`` raises,
                ``buggy_bad_verdict`` returns 42, ``buggy_no_verdict`` returns None,
                ``buggy_batch_short`` returns one verdict too few from its vectorised form, and
                ``buggy_out_of_bounds`` writes past the packet (each packet it hits is XDP_ABORTED,
                counted as ``xdp_exception``); ``buggy_slow`` takes a millisecond a packet, which
                must cost throughput and nothing else.

Every program but the buggy ones declares its params (`emu.xdp.ParamSpec`), so that validation refuses
``egress: eth9`` or a stray key; the buggy ones declare none and take any, as a user's program written
before declarations existed does.

Every program but ``l2fwd_filter`` and the buggy ones also has a vectorised form (``fn.batch``, see
`emu.xdp.XdpBatch`) that a CPU worker runs over many packets at once (those of all the polls of a
pass): the MAC swap becomes one gather and one scatter of their 12-byte headers, and the verdicts one
array.  Each must do exactly what the per-packet body does packet by packet (``tests/test_xdp.py``
runs both over the same frames and compares bytes, verdicts, redirect targets and maps); the per-packet
bodies stay the reference, and what a topology with ``xdp: {vectorised: false}`` runs.

The per-packet bodies avoid every lookup that can be done once: setup hooks (see `emu.xdp`) resolve the
egress ifindex and fetch the counter map's value storage (`emu.xdp.bpfmaps.BpfMap.view`, the analogue of the
value pointer ``bpf_map_lookup_elem`` returns) into ``ctx.priv``. The MAC swap is one ``struct`` unpack
and one ``pack_into`` on the frame's memoryview, measured faster than slicing and concatenating bytes
(about 85 ns against 165-250 ns). A frame too short to hold the two MACs is dropped, like the samples'
``data + sizeof(*eth) > data_end`` checks (which the verifier requires).
"""

from __future__ import annotations

import struct
import time

import numpy as np

from emu.net.packets import UDP_OFF
from emu.xdp import (
    BPF_F_BROADCAST,
    BPF_F_EXCLUDE_INGRESS,
    XDP_DROP,
    XDP_PASS,
    XDP_TX,
    CpuMap,
    DevMap,
    MapSpec,
    ParamSpec,
    XdpBatch,
    XdpContext,
    xdp_program,
)

__all__ = [
    "buggy_bad_verdict",
    "buggy_batch_short",
    "buggy_no_verdict",
    "buggy_out_of_bounds",
    "buggy_raise",
    "buggy_slow",
    "cpumap_drop",
    "l2fwd",
    "l2fwd_cost",
    "l2fwd_filter",
    "l2fwd_frags",
    "l2fwd_map",
    "redirect_cpu",
    "xdp_broadcast",
    "xdp_drop",
    "xdp_pass",
    "xdp_tx",
]

# Destination and source MAC: unpacked as two 6-byte strings, packed back the other way round.
_MACS = struct.Struct("6s6s")
_unpack_macs = _MACS.unpack_from
_pack_macs = _MACS.pack_into


# Column order of a header row with destination and source MAC exchanged.
_SWAP = np.r_[6:12, 0:6]


def _swap_macs(pkts: XdpBatch) -> np.ndarray:
    """The vectorised MAC swap; returns which packets were long enough to hold both MACs."""
    ok, macs = pkts.head(12)
    if len(macs):
        pkts.store_head(ok, macs[:, _SWAP])
    return ok


def _counter_setup(ctx: XdpContext) -> None:
    ctx.priv = ctx.maps["rxcnt"].view


def _xdp_drop_batch(ctx: XdpContext, pkts: XdpBatch) -> np.ndarray:
    cnt = ctx.priv
    cnt[0] += len(pkts)
    cnt[1] += int(pkts.lens.sum())
    return np.full(len(pkts), XDP_DROP, dtype=np.int64)


@xdp_program(maps={"rxcnt": MapSpec("percpu_array", 2)}, setup=_counter_setup, batch=_xdp_drop_batch, params={})
def xdp_drop(ctx: XdpContext) -> int:
    """Drop; ``rxcnt[0]`` += 1 packet, ``rxcnt[1]`` += its bytes, on this CPU's row."""
    cnt = ctx.priv
    cnt[0] += 1
    cnt[1] += len(ctx.data)  # type: ignore[arg-type]
    return XDP_DROP


def _xdp_pass_batch(ctx: XdpContext, pkts: XdpBatch) -> np.ndarray:
    return np.full(len(pkts), XDP_PASS, dtype=np.int64)


@xdp_program(batch=_xdp_pass_batch, params={}, frags=True)
def xdp_pass(ctx: XdpContext) -> int:
    """Hand every packet to the stack."""
    return XDP_PASS


def _xdp_tx_batch(ctx: XdpContext, pkts: XdpBatch) -> np.ndarray:
    return np.where(_swap_macs(pkts), XDP_TX, XDP_DROP)


@xdp_program(batch=_xdp_tx_batch, params={}, frags=True)
def xdp_tx(ctx: XdpContext) -> int:
    """Swap source and destination MAC and send the frame back out of the port it came in on."""
    d = ctx.data
    try:
        dst, src = _unpack_macs(d)  # type: ignore[arg-type]
    except struct.error:  # no room for the MACs; a try is free when nothing is raised, a len() is not
        return XDP_DROP
    _pack_macs(d, 0, src, dst)  # type: ignore[arg-type]
    return XDP_TX


def _l2fwd_setup(ctx: XdpContext) -> None:
    egress = ctx.params.get("egress")
    if not isinstance(egress, str):
        raise ValueError(f"l2fwd needs params.egress, the name of the device to forward to (got {egress!r})")
    ctx.priv = (ctx.ifindex_of(egress), ctx.maps["rxcnt"].view)


def _l2fwd_batch(ctx: XdpContext, pkts: XdpBatch) -> np.ndarray:
    ok = _swap_macs(pkts)
    egress, cnt = ctx.priv
    cnt[0] += int(np.count_nonzero(ok))
    return np.where(ok, pkts.redirect(egress, ok), XDP_DROP)


# The egress device, declared so that validation checks it names a device of the host.
_EGRESS = ParamSpec("device", "the device to redirect every frame to", required=True)


@xdp_program(maps={"rxcnt": MapSpec("percpu_array", 1)}, setup=_l2fwd_setup, batch=_l2fwd_batch,
             params={"egress": _EGRESS})
def l2fwd(ctx: XdpContext) -> int:
    """Swap MACs and redirect to ``params.egress`` with ``bpf_redirect``; ``rxcnt[0]`` counts packets."""
    d = ctx.data
    try:
        dst, src = _unpack_macs(d)  # type: ignore[arg-type]
    except struct.error:  # no room for the MACs; a try is free when nothing is raised, a len() is not
        return XDP_DROP
    _pack_macs(d, 0, src, dst)  # type: ignore[arg-type]
    egress, cnt = ctx.priv
    cnt[0] += 1
    return ctx.redirect(egress)


def _l2fwd_frags_batch(ctx: XdpContext, pkts: XdpBatch) -> np.ndarray:
    ok = _swap_macs(pkts)
    egress, cnt = ctx.priv
    cnt[0] += int(np.count_nonzero(ok))
    cnt[1] += int(np.add.reduce(pkts.buff_lens()[ok], dtype=np.int64))
    return np.where(ok, pkts.redirect(egress, ok), XDP_DROP)


@xdp_program(maps={"rxcnt": MapSpec("percpu_array", 2)}, setup=_l2fwd_setup, batch=_l2fwd_frags_batch,
             params={"egress": _EGRESS}, frags=True)
def l2fwd_frags(ctx: XdpContext) -> int:
    """``l2fwd`` declared for XDP multi-buffer (``xdp.frags``): a jumbo frame's MACs are in its linear part
    (a device's first buffer holds at least an Ethernet header); ``rxcnt[0]`` counts frames, ``rxcnt[1]``
    their bytes over every buffer (``bpf_xdp_get_buff_len``)."""
    d = ctx.data
    try:
        dst, src = _unpack_macs(d)  # type: ignore[arg-type]
    except struct.error:
        return XDP_DROP
    _pack_macs(d, 0, src, dst)  # type: ignore[arg-type]
    egress, cnt = ctx.priv
    cnt[0] += 1
    cnt[1] += ctx.get_buff_len()
    return ctx.redirect(egress)


# The clock the busy work reads; a module global so that a test can put a counting clock in its place.
_now_ns = time.perf_counter_ns


def _spin(ns: int) -> None:
    """Keep this CPU busy for at least `ns` nanoseconds (a loop on the clock, never a sleep: a sleeping
    worker would free its core, and a program's processing time is time its CPU cannot poll)."""
    if ns <= 0:
        return
    now = _now_ns
    deadline = now() + ns
    while now() < deadline:
        pass


# At most a second a packet: more is a typo (and would starve the worker's heartbeat for minutes a poll).
_COST = ParamSpec("int", "CPU time spent per packet, in nanoseconds (busy work)", default=1000, lo=0,
                  hi=1_000_000_000)


def _cost_of(ctx: XdpContext) -> int:
    # Read from the params, not cached in ctx.priv: the priv stays exactly l2fwd's, so that the forwarding
    # is l2fwd's own code; one mapping lookup is noise next to the busy loop it sizes.
    return ctx.params.get("cost_ns", _COST.default)  # type: ignore[no-any-return]


def _l2fwd_cost_setup(ctx: XdpContext) -> None:
    cost = _cost_of(ctx)
    if type(cost) is not int or cost < 0:
        raise ValueError(f"l2fwd_cost: params.cost_ns must be an integer >= 0 (got {cost!r})")
    _l2fwd_setup(ctx)


def _l2fwd_cost_batch(ctx: XdpContext, pkts: XdpBatch) -> np.ndarray:
    # The packets' cost is spent before the forwarding, as in the per-packet body: n x cost_ns per call.
    _spin(len(pkts) * _cost_of(ctx))
    return _l2fwd_batch(ctx, pkts)


@xdp_program(maps={"rxcnt": MapSpec("percpu_array", 1)}, setup=_l2fwd_cost_setup, batch=_l2fwd_cost_batch,
             params={"egress": _EGRESS, "cost_ns": _COST})
def l2fwd_cost(ctx: XdpContext) -> int:
    """``l2fwd`` that first spends ``params.cost_ns`` of CPU on each packet (a busy loop on the clock, not
    a sleep; the vectorised form spends n x ``cost_ns`` per call), so that processing time can be swept."""
    _spin(_cost_of(ctx))
    return l2fwd(ctx)


def _l2fwd_map_setup(ctx: XdpContext) -> None:
    tx_port = ctx.maps["tx_port"]
    assert isinstance(tx_port, DevMap)
    ctx.priv = (tx_port, ctx.maps["rxcnt"].view)


def _l2fwd_map_batch(ctx: XdpContext, pkts: XdpBatch) -> np.ndarray:
    ok = _swap_macs(pkts)
    tx_port, cnt = ctx.priv
    cnt[0] += int(np.count_nonzero(ok))
    v = np.full(len(pkts), XDP_DROP, dtype=np.int64)
    v[ok] = pkts.redirect_map(tx_port, 0, ok)
    return v


@xdp_program(
    maps={"tx_port": MapSpec("devmap", 64), "rxcnt": MapSpec("percpu_array", 1)},
    setup=_l2fwd_map_setup,
    batch=_l2fwd_map_batch,
    params={},  # only `tx_port`, which populates the map of that name
)
def l2fwd_map(ctx: XdpContext) -> int:
    """Swap MACs and ``bpf_redirect_map(&tx_port, 0, 0)``: an empty slot 0 aborts (flags 0)."""
    d = ctx.data
    try:
        dst, src = _unpack_macs(d)  # type: ignore[arg-type]
    except struct.error:  # no room for the MACs; a try is free when nothing is raised, a len() is not
        return XDP_DROP
    _pack_macs(d, 0, src, dst)  # type: ignore[arg-type]
    tx_port, cnt = ctx.priv
    cnt[0] += 1
    return ctx.redirect_map(tx_port, 0)


_SPORT = struct.Struct("!H")


def _redirect_cpu_setup(ctx: XdpContext) -> None:
    # The CPUs to spread over, read once from the map as user space fills xdp-bench's cpus_available.
    cpu_map = ctx.maps["cpu_map"]
    assert isinstance(cpu_map, CpuMap)
    cpus = [k for k in range(cpu_map.max_entries) if cpu_map.lookup(k) is not None]
    if not cpus:
        raise ValueError("redirect_cpu needs at least one entry in params.cpu_map ({cpu: qsize})")
    ctx.priv = (cpu_map, cpus, np.asarray(cpus, dtype=np.int64), ctx.maps["rxcnt"].view)


def _redirect_cpu_batch(ctx: XdpContext, pkts: XdpBatch) -> np.ndarray:
    cpu_map, _, cpus, cnt = ctx.priv
    cnt[0] += len(pkts)
    ok, ports = pkts.head(UDP_OFF + 2)
    keys = np.full(len(pkts), cpus[0], dtype=np.int64)
    if len(ports):
        sport = ports[:, UDP_OFF].astype(np.int64) << 8 | ports[:, UDP_OFF + 1]
        keys[ok] = cpus[sport % len(cpus)]
    return pkts.redirect_map(cpu_map, keys)


@xdp_program(
    maps={"cpu_map": MapSpec("cpumap", 32), "rxcnt": MapSpec("percpu_array", 1)},
    setup=_redirect_cpu_setup,
    batch=_redirect_cpu_batch,
    params={},  # only `cpu_map`, which populates the map of that name
    frags=True,  # (it reads the UDP source port, in the linear part of a multi-buffer frame)
)
def redirect_cpu(ctx: XdpContext) -> int:
    """``bpf_redirect_map(&cpu_map, cpu, 0)`` with `cpu` picked by the UDP source port among the map's
    entries (the first for a frame too short to have one); ``rxcnt[0]`` counts packets."""
    cpu_map, cpus, _, cnt = ctx.priv
    cnt[0] += 1
    try:
        (sport,) = _SPORT.unpack_from(ctx.data, UDP_OFF)  # type: ignore[arg-type]
    except struct.error:
        return ctx.redirect_map(cpu_map, cpus[0])
    return ctx.redirect_map(cpu_map, cpus[sport % len(cpus)])


def _broadcast_setup(ctx: XdpContext) -> None:
    exclude = ctx.params.get("exclude_ingress", True)
    if not isinstance(exclude, bool):
        raise ValueError(f"xdp_broadcast: params.exclude_ingress must be true or false (got {exclude!r})")
    ctx.priv = (ctx.maps["tx_ports"], BPF_F_BROADCAST | (BPF_F_EXCLUDE_INGRESS if exclude else 0))


def _broadcast_batch(ctx: XdpContext, pkts: XdpBatch) -> np.ndarray:
    tx_ports, flags = ctx.priv
    return pkts.redirect_map(tx_ports, 0, flags=flags)


@xdp_program(
    maps={"tx_ports": MapSpec("devmap", 64)},
    setup=_broadcast_setup,
    batch=_broadcast_batch,
    params={"exclude_ingress": ParamSpec("bool", "leave the ingress device out (BPF_F_EXCLUDE_INGRESS)",
                                         default=True)},
)
def xdp_broadcast(ctx: XdpContext) -> int:
    """``bpf_redirect_map(&tx_ports, 0, BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS)``: every device of the
    map gets the frame (a clone each, the last one the frame itself), the ingress one excepted."""
    tx_ports, flags = ctx.priv
    return ctx.redirect_map(tx_ports, 0, flags)


def _cpumap_drop_batch(ctx: XdpContext, pkts: XdpBatch) -> np.ndarray:
    return np.full(len(pkts), XDP_DROP, dtype=np.int64)


@xdp_program(batch=_cpumap_drop_batch, params={}, frags=True)
def cpumap_drop(ctx: XdpContext) -> int:
    """Drop every frame: a cpumap entry's second program (``xdp-bench redirect-cpu -r drop``)."""
    return XDP_DROP


def _l2fwd_filter_setup(ctx: XdpContext) -> None:
    # Imported here, not with the module: every CPU worker imports this module, and dpkt costs a worker
    # 4.5 MB and 45 ms of start-up that only this program needs.
    import dpkt

    egress = ctx.params.get("egress")
    if not isinstance(egress, str):
        raise ValueError(f"l2fwd_filter needs params.egress, the device to forward to (got {egress!r})")
    ports = ctx.params.get("deny_ports", [])
    if not isinstance(ports, list) or not all(type(p) is int and 0 <= p <= 0xFFFF for p in ports):
        raise ValueError(f"l2fwd_filter: params.deny_ports must be a list of port numbers (got {ports!r})")
    ctx.priv = (ctx.ifindex_of(egress), frozenset(ports), ctx.maps["rxcnt"].view, dpkt.ethernet.Ethernet,
                (dpkt.udp.UDP, dpkt.tcp.TCP), (dpkt.UnpackError, struct.error), dpkt.ip6.IP6)


@xdp_program(
    maps={"rxcnt": MapSpec("percpu_array", 2)},
    setup=_l2fwd_filter_setup,
    params={
        "egress": _EGRESS,
        "deny_ports": ParamSpec("int_list", "UDP/TCP destination ports to drop", default=[], lo=0, hi=0xFFFF),
    },
)
def l2fwd_filter(ctx: XdpContext) -> int:
    """Parse Ethernet / IPv4 / UDP or TCP with dpkt; a destination port in ``params.deny_ports`` is
    dropped (``rxcnt[1]``), anything else has its MACs swapped and is redirected to ``params.egress``
    (``rxcnt[0]``).  A frame dpkt cannot parse is dropped, as a bounds check would."""
    d = ctx.data
    egress, deny, cnt, ethernet, l4_types, unparsable, ip6 = ctx.priv
    try:
        l3 = ethernet(bytes(d)).data  # type: ignore[arg-type]
        l4 = getattr(l3, "data", None)
        if type(l3) is ip6 and any(getattr(h, "frag_off", 0) for h in l3.all_extension_headers):
            # a later fragment carries no L4 header; dpkt knows that only when the Fragment header
            # comes first, not after a hop-by-hop one (found by the C twin comparison)
            l4 = None
    except unparsable:
        return XDP_DROP
    except AttributeError:
        # dpkt 1.9.8's ip6.py reads a Fragment header's offset off the *last* extension header, which an
        # IPv6 frame with Fragment then AH (or any other) header does not have: a frame with no L4 header
        # dpkt can reach, so nothing to filter; forwarded, as the C twin (and any BPF program) forwards it.
        l4 = None
    if isinstance(l4, l4_types) and l4.dport in deny:
        cnt[1] += 1
        return XDP_DROP
    dst, src = _unpack_macs(d)  # type: ignore[arg-type]
    _pack_macs(d, 0, src, dst)  # type: ignore[arg-type]
    cnt[0] += 1
    return ctx.redirect(egress)


def buggy_raise(ctx: XdpContext) -> int:
    """Always raises: the worker must count ``xdp_exception`` and treat the packet as XDP_ABORTED."""
    raise RuntimeError("buggy_raise: this XDP program always fails")


def buggy_bad_verdict(ctx: XdpContext) -> int:
    """Returns 42, not an action: ``bpf_warn_invalid_xdp_action`` territory, handled as XDP_ABORTED."""
    return 42


def buggy_no_verdict(ctx: XdpContext) -> None:
    """Forgets its ``return``: Python gives None, not an action, handled as XDP_ABORTED."""
    ctx.redirect_ifindex = -1  # any work at all; the missing return is the bug


def _buggy_batch_short(ctx: XdpContext, pkts: XdpBatch) -> np.ndarray:
    return np.full(len(pkts) - 1, XDP_DROP, dtype=np.int64)  # off by one


@xdp_program(batch=_buggy_batch_short)
def buggy_batch_short(ctx: XdpContext) -> int:
    """Drops per packet, but its vectorised form returns one verdict too few: the worker cannot tell which
    packet lacks one, so every packet of the call is ABORTED, each counted as ``xdp_exception``."""
    return XDP_DROP


def buggy_out_of_bounds(ctx: XdpContext) -> int:
    """Writes past the end of the packet (the verifier would have refused it): ``ctx.data`` is exactly the
    packet, so the store raises and the packet is ABORTED; the neighbouring page stays intact."""
    d = ctx.data
    d[len(d) + 8] = 0xFF  # type: ignore[index]
    return XDP_DROP


def buggy_slow(ctx: XdpContext) -> int:
    """Takes a millisecond per packet (a program doing far too much work): slow, but every packet is
    still accounted for and the worker keeps its heartbeat."""
    time.sleep(0.001)
    return XDP_DROP
