"""XDP verdicts, the per-packet program context and program loading.

Kernel counterpart: ``struct xdp_md`` / ``struct xdp_buff`` (include/uapi/linux/bpf.h, include/net/xdp.h),
the ``bpf_redirect``/``bpf_redirect_map`` helpers and their per-CPU ``bpf_redirect_info``
(net/core/filter.c), and ``bpf_prog_run_xdp`` with ``bpf_warn_invalid_xdp_action``.  The emulator's CPU
worker calls an XDP program once per received packet, so this module is on the hot path: one
`XdpContext` (``__slots__``) is built per RX queue and reused, the worker only swaps in the packet's
``memoryview`` and clears the redirect target, and the helpers are a few attribute stores.

Programs
    A program is a plain Python callable ``fn(ctx) -> int`` returning one of the five actions.  It
    reads and writes the frame in place through ``ctx.data`` (a writable ``memoryview`` of exactly the
    packet bytes inside its page; ``len(ctx.data)`` is ``data_end - data``).  Exceptions and return
    values that are not an action are the program's bugs; the worker counts them as ``xdp_exception``
    and treats the packet as XDP_ABORTED (`classify_verdict`).

    Optional function attributes, set by hand or with the `xdp_program` decorator:

    ``fn.maps``   ``{name: emu.xdp.bpfmaps.MapSpec}``: the maps the program uses (its ``SEC(".maps")``).  The
                  runtime creates them once per attachment and the program finds them in ``ctx.maps``.
    ``fn.setup``  ``setup(ctx) -> None``, called once per context before the first packet: the place to
                  resolve ``ctx.params`` (``ctx.ifindex_of(ctx.params["egress"])``) and to look maps up,
                  caching the result in ``ctx.priv``.  This is the analogue of libbpf filling a
                  program's ``const volatile`` ``.rodata`` before load, and keeps dictionary lookups
                  off the per-packet path.  Per-context (not per-function) state matters because one
                  program can be attached to several devices with different params.

    ``fn.params`` ``{name: ParamSpec}``: the params the program takes (type, required or default, meaning).
                  Topology validation refuses unknown, missing and mistyped params; a ``device`` param
                  must name a device of the host.  Params named after one of the program's maps are
                  implicitly declared (they populate the map).  Without ``fn.params`` any params go.

    ``fn.batch``  ``batch(ctx, pkts: XdpBatch) -> verdicts``: the same program over many packets at
                  once (a vectorised form, as DPDK drivers have vector RX paths next to their scalar
                  ones).  It must behave exactly as calling ``fn`` on each packet in order: same frame
                  bytes, verdicts, redirect targets and map updates (the bundled programs' tests check
                  this).  A CPU worker uses it unless the topology says ``xdp: {vectorised: false}``.
                  A raise or a result that is not one integer verdict per packet aborts all of that call's
                  packets (each counted as ``xdp_exception``).

    `load_program` turns ``"module:function"`` into a `Program`; `Program.new_context` builds a context
    and runs the setup hook.

Helpers beyond the redirects: ``ctx.check_mtu`` is ``bpf_check_mtu`` over the host's devices' MTUs
(``ctx.device_mtus()``, which a native engine is given too); ``ctx.get_buff_len``, ``ctx.load_bytes`` and
``ctx.store_bytes`` are the multi-buffer access helpers (188-190), across a frame's fragments, and
``ctx.adjust_tail`` is ``bpf_xdp_adjust_tail`` (a per-packet program's, on hosts with multi-buffer devices).

XDP itself keeps no counters: programs count in their maps, and the worker keeps the per-action totals
the kernel's ``xdp:*`` tracepoints would show.
"""

from __future__ import annotations

import copy
import enum
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np

from emu.mem.page import SHINFO_TAILROOM, SI_FRAG0, SI_FRAGS_SIZE, SI_NR_FRAGS, shinfo_entries, shinfo_view
from emu.mem.pagemem import PageSpans
from emu.topology.model import ETH_DATA_LEN, ETH_HLEN
from emu.xdp.bpfmaps import BPF_F_BROADCAST, BPF_F_EXCLUDE_INGRESS, BpfMap, CpuMap, DevMap, MapSpec

__all__ = [
    "PARAM_TYPES",
    "XDP_ABORTED",
    "XDP_DROP",
    "XDP_PASS",
    "XDP_REDIRECT",
    "XDP_TX",
    "ParamSpec",
    "Program",
    "ProgramFn",
    "XdpAction",
    "XdpBatch",
    "XdpContext",
    "classify_verdict",
    "classify_verdicts",
    "load_program",
    "xdp_program",
]


class XdpAction(enum.IntEnum):
    """``enum xdp_action`` (include/uapi/linux/bpf.h)."""

    XDP_ABORTED = 0
    XDP_DROP = 1
    XDP_PASS = 2
    XDP_TX = 3
    XDP_REDIRECT = 4


# Plain ints: comparing against an IntEnum member goes through enum machinery, a global int does not.
XDP_ABORTED = 0
XDP_DROP = 1
XDP_PASS = 2
XDP_TX = 3
XDP_REDIRECT = 4

# bpf_check_mtu()'s errnos.
_EINVAL, _ENODEV, _EFAULT = 22, 19, 14
# bpf_xdp_pointer: an offset or length above this is -EFAULT (whatever the frame's length).
_XDP_ACCESS_MAX = 0xFFFF

# bpf_redirect_map(): the low bits of flags are the action on a lookup miss (XDP_ABORTED..XDP_TX).
_ACTION_MASK = XDP_ABORTED | XDP_DROP | XDP_PASS | XDP_TX
# ...and a devmap takes BPF_F_BROADCAST (every device of the map) and BPF_F_EXCLUDE_INGRESS on top.
_BCAST_FLAGS = BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS


class XdpContext:
    """``struct xdp_md`` plus the redirect helpers, one per RX queue, reused for every packet.

    The worker sets `data` and clears `redirect_ifindex` before each call (`reset`, or the two stores
    inlined); everything else is fixed when the context is built.  `priv` belongs to the program.
    """

    __slots__ = (
        "_buf",
        "_head",
        "_ifindexes",
        "_mem",
        "_mtus",
        "_nf",
        "_si",
        "_start",
        "cpu",
        "data",
        "ingress_ifindex",
        "maps",
        "params",
        "priv",
        "redirect_ifindex",
        "rx_queue_index",
    )

    def __init__(
        self,
        ingress_ifindex: int,
        rx_queue_index: int,
        cpu: int,
        params: Mapping[str, Any] | None = None,
        maps: Mapping[str, BpfMap] | None = None,
        ifindexes: Mapping[str, int] | None = None,
        mtus: Mapping[int, int] | None = None,
    ) -> None:
        self.data: memoryview | None = None
        self.ingress_ifindex = ingress_ifindex
        self.rx_queue_index = rx_queue_index
        self.cpu = cpu
        # A private deep copy behind a read-only proxy: a program cannot change the topology's params
        # for the other queues or CPUs by mutating what it was given.
        self.params: Mapping[str, Any] = MappingProxyType(copy.deepcopy(dict(params or {})))
        self.maps: Mapping[str, BpfMap] = MappingProxyType(dict(maps or {}))
        self._ifindexes: dict[str, int] = dict(ifindexes or {})
        # ``dev->mtu`` of the host's devices by ifindex (``bpf_check_mtu``: a device's length limit is its MTU
        # plus its hard_header_len, an Ethernet header); a device not given one has the default 1500.
        self._mtus: dict[int, int] = {i: ETH_DATA_LEN for i in self._ifindexes.values()}
        self._mtus.update(mtus or {})
        self.redirect_ifindex = -1
        self.priv: Any = None
        # XDP multi-buffer (`attach_frames`, `frame_start`): the host's buffer rows, their shinfo words and
        # the data segment; the frame's head buffer, where its data starts in the segment, and whether it
        # arrived with fragments (XDP_FLAGS_HAS_FRAGS).  Unset (None, 0) on a host without rx-sg devices.
        self._mem: np.ndarray | None = None
        self._si: np.ndarray | None = None
        self._buf: memoryview | None = None
        self._head = self._start = self._nf = 0

    def attach_frames(self, mem: np.ndarray, shinfo: np.ndarray | None, buf: memoryview) -> None:
        """A CPU of a host with multi-buffer devices: the buffer rows `mem`, their shinfo words and the data
        segment `buf`, through which the helpers below reach a frame's fragments."""
        self._mem, self._si, self._buf = mem, shinfo, buf

    def frame_start(self, head: int, start: int, nfrags: int) -> None:
        """Per packet on such a host: the frame's head buffer, the byte of the segment its data starts at,
        and its fragment count as it arrived (0: linear; its shinfo is then not read)."""
        self._head, self._start, self._nf = head, start, nfrags

    def _frags(self) -> list[tuple[int, int, int]]:
        """The frame's fragments as (buffer, offset, length), from its shinfo (none for a linear frame)."""
        if not self._nf or self._si is None:
            return []
        return shinfo_entries(self._si, self._head, int(self._si[self._head, SI_NR_FRAGS]))

    def reset(self, data: memoryview | None) -> None:
        """Per-packet: point at the next frame and forget the previous packet's redirect target."""
        self.data = data
        self.redirect_ifindex = -1

    def redirect(self, ifindex: int, flags: int = 0) -> int:
        """``bpf_redirect``: remember the target and return XDP_REDIRECT; any flag is an error."""
        if flags:
            return XDP_ABORTED
        self.redirect_ifindex = ifindex
        return XDP_REDIRECT

    def redirect_map(self, devmap: DevMap | CpuMap, key: int, flags: int = 0) -> int:
        """``bpf_redirect_map`` on a devmap or a cpumap: XDP_REDIRECT on a hit, else the action in
        ``flags & 3``.  A cpumap hit targets CPU `key` (`emu.xdp.bpfmaps.REDIRECT_CPUMAP` codes it).

        On a devmap, ``BPF_F_BROADCAST`` ignores `key` and sends the frame to every device of the map
        (``BPF_F_EXCLUDE_INGRESS``: but the one it came in on), always XDP_REDIRECT, as the kernel's
        ``dev_map_redirect`` does; ``BPF_F_EXCLUDE_INGRESS`` alone is a plain lookup; any other flag (a
        cpumap takes none) returns XDP_ABORTED, as ``__bpf_xdp_redirect_map`` does.
        """
        if flags & ~_ACTION_MASK:
            if flags & ~(_ACTION_MASK | _BCAST_FLAGS) or devmap.__class__ is not DevMap:
                return XDP_ABORTED
            if flags & BPF_F_BROADCAST:
                self.redirect_ifindex = devmap.bcast_base | bool(flags & BPF_F_EXCLUDE_INGRESS)  # type: ignore[union-attr]
                return XDP_REDIRECT
            flags &= _ACTION_MASK  # only a broadcast reads BPF_F_EXCLUDE_INGRESS
        if devmap.__class__ is CpuMap:
            # __cpu_map_lookup_elem: an entry with a ring (qsize > 0) is a hit.
            qs = devmap.qsizes  # type: ignore[union-attr]
            if 0 <= key < len(qs) and qs[key]:
                self.redirect_ifindex = devmap.redirect_base + key  # type: ignore[union-attr]
                return XDP_REDIRECT
            return flags
        slots = devmap.ifindexes  # type: ignore[union-attr]  # inlined DevMap.lookup: runs per packet
        if 0 <= key < len(slots):
            ifindex = slots[key]
            if ifindex:
                self.redirect_ifindex = ifindex
                return XDP_REDIRECT
        return flags

    def ifindex_of(self, name: str) -> int:
        """The ifindex of device `name` on this host (for setup hooks resolving params)."""
        try:
            return self._ifindexes[name]
        except KeyError:
            known = ", ".join(sorted(self._ifindexes)) or "none"
            raise ValueError(f"no device {name!r} on this host (devices: {known})") from None

    def get_buff_len(self) -> int:
        """``bpf_xdp_get_buff_len``: the frame's length over all its buffers (``len(ctx.data)`` plus
        ``xdp_frags_size`` of a multi-buffer frame)."""
        n = len(self.data or b"")
        if self._nf and self._si is not None:
            n += int(self._si[self._head, SI_FRAGS_SIZE])
        return n

    def _spans(self, offset: int, n: int) -> list[tuple[Any, int, int]]:
        """Where bytes ``offset .. offset + n`` of the frame (a span `_access` accepted) lie: (view, start in
        it, count) pieces over the linear part and the fragments (``bpf_xdp_copy_buf``)."""
        data = self.data
        assert data is not None
        out: list[tuple[Any, int, int]] = []
        pos = offset
        for view, size in [(data, len(data))] + [(self._mem[b, o : o + ln], ln)  # type: ignore[index]
                                                  for b, o, ln in self._frags()]:
            if pos < size and n:
                k = min(n, size - pos)
                out.append((view, pos, k))
                n -= k
                pos = 0
            else:
                pos -= size
        return out

    def _access(self, offset: int, n: int) -> int:
        """``bpf_xdp_pointer``'s checks of `n` bytes at `offset`: -EFAULT for an offset or length above
        0xffff (a negative offset being a u32 one above it), -EINVAL for none or a span past the frame's
        end, else 0."""
        if not 0 <= offset <= _XDP_ACCESS_MAX or n > _XDP_ACCESS_MAX:
            return -_EFAULT
        if self.data is None or not n or offset + n > self.get_buff_len():
            return -_EINVAL
        return 0

    def load_bytes(self, offset: int, buf: bytearray | memoryview) -> int:
        """``bpf_xdp_load_bytes``: copy ``len(buf)`` bytes of the frame from `offset` into `buf`, across its
        fragments; 0, or (nothing copied) -EFAULT for an offset or length above 0xffff (a negative offset
        being a u32 one above it) and -EINVAL for an empty `buf` or a span past the frame's end, as
        ``bpf_xdp_pointer`` and the engine's twin."""
        n = len(buf)
        err = self._access(offset, n)
        if err:
            return err
        if not self._nf:
            buf[:] = self.data[offset : offset + n]  # type: ignore[index]
            return 0
        at = 0
        for view, start, k in self._spans(offset, n):
            buf[at : at + k] = bytes(view[start : start + k])
            at += k
        return 0

    def store_bytes(self, offset: int, src: bytes | bytearray | memoryview) -> int:
        """``bpf_xdp_store_bytes``: write `src` over the frame from `offset`, across its fragments; 0, or
        (nothing written) -EFAULT or -EINVAL as `load_bytes`."""
        n = len(src)
        err = self._access(offset, n)
        if err:
            return err
        if not self._nf:
            self.data[offset : offset + n] = src  # type: ignore[index]
            return 0
        src = bytes(src)
        at = 0
        for view, start, k in self._spans(offset, n):
            if isinstance(view, np.ndarray):
                view[start : start + k] = np.frombuffer(src, np.uint8, k, at)
            else:
                view[start : start + k] = src[at : at + k]
            at += k
        return 0

    def adjust_tail(self, offset: int) -> int:
        """``bpf_xdp_adjust_tail``: move the frame's end by `offset` bytes; 0, or -EINVAL.

        A multi-buffer frame grows only into its last fragment's tailroom (zeroed, as the kernel does) and
        shrinks from the tail, releasing whole fragments (``bpf_xdp_frags_shrink_tail``; the CPU returns
        them to their pools after the program); once none is left the linear part shrinks.  A linear frame
        moves ``data_end`` within its buffer (at least an Ethernet header, at most up to the
        skb_shared_info tailroom).  Only on a host with multi-buffer devices (elsewhere -EOPNOTSUPP: a
        per-packet program's frame length is fixed there)."""
        if self._buf is None or self.data is None:
            return -95  # -EOPNOTSUPP
        si, mem = self._si, self._mem
        assert si is not None and mem is not None
        limit = mem.shape[1] - SHINFO_TAILROOM  # a buffer's data ends before its skb_shared_info tailroom
        if self._nf and int(si[self._head, SI_NR_FRAGS]):
            row = si[self._head]
            k = int(row[SI_NR_FRAGS])
            last = SI_FRAG0 + 3 * (k - 1)  # the last fragment's (buffer, offset, length) words
            if offset > 0:
                b, o, ln = (int(x) for x in row[last : last + 3])
                if offset > limit - o - ln:
                    return -_EINVAL
                mem[b, o + ln : o + ln + offset] = 0
                row[last + 2] = ln + offset
                row[SI_FRAGS_SIZE] += offset
                return 0
            if offset == -(2**31):
                return 0  # the kernel's -offset of INT_MIN is INT_MIN again: bpf_xdp_frags_shrink_tail does nothing
            shrink = -offset
            if shrink > self.get_buff_len() - ETH_HLEN:
                return -_EINVAL
            freed = 0
            for m in range(k - 1, -1, -1):
                if not shrink:
                    break
                ln = int(row[SI_FRAG0 + 3 * m + 2])
                cut = min(shrink, ln)
                shrink -= cut
                row[SI_FRAGS_SIZE] -= cut
                if cut == ln:
                    freed += 1  # (a released entry keeps its buffer and size, as the kernel's and the engine's)
                else:
                    row[SI_FRAG0 + 3 * m + 2] = ln - cut
            row[SI_NR_FRAGS] = k - freed
            if k - freed:
                return 0
            offset = -shrink  # every fragment went: the rest shrinks the linear part
        n = len(self.data) + offset
        start = self._start
        if n < ETH_HLEN or start % mem.shape[1] + n > limit:
            return -_EINVAL
        if offset > 0:
            self._buf[start + len(self.data) : start + n] = bytes(offset)
        self.data = self._buf[start : start + n]
        return 0

    def device_mtus(self) -> dict[int, int]:
        """The MTU of each device of this host, by ifindex (a copy: what a native engine is given)."""
        return dict(self._mtus)

    def check_mtu(self, ifindex: int = 0, mtu_len: int = 0, len_diff: int = 0, flags: int = 0) -> tuple[int, int]:
        """``bpf_check_mtu`` for XDP (``bpf_xdp_check_mtu``): (ret, mtu) for device `ifindex` (0: the
        ingress device).  The frame's length is ``len(ctx.data)`` + `len_diff`, or `mtu_len` (an L3
        length) plus the Ethernet header when `mtu_len` is not 0; ret is 0 when it fits ``mtu`` + ETH_HLEN,
        1 (``BPF_MTU_CHK_RET_FRAG_NEEDED``) when not, -ENODEV for no such device and -EINVAL for any flag
        (XDP takes none).  `mtu` is the device's MTU (0 when ret is negative)."""
        if flags:
            return -_EINVAL, 0
        mtu = self._mtus.get(ifindex or self.ingress_ifindex)
        if mtu is None:
            return -_ENODEV, 0
        length = (mtu_len + ETH_HLEN if mtu_len else len(self.data or b"")) + len_diff
        # In C's int, as bpf_xdp_check_mtu adds (and the engine): len_diff = INT_MAX wraps to a fit.
        length = (length + 2**31) % 2**32 - 2**31
        return (1 if length > mtu + ETH_HLEN else 0), mtu

    def __repr__(self) -> str:
        return (
            f"<XdpContext ifindex={self.ingress_ifindex} rxq={self.rx_queue_index} cpu={self.cpu} "
            f"maps={sorted(self.maps)}>"
        )


class XdpBatch:
    """Packets for a vectorised program (a CPU worker passes those of all the NAPI polls of one pass): the
    per-packet ``xdp_md`` fields as arrays.

    `pages`, `offs` and `lens` say where each packet is (page id, offset of ``data`` in the page,
    ``data_end - data``); the frame bytes are read and written through `head`/`store_head`, which keep
    the verifier's rule that a program touches only ``[data, data_end)``.  `redirect_ifindex` plays the
    per-CPU ``bpf_redirect_info`` for each packet: -1 until `redirect` or `redirect_map` sets it.
    """

    __slots__ = ("_uniform", "exceptions", "fault", "lens", "mem", "moved", "nfrags", "offs", "pages",
                 "redirect_ifindex", "spans")

    def __init__(self, mem: np.ndarray, pages: np.ndarray, offs: np.ndarray, lens: np.ndarray,
                 spans: PageSpans | None = None) -> None:
        self.mem = mem  # (npages, page_size) uint8: the host's page memory
        # Its per-page views (a worker passes its own, kept across batches).
        self.spans = spans if spans is not None else PageSpans(mem)
        # Integer arrays (the descriptors' own unsigned fields in a worker: no copies).
        self.pages = pages
        self.offs = offs
        self.lens = lens
        self.redirect_ifindex = np.full(len(pages), -1, dtype=np.int64)
        self._uniform: int | None = -1  # the offset every packet shares (None: they differ); -1: not known yet
        # Packets a native (eBPF object) program aborted on a fault, counted as xdp_exception, and the last
        # fault's text (emu.ebpf.engine).
        self.exceptions = 0
        self.fault: str | None = None
        # A native program moved packets' data or data_end (bpf_xdp_adjust_head/tail): `offs`/`lens` are the
        # new ones, which the worker stores in the pages' metadata.
        self.moved = False
        # XDP multi-buffer: each packet's fragment count as it arrived (XDP_FLAGS_HAS_FRAGS; its shinfo in
        # its head buffer's tailroom, `emu.mem.page`), a writable uint8 array a native program's
        # bpf_xdp_adjust_tail lowers when it releases fragments; None when no packet of the batch has any.
        self.nfrags: np.ndarray | None = None

    def _offset(self) -> int | None:
        """The offset every packet's data starts at (None when they differ), found once."""
        u = self._uniform
        if u == -1:
            offs = self.offs
            u = 0
            if len(offs):
                # ufunc reductions, not ndarray methods: those add a Python-level wrapper per call.
                lo = int(np.minimum.reduce(offs))
                u = lo if lo == int(np.maximum.reduce(offs)) else None
            self._uniform = u
        return u

    def __len__(self) -> int:
        return len(self.pages)

    def _span(self, ok: np.ndarray, every: bool, nbytes: int) -> tuple:
        """The index into `mem` of the first `nbytes` bytes of the packets `ok` selects (all if `every`),
        each at its own offset."""
        pages, offs = (self.pages, self.offs) if every else (self.pages[ok], self.offs[ok])
        return pages[:, None], offs[:, None] + np.arange(nbytes)

    def _uniform_span(self, nbytes: int) -> int | None:
        """The offset every packet shares, when `nbytes` from it fit in a page (else no packet can be
        that long, and none is selected)."""
        o = self._offset()
        return o if o is not None and o + nbytes <= self.mem.shape[1] else None

    def head(self, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
        """(ok, rows): `ok` marks the packets at least `nbytes` long, `rows` (one per ok packet, in order)
        is a copy of their first `nbytes` bytes (the ``data + n > data_end`` check, for the whole batch)."""
        ok = self.lens >= nbytes
        every = bool(np.logical_and.reduce(ok))
        o = self._uniform_span(nbytes)
        if o is not None:
            return ok, self.spans.gather(self.pages if every else self.pages[ok], o, nbytes)
        return ok, self.mem[self._span(ok, every, nbytes)]

    def store_head(self, ok: np.ndarray, rows: np.ndarray) -> None:
        """Write `rows` (as `head` returned them, changed) back over the first bytes of the ok packets."""
        every = len(rows) == len(self.pages)
        o = self._uniform_span(rows.shape[1])
        if o is not None:
            self.spans.scatter(self.pages if every else self.pages[ok], o, rows)
            return
        self.mem[self._span(ok, every, rows.shape[1])] = rows

    def buff_lens(self) -> np.ndarray:
        """``bpf_xdp_get_buff_len`` of every packet: `lens`, plus ``xdp_frags_size`` (from its head buffer's
        shinfo, `emu.mem.page`) for a multi-buffer frame."""
        lens = self.lens.astype(np.int64)
        nf = self.nfrags
        if nf is not None and np.logical_or.reduce(nf):
            multi = np.flatnonzero(nf)
            lens[multi] += shinfo_view(self.mem)[self.pages[multi].astype(np.intp), SI_FRAGS_SIZE]
        return lens

    def redirect(self, ifindex: int, where: np.ndarray | slice = slice(None)) -> int:
        """``bpf_redirect`` for the packets `where` selects: remember the target, return XDP_REDIRECT."""
        self.redirect_ifindex[where] = ifindex
        return XDP_REDIRECT

    def redirect_map(self, devmap: DevMap | CpuMap, keys: np.ndarray | int,
                     where: np.ndarray | slice = slice(None), flags: int = 0) -> np.ndarray:
        """``bpf_redirect_map`` on a devmap or a cpumap for the packets `where` selects (`keys` one per
        selected packet, or one for all): the verdict of each, XDP_REDIRECT on a hit, else the action in
        ``flags & 3`` (the flags as `XdpContext.redirect_map` takes them)."""
        sel = np.arange(len(self.pages))[where]
        if flags & ~_ACTION_MASK:
            if flags & ~(_ACTION_MASK | _BCAST_FLAGS) or not isinstance(devmap, DevMap):
                return np.full(len(sel), XDP_ABORTED, dtype=np.int64)
            if flags & BPF_F_BROADCAST:
                self.redirect_ifindex[sel] = devmap.bcast_base | bool(flags & BPF_F_EXCLUDE_INGRESS)
                return np.full(len(sel), XDP_REDIRECT, dtype=np.int64)
            flags &= _ACTION_MASK  # only a broadcast reads BPF_F_EXCLUDE_INGRESS
        keys = np.broadcast_to(np.asarray(keys, dtype=np.int64), sel.shape)
        if isinstance(devmap, CpuMap):
            qs = np.asarray(devmap.qsizes, dtype=np.int64)
            inside = (keys >= 0) & (keys < len(qs))
            hit = np.zeros(len(sel), dtype=bool)
            hit[inside] = qs[keys[inside]] != 0
            self.redirect_ifindex[sel[hit]] = devmap.redirect_base + keys[hit]
            return np.where(hit, XDP_REDIRECT, flags)
        slots = np.asarray(devmap.ifindexes, dtype=np.int64)
        inside = (keys >= 0) & (keys < len(slots))
        ifx = np.zeros(len(sel), dtype=np.int64)
        ifx[inside] = slots[keys[inside]]
        hit = ifx != 0
        self.redirect_ifindex[sel[hit]] = ifx[hit]
        return np.where(hit, XDP_REDIRECT, flags)


ProgramFn = Callable[[XdpContext], int]
SetupFn = Callable[[XdpContext], None]
BatchFn = Callable[[XdpContext, XdpBatch], Any]
F = TypeVar("F", bound=Callable[..., Any])


# What a declared param may be: a device name of the host, or a plain value of one type.
PARAM_TYPES = ("device", "int", "float", "str", "bool", "int_list", "str_list")


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One param a program takes: its `type` (one of `PARAM_TYPES`), whether it is `required` (else its
    `default`, which the program applies itself), what it means, and for ints (and int lists' entries)
    the bounds `lo`..`hi`.  A ``device`` param is a device name of the host the program is attached to."""

    type: str
    meaning: str
    required: bool = False
    default: Any = None
    lo: int | None = None
    hi: int | None = None

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"param type {self.type!r}: expected one of {', '.join(PARAM_TYPES)}")

    def check(self, value: Any, devices: Mapping[str, Any]) -> str | None:
        """None when `value` is acceptable, else why not (the end of a sentence about the param)."""
        t = self.type
        if t in ("device", "str"):
            if not isinstance(value, str):
                return f"must be a {'device name' if t == 'device' else 'string'}, not {value!r}"
            if t == "device" and value not in devices:
                return f"names no device of this host: {value!r} (devices: {', '.join(sorted(devices))})"
            return None
        if t == "bool":
            return None if isinstance(value, bool) else f"must be true or false, not {value!r}"
        if t == "float":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            return None if ok else f"must be a number, not {value!r}"
        is_list = t.endswith("_list")
        if is_list and not isinstance(value, list):
            return f"must be a list, not {value!r}"
        want = str if t == "str_list" else int
        what = ("a list of strings" if want is str else "a list of integers") if is_list else "an integer"
        for item in value if is_list else [value]:
            if type(item) is not want:  # type(), not isinstance(): True is not an integer here
                return f"must be {what}, not {value!r}"
            if want is int and ((self.lo is not None and item < self.lo) or (self.hi is not None and item > self.hi)):
                entries = "entries " if is_list else ""
                return f"{entries}must be between {self.lo} and {self.hi}, not {item}"
        return None

    def describe(self) -> str:
        """One line for the README: type, bounds, required or default, meaning."""
        bounds = f" {self.lo}..{self.hi}" if self.lo is not None or self.hi is not None else ""
        need = "required" if self.required else f"default {self.default!r}"
        return f"{self.type}{bounds}, {need}: {self.meaning}"


def xdp_program(
    maps: Mapping[str, MapSpec] | None = None,
    setup: SetupFn | None = None,
    batch: BatchFn | None = None,
    params: Mapping[str, ParamSpec] | None = None,
    frags: bool = False,
) -> Callable[[F], F]:
    """Declare a program's maps, setup hook, vectorised form and params: sets ``fn.maps``, ``fn.setup``,
    ``fn.batch`` and ``fn.params``, returns `fn` itself.  ``params=None`` (the default) declares nothing:
    any params are accepted; ``params={}`` declares that the program takes none.  ``frags=True``
    (``fn.frags``) declares XDP multi-buffer support, as ``SEC("xdp.frags")`` (``BPF_F_XDP_HAS_FRAGS``)
    does: only such a program may be attached to a device whose MTU needs more than one buffer."""

    def wrap(fn: F) -> F:
        fn.maps = dict(maps or {})  # type: ignore[attr-defined]
        fn.setup = setup  # type: ignore[attr-defined]
        fn.batch = batch  # type: ignore[attr-defined]
        fn.params = None if params is None else dict(params)  # type: ignore[attr-defined]
        fn.frags = bool(frags)  # type: ignore[attr-defined]
        return fn

    return wrap


@dataclass(frozen=True, slots=True)
class Program:
    """A loaded program: the per-packet callable, its name, its map specs, its setup hook, its
    vectorised form and its declared params (None: it declares none and takes any)."""

    fn: ProgramFn
    name: str
    maps: Mapping[str, MapSpec] = field(default_factory=dict)
    setup: SetupFn | None = None
    batch: BatchFn | None = None
    params: Mapping[str, ParamSpec] | None = None
    frags: bool = False  # XDP multi-buffer support (xdp.frags, BPF_F_XDP_HAS_FRAGS)

    @classmethod
    def from_callable(cls, fn: ProgramFn, name: str | None = None) -> Program:
        """Read the ``maps``/``setup`` attributes of `fn` (see the module docstring)."""
        if not callable(fn):
            raise TypeError(f"an XDP program must be callable, not {type(fn).__name__}")
        if name is None:
            name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
        maps = getattr(fn, "maps", None) or {}
        if not isinstance(maps, Mapping) or not all(isinstance(s, MapSpec) for s in maps.values()):
            raise TypeError(f"xdp program {name}: 'maps' must map names to emu.xdp.bpfmaps.MapSpec")
        setup = getattr(fn, "setup", None)
        if setup is not None and not callable(setup):
            raise TypeError(f"xdp program {name}: 'setup' must be callable")
        batch = getattr(fn, "batch", None)
        if batch is not None and not callable(batch):
            raise TypeError(f"xdp program {name}: 'batch' must be callable")
        params = getattr(fn, "params", None)
        if params is not None and (
            not isinstance(params, Mapping)
            or not all(isinstance(k, str) and isinstance(s, ParamSpec) for k, s in params.items())
        ):
            raise TypeError(f"xdp program {name}: 'params' must map names to emu.xdp.ParamSpec")
        declared = None if params is None else MappingProxyType(dict(params))
        frags = getattr(fn, "frags", False)
        if not isinstance(frags, bool):
            raise TypeError(f"xdp program {name}: 'frags' must be True or False")
        return cls(fn, name, MappingProxyType(dict(maps)), setup, batch, declared, frags)

    def initial_maps(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The params named after one of this program's maps: its initial entries (`emu.xdp.bpfmaps.populate`)."""
        return {k: v for k, v in params.items() if k in self.maps}

    def new_context(
        self,
        ingress_ifindex: int,
        rx_queue_index: int,
        cpu: int,
        params: Mapping[str, Any] | None = None,
        maps: Mapping[str, BpfMap] | None = None,
        ifindexes: Mapping[str, int] | None = None,
        mtus: Mapping[int, int] | None = None,
    ) -> XdpContext:
        """A context for one RX queue, with the program's setup hook already run on it."""
        maps = dict(maps or {})
        missing = sorted(set(self.maps) - set(maps))
        if missing:
            raise ValueError(f"xdp program {self.name}: maps {missing} were not created")
        ctx = XdpContext(ingress_ifindex, rx_queue_index, cpu, params, maps, ifindexes, mtus)
        if self.setup is not None:
            self.setup(ctx)
        return ctx


def load_program(spec: str) -> Program:
    """Import ``"module:function"`` and wrap it; ValueError says what failed (as topology validation does)."""
    from emu.topology.model import resolve_program  # the one place that imports program modules

    return Program.from_callable(resolve_program(spec), spec)


_VALID = frozenset(range(XDP_ABORTED, XDP_REDIRECT + 1))


def classify_verdict(ret: object) -> tuple[int, bool]:
    """(action, invalid): anything but one of the five actions becomes XDP_ABORTED with ``invalid`` set.

    ``invalid`` is when the kernel calls ``bpf_warn_invalid_xdp_action``; note that its ``xdp_exception``
    tracepoint also fires for a genuine XDP_ABORTED.  Booleans are rejected: ``True`` as "drop" is a bug.
    """
    if isinstance(ret, bool):
        return XDP_ABORTED, True
    try:
        v = operator.index(ret)  # int, IntEnum, numpy integers
    except TypeError:
        return XDP_ABORTED, True
    if v in _VALID:
        return v, False
    return XDP_ABORTED, True


def classify_verdicts(ret: object, n: int) -> tuple[np.ndarray, int] | None:
    """A vectorised program's result as (verdicts, invalid count), or None when it is not one integer
    verdict per packet (every packet of the call is then ABORTED).  Unknown values become XDP_ABORTED, counted;
    booleans are refused, as `classify_verdict` refuses them."""
    try:
        v = np.asarray(ret)
    except Exception:
        return None
    if v.shape != (n,) or v.dtype.kind not in "iu":
        return None
    v = v.astype(np.int64)  # always a copy: the caller may keep the program's own array
    invalid = (v < XDP_ABORTED) | (v > XDP_REDIRECT)
    bad = int(np.count_nonzero(invalid))
    if bad:
        v[invalid] = XDP_ABORTED
    return v, bad
