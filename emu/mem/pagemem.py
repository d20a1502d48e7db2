"""The page memory of one emulated host: the shared-memory segments its pages, page table and pools live in.

Every process of a host (its CPU workers, its devices, the coordinator) maps the same two segments:

* ``<prefix>-data``: N pages of `page_size` bytes, seen by the data path as ``nbufs`` buffers of
  ``buf_size`` bytes (a page each, or its fragments when the pools split pages: ``frag_size``; buffer ids
  are `emu.mem.page`'s).  Packet bytes live here and are never copied between the processes of a host; a
  device "DMAs" a frame into a buffer and a CPU runs XDP on it in place (`PageSpans` copies the bytes of
  many buffers at once).
* ``<prefix>-meta``: a header describing the layout (its words are named in `emu.mem.page`), the page
  table (one row per buffer, `emu.mem.page`), each page's fragments out (``frag_refs``, the kernel's
  ``pp_ref_count``), the page allocator's free stack (of pages), and every CPU's page-pool structures,
  whose names, types and sizes `emu.mem.pagepool.pool_regions` gives.

This module lays those out (`Layout`), creates, attaches and unlinks them (`PageMemory`) and says how much
``/dev/shm`` they take (`required_shm_bytes`).  It changes no page: the page allocator (a stand-in for the
kernel's buddy allocator, one free stack shared by all CPUs of the host, used only in bulk and only under
a lock), the pools and every change of a page's state are `emu.mem.pagepool`'s, as is the audit that
checks what they did.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from emu.mem.locks import OfdLockFile
from emu.mem.page import (
    H_CACHE,
    H_FRAGS,
    H_FREE_COUNT,
    H_FREE_LOW,
    H_LIMIT,
    H_MAGIC,
    H_MULTIBUF,
    H_NCPUS,
    H_NPAGES,
    H_PAGE_SIZE,
    H_POLICY,
    H_REFILL,
    H_RING,
    H_VERSION,
    H_WORDS,
    NO_OWNER,
    shinfo_view,
)
from emu.mem.pagepool import POOL_POLICIES, PoolParams, pool_regions
from emu.mem.shm import SHM_DIR, Segment, ShmSpaceError, shm_free_bytes
from emu.net.protocol import NO_HOLDER

MAGIC = 0x50504D31  # "PPM1"
LAYOUT_VERSION = 6  # 2: the allocator's low-water mark (H_FREE_LOW); 3: 16 pool words (netlink view);
# 4: the pools' recycling policy (H_POLICY) and the adaptive watermark's pool words; 5: fragments (H_FRAGS,
# a page table row per buffer, frag_refs); 6: XDP multi-buffer (H_MULTIBUF, the page table's nfrags)
HEADER_BYTES = 4096


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


def _words(column: np.ndarray, frags: int) -> np.ndarray | None:
    """`column` (a page-table column) with each page's entries as one unsigned word, when they fill 2, 4
    or 8 bytes; else None."""
    size = column.itemsize * frags
    if frags == 1 or size not in (2, 4, 8):
        return None
    return column.view(np.dtype(f"<u{size}"))


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class Layout:
    """Where every array of the meta segment lies, derived from the sizes alone: after the header, the
    page table (a row per buffer), the pages' fragment counts and the allocator's free stack, then the
    pools' regions (`pool_regions`)."""

    npages: int
    page_size: int
    ncpus: int
    params: PoolParams

    @property
    def frags(self) -> int:
        """Buffers per page: ``page_size / frag_size`` with fragments, else 1."""
        fs = self.params.frag_size
        return self.page_size // fs if fs else 1

    def regions(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """``(name, dtype, shape)`` of each array in segment order; each is the `PageMemory` attribute of
        that name."""
        n = (self.npages * self.frags,)
        return [
            ("state", np.dtype(np.uint8), n),
            ("owner", np.dtype(np.int16), n),
            ("gen", np.dtype(np.uint32), n),
            ("off", np.dtype(np.uint32), n),
            ("len", np.dtype(np.uint32), n),
            ("refcnt", np.dtype(np.uint16), n),
            ("holder", np.dtype(np.int16), n),
            ("nfrags", np.dtype(np.uint8), n),
            ("frag_refs", np.dtype(np.int32), (self.npages,)),
            ("free_stack", np.dtype(np.int32), (self.npages,)),
            *pool_regions(self.ncpus, self.params),
        ]

    def offsets(self) -> dict[str, int]:
        out, pos = {}, HEADER_BYTES
        for name, dtype, shape in self.regions():
            out[name] = pos
            pos = _align(pos + dtype.itemsize * int(np.prod(shape)))
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
    """One host's page memory, page table, page allocator and pools, as mapped by one process: the arrays
    that `emu.mem.pagepool` reads and changes, and the segments' life cycle."""

    def __init__(self, prefix: str, data: Segment, meta: Segment, layout: Layout) -> None:
        self.prefix = prefix
        self.data_seg = data
        self.meta_seg = meta
        self.layout = layout
        self.npages = layout.npages
        self.page_size = layout.page_size
        self.ncpus = layout.ncpus
        self.params = layout.params
        # The buffers a device receives into (`emu.mem.page`): `frags` per page, of `buf_size` bytes.
        self.frags = layout.frags
        self.buf_size = self.page_size // self.frags
        self.nbufs = self.npages * self.frags
        off = layout.offsets()
        self.header = meta.array(np.int64, H_WORDS, 0)
        a = {
            name: meta.array(dtype, int(np.prod(shape)), off[name]).reshape(shape)
            for name, dtype, shape in layout.regions()
        }
        # The page table (one entry per buffer; `emu.mem.page`), each page's fragments out (pp_ref_count,
        # kept by `emu.mem.pagepool` with fragments only) and the page allocator's free stack of pages,
        self.state, self.owner, self.gen = a["state"], a["owner"], a["gen"]
        self.off, self.len, self.refcnt, self.holder = a["off"], a["len"], a["refcnt"], a["holder"]
        self.frag_refs = a["frag_refs"]
        self.free_stack = a["free_stack"]
        # XDP multi-buffer (`emu.mem.page`'s shinfo): a head buffer's fragment count (0 for a linear frame and
        # for a fragment), and every buffer's shinfo words; `multibuf` is the host's H_MULTIBUF word: while
        # False, no frame has fragments and the pool's frame-moving functions skip them at no cost.
        self.nfrags = a["nfrags"]
        self.multibuf = bool(self.header[H_MULTIBUF])
        self.data = data.array(np.uint8, data.size, 0)
        self.shinfo = shinfo_view(self.data.reshape(self.nbufs, self.buf_size)) if self.multibuf else None
        # The state and holder columns seen a page per row (its buffers side by side), and where a page's
        # entries fit one machine word, a page per word: `emu.mem.pagepool` sets all of a page's buffers
        # in one indexed store (a word store is 6x cheaper than a row store for 1,024 pages).
        self.state_rows = self.state.reshape(self.npages, self.frags)
        self.holder_rows = self.holder.reshape(self.npages, self.frags)
        self.state_words = _words(self.state, self.frags)
        self.holder_words = _words(self.holder, self.frags)
        # and one row per CPU of each pool array (`emu.mem.pagepool.pool_regions`).
        self.pool_ctl, self.pool_counters = a["pool_ctl"], a["pool_counters"]
        self.caches, self.rings = a["caches"], a["rings"]
        self.locks = OfdLockFile(os.path.join(SHM_DIR, meta.name))
        # Scratch for the pools' O(n) duplicate detection inside one returned batch (private to this
        # process; `emu.mem.pagepool`).
        self.batch_mark = np.full(self.nbufs, -1, dtype=np.int32)
        # This process's non-owner pool handles (`emu.mem.pagepool.pool_of`), kept here so that `close`
        # drops their views of the segment with the others.
        self.pool_handles: dict[int, Any] = {}

    # -- life cycle -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, prefix: str, npages: int, page_size: int, ncpus: int, params: PoolParams | None = None,
        multibuf: bool = False,
    ) -> PageMemory:
        """Create a host's page memory with every page in the page allocator; `multibuf`: some device of the
        host receives XDP multi-buffer frames (H_MULTIBUF)."""
        params = (params or PoolParams()).normalised()
        if npages < 1 or npages >= 2**31:
            raise ValueError(f"npages must be 1..2**31-1, not {npages}")
        if page_size < 64 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 64, not {page_size}")
        if not 1 <= ncpus <= 1024:
            raise ValueError(f"ncpus must be 1..1024, not {ncpus}")
        if params.frag_size == page_size:
            params = dataclasses.replace(params, frag_size=0)  # one fragment per page: the page itself
        fs = params.frag_size
        if fs and (fs < 64 or fs & (fs - 1) or fs > page_size):
            raise ValueError(f"frag_size must be a power of two of 64..page_size ({page_size}), not {fs}")
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
        h = meta.array(np.int64, H_WORDS, 0)
        h[H_NPAGES], h[H_PAGE_SIZE], h[H_NCPUS] = npages, page_size, ncpus
        h[H_CACHE], h[H_REFILL] = params.cache_size, params.refill
        h[H_RING], h[H_LIMIT] = params.pool_size, params.recycle_limit
        h[H_POLICY] = POOL_POLICIES.index(params.policy)
        h[H_FRAGS] = layout.frags
        h[H_MULTIBUF] = int(multibuf)
        pm = cls(prefix, data, meta, layout)
        pm.owner[:] = NO_OWNER
        pm.holder[:] = NO_HOLDER
        # Pop order is from the top of the stack; lay pages out so that page 0 is handed out first.
        pm.free_stack[:] = np.arange(npages - 1, -1, -1, dtype=np.int32)
        h[H_FREE_COUNT] = h[H_FREE_LOW] = npages
        h[H_VERSION] = LAYOUT_VERSION
        h[H_MAGIC] = MAGIC  # last: an attacher that sees the magic sees a complete header
        return pm

    @classmethod
    def attach(cls, prefix: str) -> PageMemory:
        """Map a host's page memory created by another process."""
        meta = Segment.attach(f"{prefix}-meta")
        h = meta.array(np.int64, H_WORDS, 0)
        if int(h[H_MAGIC]) != MAGIC or int(h[H_VERSION]) != LAYOUT_VERSION:
            raise ValueError(f"shared-memory segment {meta.name!r} is not a pagepool-emu page table")
        policy = int(h[H_POLICY])
        if not 0 <= policy < len(POOL_POLICIES):
            raise ValueError(f"shared-memory segment {meta.name!r} names an unknown pool policy {policy}")
        frags = int(h[H_FRAGS])
        params = PoolParams(int(h[H_CACHE]), int(h[H_REFILL]), int(h[H_RING]), int(h[H_LIMIT]),
                            POOL_POLICIES[policy], int(h[H_PAGE_SIZE]) // frags if frags > 1 else 0)
        layout = Layout(int(h[H_NPAGES]), int(h[H_PAGE_SIZE]), int(h[H_NCPUS]), params)
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

    def page_view(self, buf: int, off: int = 0, length: int | None = None) -> memoryview:
        """A writable zero-copy view of bytes of a buffer (a page, or a fragment of one)."""
        start = buf * self.buf_size + off
        end = start + (self.buf_size - off if length is None else length)
        return self.data_seg.buf[start:end]

    def bufs_of(self, pages: np.ndarray) -> np.ndarray:
        """The buffer ids of `pages`, page by page (the pages themselves without fragments)."""
        if self.frags == 1:
            return pages
        f = self.frags
        # repeat, scale, then one strided add per fragment: half the cost of a broadcast for 1,024 pages
        b = np.repeat(np.asarray(pages, dtype=np.intp), f)
        b *= f
        rows = b.reshape(-1, f)
        for k in range(1, f):
            rows[:, k] += k
        return b

    def check_ids(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the ids that name a buffer of this host."""
        return (ids >= 0) & (ids < self.nbufs)

    # -- the page allocator -----------------------------------------------------------------------

    @property
    def free_count(self) -> int:
        return int(self.header[H_FREE_COUNT])

    @property
    def allocated_hwm(self) -> int:
        """The most pages ever out of the page allocator at once (a high-water mark, as VmHWM is for a
        process's RSS): a process of this host can have touched at most this many pages of page memory."""
        return self.npages - int(self.header[H_FREE_LOW])
