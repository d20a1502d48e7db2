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
