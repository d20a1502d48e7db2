"""The page pool across real processes (multiprocessing, spawn context).

An owner process allocates and recycles in a loop while other processes return its pages through its
ring, as CPUs returning TX-completed or redirected pages would.  Every wait has a generous deadline (the
test machine may be a loaded 2-core box) and nothing is asserted about timing.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time

import numpy as np
import pytest

from emu.mem import pagepool
from emu.mem.page import PageError, PageState
from emu.mem.pagemem import PageMemory
from emu.mem.pagepool import PoolOwnershipError, PoolParams, pool_of

pytestmark = pytest.mark.slow

CTX = mp.get_context("spawn")
DEADLINE = 300.0  # seconds for a whole scenario; only a hang ever gets near it
NRETURNERS = 3


# --------------------------------------------------------------------------------------------------
# child process bodies (module level: the spawn context pickles them by reference)


def _owner_main(prefix: str, outs: list, results, total: int, per_round: int) -> None:
    pm = PageMemory.attach(prefix)
    try:
        pool = pool_of(pm, 0, owner=True)
        allocated = direct = sent = 0
        r = 0
        while allocated < total:
            deadline = time.monotonic() + DEADLINE / 2
            want = min(per_round, total - allocated)
            ids = pool.alloc(want)  # fewer (even none) while most pages are out with the returners
            while len(ids) == 0:
                if time.monotonic() > deadline:
                    raise TimeoutError("no page came back through the ring")
                time.sleep(0.001)
                ids = pool.alloc(want)
            allocated += len(ids)
            k = len(ids) // 4  # a quarter dropped (XDP_DROP: recycled directly), the rest sent away
            pool.recycle_direct(ids[:k])
            direct += k
            rest = ids[k:]
            if len(rest):
                outs[r % len(outs)].put((rest.astype(np.int32).tobytes(), pm.gen[rest].tobytes()))
                sent += len(rest)
            r += 1
        for q in outs:
            q.put(None)
        results.put(("owner", {"allocated": allocated, "direct": direct, "sent": sent}))
    finally:
        pm.close()


def _returner_main(prefix: str, inbox, results, idx: int) -> None:
    pm = PageMemory.attach(prefix)
    try:
        pool = pool_of(pm, 0)  # non-owner handle: returns go through the ring under its lock
        returned = refused = 0
        while True:
            msg = inbox.get(timeout=DEADLINE)
            if msg is None:
                break
            ids = np.frombuffer(msg[0], dtype=np.int32)
            gens = np.frombuffer(msg[1], dtype=np.uint32)
            try:
                returned += pool.put(ids, gens)
            except PageError:
                refused += 1
        results.put(("returner", idx, returned, refused))
    finally:
        pm.close()


def _racer_main(prefix: str, blob: bytes, go, results, idx: int) -> None:
    """Return the same pages as another racer, at the same moment: exactly one of them may succeed."""
    pm = PageMemory.attach(prefix)
    try:
        ids = np.frombuffer(blob, dtype=np.int32)
        pool = pool_of(pm, 0)
        go.wait(DEADLINE)
        accepted = 0
        for i in range(0, len(ids), 8):
            accepted += pool.put(ids[i : i + 8], errors="count")
        results.put(("racer", idx, accepted))
    finally:
        pm.close()


def _claimer_main(prefix: str, claimed, release) -> None:
    pm = PageMemory.attach(prefix)
    try:
        pool = pool_of(pm, 1, owner=True)
        pool.alloc(3)
        claimed.set()
        release.wait(DEADLINE)
    finally:
        pm.close()


# --------------------------------------------------------------------------------------------------
# helpers


class Procs:
    """Started processes, always joined (or ended) at exit."""

    def __init__(self) -> None:
        self.procs: list = []

    def start(self, target, *args) -> None:
        p = CTX.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)

    def join_all(self) -> None:
        deadline = time.monotonic() + DEADLINE
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in self.procs if p.is_alive()]
        assert not alive, f"processes still running: {alive}"
        assert [p.exitcode for p in self.procs] == [0] * len(self.procs)

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
            if p.is_alive():
                p.kill()
                p.join(10)
        for p in self.procs:
            p.close()


def _collect(results, n: int) -> list[tuple]:
    out = []
    deadline = time.monotonic() + DEADLINE
    while len(out) < n:
        try:
            out.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            pytest.fail(f"only {len(out)} of {n} results within {DEADLINE:.0f} s: {out}")
    return out


def _finish_queues(*queues) -> None:
    for q in queues:
        q.close()
        q.join_thread()


# --------------------------------------------------------------------------------------------------
# tests


def test_owner_and_three_returners(page_memory) -> None:
    pm = page_memory(npages=1024, page_size=256, ncpus=1)
    total, per_round = 9600, 32
    results = CTX.Queue()
    inboxes = [CTX.Queue() for _ in range(NRETURNERS)]
    with Procs() as procs:
        for i, q in enumerate(inboxes):
            procs.start(_returner_main, pm.prefix, q, results, i)
        procs.start(_owner_main, pm.prefix, inboxes, results, total, per_round)
        got = _collect(results, 1 + NRETURNERS)
        procs.join_all()
    _finish_queues(results, *inboxes)
    assert mp.active_children() == []

    owner = next(r[1] for r in got if r[0] == "owner")
    returners = [r for r in got if r[0] == "returner"]
    returned = sum(r[2] for r in returners)
    assert sum(r[3] for r in returners) == 0, "a returner's put was refused"
    assert owner["allocated"] == total  # more than the host has: pages were reused
    assert returned == owner["sent"] == owner["allocated"] - owner["direct"]

    audit = pagepool.audit(pm, strict=True)
    assert audit.ok, audit.problems
    s = pool_of(pm, 0).stats()
    # Every returned page went through the ring (or, with the ring full, to the page allocator), plus the
    # owner's direct recycles that found the cache full.
    assert s["recycle_ring"] + s["recycle_ring_full"] == returned + s["recycle_cache_full"]
    assert s["recycle_cached"] + s["recycle_cache_full"] == owner["direct"]
    assert s["alloc_fast"] + s["alloc_refill"] + s["alloc_slow"] == owner["allocated"]
    assert s["alloc_refill"] > 0  # the allocator alone could not have served 9600 pages
    assert s["release_cnt"] == s["recycle_ring_full"]
    for name in ("double_free", "stale_generation", "bad_page", "foreign_cache_return", "recycle_hard_limit"):
        assert s[name] == 0, name
    # Everything came home: the pool keeps what the page allocator does not.
    assert s["inflight"] == s["cached"] + s["ring"] == pm.npages - pm.free_count
    assert audit.by_state["allocated"] == 0
    assert audit.by_state["cache"] + audit.by_state["ring"] + audit.by_state["free"] == pm.npages

    # The owner is gone: its claim lapses, and a new owner can drain the pool completely.
    pool = pool_of(pm, 0, owner=True)
    assert pool.drain() == 0
    assert pm.free_count == pm.npages
    assert pagepool.audit(pm, strict=True).ok


def test_concurrent_double_return_accepted_once(page_memory) -> None:
    pm = page_memory(npages=512, ncpus=1, params=PoolParams(pool_size=1024))
    owner = pool_of(pm, 0, owner=True)
    ids = owner.alloc(200)
    results, go = CTX.Queue(), CTX.Event()
    with Procs() as procs:
        for i in range(2):
            procs.start(_racer_main, pm.prefix, ids.astype(np.int32).tobytes(), go, results, i)
        go.set()
        got = _collect(results, 2)
        procs.join_all()
    _finish_queues(results)
    assert sum(r[2] for r in got) == 200
    s = owner.stats()
    assert s["recycle_ring"] == 200 and s["double_free"] == 200
    assert {PageState(int(x)) for x in pm.state[ids]} == {PageState.RING}
    audit = pagepool.audit(pm, strict=True)
    assert audit.ok, audit.problems


def test_live_owner_in_other_process_refused(page_memory) -> None:
    pm = page_memory(ncpus=2)
    claimed, release = CTX.Event(), CTX.Event()
    with Procs() as procs:
        procs.start(_claimer_main, pm.prefix, claimed, release)
        assert claimed.wait(DEADLINE), "child never claimed the pool"
        with pytest.raises(PoolOwnershipError):
            pool_of(pm, 1, owner=True)
        pool_of(pm, 0, owner=True)  # another CPU is free
        release.set()
        procs.join_all()
    # The owner died with 3 pages out; its claim lapses and the pool is usable (and auditable) again.
    pool = pool_of(pm, 1, owner=True)
    assert pool.inflight == 64 and pool.cache_count == 61
    assert len(pool.alloc(61)) == 61
    assert pagepool.audit(pm, strict=True).ok
