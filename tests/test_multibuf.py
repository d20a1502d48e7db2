"""Process-free tests of XDP multi-buffer in the page memory, the pool and the data-path cores.

A multi-buffer frame is a head buffer plus up to 17 fragment buffers listed in the head's shinfo
(`emu.mem.page`); every pool function that moves a frame moves its fragments with it, and each fragment
returns to its own pool.  Every scenario checks the pages exactly and ends with a strict audit.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_pagepool import expect_stats, states

from emu.mem import pagepool, reclaim
from emu.mem.page import MAX_SKB_FRAGS, SHINFO_TAILROOM, PageState, shinfo_frags, shinfo_write
from emu.mem.pagemem import PageMemory
from emu.mem.pagepool import (
    PoolParams,
    frame_bufs,
    frame_lens,
    page_hand_over,
    pool_of,
    return_pages,
    tx_dma_start,
    xdp_build_skb,
    xdp_frags_release,
    xdp_prepare_buff,
    xdp_xmit_queue,
)
from emu.net.protocol import XDP_PACKET_HEADROOM, device_code

S = PageState
ROOM = 4096 - XDP_PACKET_HEADROOM - SHINFO_TAILROOM  # frame_room(4096)


def mb_memory(page_memory, npages: int = 256, ncpus: int = 2, params: PoolParams | None = None) -> PageMemory:
    pm = page_memory(npages=npages, page_size=4096, ncpus=ncpus, params=params, multibuf=True)
    assert pm.multibuf and pm.shinfo is not None
    return pm


def audit_ok(pm: PageMemory) -> None:
    a = pagepool.audit(pm, strict=True)
    assert a.ok, a.problems
    assert a.accounted == a.total == pm.nbufs


def frames(pm: PageMemory, bufs: np.ndarray, nfrags: list[int], frag_len: int = 100) -> np.ndarray:
    """Make frames of posted buffers `bufs` as a device's RX scatter does: each takes 1 + nfrags[i] buffers in
    order; returns the heads."""
    heads, k = [], 0
    for n in nfrags:
        h = int(bufs[k])
        fr = bufs[k + 1 : k + 1 + n]
        pm.len[h] = ROOM if n else 64
        pm.off[fr] = XDP_PACKET_HEADROOM
        pm.len[fr] = frag_len
        shinfo_write(pm.shinfo, h, fr, [XDP_PACKET_HEADROOM] * n, [frag_len] * n)
        pm.nfrags[h] = n
        heads.append(h)
        k += 1 + n
    return np.array(heads, dtype=np.int64)


def received(pm: PageMemory, pool, cpu: int, nfrags: list[int]) -> np.ndarray:
    """Frames received on `cpu` (their buffers from its pool), as XDP buffers of that CPU."""
    bufs = pool.alloc(sum(nfrags) + len(nfrags), S.RX_POSTED, holder=device_code(0))
    heads = frames(pm, bufs, nfrags)
    page_hand_over(pm, heads, cpu)
    xdp_prepare_buff(pm, heads, cpu)
    assert states(pm, bufs) == {S.XDP} and set(pm.holder[bufs].tolist()) == {cpu}
    return heads


def test_the_shinfo_is_the_head_buffers_tailroom(page_memory) -> None:
    pm = mb_memory(page_memory)
    shinfo_write(pm.shinfo, 5, [7, 9], [256, 256], [3000, 10])
    raw = pm.data[5 * 4096 + 4096 - 320 : 5 * 4096 + 4096 - 320 + 4 * 8].view("<u4")
    assert raw.tolist() == [2, 3010, 7, 256, 3000, 9, 256, 10]
    pm.nfrags[5] = 2
    assert shinfo_frags(pm.shinfo, np.array([5]), np.array([2])).tolist() == [7, 9]
    assert frame_lens(pm, np.array([5])).tolist() == [int(pm.len[5]) + 3010]
    with pytest.raises(ValueError, match="MAX_SKB_FRAGS"):
        shinfo_write(pm.shinfo, 5, list(range(MAX_SKB_FRAGS + 1)), [0] * 18, [0] * 18)


def test_a_host_without_multibuf_pays_nothing(page_memory) -> None:
    pm = page_memory(npages=64, page_size=4096)
    assert not pm.multibuf and pm.shinfo is None
    ids = np.arange(4)
    assert frame_bufs(pm, ids) is ids


def test_drop_returns_every_buffer_of_the_frame_to_the_cache(page_memory) -> None:
    pm = mb_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    heads = received(pm, pool, 0, [2, 0, 17])  # 3 + 1 + 18 = 22 buffers
    expect_stats(pool, cached=64 - 22, alloc_slow=1, alloc_empty=1, alloc_fast=21, hold_cnt=64)
    assert pool.recycle_direct(heads, expect=S.XDP) == 3  # frames, not buffers
    expect_stats(pool, cached=64, alloc_slow=1, alloc_empty=1, alloc_fast=21, hold_cnt=64, recycle_cached=22)
    assert not pm.nfrags.any()
    audit_ok(pm)


def test_pass_tx_and_completion_move_the_frame_whole(page_memory) -> None:
    pm = mb_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    heads = received(pm, pool, 0, [3, 1])
    allb = frame_bufs(pm, heads)
    assert len(allb) == 6
    xdp_xmit_queue(pm, heads, device_code(1))
    assert states(pm, allb) == {S.TX_QUEUED} and set(pm.holder[allb].tolist()) == {device_code(1)}
    audit_ok(pm)
    tx_dma_start(pm, heads)
    assert states(pm, allb) == {S.TX_INFLIGHT}
    page_hand_over(pm, heads, 0)
    # A TX completion through another process's ring (the put path) takes the fragments too.
    assert pool_of(pm, 0).put(heads, pm.gen[heads], expect=S.TX_INFLIGHT) == 2
    assert states(pm, allb) == {S.RING}
    audit_ok(pm)
    heads = received(pm, pool, 0, [4])
    xdp_build_skb(pm, heads)
    assert states(pm, frame_bufs(pm, heads)) == {S.SKB}
    assert return_pages(pm, pool, heads, expect=S.SKB) == 1
    audit_ok(pm)
    assert pool.inflight == pool.cache_count + pool.ring_count


def test_each_fragment_returns_to_its_own_pool(page_memory) -> None:
    """A frame whose fragments come from two pools (as a test builds it; a device scatters over one RX
    queue, one pool): freed on cpu 0, its own buffers go to its cache, cpu 1's through cpu 1's ring."""
    pm = mb_memory(page_memory)
    p0, p1 = pool_of(pm, 0, owner=True), pool_of(pm, 1, owner=True)
    a = p0.alloc(2, S.RX_POSTED, holder=device_code(0))
    b = p1.alloc(2, S.RX_POSTED, holder=device_code(0))
    bufs = np.array([a[0], b[0], a[1], b[1]])
    heads = frames(pm, bufs, [3])
    xdp_prepare_buff(pm, heads, 0)
    assert states(pm, bufs) == {S.XDP}
    assert return_pages(pm, p0, heads, expect=S.XDP) == 1
    assert p0.stats()["recycle_cached"] == 2 and p1.stats()["recycle_ring"] == 2
    audit_ok(pm)


def test_adjust_tail_releases_whole_fragments_to_their_pools(page_memory) -> None:
    pm = mb_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    heads = received(pm, pool, 0, [5, 2, 0])
    before = frame_bufs(pm, heads)
    # The program shrank frame 0 to 2 fragments and frame 1 to none (the engine wrote the new counts).
    assert xdp_frags_release(pm, pool, heads, np.array([2, 0, 0])) == 5
    assert pm.nfrags[heads].tolist() == [2, 0, 0]
    assert len(frame_bufs(pm, heads)) == 3 + 2
    assert pool.stats()["recycle_cached"] == 5
    released = np.setdiff1d(before, frame_bufs(pm, heads))
    assert states(pm, released) == {S.CACHE}
    audit_ok(pm)
    assert pool.recycle_direct(heads, expect=S.XDP) == 3
    audit_ok(pm)
    assert pool.stats()["recycle_cached"] == 5 + 5


def test_stale_or_double_frees_release_no_fragment(page_memory) -> None:
    pm = mb_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    heads = received(pm, pool, 0, [2])
    gen = pm.gen[heads].copy()
    assert pool.recycle_direct(heads, gen, expect=S.XDP) == 1
    # The same frame again (a double free): refused, and its old fragments (now in the cache) stay put.
    assert pool.recycle_direct(heads, gen, errors="count", expect=S.XDP) == 0
    assert pool.stats()["double_free"] == 1
    audit_ok(pm)


def test_fragments_with_page_fragments(page_memory) -> None:
    """With pool.frag_size (2 KiB halves of 4 KiB pages) a frame's buffers are halves; the page goes
    home with its last half, whichever frame it was in."""
    pm = mb_memory(page_memory, params=PoolParams(frag_size=2048))
    pool = pool_of(pm, 0, owner=True)
    bufs = pool.alloc(6, S.RX_POSTED, holder=device_code(0))
    heads = frames(pm, bufs, [2, 2])
    xdp_prepare_buff(pm, heads, 0)
    assert pool.recycle_direct(heads[:1], expect=S.XDP) == 1
    audit_ok(pm)
    assert pool.recycle_direct(heads[1:], expect=S.XDP) == 1
    audit_ok(pm)
    assert pool.stats()["recycle_cached"] == 3  # pages


def test_reclaim_of_a_dead_cpu_holding_multibuffer_frames(page_memory) -> None:
    pm = mb_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    heads = received(pm, pool, 0, [3, 0, 17])
    pm.len[heads] = pm.len[heads]  # (they carry packets)
    got = reclaim.reclaim_cpu(pm, 0)
    assert got.packets == 3 and got.pages == 3
    assert not pm.nfrags.any()
    reclaim.reclaim_stranded(pm)
    audit_ok(pm)
    assert pm.free_count == pm.npages


def test_reclaim_of_a_dead_cpu_with_multibuffer_frames_on_their_way_to_it(page_memory) -> None:
    """Frames a device scattered into the dead CPU's posted buffers but has not handed over yet (every
    buffer still RX_POSTED and held by the device, the heads listing their fragments: the device is between
    `_scatter`'s writes and its `_send`): reclaim returns each buffer once (a frame's fragments with their
    head, not again as empty posted buffers)."""
    pm = mb_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    bufs = pool.alloc(1 + 3 + 1 + 1 + 17 + 5, S.RX_POSTED, holder=device_code(0))
    frames(pm, bufs[:-5], [3, 0, 17])  # and 5 posted buffers nothing was received into
    got = reclaim.reclaim_cpu(pm, 0)
    assert got.pages == 3 + 5
    reclaim.reclaim_stranded(pm)
    audit_ok(pm)
    assert pm.free_count == pm.npages
    assert len(np.unique(pm.free_stack)) == pm.npages  # no buffer in the page allocator twice


def test_audit_sees_a_fragment_out_of_step(page_memory) -> None:
    pm = mb_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    heads = received(pm, pool, 0, [2])
    fr = frame_bufs(pm, heads)[1:]
    pm.state[fr[0]] = S.SKB
    a = pagepool.audit(pm, strict=True)
    assert any("not in their frame's state" in p for p in a.problems)
    pm.state[fr[0]] = S.XDP
    assert pool.recycle_direct(heads, expect=S.XDP) == 1
    audit_ok(pm)


# -- the NIC and NAPI cores over a multi-buffer host ---------------------------------------------------

SG = "[basic, redirect, ndo-xmit, ndo-xmit-sg, rx-sg]"
NOSG = "[basic, redirect, ndo-xmit, rx-sg]"


class Rig:
    """One CPU's NAPI core and eth0's NIC core over one page memory (4 KiB pages, multi-buffer): eth0
    (rx-sg, ndo-xmit-sg, MTU 9000) receives; eth2 (ndo-xmit-sg) and eth3 (no ndo-xmit-sg) are redirect
    targets; the frame's first byte is its verdict and its second a redirect's ifindex."""

    def __init__(self, page_memory, program=None) -> None:
        import dataclasses

        from fakes import Counters, FakeOutbox, byte_verdict_program, one_cpu_host
        from test_nic_core import Clock, FakeCpus, FakeLink, FakeWire

        from emu.datapath.napi import NapiCore, RxQueue
        from emu.datapath.nic import NicCore
        from emu.net.protocol import refill_batch
        from emu.xdp.context import XdpContext

        host = one_cpu_host(f"""
            eth0: {{ifindex: 2, rx_ring_size: 64, tx_ring_size: 128, mtu: 9000, xdp_features: {SG},
                    tx_completion_us: 0}}
            eth2: {{ifindex: 4, mtu: 9000, xdp_features: {SG}}}
            eth3: {{ifindex: 5, mtu: 9000, xdp_features: {NOSG}}}
            eth4: {{ifindex: 6, mtu: 9000, xdp_features: {SG}}}
        """)
        assert host.multibuf
        host = dataclasses.replace(host, page_size=4096)
        self.pm = pm = mb_memory(page_memory, npages=512, ncpus=1)
        self.ctx = XdpContext(2, 0, 0)
        self.cc = Counters("cpu")
        rxq = RxQueue("eth0", 2, 0, 64, program or byte_verdict_program, self.ctx, None, refill_batch(64))
        self.out = FakeOutbox()
        self.core = NapiCore(host, 0, pm, pool_of(pm, 0, owner=True), [rxq], self.out, self.cc.array,
                             self.cc.index, lambda key, text: None)
        self.dc = Counters("device")
        self.cpus, self.wire, self.link = FakeCpus(), FakeWire(), FakeLink()
        self.nic = NicCore(host.devices["eth0"], 1, pm, self.cpus, self.wire, self.link, self.dc.array,
                           self.dc.index, lambda key, text: None, clock=Clock())
        self.nic.xon = 1  # (no pause for want of a full ring's worth of buffers: the test posts them)

    def msg(self, kind: str, hdr: dict, d: np.ndarray) -> bytes:
        from emu.net import wire

        return wire.pack_msg(kind, hdr, d.tobytes())

    def post(self) -> None:
        self.core.refill()
        self.core.post_flush()
        for to, kind, hdr, d in self.out.take("post"):
            assert to == "eth0"
            self.nic.dispatch(self.msg(kind, hdr, d))

    def receive(self, fs: list[bytes]) -> int:
        from emu.net import wire

        self.link.msgs.append(wire.pack_frames(fs))
        got = self.nic.receive()
        for _cpu, kind, hdr, d in self.cpus.take("rx"):
            self.core.dispatch(self.msg(kind, hdr, d))
        return got

    def tx_eth0(self) -> list[bytes]:
        """eth0 takes its xmit messages, transmits, completes; the CPU reaps every completion."""
        for to, kind, hdr, d in self.out.take("xmit"):
            if to == "eth0":
                self.nic.dispatch(self.msg(kind, hdr, d))
            else:
                self.out.sent.append((to, kind, hdr, d))
        self.nic.transmit()
        self.nic.complete(force=True)
        for _cpu, kind, hdr, d in self.cpus.take("txc"):
            self.core.dispatch(self.msg(kind, hdr, d))
        self.core.reap_tx()
        got, self.wire.frames = self.wire.frames, []
        return got


def jumbo(verdict: int, ifindex: int = 0, size: int = 9018, seed: int = 0) -> bytes:
    body = np.random.default_rng(seed).integers(0, 256, size - 2, dtype=np.uint8).tobytes()
    return bytes([verdict, ifindex]) + body


def home(pm: PageMemory) -> None:
    """Everything home and the audit strict."""
    audit_ok(pm)
    st = pm.state
    assert not np.isin(st, [S.RX_POSTED, S.XDP, S.TX_QUEUED, S.TX_INFLIGHT, S.SKB]).any()


def test_the_nic_scatters_a_jumbo_frame_over_three_buffers(page_memory) -> None:
    from emu.xdp.context import XDP_DROP

    r = Rig(page_memory)
    r.post()
    assert r.nic.nposted == [64]
    fs = [jumbo(XDP_DROP, seed=k) for k in range(3)] + [bytes([XDP_DROP]) * 64]
    assert r.receive(fs) == 4
    assert r.nic.nposted == [64 - 3 * 3 - 1]  # 9018 bytes = 3 buffers of 3520
    assert r.dc["rx_sg_frames"] == 3 and r.dc["rx_sg_frags"] == 6 and r.dc["rx_completed"] == 4
    (ready,) = r.core.rxqs.values()
    d = ready.pending[0]
    heads = d["page"].astype(np.int64)
    assert r.pm.nfrags[heads].tolist() == [2, 2, 2, 0]
    assert d["len"].tolist() == [ROOM, ROOM, ROOM, 64]
    assert frame_lens(r.pm, heads).tolist() == [9018, 9018, 9018, 64]
    assert ready.posted == 64 - 6  # the fragments' ring slots are free at once, the heads' at the poll
    assert states(r.pm, frame_bufs(r.pm, heads)) == {S.XDP}
    assert r.core.poll_pass(got=1, refilling=False) == 4
    assert r.cc["rx_frags_frames"] == 3 and r.cc["rx_frags"] == 6 and r.cc["xdp_drop"] == 4
    assert r.cc["rx_bytes"] == 3 * 9018 + 64
    for rxq in r.core.rxqs.values():
        rxq.posted = 0
    r.nic.go_down()
    for _cpu, kind, hdr, dd in r.cpus.take("rxret"):
        r.core.dispatch(r.msg(kind, hdr, dd))
    r.core.pool.drain()
    home(r.pm)
    assert r.pm.free_count == r.pm.npages


def test_xdp_tx_sends_the_whole_frame_and_its_completion_returns_every_buffer(page_memory) -> None:
    from emu.xdp.context import XDP_TX

    r = Rig(page_memory)
    r.post()
    fs = [jumbo(XDP_TX, seed=k) for k in range(4)]
    r.receive(fs)
    r.core.poll_pass(got=1, refilling=False)
    assert r.tx_eth0() == fs  # gathered head + fragments, byte for byte
    assert r.dc["tx_sg_frames"] == 4 and r.cc["xdp_tx"] == 4
    assert r.nic.txqs[0].ninflight == 0 and r.core.by_name["eth0"].tx_used == 0
    # Frames of several lengths (scattered and gathered one by one): 2, 3 and 1 buffers.
    r.post()
    mixed = [jumbo(XDP_TX, size=5000, seed=9), jumbo(XDP_TX, seed=10), jumbo(XDP_TX, size=100, seed=11)]
    r.receive(mixed)
    r.core.poll_pass(got=1, refilling=False)
    assert r.tx_eth0() == mixed
    assert r.dc["tx_sg_frames"] == 4 + 2 and r.dc["rx_sg_frags"] == 4 * 2 + 1 + 2
    # Every buffer of the frames is back in the pool (cache or ring), none out.
    assert not np.isin(r.pm.state, [S.XDP, S.TX_QUEUED, S.TX_INFLIGHT]).any()
    audit_ok(r.pm)


def test_pass_builds_skbs_with_frags_and_frees_them_whole(page_memory) -> None:
    from emu.xdp.context import XDP_PASS

    r = Rig(page_memory)
    r.post()
    r.receive([jumbo(XDP_PASS, seed=k) for k in range(5)])
    inuse = int(np.count_nonzero(pagepool.IN_USE[r.pm.state]))
    r.core.poll_pass(got=1, refilling=False)
    assert r.cc["xdp_pass"] == 5 and r.cc["stack_rx"] == 5
    assert int(np.count_nonzero(pagepool.IN_USE[r.pm.state])) == inuse - 15
    audit_ok(r.pm)


def test_redirect_to_an_sg_device_and_eopnotsupp_to_one_without(page_memory) -> None:
    from emu.xdp.context import XDP_REDIRECT

    r = Rig(page_memory)
    r.post()
    r.receive([jumbo(XDP_REDIRECT, 4, seed=1), jumbo(XDP_REDIRECT, 5, seed=2), bytes([XDP_REDIRECT, 5]) + bytes(62)])
    r.core.poll_pass(got=1, refilling=False)
    assert r.cc["xdp_redirect"] == 3
    assert r.cc["xmit_sg_drop"] == 1 and r.cc["redirect_err_eopnotsupp"] == 1 and r.cc["redirect_err"] == 1
    xmit = {to: d for to, _k, _h, d in r.out.take("xmit")}
    assert sorted(xmit) == ["eth2", "eth3"]
    (h2,) = xmit["eth2"]["page"].astype(np.int64)
    assert r.pm.nfrags[h2] == 2 and states(r.pm, frame_bufs(r.pm, np.array([h2]))) == {S.TX_QUEUED}
    assert len(xmit["eth3"]) == 1 and r.pm.nfrags[int(xmit["eth3"]["page"][0])] == 0  # the linear frame goes
    # The dropped frame's three buffers are back in the cache; eth2's and eth3's frames complete later.
    for to, d in xmit.items():
        ids = d["page"].astype(np.int64)
        tx_dma_start(r.pm, ids)
        r.core.dispatch(r.msg("txc", {"dev": to, "txq": 0}, d))
    r.core.reap_tx()
    assert not np.isin(r.pm.state, [S.XDP, S.TX_QUEUED, S.TX_INFLIGHT]).any()
    audit_ok(r.pm)


def test_broadcast_of_a_multibuffer_frame(page_memory) -> None:
    """dev_map_enqueue_multi: is_valid_dst skips eth3 (no ndo-xmit-sg); with one target left the frame
    itself goes; with two, dev_map_enqueue_clone refuses to clone a frame with frags: -EOPNOTSUPP, freed."""
    from emu.xdp.bpfmaps import MapSet, MapSpec
    from emu.xdp.context import XDP_REDIRECT

    r = Rig(page_memory)
    for targets, sent, err in (([4, 5], ["eth2"], 0), ([4, 5, 6], [], 1)):
        ms = MapSet.create(f"{r.pm.prefix}-bc{len(targets)}", {"ports": MapSpec("devmap", max_entries=8)}, 1)
        try:
            dm = ms.maps["ports"]
            for k, ifx in enumerate(targets):
                dm.update(k, ifx)
            from emu.xdp.bpfmaps import REDIRECT_BROADCAST

            r.core.devmaps[("eth0", 0)] = dm
            code = dm.bcast_base
            assert (code - REDIRECT_BROADCAST) >> 16 == 0
            r.post()
            r.receive([jumbo(XDP_REDIRECT, seed=7)])
            (rxq,) = r.core.rxqs.values()
            d = rxq.pending.pop()
            heads = d["page"].astype(np.int64)
            r.core.broadcast("eth0", code, heads)
            rxq.posted -= 1
            r.core.xdp_do_flush()
            xmit = {to: dd for to, _k, _h, dd in r.out.take("xmit")}
            assert sorted(xmit) == sent
            assert r.cc["redirect_err_eopnotsupp"] == err and r.cc["xdpf_clone"] == 0
            for to, dd in xmit.items():
                tx_dma_start(r.pm, dd["page"])
                r.core.dispatch(r.msg("txc", {"dev": to, "txq": 0}, dd))
            r.core.reap_tx()
            assert not np.isin(r.pm.state, [S.XDP, S.TX_QUEUED, S.TX_INFLIGHT]).any()
            audit_ok(r.pm)
        finally:
            ms.unlink()
            ms.close()


def test_reap_for_counts_pages_not_buffers(page_memory) -> None:
    """With 2 KiB fragments a refill of `want` buffers takes want / 2 pages: the TX completions reaped
    before it are counted in the same unit as the cache's room (buffers reaped = pages * 2)."""
    from fakes import Counters, FakeOutbox, byte_verdict_program, one_cpu_host

    from emu.datapath.napi import NapiCore, RxQueue

    host = one_cpu_host("eth0: {ifindex: 2, rx_ring_size: 64}")
    pm = page_memory(npages=512, page_size=4096, ncpus=1, params=PoolParams(frag_size=2048))
    cc = Counters("cpu")
    core = NapiCore(host, 0, pm, pool_of(pm, 0, owner=True), [RxQueue("eth0", 2, 0, 64, byte_verdict_program,
                    None, None, 8)], FakeOutbox(), cc.array, cc.index, lambda k, t: None)
    asked = []
    core.reap_tx = lambda limit=None: asked.append(limit) or 0  # type: ignore[method-assign]
    core.txc_pending.append(np.zeros(1))
    # An empty pool, 128 buffers wanted: 64 pages, the cache (128) has room for all: 128 buffers reaped.
    core._reap_for(128)
    # 40 pages in the cache: room 88 pages, still short of 24: min(64, 88) = 64 pages = 128 buffers.
    core.pool.alloc(2)  # (takes a bulk of 64 pages into the cache, hands out one page's halves)
    have = core.pool.cache_count
    core._reap_for(128)
    assert asked == [128, 2 * max(min(64, 128 - have), 64 - have)]


def test_a_per_packet_program_reads_writes_and_shrinks_a_frame_across_its_buffers(page_memory) -> None:
    """get_buff_len, load_bytes and store_bytes see the whole frame; adjust_tail grows into the last
    fragment's tailroom (zeroed) and shrinks releasing whole fragments, which go back to the pool at once;
    XDP_TX then sends what is left."""
    from emu.xdp.context import XDP_TX

    seen: list[tuple] = []

    def prog(ctx) -> int:
        n = ctx.get_buff_len()
        whole = bytearray(n)
        assert ctx.load_bytes(0, whole) == 0 and ctx.load_bytes(n - 10, bytearray(11)) < 0
        assert ctx.store_bytes(3515, b"XYZWVUTSRQ") == 0  # across the head and the first fragment
        cut = whole[2]  # the frame's third byte: how many hundred bytes to cut (0: grow by 100)
        ret = ctx.adjust_tail(-100 * cut if cut else 100)
        seen.append((n, ret, ctx.get_buff_len(), len(ctx.data)))
        return XDP_TX

    r = Rig(page_memory, program=prog)
    r.post()
    f1 = bytearray(jumbo(XDP_TX, seed=1))
    f1[2] = 50  # 9018 - 5000 = 4018: the last fragment (1978 bytes) goes, the second keeps 498
    f2 = bytearray(jumbo(XDP_TX, seed=2))
    f2[2] = 0  # + 100 into the last fragment's tailroom
    f3 = bytearray(jumbo(XDP_TX, size=7000, seed=3))
    f3[2] = 36  # 7000 = 3520 + 3480: 3600 off takes the fragment and 120 bytes of the linear part
    r.receive([bytes(f1), bytes(f2), bytes(f3)])
    before = int(np.count_nonzero(pagepool.IN_USE[r.pm.state]))
    r.core.poll_pass(got=1, refilling=False)
    assert seen == [(9018, 0, 4018, ROOM), (9018, 0, 9118, ROOM), (7000, 0, 3400, 3400)]
    assert r.cc["xdp_frags_released"] == 1 + 0 + 1
    assert int(np.count_nonzero(pagepool.IN_USE[r.pm.state])) == before - 2
    audit_ok(r.pm)
    for f in (f1, f2, f3):
        f[3515:3525] = b"XYZWVUTSRQ"
    sent = r.tx_eth0()
    assert sent == [bytes(f1[:4018]), bytes(f2) + bytes(100), bytes(f3[:3400])]
    assert not np.isin(r.pm.state, [S.XDP, S.TX_QUEUED, S.TX_INFLIGHT]).any()
    audit_ok(r.pm)


def test_check_descs_refuses_a_frame_whose_fragment_is_out_of_step(page_memory) -> None:
    from emu.mem.page import DESC_DTYPE
    from emu.mem.pagepool import check_descs

    pm = mb_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    heads = received(pm, pool, 0, [2, 0, 3])
    d = np.zeros(3, dtype=DESC_DTYPE)
    d["page"], d["gen"] = heads, pm.gen[heads]
    assert check_descs(pm, d, S.XDP) is None
    fr = frame_bufs(pm, heads[2:])[1:]
    pm.state[fr[1]] = S.RING  # torn
    assert check_descs(pm, d, S.XDP).tolist() == [True, True, False]
    pm.state[fr[1]] = S.XDP
    assert pool.recycle_direct(heads, expect=S.XDP) == 3
    audit_ok(pm)


def test_a_frame_waits_in_the_rx_fifo_until_all_its_buffers_are_posted(page_memory) -> None:
    from emu.mem.pagepool import page_pool_dev_alloc_pages
    from emu.net import wire
    from emu.xdp.context import XDP_DROP

    r = Rig(page_memory)

    def post(n: int) -> None:
        from test_nic_core import descs_of

        ids = page_pool_dev_alloc_pages(r.core.pool, n, device_code(0))
        r.nic.dispatch(wire.pack_msg("post", {"q": 0, "cpu": 0}, descs_of(r.pm, ids).tobytes()))

    post(4)
    fs = [jumbo(XDP_DROP, seed=1), jumbo(XDP_DROP, size=5000, seed=2), bytes([XDP_DROP]) * 64]
    r.link.msgs.append(wire.pack_frames(fs))
    assert r.nic.receive() == 1  # 3 buffers for the first; the second needs 2, 1 is posted
    assert r.nic.fifo == 2 and r.nic.nposted == [1] and r.dc["rx_dropped"] == 0
    post(1)
    assert r.nic.receive() == 1 and r.nic.fifo == 1 and r.nic.nposted == [0]
    post(1)
    assert r.nic.receive() == 1 and r.nic.fifo == 0
    got = [d for _c, _k, _h, d in r.cpus.take("rx")]
    heads = np.concatenate([d["page"] for d in got]).astype(np.int64)
    assert r.pm.nfrags[heads].tolist() == [2, 1, 0]  # in arrival order
    assert frame_lens(r.pm, heads).tolist() == [9018, 5000, 64]
    audit_ok(r.pm)


def test_a_multibuffer_frame_takes_a_tx_ring_slot_per_buffer(page_memory) -> None:
    """eth0's TX ring of 8 slots: two 3-buffer frames fit (6 slots), a third waits in the RX ring for the
    completions (the CPU's tx_room counts buffers); the device refuses what a peer queues beyond it."""
    from emu.xdp.context import XDP_TX

    r = Rig(page_memory)
    r.nic.tx_ring = r.core.by_name["eth0"].tx_ring = r.core.tx_poll_min = 8  # (as tx_ring_size: 8 makes them)
    r.post()
    fs = [jumbo(XDP_TX, seed=k) for k in range(3)]
    r.receive(fs)
    assert r.core.tx_room() == 8
    r.core.poll_pass(got=1, refilling=False)
    assert r.cc["xdp_tx"] == 2 and r.core.by_name["eth0"].tx_used == 6 and r.core.tx_room() == 2
    xmit = r.out.take("xmit")
    for _to, kind, hdr, d in xmit:
        r.nic.dispatch(r.msg(kind, hdr, d))
    assert r.nic.txqs[0].nqueued == 2 and r.nic.txqs[0].frag_slots == 4
    # The pass that finds 2 slots free takes nothing: the third frame needs 3.
    assert r.core.poll_pass(got=1, refilling=False) == 0 and r.cc["xdp_tx"] == 2
    sent = r.tx_eth0()
    assert sent == fs[:2] and r.core.by_name["eth0"].tx_used == 0 and r.nic.txqs[0].frag_slots == 0
    r.core.poll_pass(got=1, refilling=False)
    assert r.cc["xdp_tx"] == 3 and r.tx_eth0() == fs[2:]
    assert r.cc["xdp_tx_full"] == 0 and r.dc["xmit_full"] == 0
    audit_ok(r.pm)
