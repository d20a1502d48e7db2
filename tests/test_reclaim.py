"""Dead-worker reclaim (`emu.mem.reclaim`) on a bare PageMemory.

No process runs here: the pages a dead CPU or device would have stranded are put in place by hand (a
pool allocates them in the state and with the holder the worker would have written), each reclaim is
called as `Run` calls it, and the page counts are checked exactly.  The end-to-end paths (a worker
SIGKILLed mid-run) are in tests/test_faults.py.
"""

from __future__ import annotations

import numpy as np

from emu.mem import pagepool, reclaim
from emu.mem.page import PageState
from emu.mem.pagepool import P_CACHE_COUNT, P_RING_HEAD, P_RING_TAIL, pool_of
from emu.net.protocol import device_code

S = PageState


def out(pool, n: int, state: PageState, holder: int, length: int = 0) -> np.ndarray:
    """`n` pages of `pool`, in `state`, held by `holder`, each carrying `length` bytes."""
    ids = pool.alloc(n, state, holder=holder)
    assert len(ids) == n
    pool.pm.len[ids] = length
    return ids


def states(pm, ids: np.ndarray) -> set[int]:
    return set(pm.state[ids].tolist())


def test_reclaim_cpu_returns_what_it_held_and_its_dropped_buffers_and_destroys_its_pool(page_memory) -> None:
    pm = page_memory(npages=256, ncpus=2)
    pool0, pool1 = pool_of(pm, 0, owner=True), pool_of(pm, 1, owner=True)
    rx = out(pool1, 6, S.XDP, holder=1, length=64)  # received, verdict pending: 6 packets
    idle = out(pool1, 4, S.XDP, holder=1)  # no frame in them
    foreign = out(pool0, 4, S.TX_QUEUED, holder=1, length=64)  # CPU 0's pages, queued by CPU 1: 4 packets
    dropped = out(pool1, 5, S.RX_POSTED, holder=device_code(0))  # its buffers, dropped by the device
    other = out(pool0, 3, S.RX_POSTED, holder=device_code(0))  # CPU 0's posted buffers: not touched
    wire = out(pool1, 2, S.TX_INFLIGHT, holder=device_code(1))  # on the wire: comes back later

    got = reclaim.reclaim_cpu(pm, 1)

    assert got == reclaim.Reclaimed(pages=6 + 4 + 4 + 5, packets=6 + 4)
    # CPU 1's pages went to its ring, which was then destroyed with its cache: all in the allocator.
    assert states(pm, np.concatenate((rx, idle, dropped))) == {S.FREE}
    assert states(pm, foreign) == {S.RING}  # back in live CPU 0's ring
    assert states(pm, other) == {S.RX_POSTED} and states(pm, wire) == {S.TX_INFLIGHT}
    assert pool1.cache_count == 0 and pool1.ring_count == 0
    assert pool1.inflight == 2  # the two on the wire
    assert pool0.ring_count == 4


def test_reclaim_device_returns_what_it_held_and_counts_only_queued_frames(page_memory) -> None:
    pm = page_memory(npages=256, ncpus=2)
    pool0 = pool_of(pm, 0, owner=True)
    dead = device_code(1)
    posted = out(pool0, 8, S.RX_POSTED, holder=dead)
    queued = out(pool0, 5, S.TX_QUEUED, holder=dead, length=100)  # lost with the device
    empty = out(pool0, 2, S.TX_QUEUED, holder=dead)
    inflight = out(pool0, 3, S.TX_INFLIGHT, holder=dead, length=100)  # on the wire: the far end counts it
    live = out(pool0, 4, S.RX_POSTED, holder=device_code(0))

    got = reclaim.reclaim_device(pm, dead)

    assert got == reclaim.Reclaimed(pages=8 + 5 + 2 + 3, packets=5)
    assert states(pm, np.concatenate((posted, queued, empty, inflight))) == {S.RING}
    assert states(pm, live) == {S.RX_POSTED}
    assert pool0.ring_count == 18
    assert reclaim.reclaim_device(pm, dead) == reclaim.Reclaimed()  # nothing left to take


def test_reclaim_stranded_returns_every_page_out_and_drains_every_pool(page_memory) -> None:
    pm = page_memory(npages=512, ncpus=2)
    pool0, pool1 = pool_of(pm, 0, owner=True), pool_of(pm, 1, owner=True)
    out(pool0, 7, S.XDP, holder=0, length=60)
    out(pool0, 3, S.SKB, holder=1, length=60)
    out(pool1, 9, S.TX_INFLIGHT, holder=device_code(0), length=60)  # not carrying: on the wire
    out(pool1, 11, S.RX_POSTED, holder=device_code(0))  # empty buffers
    out(pool1, 2, S.RX_POSTED, holder=device_code(0), length=60)  # DMAed, never completed
    pool0.put(out(pool0, 5, S.XDP, holder=0), errors="count")  # into CPU 0's ring

    got = reclaim.reclaim_stranded(pm)

    assert got == reclaim.Reclaimed(pages=7 + 3 + 9 + 11 + 2, packets=7 + 3 + 2)
    audit = pagepool.audit(pm, strict=True)
    assert audit.ok, audit.problems
    assert audit.by_state["free"] == 512
    assert pool0.inflight == 0 and pool1.inflight == 0


def test_free_torn_frees_pooled_pages_in_no_pool(page_memory) -> None:
    """A kill between a cache's count and its pages' states (or a ring's head and its pages') leaves
    pages marked CACHE or RING in no structure: found once every pool is empty, and freed."""
    pm = page_memory(npages=512, ncpus=2)
    pool1 = pool_of(pm, 1, owner=True)
    taken = out(pool1, 100, S.RX_POSTED, holder=device_code(0))  # two refills of 64: 28 left cached
    assert pool1.cache_count == 28
    pm.pool_ctl[1][P_CACHE_COUNT] = 0  # the count went down; the states never changed
    pool_of(pm, 1).put(taken[:10], errors="count")  # ten into the ring...
    pm.pool_ctl[1][P_RING_HEAD] = pm.pool_ctl[1][P_RING_TAIL]  # ...and the consumer moved past them
    assert any("in no structure" in p for p in pagepool.audit(pm, strict=True).problems)

    assert reclaim.reclaim_stranded(pm) == reclaim.Reclaimed(pages=90, packets=0)
    assert reclaim.free_torn(pm) == 28 + 10

    audit = pagepool.audit(pm, strict=True)
    assert audit.ok, audit.problems
    assert audit.by_state["free"] == 512 and pool1.inflight == 0
    assert reclaim.free_torn(pm) == 0


def test_wire_losses_from_both_ends_of_a_dead_devices_cables() -> None:
    rows = {
        "h1/eth0": {"rx_packets": 100, "rx_dropped": 5, "rx_completed": 90, "tx_packets": 50, "tx_dropped": 4},
        "gen0": {"generated": 120, "link_down": 0, "link_lost": 2, "received": 40},
        "h1/eth1": {"rx_packets": 30, "rx_dropped": 0, "rx_completed": 30, "tx_packets": 0, "tx_dropped": 0},
        "h1/eth2": {"rx_packets": 25, "tx_packets": 35, "tx_dropped": 1, "link_lost": 3},
    }
    read = rows.__getitem__
    # 5 taken but never completed; 118 sent, 100 taken: 18; 46 put on the wire, 40 arrived: 6.
    assert reclaim.wire_losses([reclaim.DeadLink("h1/eth0", "gen0", "traffic")], read, {"h1/eth0"}) == 29
    # A dead peer says nothing more: only what the device itself took and did not complete.
    assert reclaim.wire_losses([reclaim.DeadLink("h1/eth0", "gen0", "traffic")], read, {"h1/eth0", "gen0"}) == 5
    # A device peer: 31 sent, 30 taken: 1; nothing sent back lost (0 sent).
    assert reclaim.wire_losses([reclaim.DeadLink("h1/eth1", "h1/eth2", "device")], read, {"h1/eth1"}) == 1
    assert reclaim.wire_losses([reclaim.DeadLink("h1/eth1")], read, {"h1/eth1"}) == 0
