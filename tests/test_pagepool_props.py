"""Stateful property test: random interleavings of page-pool operations on one host, 2-3 CPU pools.

One process owns every CPU's pool (allowed: they are different CPUs) and also uses non-owner handles
for ring returns.  The model is the set of pages the test holds (with their generation and owning CPU);
after every step the page table, the structures and the counters must agree with it.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from emu.mem import pagepool
from emu.mem.page import IN_USE, PageError, PageState
from emu.mem.pagemem import PageMemory
from emu.mem.pagepool import C, ForeignRecycleError, PoolParams, page_get, pool_of, put_page, return_pages
from emu.mem.shm import new_run_prefix, unlink_prefix

NPAGES = 96
ERROR_COUNTERS = ("double_free", "stale_generation", "bad_page", "foreign_cache_return")


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pm: PageMemory | None = None
        self.prefix = new_run_prefix()

    @initialize(
        ncpus=st.integers(2, 3),
        cache_size=st.sampled_from([4, 8, 16]),
        refill_frac=st.sampled_from([1, 2, 4]),
        pool_size=st.sampled_from([4, 8, 32]),
        limit=st.sampled_from([0, 0, 6, 20]),
    )
    def setup(self, ncpus: int, cache_size: int, refill_frac: int, pool_size: int, limit: int) -> None:
        params = PoolParams(cache_size, max(1, cache_size // refill_frac), pool_size, limit)
        self.pm = PageMemory.create(self.prefix, NPAGES, 64, ncpus, params)
        self.owners = [pool_of(self.pm, c, owner=True) for c in range(ncpus)]
        self.others = [pool_of(self.pm, c) for c in range(ncpus)]
        self.held: dict[int, tuple[int, int]] = {}  # page -> (gen, owning cpu)
        self.allocated = [0] * ncpus  # pages each pool handed out
        self.returned = [0] * ncpus  # pages given back to each pool (whatever it then did with them)
        self.drained = [0] * ncpus  # pages each pool's drain gave to the page allocator
        for cpu in range(ncpus):  # start with pages out, so that every rule has something to work on
            self._alloc(cpu, 8)

    def _alloc(self, cpu: int, n: int) -> None:
        pool = self.owners[cpu]
        before = pool.stats()
        ids = pool.alloc(n).tolist()
        assert len(ids) <= n and len(set(ids)) == len(ids)
        for p in ids:
            assert p not in self.held
            assert self.pm.state[p] == PageState.ALLOCATED and self.pm.owner[p] == cpu
            self.held[p] = (int(self.pm.gen[p]), cpu)
        after = pool.stats()
        served = sum(after[k] - before[k] for k in ("alloc_fast", "alloc_refill", "alloc_slow"))
        assert served == len(ids)
        if len(ids) < n:  # only when nothing is left anywhere this pool could take from
            assert after["alloc_failed"] == before["alloc_failed"] + 1
            assert self.pm.free_count == 0 and pool.cache_count == 0 and pool.ring_count == 0
        self.allocated[cpu] += len(ids)

    def teardown(self) -> None:
        if self.pm is not None:
            self.pm.unlink()
            self.pm.close()
        unlink_prefix(self.prefix)

    # -- helpers -----------------------------------------------------------------------------------

    @property
    def ncpus(self) -> int:
        return self.pm.ncpus

    def _held_of(self, cpu: int) -> list[int]:
        return sorted(p for p, (_, c) in self.held.items() if c == cpu)

    def _gens(self, ids: list[int]) -> np.ndarray:
        return np.array([self.held[p][0] for p in ids], dtype=np.uint32)

    def _pick(self, data, pages: list[int]) -> list[int]:
        if not pages:
            return []
        return data.draw(st.lists(st.sampled_from(pages), unique=True, max_size=24), label="pages")

    def _snapshot(self) -> tuple:
        pm = self.pm
        cnt = pm.pool_counters.copy()
        cnt[:, [C[name] for name in ERROR_COUNTERS]] = 0
        return (
            pm.state.tobytes(),
            pm.owner.tobytes(),
            pm.gen.tobytes(),
            pm.refcnt.tobytes(),
            pm.header.tobytes(),
            pm.free_stack[: pm.free_count].tobytes(),
            pm.pool_ctl.tobytes(),
            pm.caches.tobytes(),
            pm.rings.tobytes(),
            cnt.tobytes(),
        )

    def _returned(self, ids: list[int]) -> None:
        for p in ids:
            self.returned[self.held.pop(p)[1]] += 1

    # -- rules -------------------------------------------------------------------------------------

    @rule(data=st.data(), n=st.integers(0, 40))
    def alloc(self, data, n: int) -> None:
        self._alloc(data.draw(st.integers(0, self.ncpus - 1), label="cpu"), n)

    @rule(data=st.data(), with_gens=st.booleans())
    def recycle_direct(self, data, with_gens: bool) -> None:
        cpu = data.draw(st.integers(0, self.ncpus - 1), label="cpu")
        ids = self._pick(data, self._held_of(cpu))
        gens = self._gens(ids) if with_gens else None
        assert self.owners[cpu].recycle_direct(np.array(ids, dtype=np.int32), gens) == len(ids)
        self._returned(ids)

    @rule(data=st.data())
    def put_from_elsewhere(self, data) -> None:
        cpu = data.draw(st.integers(0, self.ncpus - 1), label="cpu")
        ids = self._pick(data, self._held_of(cpu))
        assert self.others[cpu].put(np.array(ids, dtype=np.int64), self._gens(ids)) == len(ids)
        self._returned(ids)

    @rule(data=st.data(), local=st.integers(-1, 2))
    def return_pages(self, data, local: int) -> None:
        ids = self._pick(data, sorted(self.held))
        pool = self.owners[local] if 0 <= local < self.ncpus else None
        assert return_pages(self.pm, pool, np.array(ids, dtype=np.int64), self._gens(ids)) == len(ids)
        self._returned(ids)

    @rule(data=st.data(), direct=st.booleans())
    def double_free(self, data, direct: bool) -> None:
        """A page not held by us (free, cached or in a ring) returned again: refused, nothing changes."""
        free = sorted(set(range(self.pm.npages)) - set(self.held))
        if not free:
            return
        page = data.draw(st.sampled_from(free), label="page")
        cpu = data.draw(st.integers(0, self.ncpus - 1), label="cpu")
        before = self._snapshot()
        target = self.owners[cpu].recycle_direct if direct else self.others[cpu].put
        with pytest.raises(PageError, match="double free"):
            target(np.array([page]))
        assert self._snapshot() == before

    @rule(data=st.data())
    def duplicate_in_batch(self, data) -> None:
        """A held page twice in one batch: one copy goes home, the other is refused as a double free."""
        held = sorted(self.held)
        if not held:
            return
        page = data.draw(st.sampled_from(held), label="page")
        gen, cpu = self.held[page]
        with pytest.raises(PageError, match="double free"):
            self.others[cpu].put(np.array([page, page]), np.array([gen, gen], dtype=np.uint32))
        self._returned([page])

    @rule(data=st.data(), direct=st.booleans())
    def stale_generation(self, data, direct: bool) -> None:
        held = sorted(self.held)
        if not held:
            return
        page = data.draw(st.sampled_from(held), label="page")
        gen, cpu = self.held[page]
        before = self._snapshot()
        target = self.owners[cpu].recycle_direct if direct else self.others[cpu].put
        with pytest.raises(PageError, match="stale"):
            target(np.array([page]), np.array([gen - 1], dtype=np.uint32))
        assert self._snapshot() == before

    @rule(data=st.data())
    def wrong_pool(self, data) -> None:
        held = sorted(self.held)
        if not held:
            return
        page = data.draw(st.sampled_from(held), label="page")
        gen, cpu = self.held[page]
        wrong = (cpu + 1) % self.ncpus
        before = self._snapshot()
        with pytest.raises(PageError, match="another pool"):
            self.others[wrong].put(np.array([page]), np.array([gen], dtype=np.uint32))
        assert self._snapshot() == before

    @rule(data=st.data())
    def foreign_direct(self, data) -> None:
        held = sorted(self.held)
        if not held:
            return
        ids = self._pick(data, held)
        cpu = data.draw(st.integers(0, self.ncpus - 1), label="cpu")
        before = self._snapshot()
        with pytest.raises(ForeignRecycleError):
            self.others[cpu].recycle_direct(np.array(ids, dtype=np.int64))
        assert self._snapshot() == before

    @rule(bad=st.sampled_from([-5, -1, NPAGES, NPAGES + 7, 2**33]))
    def out_of_range(self, bad: int) -> None:
        before = self._snapshot()
        with pytest.raises(PageError, match="out of range"):
            self.others[0].put(np.array([bad], dtype=np.int64))
        assert self._snapshot() == before

    @rule(data=st.data())
    def shared_page_released(self, data) -> None:
        """get_page + return + put_page: the pool releases the page, the last put frees it."""
        held = sorted(self.held)
        if not held:
            return
        page = data.draw(st.sampled_from(held), label="page")
        gen, cpu = self.held[page]
        pm = self.pm
        page_get(pm, np.array([page]))
        released = self.owners[cpu].stats()["recycle_released_refcnt"]
        return_pages(pm, self.owners[cpu], np.array([page]), np.array([gen], dtype=np.uint32))
        assert self.owners[cpu].stats()["recycle_released_refcnt"] == released + 1
        assert pm.owner[page] == -1 and pm.state[page] == PageState.ALLOCATED
        self._returned([page])
        self.check_audit()
        put_page(pm, np.array([page]))
        assert pm.state[page] == PageState.FREE

    @rule(data=st.data())
    def drain(self, data) -> None:
        cpu = data.draw(st.integers(0, self.ncpus - 1), label="cpu")
        self.drained[cpu] += self.owners[cpu].cache_count + self.owners[cpu].ring_count
        assert self.owners[cpu].drain() == len(self._held_of(cpu))
        assert self.owners[cpu].cache_count == 0 and self.owners[cpu].ring_count == 0

    # -- invariants --------------------------------------------------------------------------------

    @invariant()
    def check_audit(self) -> None:
        if self.pm is None:
            return
        audit = pagepool.audit(self.pm, strict=True)
        assert audit.ok, audit.problems

    @invariant()
    def each_page_in_exactly_one_place(self) -> None:
        if self.pm is None:
            return
        pm = self.pm
        where = np.zeros(pm.npages, dtype=np.int64)
        np.add.at(where, pm.free_stack[: pm.free_count], 1)
        for pool in self.owners:
            np.add.at(where, pool.cache[: pool.cache_count], 1)
            head = int(pool.ctl[1])
            ring = [int(pool.ring[(head + i) % pool.ring_size]) for i in range(pool.ring_count)]
            np.add.at(where, np.array(ring, dtype=np.int64), 1)
        np.add.at(where, np.array(sorted(self.held), dtype=np.int64), 1)
        assert (where == 1).all(), np.flatnonzero(where != 1)

    @invariant()
    def held_pages_in_use(self) -> None:
        if self.pm is None:
            return
        for page, (gen, cpu) in self.held.items():
            assert IN_USE[self.pm.state[page]]
            assert int(self.pm.gen[page]) == gen and int(self.pm.owner[page]) == cpu
            assert int(self.pm.refcnt[page]) == 1

    @invariant()
    def counters_add_up(self) -> None:
        if self.pm is None:
            return
        pm = self.pm
        for cpu, pool in enumerate(self.owners):
            s = pool.stats()
            owned = int(np.count_nonzero(pm.owner == cpu))
            assert s["hold_cnt"] - s["release_cnt"] == owned == pool.inflight
            assert owned == len(self._held_of(cpu)) + pool.cache_count + pool.ring_count
            assert s["alloc_fast"] + s["alloc_refill"] + s["alloc_slow"] == self.allocated[cpu]
            assert s["hold_cnt"] == 0 or s["alloc_slow"] > 0
            assert s["alloc_empty"] >= s["alloc_slow"]  # every slow refill follows an empty ring
            assert s["hold_cnt"] <= s["alloc_slow"] * pm.params.refill
            # Every page given back was cached, ringed or released, exactly once.
            placed = (
                "recycle_cached",
                "recycle_ring",
                "recycle_ring_full",
                "recycle_hard_limit",
                "recycle_released_refcnt",
            )
            assert sum(s[k] for k in placed) == self.returned[cpu]
            assert s["recycle_cache_full"] <= s["recycle_ring"] + s["recycle_ring_full"] + s["recycle_hard_limit"]
            released = ("recycle_ring_full", "recycle_hard_limit", "recycle_released_refcnt")
            assert s["release_cnt"] == sum(s[k] for k in released) + self.drained[cpu]
            if not pm.params.recycle_limit:
                assert s["recycle_hard_limit"] == 0
        assert pm.free_count + sum(o.cache_count + o.ring_count for o in self.owners) + len(self.held) == pm.npages


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
