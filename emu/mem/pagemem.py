"""The page memory of one emulated host: pages, the page table, descriptors and the page allocator.

Every process of a host (its CPU workers, its devices, the coordinator) maps the same two segments:

* ``<prefix>-data``: N pages of `page_size` bytes.  Packet bytes live here and are never copied between
  the processes of a host; a device "DMAs" a frame into a page and a CPU runs XDP on it in place.
* ``<prefix>-meta``: a header describing the layout, the page table, the page allocator's free stack,
  and every CPU's page-pool structures (alloc cache, recycle ring, counters; see `emu.mem.pagepool`).

The page table is the emulator's ``struct page``: per page its `state` (where it is), the CPU whose pool
allocated it (`owner`, the kernel's ``page->pp``), a generation number bumped at every allocation (so a
descriptor that outlived its page is recognised), the data `offset` and `length`, a reference count
(``page_ref_count``) and the `holder` (the CPU or device that has it now, for fault recovery).

A *page descriptor* is the fixed-size record that travels between processes in place of a page:
``(page, gen, offset, length, owner, aux)``; batches are numpy record arrays (`DESC_DTYPE`) and cross
zmq as one packed blob.

The page allocator is the stand-in for the kernel's buddy allocator and its per-CPU lists: one free
stack shared by all CPUs of the host (laid out here), used only in bulk and only under a lock; the
functions that take pages from it and give them back are `emu.mem.pagepool`'s, which owns every change of a
page's state.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emu.errors import BadInputError
from emu.mem.locks import OfdLockFile
from emu.mem.shm import SHM_DIR, Segment, ShmSpaceError, shm_free_bytes
from emu.net.protocol import NO_HOLDER


class PageState(enum.IntEnum):
    """Where a page is.  Exactly one state per page at any time: conservation is counted over these."""

    FREE = 0  # in the page allocator
    CACHE = 1  # in a CPU's lockless alloc cache
    RING = 2  # in a CPU's recycle ring
    ALLOCATED = 3  # handed out by a pool, not yet placed
    RX_POSTED = 4  # posted to a device RX ring, waiting for a frame
    XDP = 5  # owned by a CPU's XDP path (received, program running, verdict pending or bulked)
    TX_QUEUED = 6  # on a device's XDP TX queue, not yet on the wire
    TX_INFLIGHT = 7  # transmitted, awaiting TX-DMA completion
    SKB = 8  # held by an skb of the emulated network stack


# States in which a page is out of its pool and may legitimately be returned to it.
IN_USE_STATES = (
    PageState.ALLOCATED,
    PageState.RX_POSTED,
    PageState.XDP,
    PageState.TX_QUEUED,
    PageState.TX_INFLIGHT,
    PageState.SKB,
)
IN_USE = np.zeros(256, dtype=bool)
IN_USE[list(IN_USE_STATES)] = True
# States in which a page is home: in the allocator or kept by its pool (`HOME[state]`, like IN_USE).
HOME = np.zeros(256, dtype=bool)
HOME[[PageState.FREE, PageState.CACHE, PageState.RING]] = True

# One descriptor: 20 bytes, little-endian, no padding, so a batch is a flat blob on the wire.
DESC_DTYPE = np.dtype(
    [("page", "<u4"), ("gen", "<u4"), ("off", "<u4"), ("len", "<u4"), ("owner", "<u2"), ("aux", "<u2")]
)

NO_OWNER = -1
MAGIC = 0x50504D31  # "PPM1"
LAYOUT_VERSION = 2  # 2: the allocator's low-water mark (H_FREE_LOW)
HEADER_BYTES = 4096
# Locks on the meta segment: 0 is the page allocator, 1 + cpu is that CPU's recycle ring.
ALLOCATOR_LOCK = 0

# Header words (int64) at the start of the meta segment.
_H_MAGIC, _H_VERSION, _H_NPAGES, _H_PAGE_SIZE, _H_NCPUS = 0, 1, 2, 3, 4
_H_CACHE, _H_REFILL, _H_RING, _H_LIMIT, H_FREE_COUNT = 5, 6, 7, 8, 9
# Pages holding references beyond their pool's: while 0, returns skip the per-page refcount check
# (`emu.mem.pagepool` reads it in returns and keeps it in `page_get` and `put_page`).
H_EXTRA_REFS = 10
# The fewest pages the allocator ever held (its low-water mark): npages minus it is the most pages that
# were ever out at once, which bounds the page memory any process of the host can have touched.
H_FREE_LOW = 11
_H_WORDS = 16


def descs(n: int = 0) -> np.ndarray:
    """An empty (zeroed) descriptor batch of `n` records."""
    return np.zeros(n, dtype=DESC_DTYPE)


def descs_from_bytes(blob: bytes | memoryview) -> np.ndarray:
    """A descriptor batch from a packed blob; raises ValueError if the blob is not whole records."""
    if len(blob) % DESC_DTYPE.itemsize:
        raise ValueError(
            f"descriptor blob of {len(blob)} bytes is not a whole number of "
            f"{DESC_DTYPE.itemsize}-byte records"
        )
    return np.frombuffer(blob, dtype=DESC_DTYPE)


def concat_descs(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Descriptor batches end to end.  Through their bytes: `np.concatenate` on a structured dtype goes
    through dtype promotion in Python (15 us for three batches of 200, against 2.4 us this way)."""
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([np.ascontiguousarray(p).view(np.uint8) for p in parts]).view(DESC_DTYPE)


class PageSpans:
    """A host's page memory, ``(npages, page_size)`` bytes, seen as one `width`-byte item per page for the
    bytes ``off .. off + width`` of every page.

    Frames of one length at one offset (a generator's bursts, the head of every packet of an XDP batch)
    then gather and scatter as one item copy per frame, where numpy's fancy indexing with a slice
    (``mem[pages, off : off + width]``) steps through `width` one-byte elements per frame: measured on
    1,024 frames of 64 bytes, 7 us against 45 for the scatter, 7.5 against 13 for the gather."""

    _KEEP = 64  # views kept; a host sees a handful of (offset, width) pairs

    def __init__(self, mem: np.ndarray) -> None:
        self.mem = mem
        self._views: dict[tuple[int, int], tuple[np.ndarray, np.dtype]] = {}

    def _view(self, off: int, width: int) -> tuple[np.ndarray, np.dtype]:
        """The item view of bytes ``off .. off + width`` and its item dtype (building a void dtype costs
        as much as a 64-frame copy, so both are kept)."""
        vd = self._views.get((off, width))
        if vd is None:
            if not 0 <= off <= off + width <= self.mem.shape[1]:
                raise ValueError(f"bytes {off}..{off + width} are not inside a {self.mem.shape[1]}-byte page")
            dt = np.dtype((np.void, width))
            vd = (self.mem[:, off : off + width].view(dt)[:, 0], dt)
            if len(self._views) < self._KEEP:
                self._views[(off, width)] = vd
        return vd

    def gather(self, pages: np.ndarray, off: int, width: int) -> np.ndarray:
        """A copy of bytes ``off .. off + width`` of each page of `pages`: ``(len(pages), width)`` uint8."""
        if width <= 0:
            return np.empty((len(pages), 0), dtype=np.uint8)
        # intp indices: numpy indexes an item array with other integer types several times slower.
        return self._view(off, width)[0][pages.astype(np.intp, copy=False)].view(np.uint8).reshape(len(pages), width)

    def scatter(self, pages: np.ndarray, off: int, rows: np.ndarray) -> None:
        """Write row ``i`` of `rows` (``(n, width)`` uint8) over bytes ``off ..`` of page ``pages[i]``."""
        width = rows.shape[1]
        if width <= 0 or not len(rows):
            return
        v, dt = self._view(off, width)
        v[pages.astype(np.intp, copy=False)] = np.ascontiguousarray(rows).view(dt)[:, 0]


class PageError(BadInputError, ValueError):
    """A page was returned or used against the rules (double free, stale generation, bad id...): a bad
    descriptor, whoever sent it; the message quotes the page id and what was wrong with it."""


@dataclass(frozen=True, slots=True)
class PoolParams:
    """Per-CPU page-pool sizes; the defaults are the kernel's."""

    cache_size: int = 128  # PP_ALLOC_CACHE_SIZE
    refill: int = 64  # PP_ALLOC_CACHE_REFILL
    pool_size: int = 1024  # ptr_ring size; 0 means 1024, at most 16384 (page_pool_init)
    recycle_limit: int = 0  # hard limit on recyclable pages kept (cache + ring); 0 = none

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
        return PoolParams(self.cache_size, self.refill, size, self.recycle_limit)


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
    "recycle_hard_limit",  # returned pages released because the pool already keeps recycle_limit pages
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
# Pool control words (int64, `PageMemory.pool_ctl[cpu]`), written by `emu.mem.pagepool` and read by the audit:
# cache count, ring head (consumer), ring tail (producer), owner pid.
P_CACHE_COUNT, P_RING_HEAD, P_RING_TAIL, P_OWNER_PID = 0, 1, 2, 3
_P_WORDS = 8


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class Layout:
    """Byte offsets of every array in the meta segment, derived from the sizes alone."""

    npages: int
    page_size: int
    ncpus: int
    params: PoolParams

    def offsets(self) -> dict[str, int]:
        n, c, p = self.npages, self.ncpus, self.params
        fields = [
            ("state", n),
            ("owner", 2 * n),
            ("gen", 4 * n),
            ("off", 4 * n),
            ("len", 4 * n),
            ("refcnt", 2 * n),
            ("holder", 2 * n),
            ("free_stack", 4 * n),
            ("pool_ctl", 8 * _P_WORDS * c),
            ("pool_counters", 8 * len(POOL_COUNTERS) * c),
            ("cache", 4 * p.cache_size * c),
            ("ring", 4 * p.pool_size * c),
        ]
        out, pos = {}, HEADER_BYTES
        for name, size in fields:
            out[name] = pos
            pos = _align(pos + size)
        out["end"] = pos
        return out

    @property
    def meta_bytes(self) -> int:
        return self.offsets()["end"]

    @property
    def data_bytes(self) -> int:
        return self.npages * self.page_size


def required_shm_bytes(npages: int, page_size: int, ncpus: int, params: PoolParams) -> int:
    """Bytes of ``/dev/shm`` a host's page memory needs."""
    lay = Layout(npages, page_size, ncpus, params.normalised())
    return lay.meta_bytes + lay.data_bytes


class PageMemory:
    """One host's page memory, page table and page allocator, as mapped by one process."""

    def __init__(self, prefix: str, data: Segment, meta: Segment, layout: Layout) -> None:
        self.prefix = prefix
        self.data_seg = data
        self.meta_seg = meta
        self.layout = layout
        self.npages = layout.npages
        self.page_size = layout.page_size
        self.ncpus = layout.ncpus
        self.params = layout.params
        off = layout.offsets()
        n, c, p = self.npages, self.ncpus, self.params
        self.header = meta.array(np.int64, _H_WORDS, 0)
        self.state = meta.array(np.uint8, n, off["state"])
        self.owner = meta.array(np.int16, n, off["owner"])
        self.gen = meta.array(np.uint32, n, off["gen"])
        self.off = meta.array(np.uint32, n, off["off"])
        self.len = meta.array(np.uint32, n, off["len"])
        self.refcnt = meta.array(np.uint16, n, off["refcnt"])
        self.holder = meta.array(np.int16, n, off["holder"])
        self.free_stack = meta.array(np.int32, n, off["free_stack"])
        self.pool_ctl = meta.array(np.int64, _P_WORDS * c, off["pool_ctl"]).reshape(c, _P_WORDS)
        self.pool_counters = meta.array(np.int64, len(POOL_COUNTERS) * c, off["pool_counters"]).reshape(
            c, len(POOL_COUNTERS)
        )
        self.caches = meta.array(np.int32, p.cache_size * c, off["cache"]).reshape(c, p.cache_size)
        self.rings = meta.array(np.int32, p.pool_size * c, off["ring"]).reshape(c, p.pool_size)
        self.data = data.array(np.uint8, data.size, 0)
        self.locks = OfdLockFile(os.path.join(SHM_DIR, meta.name))
        # Scratch for the pools' O(n) duplicate detection inside one returned batch (private to this
        # process; `emu.mem.pagepool`).
        self.batch_mark = np.full(n, -1, dtype=np.int32)
        # This process's non-owner pool handles (`emu.mem.pagepool.pool_of`), kept here so that `close`
        # drops their views of the segment with the others.
        self.pool_handles: dict[int, Any] = {}

    # -- life cycle -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, prefix: str, npages: int, page_size: int, ncpus: int, params: PoolParams | None = None
    ) -> PageMemory:
        """Create a host's page memory with every page in the page allocator."""
        params = (params or PoolParams()).normalised()
        if npages < 1 or npages >= 2**31:
            raise ValueError(f"npages must be 1..2**31-1, not {npages}")
        if page_size < 64 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 64, not {page_size}")
        if not 1 <= ncpus <= 1024:
            raise ValueError(f"ncpus must be 1..1024, not {ncpus}")
        layout = Layout(npages, page_size, ncpus, params)
        need = layout.meta_bytes + layout.data_bytes
        free = shm_free_bytes()
        if need > free:
            raise ShmSpaceError(
                28, f"{SHM_DIR} has {free:,} bytes free but this host's page memory needs {need:,} bytes"
            )
        meta = Segment.create(f"{prefix}-meta", layout.meta_bytes)
        try:
            data = Segment.create(f"{prefix}-data", layout.data_bytes)
        except BaseException:
            meta.unlink()
            raise
        h = meta.array(np.int64, _H_WORDS, 0)
        h[_H_NPAGES], h[_H_PAGE_SIZE], h[_H_NCPUS] = npages, page_size, ncpus
        h[_H_CACHE], h[_H_REFILL] = params.cache_size, params.refill
        h[_H_RING], h[_H_LIMIT] = params.pool_size, params.recycle_limit
        pm = cls(prefix, data, meta, layout)
        pm.owner[:] = NO_OWNER
        pm.holder[:] = NO_HOLDER
        # Pop order is from the top of the stack; lay pages out so that page 0 is handed out first.
        pm.free_stack[:] = np.arange(npages - 1, -1, -1, dtype=np.int32)
        h[H_FREE_COUNT] = h[H_FREE_LOW] = npages
        h[_H_VERSION] = LAYOUT_VERSION
        h[_H_MAGIC] = MAGIC  # last: an attacher that sees the magic sees a complete header
        return pm

    @classmethod
    def attach(cls, prefix: str) -> PageMemory:
        """Map a host's page memory created by another process."""
        meta = Segment.attach(f"{prefix}-meta")
        h = meta.array(np.int64, _H_WORDS, 0)
        if int(h[_H_MAGIC]) != MAGIC or int(h[_H_VERSION]) != LAYOUT_VERSION:
            raise ValueError(f"shared-memory segment {meta.name!r} is not a pagepool-emu page table")
        params = PoolParams(int(h[_H_CACHE]), int(h[_H_REFILL]), int(h[_H_RING]), int(h[_H_LIMIT]))
        layout = Layout(int(h[_H_NPAGES]), int(h[_H_PAGE_SIZE]), int(h[_H_NCPUS]), params)
        del h
        data = Segment.attach(f"{prefix}-data")
        return cls(prefix, data, meta, layout)

    def close(self) -> None:
        self.locks.close()
        self.pool_handles.clear()
        for seg in (self.data_seg, self.meta_seg):
            seg.close()

    def unlink(self) -> None:
        self.data_seg.unlink()
        self.meta_seg.unlink()

    # -- pages ------------------------------------------------------------------------------------

    def page_view(self, page: int, off: int = 0, length: int | None = None) -> memoryview:
        """A writable zero-copy view of bytes of a page."""
        start = page * self.page_size + off
        end = start + (self.page_size - off if length is None else length)
        return self.data_seg.buf[start:end]

    def check_ids(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the ids that name a page of this host."""
        return (ids >= 0) & (ids < self.npages)

    # -- the page allocator -----------------------------------------------------------------------

    @property
    def free_count(self) -> int:
        return int(self.header[H_FREE_COUNT])

    @property
    def allocated_hwm(self) -> int:
        """The most pages ever out of the page allocator at once (a high-water mark, as VmHWM is for a
        process's RSS): a process of this host can have touched at most this many pages of page memory."""
        return self.npages - int(self.header[H_FREE_LOW])

    # -- audit ------------------------------------------------------------------------------------

    def audit(self, strict: bool = False) -> Audit:
        """Check page conservation; any process may call it at any time.

        The state histogram always sums to the page count (each page has one state) and is safe to take
        while traffic runs.  `strict` also checks every structure against the page table (each page in
        exactly one place, in the state that place implies, owned by the right pool, and every pool's
        hold_cnt - release_cnt equal to the pages it owns); that is exact only when the host is quiescent.
        """
        states = self.state.copy()
        hist = np.bincount(states, minlength=len(PageState))
        by_state = {s.name.lower(): int(hist[s]) for s in PageState}
        unknown = int(len(states) - sum(by_state.values()))
        problems: list[str] = []
        if unknown:
            problems.append(f"{unknown} pages in an unknown state")
        if strict:
            problems += self._strict_problems(states)
        return Audit(self.npages, by_state, problems)

    def _strict_problems(self, states: np.ndarray) -> list[str]:
        problems: list[str] = []
        seen = np.zeros(self.npages, dtype=np.int32)
        owner = self.owner.copy()

        def place(ids: np.ndarray, want: PageState, where: str, cpu: int = NO_OWNER) -> None:
            bad = ids[(ids < 0) | (ids >= self.npages)]
            if len(bad):
                problems.append(f"{where}: {len(bad)} ids out of range, e.g. {int(bad[0])}")
                ids = ids[(ids >= 0) & (ids < self.npages)]
            np.add.at(seen, ids, 1)
            wrong = ids[states[ids] != want]
            if len(wrong):
                p = int(wrong[0])
                problems.append(
                    f"{where}: {len(wrong)} pages not in state {want.name}, e.g. page {p} is "
                    f"{PageState(states[p]).name}"
                )
            if cpu != NO_OWNER:
                foreign = ids[owner[ids] != cpu]
                if len(foreign):
                    p = int(foreign[0])
                    problems.append(
                        f"{where}: {len(foreign)} pages owned by another CPU, e.g. page {p} (cpu {owner[p]})"
                    )

        place(self.free_stack[: self.free_count], PageState.FREE, "page allocator")
        for cpu in range(self.ncpus):
            ctl = self.pool_ctl[cpu]
            n = int(ctl[P_CACHE_COUNT])
            place(self.caches[cpu, :n], PageState.CACHE, f"cpu {cpu} alloc cache", cpu)
            head, tail = int(ctl[P_RING_HEAD]), int(ctl[P_RING_TAIL])
            size = self.params.pool_size
            ring_ids = self.rings[cpu, (np.arange(head, tail) % size)] if tail > head else np.empty(0, int)
            place(ring_ids, PageState.RING, f"cpu {cpu} recycle ring", cpu)
            cnt = self.pool_counters[cpu]
            owned = int(np.count_nonzero(owner == cpu))
            held = int(cnt[C["hold_cnt"]] - cnt[C["release_cnt"]])
            if owned != held:
                problems.append(
                    f"cpu {cpu} pool: hold_cnt - release_cnt = {held} but {owned} pages carry its mark"
                )
        twice = np.flatnonzero(seen > 1)
        if len(twice):
            problems.append(f"{len(twice)} pages in more than one place, e.g. page {int(twice[0])}")
        in_struct = (states == PageState.FREE) | (states == PageState.CACHE) | (states == PageState.RING)
        lost = np.flatnonzero(in_struct & (seen == 0))
        if len(lost):
            p = int(lost[0])
            problems.append(
                f"{len(lost)} pages marked {PageState(states[p]).name} but in no structure, e.g. page {p}"
            )
        # A page released from its pool while someone still referenced it (recycle_released_refcnt)
        # legitimately has no owner until its last put_page.
        refs = self.refcnt.copy()
        orphan = np.flatnonzero(
            ~in_struct & (owner == NO_OWNER) & (states != PageState.ALLOCATED) & (refs == 0)
        )
        if len(orphan):
            problems.append(f"{len(orphan)} pages in use but owned by no pool, e.g. page {int(orphan[0])}")
        return problems


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
