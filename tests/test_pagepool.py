"""Unit tests of the per-CPU page pool (`emu.mem.pagepool`) and the page memory under it (`emu.mem.pagemem`).

Counter semantics are the kernel's (net/core/page_pool.c, under the names of ``struct page_pool_stats``),
per page:
served from the alloc cache = `alloc_fast`; cache empty and the ring refills it = `alloc_refill` for the
page served (ring empty = `alloc_empty`); else the slow path bulk-allocates `refill` pages = one
`alloc_slow` (and `hold_cnt` += pages got).  Every scenario checks *all* counters exactly (a counter not
named must be 0) and ends with a strict audit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from emu.mem import pagepool, shm
from emu.mem.page import DESC_DTYPE, H_EXTRA_REFS, PageError, PageState, concat_descs
from emu.mem.pagemem import PageMemory
from emu.mem.pagepool import (
    P_CACHE_COUNT,
    P_OWNER_PID,
    POOL_COUNTERS,
    C,
    ForeignRecycleError,
    PoolOwnershipError,
    PoolParams,
    alloc_pages_bulk,
    page_get,
    pool_of,
    put_page,
    return_pages,
    tx_dma_start,
)

# --------------------------------------------------------------------------------------------------
# helpers


def expect_stats(pool, cached: int | None = None, ring: int | None = None, **want: int) -> None:
    """Every counter of `pool` equals `want` (0 when not named); optionally the cache and ring fill."""
    unknown = set(want) - set(POOL_COUNTERS)
    assert not unknown, f"unknown counters {unknown}"
    stats = pool.stats()
    got = {name: stats[name] for name in POOL_COUNTERS}
    assert got == {name: want.get(name, 0) for name in POOL_COUNTERS}
    if cached is not None:
        assert pool.cache_count == cached
    if ring is not None:
        assert pool.ring_count == ring


def audit_ok(pm: PageMemory) -> None:
    audit = pagepool.audit(pm, strict=True)
    assert audit.ok, audit.problems
    assert audit.accounted == pm.npages


def states(pm: PageMemory, ids) -> set[PageState]:
    return {PageState(int(s)) for s in pm.state[np.asarray(ids, dtype=np.int64)]}


def snapshot(pm: PageMemory) -> dict[str, np.ndarray]:
    """Everything a refused return must leave alone (counters excluded: refusals are counted)."""
    return {
        "state": pm.state.copy(),
        "owner": pm.owner.copy(),
        "gen": pm.gen.copy(),
        "refcnt": pm.refcnt.copy(),
        "free_stack": pm.free_stack[: pm.free_count].copy(),
        "header": pm.header.copy(),
        "ctl": pm.pool_ctl.copy(),
        "caches": pm.caches.copy(),
        "rings": pm.rings.copy(),
    }


def assert_unchanged(before: dict[str, np.ndarray], pm: PageMemory) -> None:
    after = snapshot(pm)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------------------------------
# allocation paths


def test_first_alloc_takes_slow_path(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(1)
    assert len(ids) == 1
    expect_stats(pool, cached=63, ring=0, alloc_empty=1, alloc_slow=1, hold_cnt=64)
    assert pm.free_count == 256 - 64
    p = int(ids[0])
    assert pm.state[p] == PageState.ALLOCATED
    assert pm.owner[p] == 0 and pm.refcnt[p] == 1 and pm.gen[p] == 1
    # The 63 others sit in the cache, owned by the pool, not yet handed out (gen still 0).
    cached = pool.cache[:63]
    assert states(pm, cached) == {PageState.CACHE}
    assert set(pm.owner[cached]) == {0} and set(pm.gen[cached]) == {0}
    assert pool.inflight == 64
    audit_ok(pm)


def test_fast_path_alloc_and_recycle_direct(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    first = pool.alloc(1)
    ids = pool.alloc(10)
    expect_stats(pool, cached=53, alloc_empty=1, alloc_slow=1, alloc_fast=10, hold_cnt=64)
    assert pool.recycle_direct(np.concatenate((first, ids))) == 11
    expect_stats(pool, cached=64, ring=0, alloc_empty=1, alloc_slow=1, alloc_fast=10, recycle_cached=11, hold_cnt=64)
    assert states(pm, ids) == {PageState.CACHE}
    audit_ok(pm)
    # LIFO: the pages just recycled are handed out again, one generation later.
    again = pool.alloc(11)
    assert set(again.tolist()) == set(first.tolist()) | set(ids.tolist())
    assert set(pm.gen[again]) == {2}
    expect_stats(pool, cached=53, alloc_empty=1, alloc_slow=1, alloc_fast=21, recycle_cached=11, hold_cnt=64)
    audit_ok(pm)


def test_bulk_alloc_across_two_slow_refills(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(100)
    assert len(ids) == 100 and len(set(ids.tolist())) == 100
    # cache empty -> ring empty (alloc_empty) -> slow (64, serves 1) -> 63 fast -> again -> 35 fast
    expect_stats(pool, cached=28, ring=0, alloc_empty=2, alloc_slow=2, alloc_fast=98, hold_cnt=128)
    assert pm.free_count == 256 - 128
    assert states(pm, ids) == {PageState.ALLOCATED}
    audit_ok(pm)


def test_alloc_state_and_holder(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 1, owner=True)
    ids = pool.alloc(3, state=PageState.XDP, holder=7)
    assert states(pm, ids) == {PageState.XDP}
    assert set(pm.holder[ids]) == {7} and set(pm.owner[ids]) == {1}
    assert pool.recycle_direct(ids) == 3  # any in-use state may be returned
    audit_ok(pm)


def test_refill_from_ring(page_memory) -> None:
    pm = page_memory()
    owner = pool_of(pm, 0, owner=True)
    ids = owner.alloc(64)
    expect_stats(owner, cached=0, alloc_empty=1, alloc_slow=1, alloc_fast=63, hold_cnt=64)
    other = pool_of(pm, 0)  # a non-owner handle: returns through the ring
    assert not other.is_owner
    assert other.put(ids[:40]) == 40
    assert states(pm, ids[:40]) == {PageState.RING}
    assert set(pm.holder[ids[:40]]) == {-1}
    expect_stats(owner, cached=0, ring=40, alloc_empty=1, alloc_slow=1, alloc_fast=63, recycle_ring=40, hold_cnt=64)
    audit_ok(pm)
    # The next allocation refills the cache from the ring (all 40) and serves one page from it.
    got = owner.alloc(1)
    assert int(got[0]) in set(ids[:40].tolist())
    expect_stats(
        owner,
        cached=39,
        ring=0,
        alloc_empty=1,
        alloc_slow=1,
        alloc_fast=63,
        alloc_refill=1,
        recycle_ring=40,
        hold_cnt=64,
    )
    assert states(pm, owner.cache[:39]) == {PageState.CACHE}
    audit_ok(pm)
    # The refilled pages are then served fast; no page from the allocator was needed.
    more = owner.alloc(39)
    assert set(more.tolist()) | set(got.tolist()) == set(ids[:40].tolist())
    expect_stats(
        owner,
        cached=0,
        ring=0,
        alloc_empty=1,
        alloc_slow=1,
        alloc_fast=102,
        alloc_refill=1,
        recycle_ring=40,
        hold_cnt=64,
    )
    assert pm.free_count == 256 - 64
    audit_ok(pm)


def test_refill_takes_at_most_refill_pages(page_memory) -> None:
    pm = page_memory()
    owner = pool_of(pm, 0, owner=True)
    ids = owner.alloc(128)
    expect_stats(owner, cached=0, alloc_empty=2, alloc_slow=2, alloc_fast=126, hold_cnt=128)
    assert pool_of(pm, 0).put(ids) == 128
    owner.alloc(1)
    # 64 (PP_ALLOC_CACHE_REFILL) moved to the cache, one of them served.
    expect_stats(
        owner,
        cached=63,
        ring=64,
        alloc_empty=2,
        alloc_slow=2,
        alloc_fast=126,
        alloc_refill=1,
        recycle_ring=128,
        hold_cnt=128,
    )
    owner.alloc(63 + 2)  # drain the cache, then one more refill serves a page, then one fast
    expect_stats(
        owner,
        cached=62,
        ring=0,
        alloc_empty=2,
        alloc_slow=2,
        alloc_fast=126 + 63 + 1,
        alloc_refill=2,
        recycle_ring=128,
        hold_cnt=128,
    )
    audit_ok(pm)


def test_ring_wraps_around(page_memory) -> None:
    pm = page_memory(params=PoolParams(pool_size=16))
    owner, other = pool_of(pm, 0, owner=True), pool_of(pm, 0)
    ids = owner.alloc(64)
    out = ids[:10]
    for _ in range(7):  # 70 entries through a 16-slot ring
        assert other.put(out) == 10
        audit_ok(pm)
        back = owner.alloc(10)
        assert sorted(back.tolist()) == sorted(out.tolist())
        out = back
    expect_stats(
        owner,
        cached=0,
        ring=0,
        alloc_empty=1,
        alloc_slow=1,
        alloc_fast=63 + 7 * 9,
        alloc_refill=7,
        recycle_ring=70,
        hold_cnt=64,
    )
    assert int(pm.pool_ctl[0, 1]) == 70  # ring head: the indices keep counting, the slots wrap
    audit_ok(pm)


def test_alloc_empty_counted_each_time_the_ring_is_empty(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    for i in range(1, 4):
        pool.alloc(64)
        expect_stats(pool, cached=0, alloc_empty=i, alloc_slow=i, alloc_fast=63 * i, hold_cnt=64 * i)
    audit_ok(pm)


def test_allocator_exhaustion(page_memory) -> None:
    pm = page_memory(npages=100)
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(150)
    assert len(ids) == 100 and len(set(ids.tolist())) == 100
    # slow 64 + slow 36, then the allocator is dry: the third attempt fails.
    expect_stats(pool, cached=0, alloc_empty=3, alloc_slow=2, alloc_fast=98, alloc_failed=1, hold_cnt=100)
    assert pm.free_count == 0
    none = pool.alloc(5)
    assert len(none) == 0 and none.dtype.kind == "i"
    expect_stats(pool, cached=0, alloc_empty=4, alloc_slow=2, alloc_fast=98, alloc_failed=2, hold_cnt=100)
    audit_ok(pm)
    # Another CPU gets nothing either; once pages come back it gets them.
    pool1 = pool_of(pm, 1, owner=True)
    assert len(pool1.alloc(1)) == 0
    expect_stats(pool1, alloc_empty=1, alloc_failed=1)
    assert pool.recycle_direct(ids[:10]) == 10
    pool.drain()
    got = pool1.alloc(3)
    assert len(got) == 3
    expect_stats(pool1, cached=7, alloc_empty=2, alloc_slow=1, alloc_failed=1, alloc_fast=2, hold_cnt=10)
    audit_ok(pm)


def test_allocated_hwm_is_the_most_pages_ever_out(page_memory) -> None:
    pm = page_memory(npages=256, params=PoolParams(pool_size=16))
    assert pm.allocated_hwm == 0
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(100)  # two slow refills of 64: 128 pages leave the allocator
    assert pm.allocated_hwm == 128 == 256 - pm.free_count
    # Pages going back lower what is out now, not the mark.
    assert pool_of(pm, 0).put(ids) == 100  # 16 into the ring, 84 released to the allocator
    assert pm.free_count == 256 - 128 + 84
    assert pm.allocated_hwm == 128
    # Taken again from the pool and the allocator, but never more out at once than before: unchanged.
    again = pool.alloc(100)
    assert pm.allocated_hwm == 128
    # Another CPU takes 128 more: the mark follows the new peak, and another process sees it.
    out = 256 - pm.free_count
    other = pool_of(pm, 1, owner=True).alloc(128)
    assert pm.allocated_hwm == out + 128 == 256 - pm.free_count > 128
    attached = PageMemory.attach(pm.prefix)
    try:
        assert attached.allocated_hwm == out + 128
    finally:
        attached.close()
    assert len(again) == 100 and len(other) > 0
    audit_ok(pm)


def test_alloc_zero(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    assert len(pool.alloc(0)) == 0
    expect_stats(pool)
    audit_ok(pm)


# --------------------------------------------------------------------------------------------------
# return paths


def test_cache_full_goes_to_ring(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(192)
    base = dict(alloc_empty=3, alloc_slow=3, alloc_fast=189, hold_cnt=192)
    expect_stats(pool, cached=0, **base)
    assert pool.recycle_direct(ids[:120]) == 120
    expect_stats(pool, cached=120, ring=0, recycle_cached=120, **base)
    # 8 more fit, the next 12 find the cache full and go to the ring.
    assert pool.recycle_direct(ids[120:140]) == 20
    expect_stats(pool, cached=128, ring=12, recycle_cached=128, recycle_cache_full=12, recycle_ring=12, **base)
    assert states(pm, ids[:128]) == {PageState.CACHE}
    assert states(pm, ids[128:140]) == {PageState.RING}
    audit_ok(pm)


def test_ring_full_releases_to_page_allocator(page_memory) -> None:
    pm = page_memory(params=PoolParams(pool_size=16))
    owner = pool_of(pm, 0, owner=True)
    ids = owner.alloc(64)
    base = dict(alloc_empty=1, alloc_slow=1, alloc_fast=63, hold_cnt=64)
    assert pool_of(pm, 0).put(ids[:40]) == 40  # accepted: returned to the pool (ring or page allocator)
    expect_stats(owner, cached=0, ring=16, recycle_ring=16, recycle_ring_full=24, release_cnt=24, **base)
    assert states(pm, ids[:16]) == {PageState.RING}
    released = ids[16:40]
    assert states(pm, released) == {PageState.FREE}
    assert set(pm.owner[released]) == {-1} and set(pm.refcnt[released]) == {0}
    assert pm.free_count == 256 - 64 + 24
    assert owner.inflight == 40
    audit_ok(pm)


def test_cache_full_and_ring_full(page_memory) -> None:
    pm = page_memory(npages=512, params=PoolParams(pool_size=16))
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(192)
    assert pool.recycle_direct(ids[:150]) == 150
    expect_stats(
        pool,
        cached=128,
        ring=16,
        alloc_empty=3,
        alloc_slow=3,
        alloc_fast=189,
        hold_cnt=192,
        recycle_cached=128,
        recycle_cache_full=22,
        recycle_ring=16,
        recycle_ring_full=6,
        release_cnt=6,
    )
    audit_ok(pm)


def test_hard_limit(page_memory) -> None:
    pm = page_memory(params=PoolParams(recycle_limit=10))
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(64)
    base = dict(alloc_empty=1, alloc_slow=1, alloc_fast=63, hold_cnt=64)
    # Cache and ring together keep at most 10 pages: 10 cached, 10 released (the cache was not full).
    assert pool.recycle_direct(ids[:20]) == 20
    expect_stats(pool, cached=10, ring=0, recycle_cached=10, recycle_hard_limit=10, release_cnt=10, **base)
    assert states(pm, ids[10:20]) == {PageState.FREE}
    audit_ok(pm)
    # Through the ring: already at the limit, everything is released.
    assert pool_of(pm, 0).put(ids[20:25]) == 5
    expect_stats(pool, cached=10, ring=0, recycle_cached=10, recycle_hard_limit=15, release_cnt=15, **base)
    audit_ok(pm)
    # Below the limit the ring takes what the limit leaves room for.
    pool.alloc(6)  # cache 10 -> 4
    assert pool_of(pm, 0).put(ids[25:35]) == 10
    expect_stats(
        pool,
        cached=4,
        ring=6,
        recycle_cached=10,
        recycle_ring=6,
        recycle_hard_limit=19,
        release_cnt=19,
        alloc_empty=1,
        alloc_slow=1,
        alloc_fast=69,
        hold_cnt=64,
    )
    audit_ok(pm)


def test_released_refcnt_direct_and_ring(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(8)
    base = dict(alloc_empty=1, alloc_slow=1, alloc_fast=7, hold_cnt=64)
    shared = ids[:2]
    page_get(pm, shared)
    assert set(pm.refcnt[shared]) == {2}
    assert int(pm.header[H_EXTRA_REFS]) == 2
    audit_ok(pm)
    pool.recycle_direct(ids[:4])  # return value: see test_released_pages_count_as_accepted
    # The two shared pages leave the pool; the others are cached.
    expect_stats(pool, cached=58, recycle_cached=2, recycle_released_refcnt=2, release_cnt=2, **base)
    assert set(pm.owner[shared]) == {-1} and set(pm.refcnt[shared]) == {1}
    assert states(pm, shared) == {PageState.ALLOCATED}
    assert pool.inflight == 62
    audit_ok(pm)
    # The last put_page gives them to the page allocator.
    free_before = pm.free_count
    put_page(pm, shared)
    assert states(pm, shared) == {PageState.FREE}
    assert set(pm.refcnt[shared]) == {0}
    assert int(pm.header[H_EXTRA_REFS]) == 0
    assert pm.free_count == free_before + 2
    audit_ok(pm)
    # Same through the ring.
    page_get(pm, ids[4:5])
    pool_of(pm, 0).put(ids[4:8])
    expect_stats(
        pool, cached=58, ring=3, recycle_cached=2, recycle_ring=3, recycle_released_refcnt=3, release_cnt=3, **base
    )
    audit_ok(pm)
    put_page(pm, ids[4:5])
    assert pm.state[ids[4]] == PageState.FREE
    audit_ok(pm)


def test_page_get_then_put_page_before_return_recycles_normally(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(2)
    page_get(pm, ids)
    put_page(pm, ids)
    assert set(pm.refcnt[ids]) == {1} and int(pm.header[H_EXTRA_REFS]) == 0
    # put_page never drops the pool's own reference.
    put_page(pm, ids)
    assert set(pm.refcnt[ids]) == {1} and states(pm, ids) == {PageState.ALLOCATED}
    assert pool.recycle_direct(ids) == 2
    expect_stats(pool, cached=64, alloc_empty=1, alloc_slow=1, alloc_fast=1, recycle_cached=2, hold_cnt=64)
    audit_ok(pm)


def test_foreign_direct_recycle_refused(page_memory) -> None:
    pm = page_memory()
    owner = pool_of(pm, 0, owner=True)
    ids = owner.alloc(5)
    other = pool_of(pm, 0)
    before = snapshot(pm)
    with pytest.raises(ForeignRecycleError, match="does not own"):
        other.recycle_direct(ids)
    assert_unchanged(before, pm)
    assert issubclass(ForeignRecycleError, PageError)
    expect_stats(owner, cached=59, alloc_empty=1, alloc_slow=1, alloc_fast=4, hold_cnt=64, foreign_cache_return=5)
    # A non-owner may not allocate (touch the alloc cache) or drain either.
    with pytest.raises(ForeignRecycleError):
        other.alloc(1)
    with pytest.raises(ForeignRecycleError):
        other.drain()
    assert_unchanged(before, pm)
    expect_stats(owner, cached=59, alloc_empty=1, alloc_slow=1, alloc_fast=4, hold_cnt=64, foreign_cache_return=7)
    # The pages are still the caller's to return properly.
    assert other.put(ids) == 5
    audit_ok(pm)


def test_second_live_owner_refused(page_memory) -> None:
    pm = page_memory()
    foreign = os.getppid()  # alive (pytest's parent, or the xdist controller) and not us
    assert foreign != os.getpid()
    pm.pool_ctl[1, P_OWNER_PID] = foreign
    before = snapshot(pm)
    with pytest.raises(PoolOwnershipError, match=str(foreign)):
        pool_of(pm, 1, owner=True)
    assert_unchanged(before, pm)
    # Non-owner handles are still fine, and other CPUs can be owned.
    assert not pool_of(pm, 1).is_owner
    pool_of(pm, 0, owner=True)
    assert int(pm.pool_ctl[0, P_OWNER_PID]) == os.getpid()
    # The same process may take its own claim again.
    pool_of(pm, 0, owner=True)


def test_dead_owner_claim_taken_over(page_memory) -> None:
    pm = page_memory()
    gone = dead_pid()
    pm.pool_ctl[0, P_OWNER_PID] = gone
    pool = pool_of(pm, 0, owner=True)
    assert pool.is_owner and int(pm.pool_ctl[0, P_OWNER_PID]) == os.getpid()
    assert len(pool.alloc(1)) == 1
    audit_ok(pm)


def test_double_free(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(4)
    base = dict(alloc_empty=1, alloc_slow=1, alloc_fast=3, hold_cnt=64)
    assert pool.recycle_direct(ids) == 4
    before = snapshot(pm)
    with pytest.raises(PageError, match="double free"):
        pool.recycle_direct(ids[:1])
    assert_unchanged(before, pm)
    expect_stats(pool, cached=64, recycle_cached=4, double_free=1, **base)
    with pytest.raises(PageError, match="double free"):
        pool_of(pm, 0).put(ids)
    assert_unchanged(before, pm)
    expect_stats(pool, cached=64, recycle_cached=4, double_free=5, **base)
    # errors="count" only counts.
    assert pool.recycle_direct(ids[1:3], errors="count") == 0
    assert_unchanged(before, pm)
    expect_stats(pool, cached=64, recycle_cached=4, double_free=7, **base)
    # A page back in the page allocator is refused the same way.
    pool.drain()
    free_page = int(pm.free_stack[0])
    before = snapshot(pm)
    with pytest.raises(PageError, match="double free"):
        pool_of(pm, 0).put([free_page])
    assert_unchanged(before, pm)
    audit_ok(pm)


def test_double_free_within_one_batch(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(3)
    base = dict(alloc_empty=1, alloc_slow=1, alloc_fast=2, hold_cnt=64)
    batch = np.array([ids[0], ids[1], ids[0]])
    with pytest.raises(PageError, match="double free of 1 pages"):
        pool.recycle_direct(batch)
    # The good copies are placed once; the duplicate stays with the caller.
    expect_stats(pool, cached=63, recycle_cached=2, double_free=1, **base)
    assert states(pm, ids[:2]) == {PageState.CACHE}
    assert len(set(pool.cache[:63].tolist())) == 63
    audit_ok(pm)
    # Through the ring, with errors="count".
    assert pool_of(pm, 0).put(np.array([ids[2], ids[2], ids[2]]), errors="count") == 1
    expect_stats(pool, cached=63, ring=1, recycle_cached=2, recycle_ring=1, double_free=3, **base)
    audit_ok(pm)


def test_stale_generation(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(2)
    old = pm.gen[ids].copy()
    assert pool.recycle_direct(ids, old) == 2
    again = pool.alloc(2)  # LIFO: the same two pages, one generation on
    assert sorted(again.tolist()) == sorted(ids.tolist())
    assert (pm.gen[ids] == old + 1).all()
    base = dict(alloc_empty=1, alloc_slow=1, alloc_fast=3, recycle_cached=2, hold_cnt=64)
    before = snapshot(pm)
    with pytest.raises(PageError, match="stale"):
        pool.recycle_direct(ids, old)
    with pytest.raises(PageError, match="stale"):
        pool_of(pm, 0).put(ids, old)
    assert_unchanged(before, pm)
    expect_stats(pool, cached=62, stale_generation=4, **base)
    # Mixed: the fresh descriptor is accepted, the stale one refused and left in use.
    gens = pm.gen[ids].copy()
    gens[1] -= 1
    assert pool.recycle_direct(ids, gens, errors="count") == 1
    assert pm.state[ids[0]] == PageState.CACHE and pm.state[ids[1]] == PageState.ALLOCATED
    expect_stats(pool, cached=63, stale_generation=5, **{**base, "recycle_cached": 3})
    audit_ok(pm)


@pytest.mark.parametrize("bad", [-1, 256, 2**31, 2**40])
def test_page_id_out_of_range(page_memory, bad: int) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(1)
    base = dict(alloc_empty=1, alloc_slow=1, alloc_fast=0, hold_cnt=64)
    before = snapshot(pm)
    with pytest.raises(PageError, match="out of range"):
        pool.recycle_direct(np.array([bad], dtype=np.int64))
    with pytest.raises(PageError, match="out of range"):
        pool_of(pm, 0).put(np.array([bad], dtype=np.int64))
    assert_unchanged(before, pm)
    expect_stats(pool, cached=63, bad_page=2, **base)
    # A good page in the same batch still goes home.
    assert pool.recycle_direct(np.array([bad, ids[0]], dtype=np.int64), errors="count") == 1
    expect_stats(pool, cached=64, bad_page=3, recycle_cached=1, **base)
    audit_ok(pm)


def test_pages_of_another_pool_refused(page_memory) -> None:
    pm = page_memory()
    p0, p1 = pool_of(pm, 0, owner=True), pool_of(pm, 1, owner=True)
    ids0 = p0.alloc(3)
    p1.alloc(1)
    before = snapshot(pm)
    with pytest.raises(PageError, match="another pool"):
        p1.recycle_direct(ids0)
    with pytest.raises(PageError, match="another pool"):
        pool_of(pm, 1).put(ids0)
    assert_unchanged(before, pm)
    expect_stats(p1, cached=63, alloc_empty=1, alloc_slow=1, hold_cnt=64, bad_page=6)
    expect_stats(p0, cached=61, alloc_empty=1, alloc_slow=1, alloc_fast=2, hold_cnt=64)
    assert states(pm, ids0) == {PageState.ALLOCATED}
    audit_ok(pm)


def test_return_pages_groups_by_owner(page_memory) -> None:
    pm = page_memory(ncpus=3)
    p0, p1, p2 = (pool_of(pm, c, owner=True) for c in range(3))
    a, b, c = p0.alloc(10), p1.alloc(6), p2.alloc(3)
    mixed = np.concatenate((b[:3], a, c, b[3:]))
    assert return_pages(pm, p0, mixed) == 19
    # Own pages directly into the cache, the others through their owners' rings.
    expect_stats(p0, cached=64, ring=0, alloc_empty=1, alloc_slow=1, alloc_fast=9, recycle_cached=10, hold_cnt=64)
    expect_stats(p1, cached=58, ring=6, alloc_empty=1, alloc_slow=1, alloc_fast=5, recycle_ring=6, hold_cnt=64)
    expect_stats(p2, cached=61, ring=3, alloc_empty=1, alloc_slow=1, alloc_fast=2, recycle_ring=3, hold_cnt=64)
    audit_ok(pm)
    # Without a local pool everything goes through the rings.
    a = p0.alloc(4)
    assert return_pages(pm, None, a, pm.gen[a]) == 4
    expect_stats(
        p0,
        cached=60,
        ring=4,
        alloc_empty=1,
        alloc_slow=1,
        alloc_fast=13,
        recycle_cached=10,
        recycle_ring=4,
        hold_cnt=64,
    )
    audit_ok(pm)


def test_return_pages_counts_bad_pages_without_raising(page_memory) -> None:
    pm = page_memory()
    p0, p1 = pool_of(pm, 0, owner=True), pool_of(pm, 1, owner=True)
    a, b = p0.alloc(2), p1.alloc(2)
    free_page = int(pm.free_stack[0])
    stale_gens = np.concatenate((pm.gen[a], pm.gen[b] - 1, [0, 0]))
    ids = np.concatenate((a, b, [free_page, 10**6]))
    assert return_pages(pm, p0, ids, stale_gens) == 2
    expect_stats(
        p0,
        cached=64,
        alloc_empty=1,
        alloc_slow=1,
        alloc_fast=1,
        recycle_cached=2,
        hold_cnt=64,
        double_free=1,
        bad_page=1,
    )  # ownerless ids are refused by the local pool
    expect_stats(p1, cached=62, alloc_empty=1, alloc_slow=1, alloc_fast=1, hold_cnt=64, stale_generation=2)
    assert states(pm, b) == {PageState.ALLOCATED}
    assert return_pages(pm, p0, np.empty(0, dtype=np.int64)) == 0
    audit_ok(pm)


def test_expected_state_on_return(page_memory) -> None:
    """`expect`: a return path says in which state it holds its pages; others are refused and counted."""
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    tx = pool.alloc(2, state=PageState.TX_QUEUED)
    rx = pool.alloc(1, state=PageState.RX_POSTED)
    xdp = pool.alloc(2, state=PageState.XDP)
    base = dict(alloc_empty=1, alloc_slow=1, alloc_fast=4, hold_cnt=64)
    mixed = np.concatenate((tx, rx, xdp))
    before = snapshot(pm)
    with pytest.raises(PageError, match="before their TX completion"):
        pool.recycle_direct(mixed[:3], expect=PageState.XDP)
    assert_unchanged(before, pm)
    expect_stats(pool, cached=59, recycled_before_tx_completion=2, wrong_state=1, **base)
    assert pool.recycle_direct(mixed, expect=PageState.XDP, errors="count") == 2
    expect_stats(pool, cached=61, recycle_cached=2, recycled_before_tx_completion=4, wrong_state=2, **base)
    assert states(pm, tx) == {PageState.TX_QUEUED} and states(pm, rx) == {PageState.RX_POSTED}
    # check(): the same validation without returning anything.
    good, errors = pool.check(np.concatenate((tx, rx)), None, PageState.TX_QUEUED)
    assert sorted(good.tolist()) == sorted(tx.tolist()) and len(errors) == 1 and "wrong state" in errors[0]
    # check() recycles nothing: a descriptor naming a page that awaits its TX completion (a forged RX
    # completion, say) is in the wrong state, not a page recycled before its completion.
    good, errors = pool.check(tx, None, PageState.RX_POSTED)
    assert len(good) == 0 and "wrong state" in errors[0]
    expect_stats(pool, cached=61, recycle_cached=2, recycled_before_tx_completion=4, wrong_state=5, **base)
    # Uniform batches in the expected state take the fast validation and go home, also through the ring.
    tx_dma_start(pm, tx)  # on the wire
    assert pool_of(pm, 0).put(tx, pm.gen[tx], expect=PageState.TX_INFLIGHT) == 2
    assert return_pages(pm, pool, rx, expect=PageState.RX_POSTED) == 1
    # A freed page is still a double free, whatever was expected.
    with pytest.raises(PageError, match="double free"):
        pool.recycle_direct(xdp[:1], expect=PageState.XDP)
    audit_ok(pm)


def test_recycle_direct_if_valid_takes_only_spotless_batches(page_memory) -> None:
    """The one-check fast path of a CPU's returns: a batch of its own pages exactly as expected goes home
    (cache, then ring) and counts as `recycle_direct` would; any other batch changes and counts nothing,
    and is left to the screening path."""
    pm = page_memory(params=PoolParams(cache_size=32, refill=16, pool_size=64))
    pool, other = pool_of(pm, 0, owner=True), pool_of(pm, 1, owner=True)
    mine = pool.alloc(48, state=PageState.TX_INFLIGHT)
    theirs = other.alloc(4, state=PageState.TX_INFLIGHT)
    gens = pm.gen[mine]
    before = snapshot(pm)
    stats = pool.stats()
    for ids, g in (
        (mine[:4], gens[:4] + 1),  # stale generation
        (np.concatenate((mine[:4], theirs)), pm.gen[np.concatenate((mine[:4], theirs))]),  # another pool's
        (np.concatenate((mine[:4], mine[:1])), pm.gen[np.concatenate((mine[:4], mine[:1]))]),  # twice
        (np.array([mine[0], pm.npages + 5]), np.zeros(2, np.uint32)),  # out of range
    ):
        assert pool.recycle_direct_if_valid(ids, g, PageState.TX_INFLIGHT) is None
    assert pool.recycle_direct_if_valid(mine[:4], gens[:4], PageState.XDP) is None  # wrong state
    assert_unchanged(before, pm)
    assert pool.stats() == stats
    assert pool.recycle_direct_if_valid(mine, gens, PageState.TX_INFLIGHT) == 48
    after = pool.stats()
    assert after["recycle_cached"] - stats["recycle_cached"] + after["recycle_ring"] - stats["recycle_ring"] == 48
    assert states(pm, mine) <= {PageState.CACHE, PageState.RING}
    assert other.recycle_direct_if_valid(theirs, pm.gen[theirs], PageState.TX_INFLIGHT) == 4
    audit_ok(pm)


@pytest.mark.parametrize("n", [64, 1537, 16384, 16385])
def test_one_check_takes_a_whole_ring_of_descriptor_ids(page_memory, n: int) -> None:
    """A CPU's TX completion may name a whole RX ring of pages, by the descriptors' unsigned ids: up to the
    largest ring (16,384) the one-check path takes it, a page named twice is refused at any size, and a
    larger batch is left to the screening path, which takes it too."""
    pm = page_memory(npages=16448, ncpus=1, params=PoolParams(pool_size=16384))
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(n, state=PageState.TX_INFLIGHT).astype(np.uint32)
    gens = pm.gen[ids]
    twice = ids.copy()
    twice[-1] = twice[0]
    assert pool.recycle_direct_if_valid(twice, gens, PageState.TX_INFLIGHT) is None
    if n <= 16384:
        assert pool.recycle_direct_if_valid(ids, gens, PageState.TX_INFLIGHT) == n
    else:
        assert pool.recycle_direct_if_valid(ids, gens, PageState.TX_INFLIGHT) is None
        assert pool.recycle_direct(ids, gens, expect=PageState.TX_INFLIGHT) == n
    assert states(pm, ids) <= {PageState.CACHE, PageState.RING, PageState.FREE}
    audit_ok(pm)


# --------------------------------------------------------------------------------------------------
# drain


def test_drain(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(70)  # 2 slow refills: hold 128, cache 58
    assert pool_of(pm, 0).put(ids[:20]) == 20
    base = dict(alloc_empty=2, alloc_slow=2, alloc_fast=68, hold_cnt=128, recycle_ring=20)
    expect_stats(pool, cached=58, ring=20, **base)
    assert pool.drain() == 50  # pages still out
    expect_stats(pool, cached=0, ring=0, release_cnt=78, **base)
    assert pm.free_count == 256 - 50
    audit_ok(pm)
    # Pages still in flight may come back; a second drain then reports 0.
    assert pool.recycle_direct(ids[20:]) == 50
    assert pool.drain() == 0
    expect_stats(pool, cached=0, ring=0, release_cnt=128, recycle_cached=50, **base)
    assert pm.free_count == 256
    assert states(pm, range(256)) == {PageState.FREE}
    audit_ok(pm)


def test_drain_with_wrapped_ring(page_memory) -> None:
    pm = page_memory(params=PoolParams(pool_size=16))
    pool, other = pool_of(pm, 0, owner=True), pool_of(pm, 0)
    ids = pool.alloc(64)
    other.put(ids[:12])
    pool.alloc(12)  # head = tail = 12
    other.put(ids[12:24])  # wraps: slots 12..15 and 0..7
    assert pool.ring_count == 12
    assert pool.drain() == 64 - 12
    assert pool.ring_count == 0 and pool.cache_count == 0
    audit_ok(pm)


# --------------------------------------------------------------------------------------------------
# audit


def _scenario(pm: PageMemory):
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(20)
    pool.recycle_direct(ids[:5])
    pool_of(pm, 0).put(ids[5:10])
    audit_ok(pm)
    return pool, ids


def test_audit_page_twice_in_cache(page_memory) -> None:
    pm = page_memory()
    pool, _ = _scenario(pm)
    n = pool.cache_count
    pool.cache[n] = pool.cache[0]
    pm.pool_ctl[0, P_CACHE_COUNT] = n + 1
    problems = pagepool.audit(pm, strict=True).problems
    assert any("more than one place" in p for p in problems), problems
    assert not pagepool.audit(pm, strict=True).ok
    assert pagepool.audit(pm).ok  # the histogram alone cannot see it


def test_audit_wrong_state_in_cache(page_memory) -> None:
    pm = page_memory()
    pool, _ = _scenario(pm)
    pm.state[pool.cache[0]] = PageState.XDP
    problems = pagepool.audit(pm, strict=True).problems
    assert any("alloc cache" in p and "not in state CACHE" in p for p in problems), problems


def test_audit_foreign_page_in_ring(page_memory) -> None:
    pm = page_memory()
    _, ids = _scenario(pm)
    pm.owner[ids[5]] = 1  # a ring page that carries another pool's mark
    problems = pagepool.audit(pm, strict=True).problems
    assert any("recycle ring" in p and "another CPU" in p for p in problems), problems
    assert any("cpu 1 pool: hold_cnt - release_cnt = 0 but 1 pages" in p for p in problems), problems


def test_audit_lost_page(page_memory) -> None:
    pm = page_memory()
    _scenario(pm)
    pm.header[9] = pm.free_count - 1  # drop the top of the free stack: a FREE page in no structure
    problems = pagepool.audit(pm, strict=True).problems
    assert any("in no structure" in p for p in problems), problems


def test_audit_hold_count_mismatch(page_memory) -> None:
    pm = page_memory()
    _scenario(pm)
    pm.pool_counters[0, C["hold_cnt"]] += 1
    problems = pagepool.audit(pm, strict=True).problems
    assert any("cpu 0 pool: hold_cnt - release_cnt = 65 but 64" in p for p in problems), problems


def test_audit_unknown_state_and_orphan(page_memory) -> None:
    pm = page_memory()
    _, ids = _scenario(pm)
    pm.state[ids[12]] = 200
    pm.owner[ids[13]] = -1
    pm.pool_counters[0, C["release_cnt"]] += 1
    pm.state[ids[13]] = PageState.XDP
    pm.refcnt[ids[13]] = 0
    audit = pagepool.audit(pm, strict=False)
    assert not audit.ok and any("unknown state" in p for p in audit.problems)
    problems = pagepool.audit(pm, strict=True).problems
    assert any("owned by no pool" in p for p in problems), problems


def test_audit_ring_id_out_of_range(page_memory) -> None:
    pm = page_memory()
    pool, _ = _scenario(pm)
    pool.ring[0] = 10_000
    problems = pagepool.audit(pm, strict=True).problems
    assert any("recycle ring" in p and "out of range" in p for p in problems), problems


# --------------------------------------------------------------------------------------------------
# page memory: attach, segments


def test_attach_sees_same_state(page_memory) -> None:
    pm = page_memory(npages=128, ncpus=2, params=PoolParams(cache_size=32, refill=16, pool_size=64))
    owner = pool_of(pm, 1, owner=True)
    ids = owner.alloc(5)
    pm.page_view(int(ids[0]))[:5] = b"hello"
    other = PageMemory.attach(pm.prefix)
    try:
        assert (other.npages, other.page_size, other.ncpus) == (128, 256, 2)
        assert other.params == pm.params
        assert bytes(other.page_view(int(ids[0]), 0, 5)) == b"hello"
        np.testing.assert_array_equal(other.state, pm.state)
        assert pool_of(other, 1).stats() == owner.stats()
        # A return through the attached mapping lands in the owner's ring, and the owner reuses it.
        assert pool_of(other, 1).put(ids) == 5
        assert owner.ring_count == 5
        owner.alloc(16)
        assert owner.stats()["alloc_refill"] == 1
        assert pagepool.audit(other, strict=True).ok and pagepool.audit(pm, strict=True).ok
    finally:
        other.close()
    assert not other.data_seg.owner  # an attacher never unlinks


def test_attach_rejects_foreign_segment(run_prefix: str) -> None:
    seg = shm.Segment.create(f"{run_prefix}-meta", 8192)
    try:
        with pytest.raises(ValueError, match="not a pagepool-emu page table"):
            PageMemory.attach(run_prefix)
    finally:
        seg.unlink()
        seg.close()


def test_sweep_stale_removes_only_dead_runs(run_prefix: str) -> None:
    gone = dead_pid()
    dead_name = f"{shm.PREFIX}-{gone}-{os.urandom(4).hex()}-meta"
    live_name = f"{run_prefix}-meta"
    dead = shm.Segment.create(dead_name, 4096)
    live = shm.Segment.create(live_name, 4096)
    try:
        removed = shm.sweep_stale()
        assert dead_name in removed
        assert live_name not in removed
        names = os.listdir(shm.SHM_DIR)
        assert dead_name not in names
        assert live_name in names
    finally:
        for seg in (dead, live):
            seg.unlink()
            seg.close()
    assert shm.segments_with_prefix(run_prefix) == []


def test_segment_create_impossible_size(run_prefix: str) -> None:
    total = shutil.disk_usage(shm.SHM_DIR).total
    size = max(shm.shm_free_bytes() * 2, total + 2**30)
    name = f"{run_prefix}-huge"
    with pytest.raises(shm.ShmSpaceError) as info:
        shm.Segment.create(name, size)
    assert f"{size:,}" in str(info.value)
    assert info.value.errno is not None
    assert name not in os.listdir(shm.SHM_DIR)


def test_page_memory_create_too_big(run_prefix: str) -> None:
    with pytest.raises(shm.ShmSpaceError, match="needs"):
        PageMemory.create(run_prefix, 2**31 - 1, 2**20, 1)
    assert shm.segments_with_prefix(run_prefix) == []


@pytest.mark.parametrize(
    "params",
    [PoolParams(pool_size=16385), PoolParams(cache_size=0), PoolParams(refill=129), PoolParams(recycle_limit=-1)],
)
def test_pool_params_rejected(params: PoolParams) -> None:
    with pytest.raises(ValueError):
        params.normalised()


def test_pool_size_zero_means_1024() -> None:
    assert PoolParams(pool_size=0).normalised().pool_size == 1024


# --------------------------------------------------------------------------------------------------
# bugs found (these fail until emu/mem/pagepool.py is fixed; see the report)


def test_alloc_pages_bulk_negative_count_is_harmless(page_memory) -> None:
    """alloc_pages_bulk(-3) takes k = min(-3, have) = -3 and *raises* the free count by 3."""
    pm = page_memory()
    ids = alloc_pages_bulk(pm, -3)
    assert len(ids) == 0
    assert pm.free_count == 256
    audit_ok(pm)


def test_page_get_counts_duplicate_ids(page_memory) -> None:
    """page_get([p, p]) takes two references but the refcount (fancy-index +=) rises by one only,
    while the host's extra-reference count rises by two; the same in put_page."""
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    p = pool.alloc(1)
    page_get(pm, np.array([p[0], p[0]]))
    assert int(pm.refcnt[p[0]]) == 3
    put_page(pm, np.array([p[0], p[0]]))
    assert int(pm.refcnt[p[0]]) == 1 and int(pm.header[H_EXTRA_REFS]) == 0


def test_released_pages_count_as_accepted(page_memory) -> None:
    """recycle_direct/put return the pages *accepted* (taken off the caller's hands): pages released to
    the page allocator because the ring is full or the hard limit is hit count, but pages released because
    someone else still references them (recycle_released_refcnt) do not, although the caller no longer
    holds them and no error is reported."""
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(8)
    page_get(pm, ids[:2])
    page_get(pm, ids[4:6])
    assert pool.recycle_direct(ids[:4]) == 4
    assert pool_of(pm, 0).put(ids[4:8]) == 4


def test_alloc_without_holder_clears_previous_holder(page_memory) -> None:
    """`holder` is who has the page now (for fault recovery).  A page recycled through the cache keeps
    the holder of its previous life, and alloc() without `holder` leaves it there: the new page looks
    held by the device/CPU that had it before."""
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(4, state=PageState.RX_POSTED, holder=5)
    pool.recycle_direct(ids)
    again = pool.alloc(4)
    assert sorted(again.tolist()) == sorted(ids.tolist())
    assert set(pm.holder[again]) == {-1}


def test_stale_or_forged_descriptors_are_not_violations(page_memory) -> None:
    """Only a live page returned early is `recycled_before_tx_completion`, and only a real second free a
    `double_free`: a stale descriptor (an earlier life of a page now in flight) and a handed-over one
    naming a page at home are refused as what they are, so forged messages cannot fake a violation."""
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    tx = pool.alloc(4, state=PageState.TX_INFLIGHT)
    home = pool.alloc(2, state=PageState.XDP)
    pool.recycle_direct(home, expect=PageState.XDP)
    assert return_pages(pm, pool, tx, pm.gen[tx] - 1, errors="count", expect=PageState.XDP) == 0
    good, errors = pool.check(home, None, PageState.RX_POSTED)
    assert len(good) == 0 and errors
    stats = pool.stats()
    assert stats["recycled_before_tx_completion"] == 0 and stats["double_free"] == 0
    assert stats["wrong_state"] == 4 + 2
    assert states(pm, tx) == {PageState.TX_INFLIGHT}
    audit_ok(pm)


def test_concat_descs_is_numpys_concatenate() -> None:
    rng = np.random.default_rng(7)
    whole = np.zeros(50, DESC_DTYPE)
    for name in whole.dtype.names:
        whole[name] = rng.integers(0, 1 << 16, size=50)
    parts = [whole[:7], whole[7:30], whole[30:][::-1], whole[[3, 1, 4]]]  # views, a reversed one, a copy
    got = concat_descs(parts)
    assert got.dtype == DESC_DTYPE and got.tobytes() == np.concatenate(parts).tobytes()
    assert concat_descs([whole]) is whole
