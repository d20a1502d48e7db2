"""Unit tests of page fragments (`emu.mem.pagepool` with ``PoolParams.frag_size``): the kernel's
``page_pool_alloc_frag``.

One page serves ``page_size / frag_size`` RX buffers; the pool counts pages, not buffers (alloc_fast,
alloc_slow, alloc_refill, hold_cnt, recycle_*); each page holds one reference per fragment out
(``pp_ref_count``) and only the put that drops the last one recycles it, by the same rules as a whole page
(the owner's direct put into its cache, any other put into its ring, a full ring to the page allocator).
Every scenario checks every counter exactly and ends with a strict audit.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_pagepool import expect_stats, states

from emu.mem import pagepool, reclaim
from emu.mem.page import PageError, PageState
from emu.mem.pagemem import PageMemory
from emu.mem.pagepool import (
    P_FRAG_NEXT,
    P_FRAG_PAGE,
    PoolParams,
    page_get,
    pool_of,
    return_pages,
    xdpf_clone,
)
from emu.net.protocol import XDP_PACKET_HEADROOM, device_code

S = PageState
HALF = PoolParams(frag_size=2048)  # 4 KiB pages in 2 KiB halves, as i40e, ixgbe and mlx5 split them


def frag_memory(page_memory, npages: int = 256, params: PoolParams = HALF, ncpus: int = 2) -> PageMemory:
    pm = page_memory(npages=npages, page_size=4096, ncpus=ncpus, params=params)
    assert (pm.frags, pm.buf_size, pm.nbufs) == (4096 // params.frag_size, params.frag_size,
                                                 npages * 4096 // params.frag_size)
    return pm


def audit_ok(pm: PageMemory) -> None:
    a = pagepool.audit(pm, strict=True)
    assert a.ok, a.problems
    assert a.accounted == a.total == pm.nbufs


def free_pages(pm: PageMemory) -> int:
    return pm.free_count


def test_buffers_come_in_page_halves_and_the_counters_count_pages(page_memory) -> None:
    pm = frag_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(5, S.RX_POSTED, holder=device_code(0))
    # 5 buffers = 3 pages: the first by the slow path (its bulk of 64 into the cache; the cache's top,
    # page 63, serves), two from the cache (61, 62), both halves of each in order.
    assert ids.tolist() == [126, 127, 122, 123, 124]
    expect_stats(pool, cached=61, ring=0, alloc_empty=1, alloc_slow=1, alloc_fast=2, hold_cnt=64)
    assert free_pages(pm) == 256 - 64
    assert states(pm, ids) == {S.RX_POSTED} and states(pm, [125]) == {S.FRAG}  # page 62's second half waits
    assert pm.frag_refs[61:64].tolist() == [2, 2, 2] and pm.frag_refs.sum() == 6
    assert int(pool.ctl[P_FRAG_PAGE]) == 62 + 1 and int(pool.ctl[P_FRAG_NEXT]) == 1
    audit_ok(pm)
    # The next buffer is that half: no page taken, no counter moves.
    nxt = pool.alloc(1, S.RX_POSTED, holder=device_code(0))
    assert nxt.tolist() == [125]
    expect_stats(pool, cached=61, alloc_empty=1, alloc_slow=1, alloc_fast=2, hold_cnt=64)
    assert int(pool.ctl[P_FRAG_PAGE]) == 0
    # 128 buffers are 64 pages: 61 from the cache, then the ring is empty and the slow path serves the rest.
    more = pool.alloc(128)
    assert len(more) == 128 and len(np.unique(more // 2)) == 64
    expect_stats(pool, cached=61, alloc_empty=2, alloc_slow=2, alloc_fast=2 + 61 + 2, hold_cnt=128)
    audit_ok(pm)


def test_a_buffer_is_its_pages_bytes_at_the_fragments_offset(page_memory) -> None:
    """The data path sees one row per buffer (`emu.datapath.Core`): buffer b's bytes are those of page
    b // 2 at (b % 2) * 2048, and a posted buffer receives at its own headroom."""
    pm = frag_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    ids = pagepool.page_pool_dev_alloc_pages(pool, 2, device_code(0))
    assert pm.off[ids].tolist() == [XDP_PACKET_HEADROOM] * 2
    rows = pm.data.reshape(pm.nbufs, pm.buf_size)
    rows[ids[1], XDP_PACKET_HEADROOM : XDP_PACKET_HEADROOM + 5] = np.frombuffer(b"hello", np.uint8)
    page = pm.data.reshape(pm.npages, pm.page_size)[ids[1] // 2]
    assert bytes(page[2048 + XDP_PACKET_HEADROOM : 2048 + XDP_PACKET_HEADROOM + 5]) == b"hello"
    assert bytes(pm.page_view(int(ids[1]), XDP_PACKET_HEADROOM, 5)) == b"hello"


def test_only_the_last_put_recycles_a_page_into_the_cache(page_memory) -> None:
    pm = frag_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    a, b = pool.alloc(2, S.XDP, holder=0)
    assert a // 2 == b // 2
    assert pool.recycle_direct(np.array([a]), expect=S.XDP) == 1
    # Half the page is back: nothing recycled, nothing counted, the page still out.
    expect_stats(pool, cached=63, alloc_empty=1, alloc_slow=1, hold_cnt=64)
    assert states(pm, [a]) == {S.FRAG} and states(pm, [b]) == {S.XDP} and pm.frag_refs[a // 2] == 1
    audit_ok(pm)
    # Its second return is a double free, refused: the page keeps its reference.
    with pytest.raises(PageError, match="double free"):
        pool.recycle_direct(np.array([a]), expect=S.XDP)
    assert pool.stats()["double_free"] == 1 and pm.frag_refs[a // 2] == 1
    assert pool.recycle_direct(np.array([b]), expect=S.XDP) == 1
    expect_stats(pool, cached=64, alloc_empty=1, alloc_slow=1, hold_cnt=64, recycle_cached=1, double_free=1)
    assert states(pm, [a, b]) == {S.CACHE} and pm.frag_refs[a // 2] == 0
    audit_ok(pm)


def test_both_halves_in_one_batch_recycle_their_page_once(page_memory) -> None:
    pm = frag_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(6, S.XDP, holder=0)
    assert pool.recycle_direct(ids[::-1].copy(), expect=S.XDP) == 6
    expect_stats(pool, cached=64, alloc_empty=1, alloc_fast=2, alloc_slow=1, hold_cnt=64, recycle_cached=3)
    audit_ok(pm)


def test_remote_puts_recycle_through_the_ring_and_a_full_ring_frees(page_memory) -> None:
    """Another process's puts: the last fragment of each page takes the page to the ring; past the ring,
    to the page allocator (recycle_ring_full, release_cnt), as for whole pages."""
    pm = frag_memory(page_memory, params=PoolParams(frag_size=2048, pool_size=2))
    owner = pool_of(pm, 0, owner=True)
    ids = owner.alloc(8, S.TX_INFLIGHT, holder=device_code(1))  # 4 pages on the wire
    remote = pagepool.PagePool(pm, 0, owner=False)
    assert remote.put(ids[::2].copy(), expect=S.TX_INFLIGHT) == 4  # first halves: nothing moves
    expect_stats(owner, cached=60, ring=0, alloc_empty=1, alloc_fast=3, alloc_slow=1, hold_cnt=64)
    assert remote.put(ids[1::2].copy(), expect=S.TX_INFLIGHT) == 4
    expect_stats(owner, cached=60, ring=2, alloc_empty=1, alloc_fast=3, alloc_slow=1, hold_cnt=64,
                 recycle_ring=2, recycle_ring_full=2, release_cnt=2)
    pages = set((ids // 2).tolist())
    ringed = set(owner.ring[:2].tolist())
    assert ringed < pages and states(pm, pm.bufs_of(np.array(sorted(ringed)))) == {S.RING}
    assert states(pm, pm.bufs_of(np.array(sorted(pages - ringed)))) == {S.FREE}
    assert free_pages(pm) == 256 - 64 + 2
    audit_ok(pm)
    # return_pages groups by owner: from a process owning no pool, through the ring too.
    more = owner.alloc(2, S.SKB, holder=1)
    assert return_pages(pm, None, more, expect=S.SKB) == 2
    assert owner.stats()["recycle_ring_full"] == 3  # the ring still holds its two
    audit_ok(pm)


def test_quarter_pages_take_four_puts(page_memory) -> None:
    pm = frag_memory(page_memory, params=PoolParams(frag_size=1024))
    pool = pool_of(pm, 1, owner=True)
    ids = pool.alloc(4, S.XDP, holder=1)
    page = int(ids[0]) // 4
    assert (ids // 4).tolist() == [page] * 4 and (ids % 4).tolist() == [0, 1, 2, 3] and pm.frag_refs[page] == 4
    for k, b in enumerate(ids[:3]):
        pool.recycle_direct(np.array([b]), expect=S.XDP)
        assert pm.frag_refs[page] == 3 - k and pool.stats()["recycle_cached"] == 0
    pool.recycle_direct(ids[3:], expect=S.XDP)
    assert pool.stats()["recycle_cached"] == 1 and states(pm, ids) == {S.CACHE}
    audit_ok(pm)


def test_a_stale_descriptor_of_a_reused_half_is_refused(page_memory) -> None:
    pm = frag_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(2, S.XDP, holder=0)
    gens = pm.gen[ids].copy()
    pool.recycle_direct(ids, gens, expect=S.XDP)
    again = pool.alloc(2, S.XDP, holder=0)  # the same page, LIFO from the cache: a new life
    assert again.tolist() == ids.tolist()
    assert pool.recycle_direct(ids[:1], gens[:1], errors="count", expect=S.XDP) == 0
    assert pool.stats()["stale_generation"] == 1 and pm.frag_refs[ids[0] // 2] == 2
    pool.recycle_direct(again, expect=S.XDP)
    audit_ok(pm)


def test_destroy_drains_the_half_never_handed_out_and_waits_for_the_other(page_memory) -> None:
    pm = frag_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    out = pool.alloc(3, S.RX_POSTED, holder=device_code(0))  # page 1's second half stays with the pool
    left = pool.drain()
    # page_pool_drain_frag: the unused half drops its reference; pages 0 and 1 stay out for their halves.
    pages = out[::2] // 2
    assert left == 2 and pm.frag_refs[pages].tolist() == [2, 1] and int(pool.ctl[P_FRAG_PAGE]) == 0
    audit_ok(pm)
    return_pages(pm, None, out, expect=S.RX_POSTED)
    assert pool.ring_count == 2 and pool.drain() == 0
    assert free_pages(pm) == 256 and pool.stats()["hold_cnt"] == pool.stats()["release_cnt"] == 64
    audit_ok(pm)


def test_the_strict_audit_sees_a_wrong_pp_ref_count_and_a_page_partly_home(page_memory) -> None:
    pm = frag_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(2, S.XDP, holder=0)
    pm.frag_refs[ids[0] // 2] = 3
    assert any("pp_ref_count" in p for p in pagepool.audit(pm, strict=True).problems)
    pm.frag_refs[ids[0] // 2] = 2
    audit_ok(pm)
    pm.state[ids[0]] = S.CACHE  # half a page claimed home
    assert any("partly home" in p for p in pagepool.audit(pm, strict=True).problems)
    pm.state[ids[0]] = S.XDP


def test_a_dead_worker_holding_half_a_page_is_reclaimed(page_memory) -> None:
    """CPU 1 dies holding one half of a page in XDP while its device has the other on the wire: the
    reclaim returns the half it held (the page stays out for the other), destroys its pool, and the page
    comes home when the device's half does."""
    pm = frag_memory(page_memory)
    pool1 = pool_of(pm, 1, owner=True)
    a, b = pool1.alloc(2, S.XDP, holder=1)
    pm.len[a] = 64
    pagepool.xdp_xmit_queue(pm, np.array([b]), device_code(0))
    pagepool.tx_dma_start(pm, np.array([b]))
    got = reclaim.reclaim_cpu(pm, 1)
    assert got == reclaim.Reclaimed(pages=1, packets=1)
    assert states(pm, [a]) == {S.FRAG} and states(pm, [b]) == {S.TX_INFLIGHT} and pm.frag_refs[a // 2] == 1
    assert pool1.inflight == 1
    audit_ok(pm)
    assert reclaim.reclaim_device(pm, device_code(0)) == reclaim.Reclaimed(pages=1, packets=0)
    reclaim.drain_pools(pm, [1])
    assert states(pm, [a, b]) == {S.FREE} and pool1.inflight == 0 and free_pages(pm) == 256
    audit_ok(pm)
    # reclaim_stranded leaves the fragments that wait for a sibling alone (they are no one's to return).
    pool0 = pool_of(pm, 0, owner=True)
    c, _ = pool0.alloc(2, S.SKB, holder=0)
    pool0.recycle_direct(np.array([c]), expect=S.SKB)
    assert reclaim.reclaim_stranded(pm) == reclaim.Reclaimed(pages=1, packets=0)
    assert pool0.stats()["double_free"] == 0 and free_pages(pm) == 256
    audit_ok(pm)


def test_a_broadcast_clone_takes_a_whole_page_from_the_allocator(page_memory) -> None:
    pm = frag_memory(page_memory)
    pool = pool_of(pm, 0, owner=True)
    src = pool.alloc(1, S.XDP, holder=0)
    pm.off[src], pm.len[src] = XDP_PACKET_HEADROOM, 64
    new = xdpf_clone(pm, src, 0)
    assert len(new) == 1 and new[0] % 2 == 0  # the first buffer of its page
    assert pm.off[new[0]] == XDP_PACKET_HEADROOM and pm.len[new[0]] == 64 and states(pm, new) == {S.XDP}
    assert free_pages(pm) == 256 - 64 - 1
    audit_ok(pm)
    assert return_pages(pm, pool, np.concatenate((src, new)), expect=S.XDP) == 2
    assert free_pages(pm) == 256 - 64
    audit_ok(pm)


def test_bad_fragment_sizes_and_extra_references_are_refused(page_memory) -> None:
    for fs in (3000, 32, 8192):
        with pytest.raises(ValueError, match="frag_size must be a power of two"):
            page_memory(npages=16, page_size=4096, params=PoolParams(frag_size=fs))
    whole = page_memory(npages=16, page_size=4096, params=PoolParams(frag_size=4096))
    assert whole.frags == 1 and whole.params.frag_size == 0
    pm = frag_memory(page_memory)
    with pytest.raises(PageError, match="pp_ref_count"):
        page_get(pm, np.array([0]))
    attached = PageMemory.attach(pm.prefix)
    try:
        assert (attached.frags, attached.buf_size, attached.params.frag_size) == (2, 2048, 2048)
    finally:
        attached.close()
