"""What a page is, for the page memory that lays pages out (`emu.mem.pagemem`) and the pool that moves them
(`emu.mem.pagepool`).

A page is `page_size` bytes of a host's data segment.  A *buffer* is what a device receives one frame
into: the whole page, or, when the host's pools split pages into fragments (``pool.frag_size``, the
kernel's ``page_pool_alloc_frag``), one of its ``page_size / frag_size`` fragments.  Buffer ``b`` is the
fragment at byte ``(b % frags) * frag_size`` of page ``b // frags`` (the driver's ``(page, page_offset)``
pair in one number; with one fragment per page a buffer id is a page id), and each buffer is one row of
the page table, the emulator's ``struct page``: its `state` (`PageState`: where it is), the CPU whose pool
allocated it (`owner`, the kernel's ``page->pp``; `NO_OWNER` while it is in the page allocator), a
generation number bumped at every allocation (so a descriptor that outlived its buffer is recognised), the
data `offset` (from the buffer's start) and `length`, a reference count (``page_ref_count``) and the
`holder` (the CPU or device that has it now).  Rows of one page share its `owner`; the page's fragments
out (``pp_ref_count``) are counted per page (`emu.mem.pagemem`'s ``frag_refs``).

A *page descriptor* is the fixed-size record that travels between processes in place of a buffer
(its ``page`` field is the buffer id):
``(page, gen, offset, length, owner, aux)``; batches are numpy record arrays (`DESC_DTYPE`) and cross
zmq as one packed blob.

The words of the page memory's header are named here too: the page allocator's (its free count, its
low-water mark, the count of extra references) are the pool module's to change, under `ALLOCATOR_LOCK`;
the others describe the layout and are written once, by `emu.mem.pagemem` when it creates the segment.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np

from emu.errors import BadInputError


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
    # A fragment of a page that is out of its pool while the fragment itself is not in use: not handed out
    # yet (the rest of the pool's current frag page, ``pool->frag_page``) or already put back while a
    # sibling fragment is still out (the page's ``pp_ref_count`` is not 0 yet).  Only with `frag_size`.
    FRAG = 9


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

NO_OWNER = -1
# A page straight from the page allocator, owned by no pool: an ``xdpf_clone`` copy (the kernel's
# MEM_TYPE_PAGE_ORDER0), freed back to the allocator (``put_page``) when its frame is done.
ORDER0_OWNER = -2

# One descriptor: 20 bytes, little-endian, no padding, so a batch is a flat blob on the wire.
DESC_DTYPE = np.dtype(
    [("page", "<u4"), ("gen", "<u4"), ("off", "<u4"), ("len", "<u4"), ("owner", "<u2"), ("aux", "<u2")]
)

# Header words (int64) at the start of the meta segment.  The layout's, written once at creation:
H_MAGIC, H_VERSION, H_NPAGES, H_PAGE_SIZE, H_NCPUS = 0, 1, 2, 3, 4
H_CACHE, H_REFILL, H_RING, H_LIMIT = 5, 6, 7, 8  # the pools' `PoolParams`
# The page allocator's, changed by `emu.mem.pagepool` under `ALLOCATOR_LOCK`: the pages it holds,
H_FREE_COUNT = 9
# pages holding references beyond their pool's (while 0, returns skip the per-page refcount check; kept
# by `page_get` and `put_page`),
H_EXTRA_REFS = 10
# and the fewest pages it ever held (its low-water mark): npages minus it is the most pages that were ever
# out at once, which bounds the page memory any process of the host can have touched.
H_FREE_LOW = 11
# The pools' recycling policy (`PoolParams.policy`, its index in `POOL_POLICIES`: 0 fixed, 1 adaptive),
# written once at creation like the other `PoolParams` words.
H_POLICY = 12
# Pages the page allocator gave `xdpf_clone` (MEM_TYPE_PAGE_ORDER0 frames, in no pool), and those that came
# back (under `ALLOCATOR_LOCK`): their difference is the clones out now, which the strict audit checks.
H_ORDER0_ALLOC = 13
H_ORDER0_FREE = 14
# Fragments per page (`PoolParams.frag_size`: page_size / frag_size; 1 without fragments), written once.
H_FRAGS = 15
# 1 when some device of the host receives multi-buffer frames (``rx-sg`` and an MTU beyond one buffer),
# written once: every frame-moving function of `emu.mem.pagepool` skips its fragment work while it is 0.
H_MULTIBUF = 16
H_WORDS = 17
# Locks on the meta segment: 0 is the page allocator, 1 + cpu is that CPU's recycle ring.
ALLOCATOR_LOCK = 0


# -- XDP multi-buffer: the skb_shared_info of a head buffer (the contract shared with emu.ebpf) ---------
# A frame longer than one RX buffer is a *head* buffer (the linear part) plus up to MAX_SKB_FRAGS fragment
# buffers, listed in the head's ``skb_shared_info``, which lives where the kernel puts it
# (``xdp_get_shared_info_from_buff``): the last SHINFO_TAILROOM bytes of the head's buffer.  Little-endian
# u32 words: nr_frags, xdp_frags_size, then per fragment (buffer id, offset of its data in its buffer,
# length).  Only the head's page-table row knows it has fragments (`PageMemory.nfrags`): a frame is named
# by its head everywhere in the data path, and its fragments move with it.
MAX_SKB_FRAGS = 17
SHINFO_TAILROOM = 320  # SKB_DATA_ALIGN(sizeof(struct skb_shared_info)) on x86-64 (topology's SKB_SHARED_INFO)
SHINFO_WORDS = 2 + 3 * MAX_SKB_FRAGS  # 53 words, 212 bytes, inside the tailroom
SHINFO_BYTES = 4 * SHINFO_WORDS
SI_NR_FRAGS, SI_FRAGS_SIZE, SI_FRAG0 = 0, 1, 2  # word indexes; fragment k is words SI_FRAG0 + 3k .. + 2


def shinfo_view(mem2d: np.ndarray) -> np.ndarray:
    """Every buffer's shinfo words as a writable ``(nbufs, SHINFO_WORDS)`` uint32 view of the buffer rows
    `mem2d` (``(nbufs, buf_size)`` uint8): row ``b`` is valid only while buffer ``b`` heads a multi-buffer
    frame."""
    start = mem2d.shape[1] - SHINFO_TAILROOM
    return mem2d[:, start : start + SHINFO_BYTES].view("<u4")


def shinfo_frags(si: np.ndarray, heads: np.ndarray, nfrags: np.ndarray) -> np.ndarray:
    """The fragment buffer ids of frames `heads` (their shinfo rows in `si`, `shinfo_view`), the first
    `nfrags[i]` entries of head ``i``, frame after frame (int64)."""
    if len(heads) == 1:
        k = int(nfrags[0])
        return si[int(heads[0]), SI_FRAG0 : SI_FRAG0 + 3 * k : 3].astype(np.int64)
    m = int(np.maximum.reduce(nfrags)) if len(nfrags) else 0
    if not m:
        return np.empty(0, np.int64)
    bufs = si[heads.astype(np.intp)][:, SI_FRAG0 : SI_FRAG0 + 3 * m : 3]
    return bufs[np.arange(m) < nfrags[:, None].astype(np.int64)].astype(np.int64)


def shinfo_entries(si: np.ndarray, head: int, k: int) -> list[tuple[int, int, int]]:
    """The first `k` fragments of head buffer `head` (its `shinfo_view` row in `si`) as (buffer, offset,
    length): what a copy of the whole frame reads after the linear part."""
    w = si[head, SI_FRAG0 : SI_FRAG0 + 3 * k].tolist()
    return [(w[j], w[j + 1], w[j + 2]) for j in range(0, 3 * k, 3)]


def shinfo_write(si: np.ndarray, head: int, bufs: Sequence[int] | np.ndarray, offs: Sequence[int] | np.ndarray,
                 lens: Sequence[int] | np.ndarray) -> None:
    """Write head buffer `head`'s shinfo (`shinfo_view` rows `si`): its fragments `bufs`, each with its data's
    offset in its buffer and its length (``xdp_buff_add_frag``'s result for all of them at once)."""
    k = len(bufs)
    if k > MAX_SKB_FRAGS:
        raise ValueError(f"{k} fragments: a frame has at most MAX_SKB_FRAGS ({MAX_SKB_FRAGS})")
    row = si[head]
    row[SI_NR_FRAGS] = k
    row[SI_FRAGS_SIZE] = int(np.add.reduce(np.asarray(lens, dtype=np.int64))) if k else 0
    row[SI_FRAG0 : SI_FRAG0 + 3 * k : 3] = bufs
    row[SI_FRAG0 + 1 : SI_FRAG0 + 3 * k : 3] = offs
    row[SI_FRAG0 + 2 : SI_FRAG0 + 3 * k : 3] = lens


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


class PageError(BadInputError, ValueError):
    """A page was returned or used against the rules (double free, stale generation, bad id...): a bad
    descriptor, whoever sent it; the message quotes the page id and what was wrong with it."""
