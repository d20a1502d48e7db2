"""The per-CPU page pool: the kernel's ``net/core/page_pool.c`` over the host's shared page memory.

The promise of the project, kept here and nowhere else: every page a device receives into comes from the
page pool of a CPU; it goes back only to that CPU's pool (directly from that CPU, through the pool's ring
from any other), and only once its path is done with it (a transmitted page only after its TX
completion); past the pool's hard limit, or when its ring is full, it goes back to the page allocator;
each pool accounts for every page it took and released (``hold_cnt`` - ``release_cnt``, and a counter
for every refusal); and `audit` proves from the page table alone that every page is in exactly one place.

This module therefore holds the pool's parameters (`PoolParams`), its counters (`POOL_COUNTERS`, indexed
by `C`) and control words (`P_*`), its share of the shared-memory segment (`pool_regions`, which
`emu.mem.pagemem` lays out), every change of a page's state, the one descriptor check and the audit; what
a page and a descriptor are is `emu.mem.page`'s.

Structure and rules follow the kernel (``net/core/page_pool.c``, ``include/net/page_pool/types.h``):

* an **alloc cache** (a LIFO stack of 128 entries, refilled 64 at a time) that only the owning CPU
  touches, without a lock;
* a **recycle ring** (``ptr_ring`` of `pool_size` entries, 1024 by default, at most 16384) for pages
  returned from any other context: producers take the ring's lock, the owner consumes without one;
* a **slow path** that bulk-allocates `refill` pages from the page allocator (``alloc_pages_bulk``)
  when both are empty;
* the kernel's statistics under the kernel's names (`alloc_fast` ... `recycle_released_refcnt`), plus
  ``hold_cnt``/``release_cnt`` whose difference is the pool's in-flight count.

Where the kernel *trusts* its drivers, the emulator *enforces*: a direct recycle into the cache from a
process that does not own the pool is refused (`ForeignRecycleError`) and counted as
`foreign_cache_return`; a double free, a stale generation or an out-of-range page id is refused, counted
and never reaches a structure.  Refused pages stay with the caller, so nothing is lost.

`recycle_limit` is a hard limit on the pages a pool keeps for recycling, an emulator knob the kernel's
pool does not have (its ring size is the only bound): once the cache and ring together keep that many
pages, returned pages go back to the page allocator (`recycle_hard_limit`).

The recycling policy (`PoolParams.policy`, ``hosts.<h>.pool.policy``) decides how many returned pages
a pool keeps:

* ``fixed`` (the default): the ring of `pool_size` and, when set, the hard limit `recycle_limit` above,
  the knob Alexei proposed in the discussion this project comes from.
* ``adaptive``: a high watermark ``W`` derived at run time from steady-state measurements of the pages in
  flight, as Jesper proposed ("dynamically determined by the same method proposed for determining the
  steady-state criteria"), so that there is no knob to set (``recycle_limit`` must be 0).

The adaptive watermark.  The measured quantity is ``u`` = ``hold_cnt - release_cnt - (cache + ring)``:
the pages of this pool out in use (posted for RX, in XDP, queued or in flight for TX, held by skbs).  It
leaves out the pages the pool keeps, so keeping more can never raise the watermark.  The owner takes one
sample per `alloc` call that reaches a ring refill or the slow path and one per direct-recycle batch
(`recycle_direct`), never per page, and runs Jacobson/Karels' estimator (RFC 6298's SRTT/RTTVAR, the
deviation first, from the previous mean)::

    dev  += (|u - mean| - dev) / 4        # beta  = 1/4: WM_DEV_SHIFT
    mean += (u - mean) / 8                # alpha = 1/8: WM_MEAN_SHIFT
    W     = ceil(mean + 4 * dev) + refill # K = 4: WM_K

(the first sample sets ``mean = u``, ``dev = u / 2``, as RFC 6298 starts RTTVAR), with one change,
Linux's (``tcp_rtt_estimator``, after Eifel): while the load falls (``u < mean``) the deviation grows
eight times slower.  Plain RFC 6298 reads a step down in load as a swing and widens the margin: in
test_pagepool_adaptive's load change (twelve batches in flight, then one) it took the watermark from 209
to 371 pages 16 samples after the step; with the change it only falls.  Why these: the mean of
the pages in use is the steady-state demand (Little's law: rate x time a page is out); the mean deviation
is a cheap, integer-only measure of how far the demand swings between samples, and ``mean + 4 dev`` covers
nearly every swing (as it covers the RTT's, without assuming a distribution); the extra `refill` is one
bulk of slack so that the pool can always serve the next refill from what it keeps.  The time constants,
8 samples for the mean and 4 for the deviation, make the watermark follow a change of load within about
8 refills (a step in the mean is 1 - (7/8)^8 = 66 % followed after 8 samples, 88 % after 16), while one
odd batch moves it by an eighth only; the deviation reacts faster, so a load that starts to swing (or
rise) widens the margin before the mean has moved.  A large step down is also seen as swing for a while,
so the watermark, four deviations above the mean, halves in about twice the mean's time (some 30 samples
in the test's step from 192 pages in use to 16).  The state lives in the pool's control words (`P_WATERMARK`,
`P_U_MEAN`, `P_U_DEV` in 1/`WM_SCALE` pages, `P_U_SAMPLES`) as integers (shifts, no floats), so any
process sees it; `stats` shows ``W`` as ``watermark`` (0: not measured yet, which means no limit).

The watermark bounds the pages the pool holds (in use and kept: ``hold_cnt - release_cnt``): of `n`
pages returning to the cache or the ring, at most ``max(W - inflight + n, refill - kept)`` are kept (the
second term: a pool always keeps one refill's worth, so a load that comes back finds pages), the rest go
back to the page allocator, counted in `recycle_hard_limit` as the fixed limit's are.  At each sample the
owner also trims its cache toward ``W`` (down to one refill kept at least), those pages counted the same
way.  Known gap: a CPU that goes idle takes no samples, so its pool keeps what it had until its next
batch, when it trims; a non-owner's `put` checks the watermark against counters the owner changes
concurrently, so it is exact only when the pool is quiet (as the fixed limit's check is).

Allocation semantics per page, as in ``page_pool_alloc_netmems``: served from the cache
(`alloc_fast`); else the cache is refilled from the ring and that refill serves the page
(`alloc_refill`; `alloc_empty` when the ring was empty); else the slow path bulk-allocates and serves
it (`alloc_slow`).  `alloc` hands out many pages at once with exactly those per-page counts.

Fragments (``PoolParams.frag_size``, the kernel's ``page_pool_alloc_frag``): a page serves
``page_size / frag_size`` buffers (`emu.mem.page` says how a buffer id names a page and an offset).
`alloc` then hands out buffers, taking whole pages as above (the counters count pages), each with one
reference per fragment (``pp_ref_count``, the page memory's ``frag_refs``); the fragments of the last
page it took that it did not hand out wait, FRAG, for the next call (``pool->frag_page``,
`P_FRAG_PAGE`).  A returned fragment is validated as any buffer, then drops its page's reference under
the pool's ring lock (standing for the kernel's atomic decrement) and waits, FRAG; only the put that
drops the last one moves the page on, by the rules and counters of a whole page.  `drain` drops the
references of the fragments it never handed out (``page_pool_drain_frag``).

XDP multi-buffer (a host whose page memory has ``H_MULTIBUF``; `PageMemory.multibuf`): a frame may be a head
buffer plus up to 17 fragment buffers listed in the head's shinfo (`emu.mem.page`), and is named by its head.
Every function below that moves a frame moves its fragments with it (`frame_bufs`), and every return takes
them home with their validated head, each to its own pool by the usual rule (`PagePool._with_frags`);
`xdp_frags_release` returns the fragments a program's ``bpf_xdp_adjust_tail`` released.  Without the
header word none of this runs (one attribute test).

This module owns a page's whole life: every change of its `state` (and of the `holder` that goes with
it) is made by one of the functions below, named as the kernel names that step, and every descriptor a
process is handed is checked by one function, `check_descs`.  Workers, devices and the coordinator's
reclaim call them; none writes the page table's state itself.

=================================  ==========================================  ==========================
function                           transition                                  called by
=================================  ==========================================  ==========================
`alloc_pages_bulk`                 FREE -> ALLOCATED (page allocator)          `PagePool` slow path
`PagePool.alloc`                   CACHE/RING -> `state` (``page_pool_alloc``)  its owner
`page_pool_dev_alloc_pages`        CACHE/RING -> RX_POSTED, headroom set       a CPU's RX refill
`xdp_prepare_buff`                 RX_POSTED -> XDP (holder: the CPU)          a CPU, RX completion
`xdp_build_skb`                    XDP -> SKB                                  a CPU, XDP_PASS
`xdp_xmit_queue`                   XDP -> TX_QUEUED (holder: the device)       a CPU, ``xdp_do_flush``
`tx_dma_start`                     TX_QUEUED -> TX_INFLIGHT                    a device, on the wire
`page_hand_over`                   holder only (state unchanged)               any sender of descriptors
`PagePool.recycle_direct`          in use -> CACHE (ring when full)            the owner
`PagePool.put`                     in use -> RING (``page_pool_put_page``)     any process
`return_pages`                     in use -> CACHE or RING, by owner           any process
`page_pool_return_page`            -> FREE (``page_pool_return_page``)         full ring, hard limit,
                                                                               drain, reclaim
`page_get` / `put_page`            refcount (``get_page`` / ``put_page``)       tests, shared pages
`PagePool._unref_frags`            fragment in use -> FRAG (pp_ref_count - 1)   every return, fragments
`xdp_frags_release`                fragments XDP -> CACHE or RING              a CPU, after adjust_tail
`xdpf_clone`                       FREE -> XDP, no pool (MEM_TYPE_PAGE_ORDER0)  a CPU, devmap broadcast
`xdp_return_frame_order0`          such a page -> FREE (``put_page``)          `return_pages`
`audit`                            none: checks conservation                   the coordinator, tests
=================================  ==========================================  ==========================

Concurrency (as ``page_pool.c`` states it for ``pool->alloc`` and ``pool->ring``):

* the alloc cache (``pool->alloc``) and the ring's consumer side are touched only by the process that
  owns the pool (``is_owner``: the CPU's worker, the kernel's NAPI context of the pool), so they take no
  lock; any other process returns pages through `put`, which takes the ring's producer lock (OFD lock
  ``1 + cpu``, the ``ptr_ring`` producer spinlock) and validates under it;
* the page allocator is taken under the allocator lock (OFD lock 0) from any process;
* a page out of its pool has exactly one `holder` (the CPU or device that has it), and only the holder
  changes its state, before it hands the page's descriptor on: the hand-off functions take no lock
  because no two processes hold a page at once, and the one that receives it checks the descriptor
  (`check_descs`) against the state the sender wrote.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from emu.errors import ResourceError
from emu.mem.page import (
    ALLOCATOR_LOCK,
    H_EXTRA_REFS,
    H_FREE_COUNT,
    H_FREE_LOW,
    H_ORDER0_ALLOC,
    H_ORDER0_FREE,
    HOME,
    IN_USE,
    NO_OWNER,
    ORDER0_OWNER,
    SI_FRAG0,
    SI_FRAGS_SIZE,
    PageError,
    PageState,
    shinfo_frags,
)
from emu.mem.shm import pid_alive
from emu.net.protocol import NO_HOLDER, XDP_PACKET_HEADROOM

if TYPE_CHECKING:
    from emu.mem.pagemem import PageMemory


@dataclass(frozen=True, slots=True)
class PoolParams:
    """Per-CPU page-pool sizes; the defaults are the kernel's."""

    cache_size: int = 128  # PP_ALLOC_CACHE_SIZE
    refill: int = 64  # PP_ALLOC_CACHE_REFILL
    pool_size: int = 1024  # ptr_ring size; 0 means 1024, at most 16384 (page_pool_init)
    recycle_limit: int = 0  # hard limit on recyclable pages kept (cache + ring); 0 = none
    policy: str = "fixed"  # `POOL_POLICIES`: "fixed" (recycle_limit) or "adaptive" (the watermark)
    # RX buffers are fragments of this many bytes (page_pool_alloc_frag); 0 = a whole page each
    # (page_pool_dev_alloc_pages).  Checked against page_size by `emu.mem.pagemem.PageMemory.create`.
    frag_size: int = 0

    def normalised(self) -> PoolParams:
        size = self.pool_size or 1024
        if not 1 <= size <= 16384:
            raise ValueError(f"pool_size must be 1..16384 (0 means 1024), not {self.pool_size}")
        if not 1 <= self.cache_size <= 65536:
            raise ValueError(f"cache_size must be 1..65536, not {self.cache_size}")
        if not 1 <= self.refill <= self.cache_size:
            raise ValueError(f"refill must be 1..cache_size ({self.cache_size}), not {self.refill}")
        if self.recycle_limit < 0:
            raise ValueError(f"recycle_limit must be >= 0, not {self.recycle_limit}")
        if self.policy not in POOL_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POOL_POLICIES)}, not {self.policy!r}")
        if self.policy == "adaptive" and self.recycle_limit:
            raise ValueError(f"policy 'adaptive' sets its own limit: recycle_limit must be 0, not {self.recycle_limit}")
        if self.frag_size < 0:
            raise ValueError(f"frag_size must be >= 0, not {self.frag_size}")
        return PoolParams(self.cache_size, self.refill, size, self.recycle_limit, self.policy, self.frag_size)


# The recycling policies (`PoolParams.policy`; the page memory's header stores the index): "fixed" keeps at
# most `recycle_limit` pages (0: as many as cache and ring hold), "adaptive" at most the watermark.
POOL_POLICIES = ("fixed", "adaptive")


# Per-pool counters (int64).  The first eleven are the kernel's `page_pool_stats` names; the rest are the
# pool's accounting (`hold_cnt`/`release_cnt`, as in struct page_pool) and what the emulator enforces
# where the kernel only trusts its drivers.
POOL_STATS = (
    "alloc_fast",
    "alloc_slow",
    "alloc_slow_high_order",
    "alloc_empty",
    "alloc_refill",
    "alloc_waive",
    "recycle_cached",
    "recycle_cache_full",
    "recycle_ring",
    "recycle_ring_full",
    "recycle_released_refcnt",
)
POOL_ACCOUNTING = ("hold_cnt", "release_cnt")
POOL_EXTRA = (
    "recycle_hard_limit",  # pages released past recycle_limit (fixed) or the watermark (adaptive)
    "alloc_failed",  # the page allocator had no page left (the driver's rx_alloc_fail)
    "double_free",
    "stale_generation",
    "bad_page",
    "foreign_cache_return",
    "recycled_before_tx_completion",  # a page still queued for TX or awaiting completion came back
    "wrong_state",  # a page returned from a path that does not hold it (e.g. a posted RX buffer)
)
POOL_COUNTERS = POOL_STATS + POOL_ACCOUNTING + POOL_EXTRA
C = {name: i for i, name in enumerate(POOL_COUNTERS)}
# Pool control words (int64, `PageMemory.pool_ctl[cpu]`), written by this module and read by the audit:
# cache count, ring head (consumer), ring tail (producer), owner pid.
P_CACHE_COUNT, P_RING_HEAD, P_RING_TAIL, P_OWNER_PID = 0, 1, 2, 3
# What the kernel keeps for the netlink view of a pool (``pool->user.id``, ``pool->slow.netdev``,
# ``pool->p.napi``, ``pool->user.detach_time``; `emu.run.pools` shows them): the pool's id, the ifindex
# and NAPI id it serves (0: none), written once by `page_pool_list` before any worker runs; the
# CLOCK_BOOTTIME second at which `drain` (``page_pool_destroy``) found pages still in flight (0: never),
# and whether the pool was destroyed at all (a destroyed pool with nothing in flight is freed and, in the
# kernel, no longer listed).  In shared memory, so that a process outside the run can read them.
P_ID, P_IFINDEX, P_NAPI_ID, P_DETACH_TIME, P_DESTROYED = 4, 5, 6, 7, 8
# The adaptive policy's state, written by the owner only (see "The adaptive watermark" above): the
# watermark W (0: not measured yet, no limit), the mean and mean deviation of the pages out in use, in
# 1/`WM_SCALE` pages, and the number of samples taken.
P_WATERMARK, P_U_MEAN, P_U_DEV, P_U_SAMPLES = 9, 10, 11, 12
# With fragments: the page the pool is splitting (``pool->frag_page``; its id + 1, 0 for none) and the
# index of its next fragment to hand out (``pool->frag_offset`` / frag_size).  Owner only.
P_FRAG_PAGE, P_FRAG_NEXT = 13, 14
P_WORDS = 16
# The estimator's constants (RFC 6298's alpha = 1/8, beta = 1/4, K = 4) and fixed point.
WM_MEAN_SHIFT, WM_DEV_SHIFT, WM_K, WM_SCALE_SHIFT = 3, 2, 4, 8
WM_SCALE = 1 << WM_SCALE_SHIFT


def pool_regions(ncpus: int, params: PoolParams) -> list[tuple[str, np.dtype, tuple[int, int]]]:
    """The pools' share of the meta segment, as ``(name, dtype, shape)`` per array, one row per CPU:
    control words, counters, alloc caches and recycle rings.  `emu.mem.pagemem` lays them out after the
    page table and maps each as the `PageMemory` attribute of that name."""
    return [
        ("pool_ctl", np.dtype(np.int64), (ncpus, P_WORDS)),
        ("pool_counters", np.dtype(np.int64), (ncpus, len(POOL_COUNTERS))),
        ("caches", np.dtype(np.int32), (ncpus, params.cache_size)),
        ("rings", np.dtype(np.int32), (ncpus, params.pool_size)),
    ]


_ALLOC_FAST = C["alloc_fast"]
_LITTLE = sys.byteorder == "little"
# The largest batch `_valid_uniform` checks in one go: the largest RX ring a topology may have (larger
# batches take the full check).
_UNIFORM_MAX = 16384
# Byte patterns a valid batch of up to _UNIFORM_MAX pages shows, shared by every pool handle and by
# `check_descs`; each batch compares against a slice of them (a copy of a few KiB costs less than
# keeping patterns for every batch size seen).
_POS = np.arange(_UNIFORM_MAX, dtype=np.int32)
_POS_BYTES = _POS.tobytes()
_ZEROS = bytes(4 * _UNIFORM_MAX)
_OWNER_BYTES: dict[int, bytes] = {}


def _owner_bytes(owner: int) -> bytes:
    """`owner` as the int16 page-table entries of a batch of up to _UNIFORM_MAX pages."""
    b = _OWNER_BYTES.get(owner)
    if b is None:
        b = _OWNER_BYTES[owner] = np.full(_UNIFORM_MAX, owner, dtype=np.int16).tobytes()
    return b


class ForeignRecycleError(PageError):
    """A direct (lockless) recycle into a CPU's alloc cache from a process that does not own it."""


class PoolOwnershipError(ResourceError, RuntimeError):
    """A second live process tried to own a CPU's pool."""


class PagePool:
    """A handle on one CPU's page pool.

    Exactly one process owns a pool (``pool_of(pm, cpu, owner=True)``); it alone allocates and
    recycles directly.  Any process may hold a non-owner handle and `put` pages into the ring.
    """

    def __init__(self, pm: PageMemory, cpu: int, owner: bool) -> None:
        if not 0 <= cpu < pm.ncpus:
            raise ValueError(f"cpu {cpu} out of range: this host has {pm.ncpus} CPUs")
        self.pm = pm
        self.cpu = cpu
        self.is_owner = owner
        # Scalar words go through memoryviews: ~5x cheaper than numpy scalar indexing on the hot path.
        self.ctl = memoryview(pm.pool_ctl[cpu])
        self.cnt = memoryview(pm.pool_counters[cpu])
        self._hdr = memoryview(pm.header)
        self._mine = _owner_bytes(cpu)
        # Direct recycles done through this object (a CPU refills inside a poll that did any).
        self.direct_recycles = 0
        self.cache = pm.caches[cpu]
        self.ring = pm.rings[cpu]
        self.cache_size = pm.params.cache_size
        self.refill = pm.params.refill
        self.ring_size = pm.params.pool_size
        self.limit = pm.params.recycle_limit
        self.adaptive = pm.params.policy == "adaptive"
        self.frags = pm.frags
        self.frag_shift = pm.frags.bit_length() - 1  # frags is a power of two: a buffer's page is id >> this
        self.ring_lock = 1 + cpu
        if owner:
            pid = os.getpid()
            prev = int(self.ctl[P_OWNER_PID])
            if prev and prev != pid and pid_alive(prev):
                raise PoolOwnershipError(f"cpu {cpu}'s page pool is already owned by live pid {prev}")
            self.ctl[P_OWNER_PID] = pid

    # -- introspection ----------------------------------------------------------------------------

    @property
    def cache_count(self) -> int:
        return int(self.ctl[P_CACHE_COUNT])

    @property
    def ring_count(self) -> int:
        return int(self.ctl[P_RING_TAIL] - self.ctl[P_RING_HEAD])

    @property
    def inflight(self) -> int:
        """The kernel's ``page_pool_inflight``: hold_cnt - release_cnt (cached pages count too)."""
        return int(self.cnt[C["hold_cnt"]] - self.cnt[C["release_cnt"]])

    def stats(self) -> dict[str, int]:
        out = {name: int(v) for name, v in zip(POOL_COUNTERS, self.cnt, strict=True)}
        out["inflight"] = out["hold_cnt"] - out["release_cnt"]
        out["cached"] = self.cache_count
        out["ring"] = self.ring_count
        if self.adaptive:
            out["watermark"] = self.watermark
        return out

    @property
    def watermark(self) -> int:
        """The adaptive policy's watermark ``W`` (0: not measured yet, no limit; always 0 for fixed)."""
        return int(self.ctl[P_WATERMARK])

    # -- allocation (owner only) ------------------------------------------------------------------

    def _require_owner(self, what: str) -> None:
        if not self.is_owner:
            self.cnt[C["foreign_cache_return"]] += 1
            raise ForeignRecycleError(
                f"{what} on cpu {self.cpu}'s page pool from pid {os.getpid()}, which does not own it "
                f"(owner pid {int(self.ctl[P_OWNER_PID])}): only the owning CPU may touch its alloc cache"
            )

    def alloc(self, n: int, state: PageState = PageState.ALLOCATED, holder: int = NO_HOLDER) -> np.ndarray:
        """Allocate up to `n` buffers (fewer only when the page allocator runs dry); returns buffer ids:
        pages, or with fragments (``page_pool_alloc_frag``) fragments of pages (`_alloc_frags`).

        Each buffer's generation is bumped, so descriptors of its previous life become stale.
        """
        self._require_owner("alloc")
        if self.frags > 1:
            return self._alloc_frags(n, state, holder)
        return self._hand_out(self._take(n), state, holder)

    def _alloc_frags(self, n: int, state: int, holder: int) -> np.ndarray:
        """``page_pool_alloc_frag`` for `n` buffers: the rest of the page being split first, then whole
        pages from `_take` (counted as pages), each with one reference per fragment (``pp_ref_count``,
        set once as ``page_pool_fragment_netmem`` does: equal fragments fill a page exactly, so the
        kernel's bias drain is not needed while a page is split).  Fragments of the last page not handed
        out stay with the pool (FRAG) for the next call."""
        pm, ctl, f = self.pm, self.ctl, self.frags
        parts = []
        slot = int(ctl[P_FRAG_PAGE]) - 1
        if slot >= 0 and n > 0:
            nxt = int(ctl[P_FRAG_NEXT])
            k = min(f - nxt, n)
            parts.append(np.arange(slot * f + nxt, slot * f + nxt + k, dtype=np.intp))
            n -= k
            ctl[P_FRAG_NEXT] = nxt + k
            if nxt + k == f:
                ctl[P_FRAG_PAGE] = ctl[P_FRAG_NEXT] = 0
        if n > 0:
            pages = self._take(-(-n // f))
            if len(pages):
                pm.frag_refs.put(pages, f)
                bufs = pm.bufs_of(pages)
                parts.append(bufs[:n])
                rest = bufs[n:]
                if len(rest):
                    pm.state.put(rest, int(PageState.FRAG))
                    pm.holder.put(rest, NO_HOLDER)
                    ctl[P_FRAG_PAGE] = int(pages[-1]) + 1
                    ctl[P_FRAG_NEXT] = f - len(rest)
        if not parts:
            return np.empty(0, dtype=np.intp)
        return self._hand_out(parts[0] if len(parts) == 1 else np.concatenate(parts), state, holder)

    def _take(self, n: int) -> np.ndarray:
        """Up to `n` pages off the cache (refilled from the ring, else the slow path), counted per page as
        ``page_pool_alloc_netmems`` counts them; their states are the caller's to set."""
        cnt = self.cnt
        have = self.ctl[P_CACHE_COUNT]
        if have >= n > 0:
            # The common case, kept free of lists and concatenation: the cache alone serves the bulk.
            ids = self.cache[have - n : have].astype(np.intp)
            self.ctl[P_CACHE_COUNT] = have - n
            cnt[_ALLOC_FAST] += n
            return ids
        parts = []
        want = n
        while want > 0:
            have = int(self.ctl[P_CACHE_COUNT])
            if have:
                k = min(have, want)
                parts.append(self.cache[have - k : have].astype(np.intp))
                self.ctl[P_CACHE_COUNT] = have - k
                cnt[C["alloc_fast"]] += k
                want -= k
                continue
            # The cache is empty: one page comes from a ring refill, else from the slow path.
            if self._refill_from_ring():
                cnt[C["alloc_refill"]] += 1
            elif self._alloc_slow():
                cnt[C["alloc_slow"]] += 1
            else:
                cnt[C["alloc_failed"]] += 1
                break
            have = int(self.ctl[P_CACHE_COUNT])
            parts.append(self.cache[have - 1 : have].astype(np.intp))
            self.ctl[P_CACHE_COUNT] = have - 1
            want -= 1
        if self.adaptive:
            self._measure()
        if not parts:
            return np.empty(0, dtype=np.intp)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _hand_out(self, ids: np.ndarray, state: int, holder: int) -> np.ndarray:
        pm = self.pm
        gen = pm.gen
        gen.put(ids, gen.take(ids) + 1)
        if pm.multibuf:
            pm.nfrags.put(ids, 0)  # a new life starts linear
        pm.state.put(ids, int(state))
        pm.holder.put(ids, holder)
        return ids

    def _refill_from_ring(self) -> int:
        """Move up to `refill` pages from the ring into the empty cache; the owner needs no lock."""
        head = int(self.ctl[P_RING_HEAD])
        avail = int(self.ctl[P_RING_TAIL]) - head
        if avail <= 0:
            self.cnt[C["alloc_empty"]] += 1
            return 0
        k = min(avail, self.refill, self.cache_size)
        ids = self._ring_slice(head, k)
        self.cache[:k] = ids
        _set_pages(self.pm, ids, PageState.CACHE)
        self.ctl[P_CACHE_COUNT] = k
        self.ctl[P_RING_HEAD] = head + k  # published last: producers may now reuse the slots
        return k

    def _ring_slice(self, start: int, k: int) -> np.ndarray:
        i = start % self.ring_size
        if i + k <= self.ring_size:
            return self.ring[i : i + k].copy()
        return np.concatenate((self.ring[i:], self.ring[: i + k - self.ring_size]))

    def _alloc_slow(self) -> int:
        ids = alloc_pages_bulk(self.pm, self.refill)
        k = len(ids)
        if k == 0:
            return 0
        pm = self.pm
        bufs = pm.bufs_of(ids)
        pm.owner[bufs] = self.cpu
        pm.refcnt[bufs] = 1
        self.cnt[C["hold_cnt"]] += k
        self.cache[:k] = ids
        pm.state.put(bufs, int(PageState.CACHE))
        self.ctl[P_CACHE_COUNT] = k
        return k

    # -- return paths -----------------------------------------------------------------------------

    def _validate(
        self, ids: np.ndarray, gens: np.ndarray | None, errors: list[str], expect: int | None = None,
        returning: bool = True,
    ) -> np.ndarray:
        """Drop (and count) every page that may not be returned to this pool now; return the rest.

        `expect` is the state the returning path holds its pages in (e.g. TX_INFLIGHT for a TX
        completion); without it any in-use state is accepted.
        """
        ids = np.asarray(ids)
        n = len(ids)
        if 0 < n <= _UNIFORM_MAX and ids.dtype.kind in "iu":
            try:
                if self._valid_uniform(ids, gens, n, expect):
                    return ids
            except IndexError:
                pass  # an id out of range: the full check below names it
        return self._validate_full(ids, gens, errors, expect, returning)

    def check(self, ids: np.ndarray, gens: np.ndarray | None, expect: int) -> tuple[np.ndarray, list[str]]:
        """Validate descriptors a peer handed over (same rules as a return, except that nothing is being
        recycled: a page awaiting TX completion is merely in the wrong state); returns the good page ids
        and the problems found (already counted)."""
        errors: list[str] = []
        return self._validate(ids, gens, errors, expect, returning=False), errors

    def _valid_uniform(self, ids: np.ndarray, gens: np.ndarray | None, n: int, expect: int | None) -> bool:
        """The common case in a few gathers and byte compares: every page in one in-use state, owned
        by this pool, of the current generation, and no page twice."""
        pm = self.pm
        # `take` wraps negative ids like Python indexing, so signed ids need their own check (the
        # descriptors' unsigned ids do not); an id past the end raises IndexError: the full check names it.
        if ids.dtype.kind == "i":
            if ids.itemsize == 8 and _LITTLE:
                # The high 32 bits of every valid id are zero (a negative id's are not): one byte compare,
                # a third of the cost of ids.min().
                if ids.view(np.uint32)[1::2].tobytes() != _ZEROS[: 4 * n]:
                    return False
            elif ids.min() < 0:
                return False
        st = pm.state.take(ids)
        first = int(st[0])
        if (first != expect if expect is not None else not IN_USE[first]) or st.tobytes() != bytes((first,)) * n:
            return False
        if pm.owner.take(ids).tobytes() != self._mine[: 2 * n]:
            return False
        if gens is not None and pm.gen.take(ids).tobytes() != np.asarray(gens, dtype=np.uint32).tobytes():
            return False
        mark = pm.batch_mark
        mark.put(ids, _POS[:n])
        return mark.take(ids).tobytes() == _POS_BYTES[: 4 * n]

    def _validate_full(
        self, ids: np.ndarray, gens: np.ndarray | None, errors: list[str], expect: int | None,
        returning: bool = True,
    ) -> np.ndarray:
        pm = self.pm
        ids = np.asarray(ids, dtype=np.int64)
        cnt = self.cnt
        inrange = (ids >= 0) & (ids < pm.nbufs)
        if not inrange.all():
            bad = ids[~inrange]
            cnt[C["bad_page"]] += len(bad)
            errors.append(f"{len(bad)} page ids out of range 0..{pm.nbufs - 1}, e.g. {int(bad[0])}")
            ids = ids[inrange]
            if gens is not None:
                gens = np.asarray(gens)[inrange]
        if len(ids) == 0:
            return ids
        st = pm.state[ids]
        in_use = IN_USE[st]
        if expect is not None:
            early = in_use & (st != expect) & ((st == PageState.TX_QUEUED) | (st == PageState.TX_INFLIGHT))
            if gens is not None:
                early &= pm.gen[ids] == gens  # a stale descriptor names an earlier life, not this one
            if not returning:
                early[:] = False
            wrong = in_use & (st != expect) & ~early
            self._refuse(early, "recycled_before_tx_completion", ids, errors,
                         lambda n, p: f"{n} pages returned before their TX completion, e.g. page {p} "
                                      f"({PageState(int(pm.state[p])).name})")
            self._refuse(wrong, "wrong_state", ids, errors,
                         lambda n, p: f"{n} pages in the wrong state, e.g. page {p} is "
                                      f"{PageState(int(pm.state[p])).name}, expected {PageState(expect).name}")
            in_use = st == expect
            if (early | wrong).any():
                keep = ~(early | wrong)
                ids, st, in_use = ids[keep], st[keep], in_use[keep]
                if gens is not None:
                    gens = np.asarray(gens)[keep]
                if len(ids) == 0:
                    return ids
        mine = pm.owner[ids] == self.cpu
        fresh = np.ones(len(ids), dtype=bool) if gens is None else pm.gen[ids] == gens
        # A page twice in one batch is a double free of its later copies.
        mark = pm.batch_mark
        pos = np.arange(len(ids), dtype=np.int32)
        mark[ids] = pos
        dup = mark[ids] != pos
        good = in_use & mine & fresh & ~dup
        if good.all():
            return ids
        freed = ~in_use | dup
        foreign = ~freed & ~mine
        stale = ~freed & mine & ~fresh
        if returning:
            self._refuse(freed, "double_free", ids, errors,
                         lambda n, p: f"double free of {n} pages, e.g. page {p} "
                                      f"(already {PageState(int(pm.state[p])).name})")
        else:  # nothing is being freed: a descriptor of a page at home is just in the wrong state
            self._refuse(freed, "wrong_state", ids, errors,
                         lambda n, p: f"{n} pages not in use, e.g. page {p} is {PageState(int(pm.state[p])).name}")
        self._refuse(foreign, "bad_page", ids, errors,
                     lambda n, p: f"{n} pages of another pool returned to cpu {self.cpu}'s, e.g. page {p} of cpu "
                                  f"{int(pm.owner[p])}")
        if stale.any():
            g = int(np.asarray(gens)[stale][0])
            self._refuse(stale, "stale_generation", ids, errors,
                         lambda n, p: f"{n} stale descriptors, e.g. page {p} gen {g} but the page is at gen "
                                      f"{int(pm.gen[p])}")
        return ids[good]

    def _refuse(self, mask: np.ndarray, counter: str, ids: np.ndarray, errors: list[str], describe) -> None:
        """Count the pages `mask` selects under `counter` and describe the first of them."""
        n = int(np.count_nonzero(mask))
        if n:
            self.cnt[C[counter]] += n
            errors.append(describe(n, int(ids[mask][0])))

    def _release_refcnt(self, ids: np.ndarray) -> np.ndarray:
        """Pages someone else still references leave the pool (``recycle_released_refcnt``)."""
        pm = self.pm
        if not self._hdr[H_EXTRA_REFS]:
            return ids
        shared = pm.refcnt[ids] > 1
        if not shared.any():
            return ids
        out = ids[shared]
        pm.refcnt[out] -= 1
        pm.owner[out] = NO_OWNER
        with pm.locks.lock(ALLOCATOR_LOCK):
            self.cnt[C["release_cnt"]] += len(out)
        self.cnt[C["recycle_released_refcnt"]] += len(out)
        return ids[~shared]

    def recycle_direct(
        self, ids: np.ndarray, gens: np.ndarray | None = None, errors: str = "raise", expect: int | None = None
    ) -> int:
        """``page_pool_recycle_direct``: the owner puts pages straight into its cache.

        Pages that do not fit go to the ring (`recycle_cache_full`), as in the kernel.  Returns how many
        pages were accepted; with ``errors="raise"`` a refused page raises `PageError` after the good
        ones are placed (the bad ones stay with the caller), with ``errors="count"`` it is only counted.
        """
        if not self.is_owner:
            self.cnt[C["foreign_cache_return"]] += len(ids)
            raise ForeignRecycleError(
                f"direct recycle of {len(ids)} pages into cpu {self.cpu}'s alloc cache from pid "
                f"{os.getpid()}, which does not own that pool (owner pid {int(self.ctl[P_OWNER_PID])}); "
                f"return them through the pool's ring with put()"
            )
        problems: list[str] = []
        ids = self._validate(ids, gens, problems, expect)
        n = len(ids)
        foreign = None
        if self.pm.multibuf:
            ids, foreign = self._with_frags(ids)
        self._recycle_valid(ids)
        if foreign is not None:
            return_pages(self.pm, None, foreign)
        self._raise(problems, errors)
        return n

    def _with_frags(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Validated frames `ids` end (``xdp_return_frame`` of a multi-buffer frame, ``xdp_return_frags``):
        their fragment buffers join them, each to its own pool.  Returns the heads with the fragments of
        this pool, and those of other pools (None: none), which go home through their owners' rings.
        The heads' fragment counts are cleared: they are linear buffers again."""
        pm = self.pm
        fr = frame_frags(pm, ids)
        if not len(fr):
            return ids, None
        pm.nfrags.put(ids, 0)
        fr = fr[IN_USE[pm.state.take(fr)]]  # (a fragment already home cannot come back twice)
        own = pm.owner.take(fr) == self.cpu
        foreign = None
        if not np.logical_and.reduce(own):
            foreign, fr = fr[~own], fr[own]
        return np.concatenate((np.asarray(ids, dtype=np.int64), fr)), foreign

    def _unref_frags(self, ids: np.ndarray) -> np.ndarray:
        """``page_pool_unref_netmem`` for validated fragments `ids`: each drops a reference of its page;
        returns the pages whose last fragment this was (only the last put recycles a page), the other
        fragments wait, FRAG, for their siblings.  Under the pool's ring lock (the kernel's atomic
        decrement), which every return path of this pool's pages takes."""
        pm = self.pm
        pm.state.put(ids, int(PageState.FRAG))
        pm.holder.put(ids, NO_HOLDER)
        f, n = self.frags, len(ids)
        if n % f == 0:
            # The common case: whole pages back, their fragments side by side (a page's buffers are posted,
            # received and freed together): every page's last reference goes, pp_ref_count being the
            # fragments in use (the audit's invariant) and a buffer being named once (the validation's).
            rows = ids.reshape(-1, f) >> self.frag_shift
            if np.logical_and.reduce((rows == rows[:, :1]).ravel()):
                pages = rows[:, 0]
                pm.frag_refs.put(pages, 0)
                return pages
        # Each page once, with how many of its fragments came back in this batch (often all: the halves
        # of a page are posted, received and freed together): the runs of the sorted page ids.
        pages = ids >> self.frag_shift
        pages.sort()
        n = len(pages)
        bounds = np.empty(n + 1, dtype=bool)
        bounds[0] = bounds[n] = True
        np.not_equal(pages[1:], pages[:-1], out=bounds[1:n])
        edges = bounds.nonzero()[0]
        first = edges[:-1]
        pages = pages[first]
        left = pm.frag_refs.take(pages) - (edges[1:] - first)
        pm.frag_refs.put(pages, left)
        return pages[left == 0]

    def _recycle_valid(self, ids: np.ndarray) -> None:
        """Validated pages into the cache, what does not fit into the ring (or back to the allocator)."""
        self.direct_recycles += 1
        if self.frags > 1:
            with self.pm.locks.lock(self.ring_lock):
                ids = self._unref_frags(ids)
        ids = self._release_refcnt(ids)
        if len(ids):
            ids = self._cache_put(ids)
            if len(ids):
                self._ring_put(ids)
        if self.adaptive:
            self._measure()

    # -- the adaptive watermark (see the module's docstring) --------------------------------------

    def _measure(self) -> None:
        """One sample of the pages out in use (owner only): update the estimator and ``W``, then trim
        the cache toward ``W``."""
        ctl = self.ctl
        inflight = self.inflight
        cache = int(ctl[P_CACHE_COUNT])
        kept = cache + self.ring_count
        u = max(0, inflight - kept) << WM_SCALE_SHIFT
        if ctl[P_U_SAMPLES]:
            mean, dev = int(ctl[P_U_MEAN]), int(ctl[P_U_DEV])
            err = u - mean
            step = abs(err) - dev
            if err < 0 < step:
                # A falling load: the deviation grows WM_MEAN_SHIFT times slower (Linux's
                # tcp_rtt_estimator, after Eifel), or the margin would swell as the demand drops.
                step >>= WM_MEAN_SHIFT
            dev += step >> WM_DEV_SHIFT
            mean += err >> WM_MEAN_SHIFT
        else:
            mean, dev = u, u >> 1
        wm = -(-(mean + WM_K * dev) >> WM_SCALE_SHIFT) + self.refill
        ctl[P_U_MEAN], ctl[P_U_DEV], ctl[P_WATERMARK] = mean, dev, wm
        ctl[P_U_SAMPLES] += 1
        trim = min(cache, inflight - wm, kept - self.refill)
        if trim > 0:
            ids = self.cache[cache - trim : cache].copy()
            ctl[P_CACHE_COUNT] = cache - trim
            self.cnt[C["recycle_hard_limit"]] += trim
            page_pool_return_page(self.pm, ids, self.cpu)

    def _keep_room(self, n: int) -> int:
        """Of `n` pages returning, how many the watermark lets the pool keep."""
        wm = int(self.ctl[P_WATERMARK])
        if not wm:
            return n
        kept = int(self.ctl[P_CACHE_COUNT]) + self.ring_count
        return max(0, wm - self.inflight + n, self.refill - kept)

    def recycle_direct_if_valid(self, ids: np.ndarray, gens: np.ndarray, expect: int) -> int | None:
        """`recycle_direct` for the common case, checked once: when every page is this pool's own, in
        state `expect`, of generation `gens` and named once, recycle them all and return how many; else
        change and count nothing and return None (the caller then screens them one by one)."""
        if not self.is_owner:
            return None
        n = len(ids)
        if not 0 < n <= _UNIFORM_MAX or ids.dtype.kind not in "iu":
            return None
        try:
            if not self._valid_uniform(ids, gens, n, expect):
                return None
        except IndexError:
            return None
        foreign = None
        if self.pm.multibuf:
            ids, foreign = self._with_frags(ids)
        self._recycle_valid(ids)
        if foreign is not None:
            return_pages(self.pm, None, foreign)
        return n

    def _cache_put(self, ids: np.ndarray) -> np.ndarray:
        """Put what fits into the cache; return the rest (counted `recycle_cache_full`)."""
        have = int(self.ctl[P_CACHE_COUNT])
        room = self.cache_size - have
        if self.limit:
            room = min(room, max(0, self.limit - have - self.ring_count))
        elif self.adaptive:
            room = min(room, self._keep_room(len(ids)))
        k = min(room, len(ids))
        if k:
            head = ids[:k]
            _set_pages(self.pm, head, PageState.CACHE)
            self.cache[have : have + k] = head
            self.ctl[P_CACHE_COUNT] = have + k
            self.cnt[C["recycle_cached"]] += k
        rest = ids[k:]
        if len(rest) and have + k >= self.cache_size:
            self.cnt[C["recycle_cache_full"]] += len(rest)
        return rest

    def put(
        self, ids: np.ndarray, gens: np.ndarray | None = None, errors: str = "raise", expect: int | None = None
    ) -> int:
        """Return pages from any context through the recycle ring (``page_pool_put_page`` without
        allow_direct); a full ring, or the hard limit, releases them to the page allocator."""
        problems: list[str] = []
        foreign = None
        with self.pm.locks.lock(self.ring_lock):
            # Validated under the ring lock: two processes returning the same page serialise here, so the
            # second sees it in the ring and is refused as a double free.
            ids = self._validate(ids, gens, problems, expect)
            accepted = len(ids)
            if self.pm.multibuf:
                ids, foreign = self._with_frags(ids)
            if self.frags > 1:
                ids = self._unref_frags(ids)
            ids = self._release_refcnt(ids)
            if len(ids):
                self._ring_put_locked(ids)
        if foreign is not None:
            return_pages(self.pm, None, foreign)  # (after the lock: another pool's ring lock is taken)
        self._raise(problems, errors)
        return accepted

    def _ring_put(self, ids: np.ndarray) -> None:
        with self.pm.locks.lock(self.ring_lock):
            self._ring_put_locked(ids)

    def _ring_put_locked(self, ids: np.ndarray) -> None:
        head = int(self.ctl[P_RING_HEAD])
        tail = int(self.ctl[P_RING_TAIL])
        n = len(ids)
        fits = min(self.ring_size - (tail - head), n)
        k = fits
        if self.limit:
            k = min(k, max(0, self.limit - (tail - head) - int(self.ctl[P_CACHE_COUNT])))
            self.cnt[C["recycle_hard_limit"]] += fits - k
        elif self.adaptive:
            k = min(k, self._keep_room(n))
            self.cnt[C["recycle_hard_limit"]] += fits - k
        if k:
            put = ids[:k]
            _set_pages(self.pm, put, PageState.RING, NO_HOLDER)
            i = tail % self.ring_size
            first = min(k, self.ring_size - i)
            self.ring[i : i + first] = put[:first]
            if first < k:
                self.ring[: k - first] = put[first:]
            self.ctl[P_RING_TAIL] = tail + k  # published last: the owner may now consume the entries
            self.cnt[C["recycle_ring"]] += k
        if n > fits:
            self.cnt[C["recycle_ring_full"]] += n - fits
        if n > k:
            page_pool_return_page(self.pm, ids[k:], self.cpu)

    @staticmethod
    def _raise(problems: list[str], errors: str) -> None:
        if problems and errors == "raise":
            raise PageError("; ".join(problems))

    # -- shutdown ---------------------------------------------------------------------------------

    def drain(self) -> int:
        """``page_pool_destroy``'s first half: give the cache's and ring's pages back to the allocator.

        Returns the in-flight count left (pages still out: the caller retries until it reaches 0).
        """
        self._require_owner("drain")
        with self.pm.locks.lock(self.ring_lock):
            head = int(self.ctl[P_RING_HEAD])
            k = int(self.ctl[P_RING_TAIL]) - head
            ring_ids = self._ring_slice(head, k) if k > 0 else np.empty(0, np.int32)
            self.ctl[P_RING_HEAD] = head + max(k, 0)
            # page_pool_drain_frag: the fragments of the page being split that were never handed out drop
            # their references; if its handed-out ones are all back, the page goes too.
            slot = int(self.ctl[P_FRAG_PAGE]) - 1
            done = np.empty(0, np.int32)
            if slot >= 0:
                self.ctl[P_FRAG_PAGE] = 0
                self.pm.frag_refs[slot] -= self.frags - int(self.ctl[P_FRAG_NEXT])
                self.ctl[P_FRAG_NEXT] = 0
                if self.pm.frag_refs[slot] == 0:
                    done = np.array([slot], np.int32)
        have = int(self.ctl[P_CACHE_COUNT])
        cache_ids = self.cache[:have].copy()
        self.ctl[P_CACHE_COUNT] = 0
        page_pool_return_page(self.pm, np.concatenate((cache_ids, ring_ids, done)), self.cpu)
        left = self.inflight
        # page_pool_destroy -> page_pool_detached: pages still out keep the pool listed, detached, with
        # the time of its first destroy (a pool is destroyed once; reclaim drains it again, later).
        if left and not self.ctl[P_DETACH_TIME] and not self.ctl[P_DESTROYED]:
            self.ctl[P_DETACH_TIME] = max(1, int(time.clock_gettime(time.CLOCK_BOOTTIME)))
        self.ctl[P_DESTROYED] = 1
        return left


def page_pool_list(pm: PageMemory, cpu: int, pool_id: int, ifindex: int, napi_id: int) -> None:
    """``page_pool_list``: give CPU `cpu`'s pool its netlink identity (its id, and the ifindex and NAPI
    id of what it serves, 0 for none) before any process uses it."""
    ctl = pm.pool_ctl[cpu]
    ctl[P_ID], ctl[P_IFINDEX], ctl[P_NAPI_ID] = pool_id, ifindex, napi_id


def pool_of(pm: PageMemory, cpu: int, owner: bool = False) -> PagePool:
    """A handle on CPU `cpu`'s page pool in `pm`; `owner=True` claims the pool for this process.

    Non-owner handles (for returning pages through the ring) are made once per process and CPU, and
    kept with the page memory that they view."""
    if owner:
        return PagePool(pm, cpu, owner=True)
    handle = pm.pool_handles.get(cpu)
    if handle is None:
        handle = pm.pool_handles[cpu] = PagePool(pm, cpu, owner=False)
    return handle


def return_pages(
    pm: PageMemory, local: PagePool | None, ids: np.ndarray, gens: np.ndarray | None = None,
    errors: str = "count",
    expect: int | None = None,
    bulk: int | None = None,
) -> int:
    """Return pages to whichever pools own them (``page_pool_put_netmem_bulk``).

    Pages of `local` (the caller's own pool, if it owns one) are recycled directly; the others are grouped
    by owner and go through their owner's ring, one lock round trip per `bulk` pages (the whole group
    when None; ``xdp_return_frame_bulk`` flushes every 16).  Returns the number of pages accepted.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return 0
    if int(np.minimum.reduce(ids)) >= 0 and int(np.maximum.reduce(ids)) < pm.nbufs:
        owners = pm.owner.take(ids).astype(np.int64)
    else:
        inrange = (ids >= 0) & (ids < pm.nbufs)
        owners = np.full(len(ids), NO_OWNER, dtype=np.int64)
        owners[inrange] = pm.owner[ids[inrange]]
    accepted = 0
    lo = int(np.minimum.reduce(owners))
    # Completions mostly come in runs of one owner's pages: no sort needed then.
    single = lo == int(np.maximum.reduce(owners))
    for cpu in [lo] if single else np.unique(owners):
        sel = slice(None) if single else owners == cpu
        g = None if gens is None else np.asarray(gens)[sel]
        cpu = int(cpu)
        if cpu == ORDER0_OWNER:
            accepted += xdp_return_frame_order0(pm, ids[sel], g, expect)
        elif cpu == NO_OWNER or cpu >= pm.ncpus:
            # Out of range, or already back in the allocator: let the caller's pool (or CPU 0's) refuse
            # and count it with the usual message.
            target = local if local is not None else pool_of(pm, 0)
            accepted += target.put(ids[sel], g, errors=errors, expect=expect)
        elif local is not None and cpu == local.cpu and local.is_owner:
            accepted += local.recycle_direct(ids[sel], g, errors=errors, expect=expect)
        else:
            mine, step = ids[sel], bulk or len(ids)
            for k in range(0, len(mine), step):
                accepted += pool_of(pm, cpu).put(mine[k : k + step], None if g is None else g[k : k + step],
                                                 errors=errors, expect=expect)
    return accepted


# -- the page allocator -----------------------------------------------------------------------------
# The buddy allocator's stand-in (its free stack is laid out in `emu.mem.pagemem`): pages leave it only in
# bulk into a pool's cache, and come back from a pool that releases them.


def alloc_pages_bulk(pm: PageMemory, n: int) -> np.ndarray:
    """``alloc_pages_bulk``: take up to `n` pages from the page allocator (fewer when it runs dry); they
    are ALLOCATED until their pool places them."""
    header = pm.header
    with pm.locks.lock(ALLOCATOR_LOCK):
        have = int(header[H_FREE_COUNT])
        k = max(0, min(n, have))
        ids = pm.free_stack[have - k : have][::-1].copy()
        header[H_FREE_COUNT] = have - k
        if have - k < header[H_FREE_LOW]:
            header[H_FREE_LOW] = have - k
        # Marked while still under the lock so that an audit never sees a page in no place.
        pm.state[pm.bufs_of(ids)] = PageState.ALLOCATED
    return ids


def page_pool_return_page(pm: PageMemory, ids: np.ndarray, release_pool: int = NO_OWNER,
                          order0: bool = False) -> None:
    """``page_pool_return_page``: give pages back to the page allocator (FREE, no owner, no holder).

    `release_pool` is the CPU whose pool releases them: its `release_cnt` is bumped here, under the
    allocator lock, because releases happen from any process (the kernel uses an atomic).
    """
    if len(ids) == 0:
        return
    header = pm.header
    bufs = pm.bufs_of(ids)
    with pm.locks.lock(ALLOCATOR_LOCK):
        have = int(header[H_FREE_COUNT])
        k = len(ids)
        pm.free_stack[have : have + k] = ids
        pm.state[bufs] = PageState.FREE
        pm.owner[bufs] = NO_OWNER
        pm.holder[bufs] = NO_HOLDER
        pm.refcnt[bufs] = 0
        if pm.multibuf:
            pm.nfrags[bufs] = 0
        if pm.frags > 1:
            pm.frag_refs[ids] = 0
        header[H_FREE_COUNT] = have + k
        if release_pool >= 0:
            pm.pool_counters[release_pool, C["release_cnt"]] += k
        if order0:
            header[H_ORDER0_FREE] += k


def _set_pages(pm: PageMemory, pages: np.ndarray, state: int, holder: int | None = None) -> None:
    """Every buffer of `pages` to `state` (and `holder` when given): one store per column, of a word per
    page where a page's entries fit one."""
    f = pm.frags
    if f == 1:
        pm.state.put(pages, int(state))
        if holder is not None:
            pm.holder.put(pages, holder)
        return
    if pm.state_words is not None:
        pm.state_words.put(pages, int.from_bytes(bytes((int(state),)) * f, "little"))
    else:
        pm.state_rows[pages] = int(state)
    if holder is not None:
        if pm.holder_words is not None:
            pm.holder_words.put(pages, int.from_bytes(int(holder).to_bytes(2, "little", signed=True) * f, "little"))
        else:
            pm.holder_rows[pages] = holder


# The allocator's own name for the same step, as tests and benchmarks of the allocator call it.
free_pages_bulk = page_pool_return_page


def page_get(pm: PageMemory, ids: np.ndarray) -> None:
    """``get_page``: take an extra reference (a pool will then release rather than recycle it).  Not
    with fragments: a fragment's references are its page's ``pp_ref_count``, which the pool keeps."""
    if pm.frags > 1:
        raise PageError(f"get_page on buffers of {pm.buf_size}-byte fragments: their page's references are "
                        f"its pool's (pp_ref_count), not taken one by one")
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[pm.check_ids(ids)]
    np.add.at(pm.refcnt, ids, 1)  # add.at: a page named twice takes two references
    pm.header[H_EXTRA_REFS] += len(ids)


def put_page(pm: PageMemory, ids: np.ndarray) -> None:
    """``put_page``: drop a reference taken with `page_get`.

    A page its pool already released (``recycle_released_refcnt``) goes to the page allocator when its
    last reference is dropped.  The pool's own reference is dropped only by returning the page to it.
    """
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[pm.check_ids(ids)]
    refs = pm.refcnt[ids]
    ownerless = pm.owner[ids] == NO_OWNER
    ids = ids[(refs > 1) | (ownerless & (refs > 0) & IN_USE[pm.state[ids]])]
    np.subtract.at(pm.refcnt, ids, 1)
    pm.header[H_EXTRA_REFS] -= len(ids)
    ids = np.unique(ids)
    last = (pm.refcnt[ids] == 0) & (pm.owner[ids] == NO_OWNER)
    page_pool_return_page(pm, ids[last])


def xdpf_clone(pm: PageMemory, ids: np.ndarray, holder: int) -> np.ndarray:
    """``xdpf_clone``: for each frame of `ids`, a page from the page allocator (``dev_alloc_page``, no pool)
    to copy it into: XDP, held by `holder`, at the same offset and length, owned by no pool
    (`ORDER0_OWNER`) with its one reference.  All or nothing: when the allocator cannot give a page for
    every frame, it gives none (the caller's broadcast then fails with -ENOMEM).  The caller copies the
    bytes; the pages go back to the allocator through `return_pages` when their frames are done."""
    ids = np.asarray(ids, dtype=np.int64)
    if pm.multibuf and np.logical_or.reduce(pm.nfrags.take(ids)):
        # (dev_map_enqueue_clone refuses such frames first: "Frags live outside the linear frame and cannot
        # be cloned safely"; a copy of the linear part would name the original's fragments.)
        raise PageError("xdpf_clone of a multi-buffer frame: its fragments cannot be cloned")
    new = alloc_pages_bulk(pm, len(ids)).astype(np.int64)
    if len(new) < len(ids):
        page_pool_return_page(pm, new)
        return new[:0]
    with pm.locks.lock(ALLOCATOR_LOCK):
        pm.header[H_ORDER0_ALLOC] += len(new)
    if pm.frags > 1:
        # A whole page per copy, as dev_alloc_page gives: the frame goes into its first buffer, the
        # others are no buffer of anyone's (FRAG, of no pool) until the page goes back.
        allb = pm.bufs_of(new)
        pm.owner[allb] = ORDER0_OWNER
        pm.state[allb] = PageState.FRAG
        new = new * pm.frags
    pm.off[new] = pm.off[ids]
    pm.len[new] = pm.len[ids]
    pm.gen[new] += 1
    pm.refcnt[new] = 1
    pm.owner[new] = ORDER0_OWNER
    pm.holder[new] = holder
    pm.state[new] = PageState.XDP
    return new


def xdp_return_frame_order0(
    pm: PageMemory, ids: np.ndarray, gens: np.ndarray | None = None, expect: int | None = None
) -> int:
    """``xdp_return_frame`` of a MEM_TYPE_PAGE_ORDER0 frame (an `xdpf_clone` copy): ``put_page`` drops its
    one reference and the page goes back to the page allocator.  Only such pages, in use (in state
    `expect` when given) and of generation `gens` when given; the rest are refused (returns how many
    were freed)."""
    ids = np.asarray(ids, dtype=np.int64)
    ok = (pm.owner[ids] == ORDER0_OWNER) & (pm.refcnt[ids] == 1) & IN_USE[pm.state[ids]]
    if expect is not None:
        ok &= pm.state[ids] == expect
    if gens is not None:
        ok &= pm.gen[ids] == np.asarray(gens)
    good = np.unique(ids[ok])
    page_pool_return_page(pm, good // pm.frags, order0=True)
    return len(good)


# -- the driver's and XDP's hand-offs ------------------------------------------------------------------
# A page out of its pool moves between a CPU's XDP path and a device's rings.  Each step is one batch
# store into the page table by the process that holds the pages, made before it hands their descriptors
# on (so that, should it die in between, the coordinator finds every page where its state says).


def page_pool_dev_alloc_pages(pool: PagePool, n: int, holder: int) -> np.ndarray:
    """``page_pool_dev_alloc_pages`` for an RX ring: up to `n` pages from the pool, RX_POSTED to the
    device `holder`, each to receive its frame at ``XDP_PACKET_HEADROOM``."""
    ids = pool.alloc(n, PageState.RX_POSTED, holder=holder)
    if len(ids):
        pool.pm.off.put(ids, XDP_PACKET_HEADROOM)
        pool.pm.len.put(ids, 0)
    return ids


def xdp_prepare_buff(pm: PageMemory, ids: np.ndarray, cpu: int) -> None:
    """``xdp_prepare_buff``: completed RX buffers become the XDP buffers of CPU `cpu` (RX_POSTED -> XDP),
    a multi-buffer frame's fragments with its head (as every function below moves a frame whole)."""
    if pm.multibuf:
        ids = frame_bufs(pm, ids)
    pm.state.put(ids, PageState.XDP)
    pm.holder.put(ids, cpu)


def xdp_build_skb(pm: PageMemory, ids: np.ndarray) -> None:
    """``xdp_build_skb_from_frame``: XDP_PASS hands the pages to the stack as skbs (XDP -> SKB); a
    multi-buffer frame's fragments become the skb's frags (``xdp_update_skb_shared_info``)."""
    if pm.multibuf:
        ids = frame_bufs(pm, ids)
    pm.state.put(ids, PageState.SKB)


def xdp_xmit_queue(pm: PageMemory, ids: np.ndarray, holder: int) -> None:
    """``ndo_xdp_xmit`` (and XDP_TX's ring): the frames go onto a device's TX queue (XDP -> TX_QUEUED),
    which holds them from now on."""
    if pm.multibuf:
        ids = frame_bufs(pm, ids)
    pm.state.put(ids, PageState.TX_QUEUED)
    pm.holder.put(ids, holder)


def frame_frags(pm: PageMemory, heads: np.ndarray) -> np.ndarray:
    """The fragment buffers of frames `heads` (their shinfo entries, frame after frame; none for linear
    frames or a host without multi-buffer devices)."""
    if not pm.multibuf or not len(heads):
        return np.empty(0, np.int64)
    nf = pm.nfrags.take(heads)
    if not np.logical_or.reduce(nf):
        return np.empty(0, np.int64)
    multi = nf != 0
    return shinfo_frags(pm.shinfo, np.asarray(heads)[multi], nf[multi])


def frame_bufs(pm: PageMemory, ids: np.ndarray) -> np.ndarray:
    """Frames `ids` as all their buffers: the heads, then every fragment (`ids` itself when none has any)."""
    fr = frame_frags(pm, ids)
    return ids if not len(fr) else np.concatenate((np.asarray(ids, dtype=np.int64), fr))


def frame_lens(pm: PageMemory, ids: np.ndarray) -> np.ndarray:
    """``xdp_get_frame_len``: each frame's whole length, its linear part plus ``xdp_frags_size``."""
    lens = pm.len.take(ids).astype(np.int64)
    if pm.multibuf:
        nf = pm.nfrags.take(ids)
        if np.logical_or.reduce(nf):
            multi = np.flatnonzero(nf)
            lens[multi] += pm.shinfo[np.asarray(ids)[multi].astype(np.intp), SI_FRAGS_SIZE]
    return lens


def fragments_in_use(pm: PageMemory) -> np.ndarray:
    """Every buffer that is a fragment of a frame in use (from the whole page table: for reclaim and the
    audit, which must not take a fragment for a frame of its own)."""
    if not pm.multibuf:
        return np.empty(0, np.int64)
    heads = np.flatnonzero((pm.nfrags != 0) & IN_USE[pm.state])
    return frame_frags(pm, heads)


def xdp_frags_release(pm: PageMemory, local: PagePool | None, heads: np.ndarray, nfrags: np.ndarray) -> int:
    """After a program ran: the fragments ``bpf_xdp_adjust_tail`` released (``bpf_xdp_frags_shrink_tail``,
    which the kernel frees at once with ``__xdp_return``), entries ``[nfrags[i], old)`` of each head's
    shinfo, go back to their pools (in this CPU's softirq: `local`'s own straight into its cache) and
    the heads' counts become `nfrags`.  Returns the buffers freed."""
    old = pm.nfrags.take(heads)
    new = np.asarray(nfrags, dtype=np.uint8)
    sel = new < old
    if not np.logical_or.reduce(sel):
        return 0
    h = np.asarray(heads)[sel].astype(np.intp)
    o, n = old[sel].astype(np.int64), new[sel].astype(np.int64)
    m = int(np.maximum.reduce(o))
    ent = pm.shinfo[h][:, SI_FRAG0 : SI_FRAG0 + 3 * m : 3]
    k = np.arange(m)
    rel = ent[(k >= n[:, None]) & (k < o[:, None])].astype(np.int64)
    pm.nfrags.put(h, n)
    return return_pages(pm, local, rel, expect=PageState.XDP)


def tx_dma_start(pm: PageMemory, ids: np.ndarray) -> None:
    """The device puts queued frames on the wire: TX_QUEUED -> TX_INFLIGHT until their completion."""
    if pm.multibuf:
        ids = frame_bufs(pm, ids)
    pm.state.put(ids, PageState.TX_INFLIGHT)


def page_hand_over(pm: PageMemory, ids: np.ndarray, holder: int) -> None:
    """The pages go to `holder` (a CPU or a device code) in the state they are in: if it dies, the
    coordinator finds them there."""
    if pm.multibuf:
        ids = frame_bufs(pm, ids)
    pm.holder.put(ids, holder)


def check_descs(
    pm: PageMemory, d: np.ndarray, expect: PageState, owner: int | None = None, unique: bool = False
) -> np.ndarray | None:
    """The check of descriptors a process is handed: each must name a page of this host (range) in its
    current life (generation), in the state the message implies (`expect`), of pool `owner` when given,
    and with `unique` no page twice; a multi-buffer frame's fragments must be in that state too.

    Returns None when every descriptor passes (the common case: a few gathers and one reduction), else
    the mask of those that do.  It changes and counts nothing: the caller refuses the rest and counts
    them as ``bad_descriptors``.
    """
    ok = _check_heads(pm, d, expect, owner, unique)
    if pm.multibuf and len(d):
        ok = _check_frags(pm, d["page"], expect, ok)
    return ok


def _check_frags(pm: PageMemory, pages: np.ndarray, expect: PageState, ok: np.ndarray | None) -> np.ndarray | None:
    """`check_descs` for the fragments of the frames that passed: a frame whose fragment is not in state
    `expect` (a page table a dead process tore, a forged message) is refused whole."""
    idx = np.arange(len(pages)) if ok is None else np.flatnonzero(ok)
    heads = pages[idx].astype(np.int64)
    nf = pm.nfrags.take(heads)
    if not np.logical_or.reduce(nf):
        return ok
    multi = np.flatnonzero(nf)
    fr = shinfo_frags(pm.shinfo, heads[multi], nf[multi])
    of = np.repeat(idx[multi], nf[multi].astype(np.int64))
    bad = fr >= pm.nbufs
    inr = ~bad
    bad[inr] = pm.state.take(fr[inr]) != expect
    if not np.logical_or.reduce(bad):
        return ok
    mask = np.ones(len(pages), dtype=bool) if ok is None else ok.copy()
    mask[of[bad]] = False
    return mask


def _check_heads(
    pm: PageMemory, d: np.ndarray, expect: PageState, owner: int | None = None, unique: bool = False
) -> np.ndarray | None:
    pages = d["page"]
    n = len(pages)
    if 0 < n <= _UNIFORM_MAX:
        # The common case in gathers and byte compares (as `PagePool._valid_uniform`): a third of the cost
        # of the masks below, which only run when something is refused.
        try:
            if (pm.state.take(pages).tobytes() == bytes((int(expect),)) * n
                    and pm.gen.take(pages).tobytes() == d["gen"].tobytes()
                    and (owner is None or pm.owner.take(pages).tobytes() == _owner_bytes(owner)[: 2 * n])):
                if not unique:
                    return None
                mark = pm.batch_mark
                mark.put(pages, _POS[:n])
                if mark.take(pages).tobytes() == _POS_BYTES[: 4 * n]:
                    return None
        except IndexError:
            pass  # a page id past the end: the masks below refuse it
    ok = pages < pm.nbufs  # ids are unsigned: nothing below 0
    if np.logical_and.reduce(ok):
        ok = (pm.state.take(pages) == expect) & (pm.gen.take(pages) == d["gen"])
        if owner is not None:
            ok &= pm.owner.take(pages) == owner
    else:
        inr = pages[ok]
        good = (pm.state.take(inr) == expect) & (pm.gen.take(inr) == d["gen"][ok])
        if owner is not None:
            good &= pm.owner.take(inr) == owner
        ok[ok] = good
    if unique and len(pages) > 1:
        # A page named twice: its later copies are refused (the same page cannot be two buffers).
        sel = np.flatnonzero(ok)
        ids = pages[sel]
        pos = np.arange(len(ids), dtype=np.int32)
        mark = pm.batch_mark
        mark.put(ids, pos)
        dup = mark.take(ids) != pos
        if np.logical_or.reduce(dup):
            ok[sel[dup]] = False
    return None if np.logical_and.reduce(ok) else ok


# -- the audit --------------------------------------------------------------------------------------
# The promise of this module, checked from the page table and the pools' structures alone: every page is
# in exactly one place, and each pool's accounting matches the pages that carry its mark.


@dataclass(slots=True)
class Audit:
    """Result of a page-conservation audit."""

    total: int
    by_state: dict[str, int]
    problems: list[str]

    @property
    def accounted(self) -> int:
        return sum(self.by_state.values())

    @property
    def ok(self) -> bool:
        return not self.problems and self.accounted == self.total

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "accounted": self.accounted,
            "by_state": dict(self.by_state),
            "problems": list(self.problems),
        }


def audit(pm: PageMemory, strict: bool = False) -> Audit:
    """Check page conservation in `pm`; any process may call it at any time.

    The state histogram counts buffers (a page each, or its fragments: ``frag_size``); it always sums to
    the buffer count (each has one state) and is safe to take while traffic runs.  `strict` also checks
    every structure against the page table (each page in exactly one place, all its buffers in the state
    that place implies, owned by the right pool, every pool's hold_cnt - release_cnt equal to the pages
    it owns, and with fragments each page out of its pool holding one reference per fragment in use or
    not handed out yet); that is exact only when the host is quiescent.
    """
    states = pm.state.copy()
    hist = np.bincount(states, minlength=len(PageState))
    by_state = {s.name.lower(): int(hist[s]) for s in PageState}
    unknown = int(len(states) - sum(by_state.values()))
    problems: list[str] = []
    if unknown:
        problems.append(f"{unknown} buffers in an unknown state")
    if strict:
        problems += _strict_problems(pm, states)
    return Audit(pm.nbufs, by_state, problems)


def _strict_problems(pm: PageMemory, states: np.ndarray) -> list[str]:
    problems: list[str] = []
    f = pm.frags
    seen = np.zeros(pm.npages, dtype=np.int32)
    owner = pm.owner.copy()
    # Per page: its first buffer's owner (a page's buffers share it, checked below) and its states.
    page_owner = owner[::f]
    page_states = states.reshape(pm.npages, f)

    def place(ids: np.ndarray, want: PageState, where: str, cpu: int = NO_OWNER) -> None:
        bad = ids[(ids < 0) | (ids >= pm.npages)]
        if len(bad):
            problems.append(f"{where}: {len(bad)} ids out of range, e.g. {int(bad[0])}")
            ids = ids[(ids >= 0) & (ids < pm.npages)]
        np.add.at(seen, ids, 1)
        wrong = ids[(page_states[ids] != want).any(axis=1)]
        if len(wrong):
            p = int(wrong[0])
            st = PageState(int(page_states[p][page_states[p] != want][0]))
            problems.append(f"{where}: {len(wrong)} pages not in state {want.name}, e.g. page {p} is {st.name}"
                            + (" (a buffer of it)" if f > 1 else ""))
        if cpu != NO_OWNER:
            foreign = ids[page_owner[ids] != cpu]
            if len(foreign):
                p = int(foreign[0])
                problems.append(
                    f"{where}: {len(foreign)} pages owned by another CPU, e.g. page {p} (cpu {page_owner[p]})"
                )

    place(pm.free_stack[: pm.free_count], PageState.FREE, "page allocator")
    slots: dict[int, int] = {}  # page being split -> its fragments not handed out yet
    for cpu in range(pm.ncpus):
        ctl = pm.pool_ctl[cpu]
        n = int(ctl[P_CACHE_COUNT])
        place(pm.caches[cpu, :n], PageState.CACHE, f"cpu {cpu} alloc cache", cpu)
        head, tail = int(ctl[P_RING_HEAD]), int(ctl[P_RING_TAIL])
        size = pm.params.pool_size
        ring_ids = pm.rings[cpu, (np.arange(head, tail) % size)] if tail > head else np.empty(0, int)
        place(ring_ids, PageState.RING, f"cpu {cpu} recycle ring", cpu)
        if ctl[P_FRAG_PAGE]:
            slots[int(ctl[P_FRAG_PAGE]) - 1] = f - int(ctl[P_FRAG_NEXT])
        cnt = pm.pool_counters[cpu]
        owned = int(np.count_nonzero(page_owner == cpu))
        held = int(cnt[C["hold_cnt"]] - cnt[C["release_cnt"]])
        if owned != held:
            problems.append(
                f"cpu {cpu} pool: hold_cnt - release_cnt = {held} but {owned} pages carry its mark"
            )
    twice = np.flatnonzero(seen > 1)
    if len(twice):
        problems.append(f"{len(twice)} pages in more than one place, e.g. page {int(twice[0])}")
    in_struct = HOME[states]
    page_home = in_struct[::f] if f == 1 else in_struct.reshape(pm.npages, f).any(axis=1)
    lost = np.flatnonzero(page_home & (seen == 0))
    if len(lost):
        p = int(lost[0])
        problems.append(
            f"{len(lost)} pages marked {PageState(states[p * f]).name} but in no structure, e.g. page {p}"
        )
    if f > 1:
        problems += _frag_problems(pm, states, owner, page_home, slots)
    if pm.multibuf:
        problems += _multibuf_problems(pm, states)
    # A page released from its pool while someone still referenced it (recycle_released_refcnt)
    # legitimately has no owner until its last put_page.
    refs = pm.refcnt.copy()
    orphan = np.flatnonzero(
        ~in_struct & (owner == NO_OWNER) & (states != PageState.ALLOCATED) & (refs == 0)
    )
    if len(orphan):
        problems.append(f"{len(orphan)} pages in use but owned by no pool, e.g. page {int(orphan[0])}")
    # xdpf_clone's pages from the page allocator: in use, with their one reference, until freed; and as
    # many out as the allocator gave them less those that came back.
    out0 = int(pm.header[H_ORDER0_ALLOC] - pm.header[H_ORDER0_FREE])
    marked = int(np.count_nonzero(page_owner == ORDER0_OWNER))
    if out0 != marked:
        problems.append(f"page allocator: {out0} cloned pages out (given - returned) but {marked} carry the mark")
    # (with fragments, a clone is the first buffer of its page)
    order0 = f * np.flatnonzero((page_owner == ORDER0_OWNER) & (~IN_USE[states[::f]] | (refs[::f] != 1)))
    if len(order0):
        p = int(order0[0])
        problems.append(f"{len(order0)} cloned (page-allocator) pages not in use with one reference, e.g. page "
                        f"{p} ({PageState(states[p]).name}, refcnt {int(refs[p])})")
    return problems


def _multibuf_problems(pm: PageMemory, states: np.ndarray) -> list[str]:
    """The strict audit's multi-buffer checks: only a frame in use counts fragments, and each of its
    fragments is a buffer of this host in its head's state, named by no other frame and heading none."""
    problems: list[str] = []
    heads = np.flatnonzero(pm.nfrags)
    idle = heads[~IN_USE[states[heads]]]
    if len(idle):
        problems.append(f"{len(idle)} buffers not in use still list fragments (nfrags), e.g. buffer {int(idle[0])}")
    heads = heads[IN_USE[states[heads]]]
    if not len(heads):
        return problems
    nf = pm.nfrags[heads]
    fr = shinfo_frags(pm.shinfo, heads, nf)
    hs = np.repeat(heads, nf.astype(np.int64))
    out = (fr < 0) | (fr >= pm.nbufs)
    if out.any():
        problems.append(f"{int(np.count_nonzero(out))} fragments name no buffer, e.g. frame {int(hs[out][0])}")
        fr, hs = fr[~out], hs[~out]
    wrong = states[fr] != states[hs]
    if wrong.any():
        b, h = int(fr[wrong][0]), int(hs[wrong][0])
        problems.append(f"{int(np.count_nonzero(wrong))} fragments not in their frame's state, e.g. buffer {b} is "
                        f"{PageState(int(states[b])).name}, its frame {h} {PageState(int(states[h])).name}")
    uniq, cnt = np.unique(np.concatenate((fr, heads)), return_counts=True)
    if (cnt > 1).any():
        problems.append(f"{int(np.count_nonzero(cnt > 1))} buffers in more than one frame, e.g. buffer "
                        f"{int(uniq[cnt > 1][0])}")
    return problems


def _frag_problems(pm: PageMemory, states: np.ndarray, owner: np.ndarray, page_home: np.ndarray,
                   slots: dict[int, int]) -> list[str]:
    """The strict audit's fragment checks: a page is whole (every buffer home, or none), its buffers
    share one owner, and a pool's page out holds ``pp_ref_count`` = its fragments in use + those of the
    page being split not handed out yet (0 once home)."""
    problems: list[str] = []
    f = pm.frags
    st = states.reshape(pm.npages, f)
    home = HOME[st]
    part = np.flatnonzero(home.any(axis=1) & ~home.all(axis=1))
    if len(part):
        problems.append(f"{len(part)} pages partly home (some fragments in a pool or the allocator, some "
                        f"out), e.g. page {int(part[0])}")
    own = owner.reshape(pm.npages, f)
    split = np.flatnonzero((own != own[:, :1]).any(axis=1))
    if len(split):
        problems.append(f"{len(split)} pages whose fragments name different owners, e.g. page {int(split[0])}")
    want = np.count_nonzero(IN_USE[st], axis=1).astype(np.int64)
    for page, left in slots.items():
        want[page] += left
    pooled = own[:, 0] >= 0
    refs = pm.frag_refs.astype(np.int64)
    bad = np.flatnonzero(pooled & ~page_home & (refs != want) | page_home & (refs != 0))
    if len(bad):
        p = int(bad[0])
        problems.append(f"{len(bad)} pages whose pp_ref_count is not their fragments out, e.g. page {p}: "
                        f"pp_ref_count {int(refs[p])}, fragments out {int(want[p])}")
    return problems
