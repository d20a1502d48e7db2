"""The maps of a loaded eBPF object, in the emulator's shared memory, with the kernel's semantics per
emulated CPU.

Kernel counterpart: the maps ``BPF_MAP_CREATE`` makes for an object (kernel/bpf/arraymap.c, hashtab.c,
devmap.c, ringbuf.c, and the global-data arrays libbpf creates for ``.data``/``.rodata``/``.bss``), and the
``bpf(2)`` map commands user space uses on them.  One `emu.mem.shm.Segment` holds all the maps of one
attached object on one host: the coordinator creates it (`ObjMaps.create`, filling the global-data maps
with their initial bytes and the topology's ``maps:`` entries), every CPU worker attaches it, and the
engine (emu/ebpf/engine/src/maps.rs, the one implementation of every map's semantics, which this module
drives through ``emu.ebpf._engine.Maps``) reads and writes it from the programs' helpers.

Layout (computed here, checked by the engine): a 64-byte segment header (magic, version, CPU count, map
count, a fingerprint of the layout), then per map, each on its own cache line: a 64-byte header (element
count, LRU clock, event counters), for hash maps a slot table (16 bytes per slot: state, hash, LRU stamp)
and a key table, then the values, ``rows x capacity`` of them, ``rows`` being the CPU count for per-CPU maps.
Array-like maps (array, percpu_array, devmap, prog_array) have ``capacity = max_entries``; hash maps twice
as many slots as ``max_entries`` rounded up to a power of two (linear probing).  Ringbuf and
perf_event_array maps are per-run event collectors: only their counters (events, bytes) exist.

Cross-process writes to hash maps take an OFD lock on one byte of the segment's file (the map's index), as
`emu.xdp.bpfmaps` does for the Python programs' maps: a CPU worker killed while holding it cannot wedge
the others.  Errors are the kernel's: `emu.xdp.bpfmaps.MapError` with its errno.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from emu.ebpf import obj as o
from emu.errors import BadInputError
from emu.mem.shm import SHM_DIR, Segment
from emu.xdp.bpfmaps import BPF_ANY, REDIRECT_BROADCAST, MapError

__all__ = ["MAP_TYPE_NAMES", "ObjDevMap", "ObjMaps", "map_layout"]

MAP_TYPE_NAMES = {
    o.BPF_MAP_TYPE_HASH: "hash",
    o.BPF_MAP_TYPE_ARRAY: "array",
    o.BPF_MAP_TYPE_PROG_ARRAY: "prog_array",
    o.BPF_MAP_TYPE_PERF_EVENT_ARRAY: "perf_event_array",
    o.BPF_MAP_TYPE_PERCPU_HASH: "percpu_hash",
    o.BPF_MAP_TYPE_PERCPU_ARRAY: "percpu_array",
    o.BPF_MAP_TYPE_LRU_HASH: "lru_hash",
    o.BPF_MAP_TYPE_LRU_PERCPU_HASH: "lru_percpu_hash",
    o.BPF_MAP_TYPE_DEVMAP: "devmap",
    o.BPF_MAP_TYPE_DEVMAP_HASH: "devmap_hash",
    o.BPF_MAP_TYPE_RINGBUF: "ringbuf",
}
_ARRAYS = {o.BPF_MAP_TYPE_ARRAY, o.BPF_MAP_TYPE_PERCPU_ARRAY, o.BPF_MAP_TYPE_DEVMAP, o.BPF_MAP_TYPE_PROG_ARRAY}
_HASHES = {o.BPF_MAP_TYPE_HASH, o.BPF_MAP_TYPE_PERCPU_HASH, o.BPF_MAP_TYPE_LRU_HASH,
           o.BPF_MAP_TYPE_LRU_PERCPU_HASH, o.BPF_MAP_TYPE_DEVMAP_HASH}
_PERCPU = {o.BPF_MAP_TYPE_PERCPU_ARRAY, o.BPF_MAP_TYPE_PERCPU_HASH, o.BPF_MAP_TYPE_LRU_PERCPU_HASH}
_EVENTS = {o.BPF_MAP_TYPE_RINGBUF, o.BPF_MAP_TYPE_PERF_EVENT_ARRAY}
_DEVMAPS = {o.BPF_MAP_TYPE_DEVMAP, o.BPF_MAP_TYPE_DEVMAP_HASH}

_ALIGN = 64
_MAGIC = 0x4F424A4D41505321  # "OBJMAPS!"
_VERSION = 1
_HDR = struct.Struct("<QQQQQ")  # magic, version, ncpus, nmaps, fingerprint
_TRACE = struct.Struct("<QQ")  # per CPU: bpf_trace_printk lines logged, lines dropped by the rate limit
_MAP_HDR = 64
_SLOT = 16
# One object's maps may not reserve more than this (a typo in max_entries should not fill /dev/shm), and
# a map's values must be addressable with the engine's 32-bit offsets.
MAX_SEGMENT = 1 << 31


def _up(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def _check(m: o.MapDef) -> None:
    where = f"map {m.name!r} ({m.section})"
    if m.type not in MAP_TYPE_NAMES:
        raise BadInputError(f"{where}: map type {m.type} is not supported "
                            f"(supported: {', '.join(sorted(MAP_TYPE_NAMES.values()))})")
    if m.type in _EVENTS:
        return
    if m.max_entries < 1 or m.key_size < 1 or m.value_size < 1:
        raise BadInputError(f"{where}: key_size {m.key_size}, value_size {m.value_size}, "
                            f"max_entries {m.max_entries} must all be positive")
    if m.type in _ARRAYS | _DEVMAPS and m.key_size != 4:  # dev_map_alloc_check: devmap_hash too
        raise BadInputError(f"{where}: an array-like map or devmap has 4-byte keys, not {m.key_size}")
    if m.type in _DEVMAPS and m.value_size not in (4, 8):
        raise BadInputError(f"{where}: a devmap's value is an ifindex (4 bytes) or struct bpf_devmap_val "
                            f"(8 bytes), not {m.value_size}")
    if m.type == o.BPF_MAP_TYPE_PROG_ARRAY and m.value_size != 4:
        raise BadInputError(f"{where}: a prog_array's value is 4 bytes, not {m.value_size}")


def map_layout(maps: list[o.MapDef], ncpus: int) -> tuple[int, list[list[int]]]:
    """(segment size, one layout row per map as the engine takes it: type, key_size, value_size, max_entries,
    map_flags, rows, capacity, vstride, kstride, off_hdr, off_slots, off_keys, off_values, values_len)."""
    off = _up(_ALIGN + _TRACE.size * ncpus)  # the segment header, then per CPU its trace_printk counters
    out = []
    for m in maps:
        _check(m)
        rows = ncpus if m.type in _PERCPU else 1
        if m.type in _EVENTS:
            cap = vstride = kstride = 0
        elif m.type in _HASHES:
            cap = max(8, 1 << (2 * m.max_entries - 1).bit_length())
            vstride, kstride = _up(m.value_size, 8), _up(m.key_size, 8)
        else:
            cap, vstride, kstride = m.max_entries, _up(m.value_size, 8), 0
        hdr = off
        slots = hdr + _MAP_HDR
        keys = _up(slots + (cap * _SLOT if m.type in _HASHES else 0))
        values = _up(keys + (cap * kstride if m.type in _HASHES else 0))
        vlen = rows * cap * vstride
        if vlen >= 1 << 32:
            raise BadInputError(f"map {m.name!r}: {vlen:,} bytes of values is more than the engine addresses")
        off = _up(values + vlen)
        out.append([m.type, m.key_size, m.value_size, m.max_entries, m.map_flags, rows, cap, vstride, kstride,
                    hdr, slots, keys, values, vlen])
    if off > MAX_SEGMENT:
        raise BadInputError(f"the object's maps need {off:,} bytes of shared memory (at most {MAX_SEGMENT:,})")
    return off, out


def _fingerprint(layout: list[list[int]]) -> int:
    return zlib.crc32(repr(layout).encode())


def _to_bytes(v: Any, size: int, what: str) -> bytes:
    if isinstance(v, bytes | bytearray | memoryview):
        b = bytes(v)
        if len(b) != size:
            raise BadInputError(f"{what}: {len(b)} bytes given, {size} expected")
        return b
    if isinstance(v, int) and not isinstance(v, bool):
        if size > 8 and v >= 0:
            return v.to_bytes(size, "little")
        try:
            return (v % (1 << (8 * size))).to_bytes(size, "little") if v < 0 else v.to_bytes(size, "little")
        except OverflowError:
            raise BadInputError(f"{what}: {v} does not fit {size} bytes") from None
    raise BadInputError(f"{what}: expected an integer or bytes, not {v!r}")


def _from_bytes(b: bytes) -> int | str:
    """A key or value for the report: an integer up to 8 bytes, else hex."""
    return int.from_bytes(b, "little") if len(b) <= 8 else b.hex()


class ObjMaps:
    """All maps of one attached object on one host, in one shared-memory segment (see the module docstring).

    Keys and values are ints (little-endian, the key's or value's size) or bytes of exactly that size.
    For per-CPU maps, `cpu` picks the row; `update` without `cpu` sets every CPU's value (as user space
    passing one value for all CPUs), `lookup` without `cpu` returns the list of every CPU's value.
    """

    def __init__(self, seg: Segment, maps: list[o.MapDef], ncpus: int) -> None:
        from emu.ebpf import _engine

        self.seg = seg
        self.name = seg.name
        self.defs = list(maps)
        self.ncpus = ncpus
        self.size, self.layout = map_layout(self.defs, ncpus)
        self.index = {m.name: i for i, m in enumerate(self.defs)}
        self.lock_fd = os.open(f"{SHM_DIR}/{seg.name}", os.O_RDWR)
        self.mem = seg.array("u1", seg.size, 0)
        self.native = _engine.Maps(self.mem, self.layout, self.lock_fd)
        self.globals: dict[str, o.GlobalVar] = {}
        self.programs: list[str] = []  # the object's programs, in the engine's order (prog_array values)

    @classmethod
    def create(cls, name: str, maps: list[o.MapDef], ncpus: int) -> ObjMaps:
        """Create segment `name` with every map empty and the global-data maps holding their initial bytes."""
        if ncpus < 1:
            raise ValueError(f"ncpus must be at least 1, not {ncpus}")
        size, layout = map_layout(list(maps), ncpus)
        seg = Segment.create(name, size)
        try:
            seg.buf[: _HDR.size] = _HDR.pack(_MAGIC, _VERSION, ncpus, len(maps), _fingerprint(layout))
            om = cls(seg, list(maps), ncpus)
            for i, m in enumerate(om.defs):
                if m.data is not None:
                    data = bytes(m.data).ljust(m.value_size, b"\0")[: m.value_size]
                    om._check_err(om.native.update(i, b"\0\0\0\0", data, BPF_ANY, 0, False), m.name)
            return om
        except BaseException:
            seg.unlink()
            seg.close()
            raise

    @classmethod
    def attach(cls, name: str, maps: list[o.MapDef], ncpus: int) -> ObjMaps:
        """Attach an existing segment, refusing one laid out for other maps or another CPU count."""
        seg = Segment.attach(name)
        try:
            magic, version, seg_ncpus, _, fp = _HDR.unpack_from(seg.buf)
            size, layout = map_layout(list(maps), ncpus)
            if magic != _MAGIC or version != _VERSION:
                raise ValueError(f"segment {name!r} is not an object's maps")
            if seg_ncpus != ncpus or fp != _fingerprint(layout) or seg.size < size:
                raise ValueError(f"object maps {name!r} were created for other maps or another CPU count")
            return cls(seg, list(maps), ncpus)
        except BaseException:
            seg.close()
            raise

    # ---- bpf(2) map commands ----

    def _def(self, name: str) -> tuple[int, o.MapDef]:
        try:
            i = self.index[name]
        except KeyError:
            known = ", ".join(self.index) or "none"
            raise BadInputError(f"no map {name!r} in the object (maps: {known})") from None
        return i, self.defs[i]

    @staticmethod
    def _check_err(rc: int, name: str) -> None:
        if rc < 0:
            err = -rc
            raise MapError(err, f"map {name!r}: {os.strerror(err) if err in errno.errorcode else err}")

    def _rows(self, m: o.MapDef) -> int:
        return self.ncpus if m.type in _PERCPU else 1

    def lookup(self, name: str, key: Any, cpu: int | None = None) -> Any:
        """The value (an int up to 8 bytes, else bytes) or None; per-CPU maps: CPU `cpu`'s, or all of them."""
        i, m = self._def(name)
        k = _to_bytes(key, m.key_size, f"map {name!r} key")
        rows = self._rows(m)
        if cpu is None and rows > 1:
            vals = [self.native.lookup(i, k, r) for r in range(rows)]
            return None if vals[0] is None else [self._value(v) for v in vals]
        v = self.native.lookup(i, k, 0 if cpu is None else cpu)
        return None if v is None else self._value(v)

    @staticmethod
    def _value(v: bytes) -> int | bytes:
        return int.from_bytes(v, "little") if len(v) <= 8 else v

    def update(self, name: str, key: Any, value: Any, flags: int = BPF_ANY, cpu: int | None = None) -> None:
        i, m = self._def(name)
        if m.type in _EVENTS:
            raise MapError(errno.EINVAL, f"map {name!r}: a {MAP_TYPE_NAMES[m.type]} takes no elements")
        k = _to_bytes(key, m.key_size, f"map {name!r} key")
        v = _to_bytes(value, m.value_size, f"map {name!r} value")
        rows = self._rows(m)
        if cpu is None and rows > 1:
            self._check_err(self.native.update(i, k, v * rows, flags, 0, True), name)
        else:
            self._check_err(self.native.update(i, k, v, flags, cpu or 0, False), name)

    def delete(self, name: str, key: Any) -> None:
        i, m = self._def(name)
        self._check_err(self.native.delete(i, _to_bytes(key, m.key_size, f"map {name!r} key")), name)

    def keys(self, name: str) -> list[int | str]:
        """The keys present (ints up to 8 bytes, else hex), in the table's order."""
        i, _ = self._def(name)
        return [_from_bytes(k) for k in self.native.keys(i)]

    def events(self, name: str) -> tuple[int, int]:
        """(events, bytes) a ringbuf or perf_event_array collected in this run."""
        i, _ = self._def(name)
        return self.native.events(i)

    # ---- bpf_trace_printk, counted per CPU (each CPU writes only its own counters) ----

    def count_trace(self, cpu: int, lines: int, dropped: int) -> None:
        off = _ALIGN + _TRACE.size * cpu
        a, b = _TRACE.unpack_from(self.seg.buf, off)
        _TRACE.pack_into(self.seg.buf, off, a + lines, b + dropped)

    def trace_counts(self) -> tuple[int, int]:
        """(lines, dropped) over every CPU."""
        rows = [_TRACE.unpack_from(self.seg.buf, _ALIGN + _TRACE.size * c) for c in range(self.ncpus)]
        return sum(r[0] for r in rows), sum(r[1] for r in rows)

    # ---- the report ----

    def snapshot(self) -> dict[str, Any]:
        """Every map by name: type and sizes, and its non-zero entries (per-CPU maps: each CPU's and the sum);
        event maps their counts; global-data maps their variables too."""
        out: dict[str, Any] = {}
        for i, m in enumerate(self.defs):
            meta: dict[str, Any] = {"type": MAP_TYPE_NAMES[m.type], "key_size": m.key_size,
                                    "value_size": m.value_size, "max_entries": m.max_entries}
            if m.type in _EVENTS:
                n, nbytes = self.native.events(i)
                out[m.name] = {**meta, "events": n, "bytes": nbytes}
                continue
            rows = self._rows(m)
            entries: dict[str, Any] = {}
            for kb in self.native.keys(i):
                vals = [self.native.lookup(i, kb, r) for r in range(rows)]
                if any(v is None for v in vals):
                    continue  # deleted between keys() and lookup()
                if m.type in _ARRAYS and not any(any(v) for v in vals):
                    continue  # arrays show non-zero entries, as the Python maps do
                key = str(_from_bytes(kb))
                if rows > 1:
                    ints = [_from_bytes(v) for v in vals]
                    entry: Any = {"cpus": ints}
                    if all(isinstance(x, int) for x in ints):
                        entry["sum"] = sum(ints)  # type: ignore[arg-type]
                    entries[key] = entry
                else:
                    entries[key] = _from_bytes(vals[0])  # type: ignore[arg-type]
            if rows > 1:
                meta["ncpus"] = rows
            out[m.name] = {**meta, "entries": entries}
            gvars = {g: v for g, v in self.globals.items() if v.map_index == i}
            if gvars and m.type == o.BPF_MAP_TYPE_ARRAY:
                raw = self.native.lookup(i, b"\0\0\0\0", 0) or b""
                out[m.name]["vars"] = {g: _from_bytes(raw[v.offset: v.offset + v.size]) for g, v in gvars.items()}
        lines, dropped = self.trace_counts()
        if lines or dropped:
            # not a C identifier: cannot collide with a map's name
            out["(bpf_trace_printk)"] = {"lines": lines, "dropped": dropped}
        return out

    def devmaps(self) -> dict[str, ObjDevMap]:
        """The object's devmaps and devmap_hashes by name, as a broadcast reads them (`ObjDevMap`)."""
        return {m.name: ObjDevMap(self, i) for i, m in enumerate(self.defs) if m.type in _DEVMAPS}

    def populate(self, initial: Mapping[str, Mapping[Any, Any]], ifindex_of: Callable[[str], int]) -> None:
        """Fill maps from the topology's ``maps: {MAP: {KEY: VALUE}}``: keys ints (or decimal strings, as
        YAML gives them), values ints, or device names for a devmap (its ifindex)."""
        for name, entries in initial.items():
            _, m = self._def(name)
            if not isinstance(entries, Mapping):
                raise BadInputError(f"map {name!r}: initial entries must be a mapping of key to value")
            for k, v in entries.items():
                try:
                    key = int(k) if not isinstance(k, bytes) else k
                except (TypeError, ValueError):
                    raise BadInputError(f"map {name!r}: key {k!r} is not an integer") from None
                if isinstance(v, str) and m.type == o.BPF_MAP_TYPE_PROG_ARRAY:
                    if v not in self.programs:
                        raise BadInputError(f"map {name!r}: {v!r} is no program of the object "
                                            f"(programs: {', '.join(self.programs) or 'none'})")
                    v = self.programs.index(v) + 1  # the engine's prog_array holds program index + 1
                elif isinstance(v, str):
                    if m.type not in _DEVMAPS and not (m.type in _ARRAYS and m.value_size == 4):
                        raise BadInputError(f"map {name!r}: value {v!r} names a device, but the map is a "
                                            f"{MAP_TYPE_NAMES[m.type]} of {m.value_size}-byte values")
                    v = ifindex_of(v)
                self.update(name, key, v)

    def close(self) -> None:
        self.native = None  # drops the engine's view of the segment first
        self.mem = None
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
        self.seg.close()

    def unlink(self) -> None:
        self.seg.unlink()

    def __enter__(self) -> ObjMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ObjDevMap:
    """A devmap (or devmap_hash) of an object, seen by the CPU worker's broadcast path
    (`emu.xdp.bpfmaps.BroadcastMap`, `emu.datapath.napi.NapiCore.broadcast`): the engine's
    ``bpf_redirect_map(&map, _, BPF_F_BROADCAST...)`` gives the target ``REDIRECT_BROADCAST | index << 16
    (| 1 with BPF_F_EXCLUDE_INGRESS)``, `index` the map's place in the object, and the worker reads the
    map's devices here when it makes the broadcast, as ``dev_map_enqueue_multi`` walks the map then."""

    __slots__ = ("bcast_base", "index", "maps", "name")

    def __init__(self, maps: ObjMaps, index: int) -> None:
        self.maps = maps
        self.index = index
        self.name = maps.defs[index].name
        self.bcast_base = REDIRECT_BROADCAST | index << 16

    @property
    def ifindexes(self) -> list[int]:
        """The map's ifindexes in the kernel's walk order (a devmap by index, a devmap_hash by bucket)."""
        return self.maps.native.devmap_ifindexes(self.index)
