"""The CPU's NAPI core (`emu.datapath.napi.NapiCore`) driven without a process: a fake outbox records what
it sends, a real page memory holds the pages, and the test plays the device (writing frames, sending RX
and TX completions).  Each test runs in milliseconds."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
from fakes import Counters, FakeOutbox, byte_verdict_program, one_cpu_host

from emu.datapath import napi
from emu.datapath.napi import NapiCore, RxQueue
from emu.mem import pagepool
from emu.mem.page import DESC_DTYPE, HOME, PageState
from emu.mem.pagepool import pool_of, tx_dma_start
from emu.net import wire
from emu.net.protocol import DEVICE_BIT, XDP_PACKET_HEADROOM, device_code, refill_batch, transit_code
from emu.xdp.context import XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX

RX_RING = 64


def make_core(page_memory, eth1: str = "", tx_ring: int = 128, txc_release: str = "deferred"):
    host = dataclasses.replace(one_cpu_host(f"""
        eth0: {{ifindex: 2, rx_ring_size: {RX_RING}, tx_ring_size: {tx_ring}}}
        eth1: {{ifindex: 3{', ' + eth1 if eth1 else ''}}}
    """), txc_release=txc_release)
    pm = page_memory(npages=1024, page_size=512, ncpus=1)
    counters = Counters("cpu")
    ctx = types.SimpleNamespace(data=None, redirect_ifindex=-1)
    rxq = RxQueue("eth0", 2, 0, RX_RING, byte_verdict_program, ctx, None, refill_batch(RX_RING))
    out = FakeOutbox()
    core = NapiCore(host, 0, pm, pool_of(pm, 0, owner=True), [rxq], out, counters.array, counters.index,
                    lambda key, text: None)
    core.count = counters.__getitem__  # type: ignore[attr-defined]
    return core, pm, out


def post(core: NapiCore, out: FakeOutbox) -> np.ndarray:
    """The RX refill, and the posted descriptors the device got."""
    core.refill()
    core.post_flush()
    (to, _kind, hdr, d), = out.take("post")
    assert (to, hdr) == ("eth0", {"q": 0, "cpu": 0})
    return d


def complete_rx(core: NapiCore, pm, posted: np.ndarray, frames: list[bytes]) -> np.ndarray:
    """Play the device: DMA `frames` into the first posted buffers and complete them to the CPU."""
    d = posted[: len(frames)].copy()
    for k, f in enumerate(frames):
        p = int(d["page"][k])
        pm.data[p * pm.page_size + XDP_PACKET_HEADROOM : p * pm.page_size + XDP_PACKET_HEADROOM + len(f)] = \
            np.frombuffer(f, np.uint8)
        pm.len[p] = len(f)
    d["len"] = [len(f) for f in frames]
    core.dispatch(wire.pack_msg("rx", {"dev": "eth0", "q": 0}, d.tobytes()))
    return d


def frame(verdict: int, ifindex: int = 0) -> bytes:
    return bytes([verdict, ifindex]) + bytes(62)


def test_refill_posts_a_full_ring_at_the_headroom(page_memory) -> None:
    core, pm, out = make_core(page_memory)
    d = post(core, out)
    ids = d["page"]
    assert len(d) == RX_RING and core.count("rx_posted") == RX_RING
    assert (pm.state[ids] == PageState.RX_POSTED).all()
    assert (pm.holder[ids] == device_code(0)).all()
    assert (d["off"] == XDP_PACKET_HEADROOM).all() and (d["len"] == 0).all()
    # Full: nothing more to post until buffers come back.
    core.refill()
    core.post_flush()
    assert out.take("post") == []


def test_a_poll_over_every_verdict(page_memory) -> None:
    core, pm, out = make_core(page_memory)
    posted = post(core, out)
    verdicts = [XDP_ABORTED] * 2 + [XDP_DROP] * 3 + [XDP_PASS] * 4 + [XDP_TX] * 5 + [XDP_REDIRECT] * 6
    d = complete_rx(core, pm, posted, [frame(v, 3) for v in verdicts])
    ids = d["page"]
    assert (pm.state[ids] == PageState.XDP).all() and (pm.holder[ids] == 0).all()
    assert core.poll_pass(got=1, refilling=False) == len(verdicts)
    assert {k: core.count(k) for k in ("xdp_aborted", "xdp_drop", "xdp_pass", "xdp_tx", "xdp_redirect",
                                       "rx_packets", "polls", "stack_rx", "xdp_exception")} == {
        "xdp_aborted": 2, "xdp_drop": 3, "xdp_pass": 4, "xdp_tx": 5, "xdp_redirect": 6, "rx_packets": 20,
        "polls": 1, "stack_rx": 4, "xdp_exception": 0}
    # DROP, ABORTED and the PASS skbs freed on this CPU are back in its cache.
    assert (pm.state[ids[:9]] == PageState.CACHE).all()
    # XDP_TX to eth0's queue, REDIRECT to eth1's, as one xmit message each with the frames' descriptors.
    xmit = {to: (hdr, m) for to, _, hdr, m in out.take("xmit")}
    assert xmit["eth0"][0] == {"txq": 0, "cpu": 0, "kind": "tx"}
    assert xmit["eth1"][0] == {"txq": 0, "cpu": 0, "kind": "redirect"}
    assert xmit["eth0"][1]["page"].tolist() == ids[9:14].tolist()
    assert xmit["eth1"][1]["page"].tolist() == ids[14:].tolist()
    assert (xmit["eth0"][1]["len"] == 64).all() and (xmit["eth0"][1]["gen"] == pm.gen[ids[9:14]]).all()
    assert (pm.state[ids[9:]] == PageState.TX_QUEUED).all()
    assert (pm.holder[ids[9:14]] == device_code(0)).all() and (pm.holder[ids[14:]] == device_code(1)).all()
    assert core.count("xmit_bulks") == 1  # one ndo_xdp_xmit call for 6 frames (bulk of 16)


def test_tx_ring_room_and_its_completions(page_memory) -> None:
    core, pm, out = make_core(page_memory, tx_ring=8)
    eth0 = core.by_name["eth0"]
    posted = post(core, out)
    assert core.tx_room() == 8  # the smallest room of this CPU's own TX queues
    complete_rx(core, pm, posted, [frame(XDP_TX)] * 8)
    core.poll_pass(got=1, refilling=False)
    (_, _, _hdr, sent), = out.take("xmit")
    assert eth0.tx_used == 8 and core.tx_room() == 0
    # No room for a poll: the next packets wait in the RX ring, counted as a wait.
    complete_rx(core, pm, posted[8:], [frame(XDP_TX)] * 4)
    assert core.poll_pass(got=1, refilling=False) == 0
    assert core.count("tx_ring_waits") == 1 and out.take("xmit") == []
    # The device refuses 3 (txdrop) and completes 5 (txc): the slots are free again.
    core.dispatch(wire.pack_msg("txdrop", {"dev": "eth0", "kind": "tx"}, sent[5:].tobytes()))
    assert core.count("xdp_tx_full") == 3 and eth0.tx_used == 5
    assert (pm.state[sent["page"][5:]] == PageState.CACHE).all()
    tx_dma_start(pm, sent["page"][:5])
    core.dispatch(wire.pack_msg("txc", {"dev": "eth0", "txq": 0}, sent[:5].tobytes()))
    assert core.count("tx_completions") == 5 and eth0.tx_used == 0 and core.tx_room() == 8
    # Completed, not reaped yet (txc_release: deferred): still TX_INFLIGHT.
    assert (pm.state[sent["page"][:5]] == PageState.TX_INFLIGHT).all()
    assert core.reap_tx() == 5
    assert (pm.state[sent["page"][:5]] == PageState.CACHE).all()
    # A completion repeated is refused (the pages are home): nothing counted twice.
    core.dispatch(wire.pack_msg("txc", {"dev": "eth0", "txq": 0}, sent[:5].tobytes()))
    assert core.count("tx_completions") == 5 and core.count("bad_descriptors") == 5
    # The waiting packets go now.
    assert core.poll_pass(got=0, refilling=False) == 4


def _completed(pm, pool, n: int) -> np.ndarray:
    """`n` pages of `pool` transmitted and completed: TX_INFLIGHT, as the descriptors of a txc message."""
    ids = pool.alloc(n, PageState.TX_INFLIGHT)
    d = np.zeros(n, dtype=DESC_DTYPE)
    d["page"], d["gen"] = ids, pm.gen[ids]
    return d


def _pool_stats(core: NapiCore) -> dict[str, int]:
    s = core.pool.stats()
    return {k: s[k] for k in ("recycle_cached", "recycle_cache_full", "recycle_ring", "alloc_slow")}


def test_deferred_completions_reach_the_refill_through_the_cache(page_memory) -> None:
    """txc_release: deferred.  300 own completions in one message (more than the 128-page cache) wait;
    the RX refill reaps what it takes and the cache has room for, so they reach it through the cache;
    once no packet came for TXC_IDLE_NS the rest are reaped, the overflow going to the ring."""
    core, pm, _out = make_core(page_memory)
    d = _completed(pm, core.pool, 300)  # 5 slow-path bulks of 64: 20 pages left in the cache
    assert core.pool.cache_count == 20
    core.dispatch(wire.pack_msg("txc", {"dev": "eth0", "txq": 0}, d.tobytes()))
    assert core.count("tx_completions") == 300 and _pool_stats(core)["recycle_cached"] == 0
    core.refill()  # an RX ring of 64 to fill: 64 reaped into the cache, then taken from it
    assert _pool_stats(core) == {"recycle_cached": 64, "recycle_cache_full": 0, "recycle_ring": 0, "alloc_slow": 5}
    assert sum(len(x) for x in core.txc_pending) == 236 and core.pool.cache_count == 20
    now = [10**12]
    core.clock = lambda: now[0]
    core.last_rx_ns = now[0]
    core.poll_pass(got=0, refilling=True)  # a gap between two batches: they keep waiting
    assert sum(len(x) for x in core.txc_pending) == 236
    now[0] += napi.TXC_IDLE_NS
    core.poll_pass(got=0, refilling=True)  # traffic stopped: the rest are reaped, 108 fit the cache
    assert not core.txc_pending
    assert _pool_stats(core) == {"recycle_cached": 64 + 108, "recycle_cache_full": 128, "recycle_ring": 128,
                                 "alloc_slow": 5}
    assert (pm.state[d["page"]] != PageState.TX_INFLIGHT).all()


def test_immediate_completions_overflow_the_cache(page_memory) -> None:
    """txc_release: immediate: the same 300 completions are recycled as they arrive; the cache takes the
    108 it has room for, the rest go to the ring (mlx5's release before its deferred page release)."""
    core, pm, _out = make_core(page_memory, txc_release="immediate")
    d = _completed(pm, core.pool, 300)
    core.dispatch(wire.pack_msg("txc", {"dev": "eth0", "txq": 0}, d.tobytes()))
    assert core.count("tx_completions") == 300 and not core.txc_pending
    assert _pool_stats(core) == {"recycle_cached": 108, "recycle_cache_full": 192, "recycle_ring": 192, "alloc_slow": 5}
    core.refill()  # from the cache first: the completed pages reach it through the ring later
    assert _pool_stats(core)["recycle_cached"] == 108


def test_deferred_completions_are_reaped_when_going_down_and_at_shutdown(page_memory) -> None:
    core, pm, _out = make_core(page_memory)
    d = _completed(pm, core.pool, 40)
    core.dispatch(wire.pack_msg("txc", {"dev": "eth0", "txq": 0}, d[:20].tobytes()))
    core.clock = lambda: 0
    core.poll_pass(got=1, refilling=False)  # ndo_stop: NAPI cleans its TX ring whatever the time
    assert not core.txc_pending and (pm.state[d["page"][:20]] == PageState.CACHE).all()
    core.dispatch(wire.pack_msg("txc", {"dev": "eth0", "txq": 0}, d[20:].tobytes()))
    core.shutdown()  # page_pool_destroy: nothing left out
    assert (pm.state[d["page"]] == PageState.FREE).all() and core.pool.inflight == 0


def test_completion_before_the_wire_is_refused(page_memory) -> None:
    core, pm, out = make_core(page_memory)
    posted = post(core, out)
    complete_rx(core, pm, posted, [frame(XDP_TX)] * 4)
    core.poll_pass(got=1, refilling=False)
    (_, _, _, sent), = out.take("xmit")
    core.dispatch(wire.pack_msg("txc", {"dev": "eth0", "txq": 0}, sent.tobytes()))  # still TX_QUEUED
    assert core.count("tx_completions") == 0 and core.count("bad_descriptors") == 4
    assert (pm.state[sent["page"]] == PageState.TX_QUEUED).all()


@pytest.mark.parametrize("fallback", ["drop", "skb"])
def test_redirect_to_a_device_without_xdp_xmit(page_memory, fallback: str) -> None:
    core, pm, out = make_core(page_memory, f"xdp_xmit: false, redirect_fallback: {fallback}")
    posted = post(core, out)
    d = complete_rx(core, pm, posted, [frame(XDP_REDIRECT, 3)] * 5)
    core.poll_pass(got=1, refilling=False)
    assert out.take("xmit") == []
    assert (pm.state[d["page"]] == PageState.CACHE).all()  # the page is freed either way
    if fallback == "drop":
        assert core.count("redirect_err") == 5 and core.count("redirect_skb") == 0
        assert out.take("frames") == []
    else:
        assert core.count("redirect_skb") == 5 and core.count("redirect_err") == 0
        (to, _, frames), = out.take("frames")
        assert to == "eth1" and frames == [frame(XDP_REDIRECT, 3)] * 5


def test_redirect_to_an_unknown_or_dead_device(page_memory) -> None:
    core, pm, out = make_core(page_memory)
    posted = post(core, out)
    complete_rx(core, pm, posted, [frame(XDP_REDIRECT, 9)] * 3)  # no ifindex 9 on this host
    core.poll_pass(got=1, refilling=False)
    assert core.count("redirect_err") == 3
    core.apply_offline(1 << (DEVICE_BIT + 1))  # eth1 died
    complete_rx(core, pm, posted[3:], [frame(XDP_REDIRECT, 3)] * 2)
    core.poll_pass(got=1, refilling=False)
    assert core.count("redirect_err") == 5 and out.take("xmit") == []


def test_refused_rx_descriptors(page_memory) -> None:
    core, pm, out = make_core(page_memory)
    posted = post(core, out)
    stale = posted[:4].copy()
    stale["gen"] += 1
    twice = np.concatenate((posted[4:6], posted[4:5])).astype(DESC_DTYPE)
    core.dispatch(wire.pack_msg("rx", {"dev": "eth0", "q": 0}, stale.tobytes()))
    core.dispatch(wire.pack_msg("rx", {"dev": "eth0", "q": 0}, twice.tobytes()))
    assert core.count("bad_descriptors") == 5
    assert (pm.state[posted["page"][:4]] == PageState.RX_POSTED).all()
    assert (pm.state[posted["page"][4:6]] == PageState.XDP).all()
    core.dispatch(b"garbage")
    core.dispatch(wire.pack_msg("rx", {"dev": "eth7", "q": 0}, posted[8:9].tobytes()))
    assert core.count("bad_messages") == 2


def test_rx_return_and_shutdown_bring_every_page_home(page_memory) -> None:
    core, pm, out = make_core(page_memory)
    posted = post(core, out)
    complete_rx(core, pm, posted, [frame(XDP_DROP)] * 3)  # received, never polled
    core.dispatch(wire.pack_msg("rxret", {"dev": "eth0", "q": 0}, posted[3:].tobytes()))  # ndo_stop
    assert core.rxqs[("eth0", 0)].posted == 3
    core.shutdown()
    assert core.rxqs[("eth0", 0)].posted == 0 and core.pool.inflight == 0
    audit = pagepool.audit(pm, strict=True)
    assert audit.ok and audit.by_state["free"] == pm.npages, audit.problems


def test_a_ring_handed_back_at_ndo_stop_is_never_refilled(page_memory) -> None:
    """A CPU pass that began before the CPU saw DOWN (``refilling=True``) takes the device's hand-back
    of its ring, and must not post the ring right back: the coordinator, seeing every page home, may
    already have told everyone to exit, and a whole ring of RX_POSTED pages would be leaked (seen as a
    generated 3-host topology ending with an RX ring of 5,697 buffers `leaked`)."""
    core, pm, out = make_core(page_memory)
    posted = post(core, out)
    core.dispatch(wire.pack_msg("rxret", {"dev": "eth0", "q": 0}, posted.tobytes()))  # ndo_stop
    assert core.rxqs[("eth0", 0)].posted == 0
    core.poll_pass(got=1, refilling=True)
    core.refill()
    core.post_flush()
    assert out.take("post") == []
    assert core.count("rx_posted") == RX_RING
    assert HOME[pm.state[posted["page"]]].all()


def test_pages_a_dead_device_handed_over_but_never_sent_come_home(page_memory) -> None:
    """A device killed between handing its completions over (``NicCore._send``: the pages are on their
    way to the CPU, `transit_code`) and sending the message: once the CPU has taken every message (the
    worker calls `reclaim_transit` when its inbox runs dry after the device was declared dead), it
    takes those pages back itself, and nothing else moves; before, nobody returned them and the shutdown
    waited for them for ever."""
    core, pm, out = make_core(page_memory)
    posted = post(core, out)
    ids = posted["page"].astype(np.int64)
    # eth0 (device 0) completed 5 frames: handed over, the message never sent; 3 more in a message taken.
    pagepool.page_hand_over(pm, ids[:5], transit_code(0, 0))
    complete_rx(core, pm, posted[5:], [frame(XDP_DROP)] * 3)
    # A TX completion of eth1 (device 1) also on its way: eth1 lives, so it is not touched.
    txd = _completed(pm, core.pool, 2)
    tx = txd["page"].astype(np.int64)
    pagepool.page_hand_over(pm, tx, transit_code(1, 0))
    assert core.reclaim_transit() == 0  # no device died yet
    core.apply_offline(1 << DEVICE_BIT)  # eth0 died
    assert core.transit_dead and core.reclaim_transit() == 5 and not core.transit_dead
    assert (pm.state[ids[:5]] != PageState.RX_POSTED).all() and HOME[pm.state[ids[:5]]].all()
    assert (pm.state[ids[5:8]] == PageState.XDP).all() and (pm.state[tx] == PageState.TX_INFLIGHT).all()
    assert core.reclaim_transit() == 0  # once per death
    # eth1's completion arrives: this CPU holds those pages now; all goes home at shutdown.
    core.dispatch(wire.pack_msg("txc", {"dev": "eth1", "txq": 0}, txd.tobytes()))
    assert (pm.holder[tx] == 0).all()
    core.poll_pass(got=1, refilling=False)
    core.dispatch(wire.pack_msg("rxret", {"dev": "eth0", "q": 0}, posted[8:].tobytes()))
    core.shutdown()
    audit = pagepool.audit(pm, strict=True)
    assert audit.ok and audit.by_state["free"] == pm.npages, audit.problems
