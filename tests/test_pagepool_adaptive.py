"""The adaptive recycling policy (`PoolParams.policy = "adaptive"`, `emu.mem.pagepool`'s watermark).

A pool is driven through a load change (a window of batches in flight that grows, then shrinks): the
watermark must follow, every page the watermark turns away must reach the page allocator and be counted
in `recycle_hard_limit`, and a strict audit must pass at the end.  The fixed policy's behaviour is
test_pagepool.py's, unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from emu.mem import pagepool
from emu.mem.page import PageState
from emu.mem.pagemem import PageMemory
from emu.mem.pagepool import (
    P_U_DEV,
    P_U_MEAN,
    P_U_SAMPLES,
    P_WATERMARK,
    WM_SCALE,
    C,
    PagePool,
    PoolParams,
    pool_of,
)

BATCH = 16
PARAMS = PoolParams(cache_size=32, refill=16, pool_size=256, policy="adaptive")


def attached_policy(pm: PageMemory) -> str:
    other = PageMemory.attach(pm.prefix)
    try:
        return other.params.policy
    finally:
        other.close()


def samples(pool: PagePool) -> int:
    return int(pool.ctl[P_U_SAMPLES])


def kept(pool: PagePool) -> int:
    return pool.cache_count + pool.ring_count


class Driver:
    """Keeps a window of batches in flight on CPU 0's pool: each step allocates one batch and, past the
    window, recycles the oldest directly; every call checks that the pages the allocator gained are
    exactly the pages counted in `recycle_hard_limit` (less the pages the pool took from it)."""

    def __init__(self, pm: PageMemory) -> None:
        self.pm = pm
        self.pool = pool_of(pm, 0, owner=True)
        self.out: deque[np.ndarray] = deque()
        self.released = 0

    def _counted(self, call: Callable[..., Any], *args: Any) -> Any:
        pool, pm = self.pool, self.pm
        free, hard, hold = pm.free_count, pool.cnt[C["recycle_hard_limit"]], pool.cnt[C["hold_cnt"]]
        result = call(*args)
        d_hard = int(pool.cnt[C["recycle_hard_limit"]] - hard)
        d_hold = int(pool.cnt[C["hold_cnt"]] - hold)
        assert pm.free_count - free == d_hard - d_hold
        self.released += d_hard
        return result

    def step(self, window: int) -> None:
        pool = self.pool
        self.out.append(self._counted(pool.alloc, BATCH, PageState.XDP))
        while len(self.out) > window:
            ids = self.out.popleft()
            assert self._counted(pool.recycle_direct, ids) == len(ids)
            # After a return and its trim the pool holds at most W pages, unless it keeps only one
            # refill's worth (the floor) or what is over W sits in the ring (the trim takes the cache).
            assert (pool.inflight <= pool.watermark or kept(pool) <= pool.refill
                    or pool.cache_count == 0), pool.stats()

    def in_use(self) -> int:
        return sum(len(b) for b in self.out)


def test_watermark_follows_a_load_change(page_memory) -> None:
    pm = page_memory(npages=2048, page_size=256, ncpus=2, params=PARAMS)
    assert attached_policy(pm) == "adaptive"  # attaching processes see the policy
    drv = Driver(pm)
    pool = drv.pool
    assert pool.watermark == 0 and pool.stats()["watermark"] == 0  # not measured yet: no limit

    # Light load: one batch in flight.
    for _ in range(40):
        drv.step(1)
    light = pool.watermark
    assert 0 < light <= 4 * BATCH + pool.refill, pool.stats()

    # Heavy load: twelve batches in flight.  The watermark rises to cover them.
    for _ in range(60):
        drv.step(12)
    heavy = pool.watermark
    assert heavy >= 11 * BATCH + pool.refill > light, pool.stats()
    mean = int(pool.ctl[P_U_MEAN]) / WM_SCALE
    assert 10 * BATCH <= mean <= 12 * BATCH, mean

    # Light again.  The watermark never rises on the way down (the deviation's slower growth on a falling
    # load); within 16 samples the mean has followed most of the step, and the watermark, which carries
    # four deviations of a step the estimator first sees as swing, is under half the heavy one within 32.
    # After 40 steps it is back near the light load's, and the cache is trimmed to it.
    start = samples(pool)
    while samples(pool) - start < 32:
        drv.step(1)
        assert pool.watermark <= heavy, (pool.watermark, heavy)
        if samples(pool) - start >= 16:
            assert int(pool.ctl[P_U_MEAN]) / WM_SCALE < mean / 2
    assert pool.watermark < heavy // 2, (pool.watermark, heavy)
    for _ in range(40):
        drv.step(1)
    assert pool.watermark <= 2 * light, (pool.watermark, light)
    assert pool.inflight <= max(pool.watermark, drv.in_use() + pool.refill)

    # Exactly what was counted went to the allocator; nothing else left the pool.
    st = pool.stats()
    assert drv.released == st["recycle_hard_limit"] > 0
    assert st["release_cnt"] == st["recycle_hard_limit"]
    assert st["recycle_ring_full"] == st["recycle_released_refcnt"] == 0
    assert pm.free_count == pm.npages - st["inflight"]
    for ids in drv.out:
        pool.recycle_direct(ids)
    drv.out.clear()
    a = pagepool.audit(pm, strict=True)
    assert a.ok, a.problems


def test_estimator_is_rfc6298(page_memory) -> None:
    """The first sample sets mean = u and dev = u / 2; each next one moves dev by a quarter of the
    error's size and mean by an eighth of the error (integers, in 1/WM_SCALE pages)."""
    pm = page_memory(npages=1024, page_size=256, ncpus=1, params=PARAMS)
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(48, PageState.XDP)  # slow path three times, one sample: u = 48
    assert samples(pool) == 1
    assert int(pool.ctl[P_U_MEAN]) == 48 * WM_SCALE and int(pool.ctl[P_U_DEV]) == 24 * WM_SCALE
    assert pool.watermark == 48 + 4 * 24 + pool.refill
    pool.recycle_direct(ids[:16])  # one sample: u = 32, error -16 pages
    dev = 24 * WM_SCALE + (16 * WM_SCALE - 24 * WM_SCALE) // 4
    mean = 48 * WM_SCALE - 16 * WM_SCALE // 8
    assert (int(pool.ctl[P_U_MEAN]), int(pool.ctl[P_U_DEV])) == (mean, dev)
    assert pool.watermark == -(-(mean + 4 * dev) // WM_SCALE) + pool.refill
    pool.recycle_direct(ids[16:])
    assert pagepool.audit(pm, strict=True).ok


def test_returns_past_the_watermark_go_to_the_allocator(page_memory) -> None:
    """Of n returning pages the pool keeps max(W - inflight + n, refill - kept); the rest are released and
    counted, through the cache and through another CPU's ring put alike."""
    pm = page_memory(npages=1024, page_size=256, ncpus=2, params=PARAMS)
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(16, PageState.XDP)
    more = pool.alloc(200, PageState.XDP)  # one sample per call that reached the slow path
    # Pin a small watermark (as a light load's would be) to check the rule exactly.
    pool.ctl[P_WATERMARK] = 150
    inflight = pool.inflight
    before = pool.stats()
    # Another CPU returns 120 pages through the ring: 150 - inflight + 120 of them may stay.
    allowed = max(150 - inflight + 120, pool.refill - kept(pool))
    assert allowed == 150 - inflight + 120 > 0
    assert pool_of(pm, 0).put(more[:120]) == 120
    st = pool.stats()
    assert st["recycle_ring"] - before["recycle_ring"] == allowed
    assert st["recycle_hard_limit"] - before["recycle_hard_limit"] == 120 - allowed
    assert st["release_cnt"] - before["release_cnt"] == 120 - allowed
    assert st["inflight"] == 150
    assert int(np.count_nonzero(pm.state[more[:120]] == PageState.FREE)) == 120 - allowed
    # Past the limit (W below what the pool holds), a further return keeps nothing: the floor does not
    # apply, the pool keeps more than one refill.
    assert kept(pool) > pool.refill
    pool.ctl[P_WATERMARK] = st["inflight"] - 10
    n0 = pool.stats()["recycle_hard_limit"]
    pool_of(pm, 0).put(more[120:130])
    assert pool.stats()["recycle_hard_limit"] - n0 == 10
    for batch in (ids, more[130:]):
        pool.recycle_direct(batch)
    a = pagepool.audit(pm, strict=True)
    assert a.ok, a.problems
    st = pool.stats()
    assert st["hold_cnt"] - st["release_cnt"] == st["cached"] + st["ring"]


def test_the_floor_keeps_one_refill(page_memory) -> None:
    """However low the watermark, a pool keeps one refill's worth of the pages coming back."""
    pm = page_memory(npages=512, page_size=256, ncpus=1, params=PARAMS)
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(64, PageState.XDP)
    pool.ctl[P_WATERMARK] = 1
    pool_of(pm, 0).put(ids[:40])
    assert kept(pool) == pool.refill
    assert pool.stats()["recycle_hard_limit"] == 40 - pool.refill
    pool.recycle_direct(ids[40:])
    assert pagepool.audit(pm, strict=True).ok


@pytest.mark.parametrize(
    ("params", "message"),
    [(PoolParams(policy="lifo"), "policy must be one of fixed, adaptive"),
     (PoolParams(policy="adaptive", recycle_limit=10), "recycle_limit must be 0")],
)
def test_bad_policies_refused(params: PoolParams, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        params.normalised()


def test_fixed_pools_show_no_watermark(page_memory) -> None:
    pm = page_memory()
    pool = pool_of(pm, 0, owner=True)
    ids = pool.alloc(100, PageState.XDP)
    pool.recycle_direct(ids)
    assert "watermark" not in pool.stats() and pool.watermark == 0 and samples(pool) == 0
    assert attached_policy(pm) == "fixed"
