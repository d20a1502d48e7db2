"""BPF maps in shared memory, shared by the CPU worker processes of one emulated host.

Kernel counterpart: ``kernel/bpf/arraymap.c`` (BPF_MAP_TYPE_ARRAY, _PERCPU_ARRAY), ``kernel/bpf/hashtab.c``
(BPF_MAP_TYPE_HASH, _PERCPU_HASH), ``kernel/bpf/devmap.c`` (BPF_MAP_TYPE_DEVMAP) and ``kernel/bpf/cpumap.c``
(BPF_MAP_TYPE_CPUMAP: an entry per target CPU with its ptr_ring's ``qsize``, see `CpuMap`).  In the kernel a map
is one object every CPU sees, which is what lets an XDP program keep state across packets and lets user
space read it.  Here the "CPUs" are separate processes, so the maps of one program attachment live in
one `emu.mem.shm.Segment` (a `MapSet`) that every CPU worker attaches; a per-CPU map gives each CPU its own
cache-line-aligned row, written by that CPU only and therefore lockless, exactly the reason the kernel
has per-CPU maps.

Values are fixed-size like the kernel's ``value_size``: a scalar numpy dtype (default ``uint64``) or a
small structured dtype.  Value types are numpy dtype strings (``"u8"`` is numpy's 8-byte ``uint64``,
``"u4"`` a ``uint32``, ``"u1"`` one byte) plus the kernel spellings ``"u16"``/``"u32"``/``"u64"`` and
``"s16"``/``"s32"``/``"s64"``.  Scalar values are read and written through ``memoryview`` casts (a
Python ``int`` per access, about half the cost of a numpy scalar), structured values through a numpy
array: `lookup` then returns a writable ``np.void`` view, the analogue of the value *pointer*
``bpf_map_lookup_elem`` returns.  Every map also exposes `view`, the whole value storage of this CPU
(per-CPU maps) or of the map, for programs that want the cheapest possible counter bump
(``view[0] += 1``; no bounds check beyond Python's, negative keys wrap).

Concurrency, compared with the kernel:

* `ArrayMap.add` on a global array is a plain read-modify-write: unlike ``__sync_fetch_and_add`` it is
  **not** atomic across processes, so two CPUs bumping one global counter can lose increments.  Use a
  per-CPU map for counters (as kernel programs do for the same cache-line reasons) and sum in user space.
* Hash maps are fixed-capacity open-addressing tables (linear probing, tombstones on delete).  Lookups
  are lockless like the kernel's RCU lookups.  Every write to a global `HashMap` and every key insert or
  delete of a `PerCpuHashMap` takes a per-map cross-process lock: a Linux open-file-description (OFD)
  lock on one byte of the segment's ``/dev/shm`` file (`emu.mem.locks.OfdLockFile`).  The kernel drops an OFD
  lock when its holder dies, so a CPU worker killed mid-update cannot wedge the others, which a spinlock
  word in shared memory would.  An uncontended lock/unlock costs ~1-2 us, so keep global hash writes off
  the per-packet path or accept that cost.
* `PerCpuHashMap` follows the kernel: one shared key set, a value per CPU for every key.  A CPU inserting
  a key sets its own value and zeroes the other CPUs' (``pcpu_init_value``); updating the value of an
  existing key touches only the caller's row and takes no lock.  ``max_entries`` bounds the shared key
  count.
* A lockless reader can see a structured value half-written, and may transiently miss keys while a
  writer compacts the table (only after many deletes).  The kernel avoids both with RCU; the emulator's
  programs only read counters, so this is accepted.

Error semantics follow the ``bpf(2)`` syscall: `MapError` (a `KeyError`) carries the errno the kernel
would return: ``E2BIG`` for an array key out of range or a full hash map, ``EEXIST``/``ENOENT`` for
``BPF_NOEXIST``/``BPF_EXIST`` conflicts, ``ENOENT`` for deleting a missing hash key, ``EINVAL`` for bad
flags or deleting from an array.
"""

from __future__ import annotations

import errno
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from emu.errors import BadInputError
from emu.mem.locks import OfdLockFile
from emu.mem.shm import SHM_DIR, Segment

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_F_BROADCAST",
    "BPF_F_EXCLUDE_INGRESS",
    "BPF_NOEXIST",
    "CPUMAP_BATCH",
    "CPU_MAP_BULK_SIZE",
    "MAP_TYPES",
    "REDIRECT_BROADCAST",
    "REDIRECT_CPUMAP",
    "ArrayMap",
    "BpfMap",
    "BroadcastMap",
    "CpuMap",
    "DevMap",
    "HashMap",
    "MapError",
    "MapSet",
    "MapSpec",
    "PerCpuArrayMap",
    "PerCpuHashMap",
    "populate",
]

# Update flags (include/uapi/linux/bpf.h).
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
# bpf_redirect_map flags (include/uapi/linux/bpf.h): send to every device of a devmap, but the ingress one.
BPF_F_BROADCAST = 1 << 3
BPF_F_EXCLUDE_INGRESS = 1 << 4

MapType = Literal["array", "percpu_array", "hash", "percpu_hash", "devmap", "cpumap"]
MAP_TYPES: tuple[str, ...] = ("array", "percpu_array", "hash", "percpu_hash", "devmap", "cpumap")
MAX_ENTRIES_LIMIT = 1 << 24  # keeps a typo from reserving gigabytes of /dev/shm

# kernel/bpf/cpumap.c: frames a CPU bulks per target before the ptr_ring (CPU_MAP_BULK_SIZE), frames the
# target's kthread takes a round (CPUMAP_BATCH), and the sanity limit on an entry's qsize.
CPU_MAP_BULK_SIZE = 8
CPUMAP_BATCH = 8
CPU_MAP_QSIZE_MAX = 16384
# A redirect target at or above this names a cpumap entry rather than an ifindex (ifindexes are u32):
# ``REDIRECT_CPUMAP | ordinal << 16 | cpu``, `ordinal` the map's place in its map set (sorted names), as
# the kernel's ``bpf_redirect_info`` keeps the map type and the entry next to the target.
REDIRECT_CPUMAP = 1 << 32
# A devmap broadcast's target: ``REDIRECT_BROADCAST | ordinal << 16 | exclude_ingress`` (`DevMap.bcast_base`).
REDIRECT_BROADCAST = 2 << 32


@runtime_checkable
class BroadcastMap(Protocol):
    """A devmap a broadcast can name (a Python program's `DevMap`, an eBPF object's
    `emu.ebpf.maps.ObjDevMap`): its name, `bcast_base` (``REDIRECT_BROADCAST | ordinal << 16``, the code its
    program's redirect gives, ``| 1`` with BPF_F_EXCLUDE_INGRESS) and `ifindexes`, its devices in the order
    ``dev_map_enqueue_multi`` walks them (0: an empty slot), read when the broadcast is made."""

    name: str
    bcast_base: int

    @property
    def ifindexes(self) -> Sequence[int]: ...


# A cpumap entry: ``struct bpf_cpumap_val`` (qsize; the second program, here by its "module:function" name,
# as a pinned path names a program) and the entry's ptr_ring, as frames produced and consumed.
CPUMAP_DTYPE = np.dtype([("qsize", "<u4"), ("_pad", "<u4"), ("produced", "<u8"), ("consumed", "<u8"),
                         ("program", "S104")])

_ALIGN = 64  # rows and maps start on their own cache line, like the kernel's per-CPU areas
_MAGIC = 0x50504D4150534554  # "PPMAPSET"
_VERSION = 1
_HEADER = 64
_HASH_HEADER = 64  # count, tombstones
_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: sequential keys spread over the table
_M64 = (1 << 64) - 1

# Hash slot states.
_EMPTY = 0
_USED = 1
_DELETED = 2

# Kernel spellings of integer types; everything else goes to np.dtype().
_ALIASES = {
    "u16": "uint16",
    "u32": "uint32",
    "u64": "uint64",
    "s8": "int8",
    "s16": "int16",
    "s32": "int32",
    "s64": "int64",
    "i16": "int16",
    "i32": "int32",
    "i64": "int64",
}
_KEY_TYPES = {
    "u32": "uint32",
    "u64": "uint64",
    "u4": "uint32",
    "u8": "uint64",
    "uint32": "uint32",
    "uint64": "uint64",
}
# memoryview.cast formats for the scalar dtypes (native order only).
_MV_FORMATS = {
    ("u", 1): "B", ("u", 2): "H", ("u", 4): "I", ("u", 8): "Q",
    ("i", 1): "b", ("i", 2): "h", ("i", 4): "i", ("i", 8): "q",
    ("f", 4): "f", ("f", 8): "d",
}  # fmt: skip


class MapError(BadInputError, KeyError):
    """A map operation failed the way ``bpf(2)`` would; `errno` is the kernel's error number."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message

    def __str__(self) -> str:
        return f"[{errno.errorcode.get(self.errno, self.errno)}] {self.message}"


def _resolve_dtype(value: str) -> np.dtype:
    dt = np.dtype(_ALIASES.get(value, value))
    if dt.fields is None:
        if (dt.kind, dt.itemsize) not in _MV_FORMATS or not dt.isnative:
            raise ValueError(f"map value type {value!r}: scalar values must be native integers or floats")
    elif dt.hasobject:
        raise ValueError(f"map value type {value!r}: object fields cannot live in shared memory")
    return dt


@dataclass(frozen=True, slots=True)
class MapSpec:
    """What a program declares about a map (``struct bpf_map_def``): type, size, value and key types.

    `value` defaults to ``"u64"`` (``"u32"`` ifindexes for a devmap, the only value a devmap takes here).
    `key` matters for hash maps only (``"u32"`` or ``"u64"``); array-like maps are indexed by u32.
    """

    type: MapType
    max_entries: int
    value: str | None = None
    key: str = "u32"
    dtype: np.dtype = field(init=False, repr=False, compare=False)
    key_dtype: np.dtype = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.type not in MAP_TYPES:
            raise ValueError(f"map type {self.type!r}: expected one of {', '.join(MAP_TYPES)}")
        if not isinstance(self.max_entries, int) or not 1 <= self.max_entries <= MAX_ENTRIES_LIMIT:
            raise ValueError(f"max_entries {self.max_entries!r}: expected an int in 1..{MAX_ENTRIES_LIMIT}")
        if self.type == "devmap":
            if self.value not in (None, "u32", "u4", "uint32"):
                raise ValueError(f"a devmap holds u32 ifindexes, not {self.value!r}")
            dt = np.dtype("uint32")
        elif self.type == "cpumap":
            if self.value is not None:
                raise ValueError(f"a cpumap holds struct bpf_cpumap_val (qsize, program), not {self.value!r}")
            dt = CPUMAP_DTYPE
        else:
            dt = _resolve_dtype("u64" if self.value is None else self.value)
        if self.key not in _KEY_TYPES or (
            self.type not in ("hash", "percpu_hash") and self.key not in ("u32", "u4")
        ):
            raise ValueError(f"key type {self.key!r}: hash maps take u32 or u64 keys, other maps u32")
        object.__setattr__(self, "dtype", dt)
        object.__setattr__(self, "key_dtype", np.dtype(_KEY_TYPES[self.key]))

    @property
    def percpu(self) -> bool:
        return self.type.startswith("percpu_")

    def describe(self) -> str:
        """A canonical text form, used to check that attach sees the layout create made."""
        return f"{self.type}:{self.max_entries}:{self.dtype.descr!r}:{self.key_dtype.str}"


def _up(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def _hash_capacity(max_entries: int) -> int:
    # Twice the entries, rounded to a power of two: linear probing stays short at load <= 1/2.
    return max(8, 1 << (2 * max_entries - 1).bit_length())


@dataclass(frozen=True, slots=True)
class _Place:
    """Where one map lives in the segment."""

    offset: int  # start of the map (the hash header for hash maps); also its lock byte
    values: int  # first value row
    row: int  # bytes between per-CPU rows (0 for global maps)
    capacity: int  # value slots per row (max_entries, or the hash table size)
    states: int = 0  # hash maps: slot-state bytes
    keys: int = 0  # hash maps: keys
    end: int = 0


def _layout(specs: Mapping[str, MapSpec], ncpus: int) -> tuple[int, dict[str, _Place]]:
    places: dict[str, _Place] = {}
    off = _HEADER
    for name in sorted(specs):  # insertion order must not change the layout
        s = specs[name]
        start = off
        if s.type in ("hash", "percpu_hash"):
            cap = _hash_capacity(s.max_entries)
            states = start + _HASH_HEADER
            keys = _up(states + cap)
            values = _up(keys + cap * s.key_dtype.itemsize)
        else:
            cap = s.max_entries
            states = keys = 0
            values = start
        row = _up(cap * s.dtype.itemsize)
        end = values + row * (ncpus if s.percpu else 1)
        places[name] = _Place(start, values, row if s.percpu else 0, cap, states, keys, end)
        off = _up(end)
    return off, places


def _fingerprint(specs: Mapping[str, MapSpec], ncpus: int) -> int:
    text = f"{ncpus};" + ";".join(f"{n}={specs[n].describe()}" for n in sorted(specs))
    # zlib, not hashlib: importing hashlib loads OpenSSL into every worker; this only has to tell two
    # differently shaped map sets apart.
    raw = text.encode()
    return zlib.crc32(raw) | zlib.adler32(raw) << 32


def _values_view(seg: Segment, dtype: np.dtype, count: int, offset: int) -> Any:
    """Writable storage for `count` values: a memoryview cast for scalars, a numpy array for records."""
    if dtype.fields is None:
        return seg.buf[offset : offset + count * dtype.itemsize].cast(
            _MV_FORMATS[(dtype.kind, dtype.itemsize)]
        )
    return seg.array(dtype, count, offset)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.void | np.ndarray):
        v = v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, bytes):
        return v.hex()
    return v


def _record_json(dtype: np.dtype, v: Any) -> Any:
    if dtype.fields is None:
        return _jsonable(v)
    return {name: _jsonable(x) for name, x in zip(dtype.names or (), v.tolist(), strict=True)}


def _is_zero(v: Any) -> bool:
    if isinstance(v, np.void):
        return not any(np.frombuffer(v.tobytes(), dtype=np.uint8))
    return v == 0


def _to_record(dtype: np.dtype, value: Any) -> Any:
    """Accept a dict of fields for a structured value (numpy wants a tuple)."""
    if dtype.fields is not None and isinstance(value, Mapping):
        names = dtype.names or ()
        unknown = set(value) - set(names)
        if unknown:
            raise ValueError(f"unknown value fields {sorted(unknown)}; the value has {list(names)}")
        return tuple(value.get(n, 0) for n in names)
    return value


class _Wrap:
    """Two's-complement wrap for `add`, like the kernel's fixed-width arithmetic."""

    __slots__ = ("bits", "signed")

    def __init__(self, dtype: np.dtype) -> None:
        self.bits = dtype.itemsize * 8
        self.signed = dtype.kind == "i"

    def __call__(self, x: Any) -> Any:
        if isinstance(x, float):
            return x
        x &= (1 << self.bits) - 1
        if self.signed and x >> (self.bits - 1):
            x -= 1 << self.bits
        return x


def _check_flags(flags: int) -> None:
    if flags not in (BPF_ANY, BPF_NOEXIST, BPF_EXIST):
        raise MapError(errno.EINVAL, f"unknown update flags {flags!r}")


# --------------------------------------------------------------------------------------------------
# Maps


class BpfMap:
    """What every map has: its name, spec and a JSON-able `snapshot`."""

    __slots__ = ("_n", "_v", "_wrap", "dtype", "name", "spec")

    def __init__(self, name: str, spec: MapSpec) -> None:
        self.name = name
        self.spec = spec
        self.dtype = spec.dtype
        self._n = spec.max_entries
        self._wrap = _Wrap(spec.dtype) if spec.dtype.fields is None else None
        self._v: Any = None

    @property
    def max_entries(self) -> int:
        return self._n

    @property
    def view(self) -> Any:
        """The value storage of this map (this CPU's row for per-CPU maps), indexed by slot."""
        return self._v

    def _add_slow(self, v: Any, i: int, delta: Any) -> None:
        if self._wrap is None:
            raise TypeError(f"map {self.name!r}: add() needs a scalar value type; update the fields instead")
        v[i] = self._wrap(v[i] + delta)

    def _views(self) -> list[Any]:
        return [self._v]

    def release(self) -> None:
        """Drop this map's views of the segment (part of `MapSet.close`); later use raises ValueError."""
        for v in self._views():
            if isinstance(v, memoryview):
                v.release()

    def snapshot(self) -> dict[str, Any]:
        raise NotImplementedError

    def _meta(self) -> dict[str, Any]:
        s = self.spec
        return {"type": s.type, "max_entries": s.max_entries, "value": str(self.dtype)}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} max_entries={self._n}>"


class ArrayMap(BpfMap):
    """BPF_MAP_TYPE_ARRAY: `max_entries` preallocated, zero-initialised values indexed by a u32 key."""

    __slots__ = ()

    def __init__(self, name: str, spec: MapSpec, values: Any) -> None:
        super().__init__(name, spec)
        self._v = values

    def lookup(self, key: int) -> Any:
        """The value at `key`, or None out of range (``bpf_map_lookup_elem`` returning NULL)."""
        if 0 <= key < self._n:
            return self._v[key]
        return None

    def update(self, key: int, value: Any, flags: int = BPF_ANY) -> None:
        if flags:
            _check_flags(flags)
            if flags == BPF_NOEXIST:
                raise MapError(errno.EEXIST, f"map {self.name!r}: array elements always exist (BPF_NOEXIST)")
        if not 0 <= key < self._n:
            raise MapError(errno.E2BIG, f"map {self.name!r}: key {key} out of range 0..{self._n - 1}")
        self._v[key] = _to_record(self.dtype, value)

    def add(self, key: int, delta: int | float = 1) -> None:
        """``__sync_fetch_and_add`` stand-in: atomic only per-CPU (see the module docstring)."""
        if not 0 <= key < self._n:
            raise MapError(errno.E2BIG, f"map {self.name!r}: key {key} out of range 0..{self._n - 1}")
        v = self._v
        try:
            v[key] += delta
        except (ValueError, OverflowError, TypeError):
            self._add_slow(v, key, delta)

    def delete(self, key: int) -> None:
        raise MapError(errno.EINVAL, f"map {self.name!r}: array elements cannot be deleted")

    def __getitem__(self, key: int) -> Any:
        if 0 <= key < self._n:
            return self._v[key]
        raise MapError(errno.ENOENT, f"map {self.name!r}: key {key} out of range 0..{self._n - 1}")

    def __setitem__(self, key: int, value: Any) -> None:
        self.update(key, value)

    def __len__(self) -> int:
        return self._n

    def snapshot(self) -> dict[str, Any]:
        entries = {
            str(k): _record_json(self.dtype, self._v[k]) for k in range(self._n) if not _is_zero(self._v[k])
        }
        return {**self._meta(), "entries": entries}


class PerCpuArrayMap(ArrayMap):
    """BPF_MAP_TYPE_PERCPU_ARRAY: one row per CPU; the program side acts on the current CPU's row.

    User space reads every CPU (`values`, `sum`) like ``bpf_map_lookup_elem`` on a per-CPU map returns
    one value per possible CPU.
    """

    __slots__ = ("cpu", "rows")

    def __init__(self, name: str, spec: MapSpec, rows: list[Any], cpu: int) -> None:
        super().__init__(name, spec, rows[cpu])
        self.rows = rows
        self.cpu = cpu

    def values(self, key: int) -> list[Any]:
        """Every CPU's value at `key`."""
        if not 0 <= key < self._n:
            raise MapError(errno.ENOENT, f"map {self.name!r}: key {key} out of range 0..{self._n - 1}")
        return [r[key] for r in self.rows]

    def sum(self, key: int) -> Any:
        """The sum over CPUs (per field for a structured value)."""
        vals = self.values(key)
        if self.dtype.fields is None:
            return sum(vals)
        return {n: sum(v[n].item() for v in vals) for n in self.dtype.names or ()}

    def update_all(self, key: int, value: Any) -> None:
        """Set `key` on every CPU (user space writing a per-CPU element)."""
        for cpu in range(len(self.rows)):
            self.update_cpu(cpu, key, value)

    def update_cpu(self, cpu: int, key: int, value: Any) -> None:
        if not 0 <= key < self._n:
            raise MapError(errno.E2BIG, f"map {self.name!r}: key {key} out of range 0..{self._n - 1}")
        self.rows[cpu][key] = _to_record(self.dtype, value)

    def _views(self) -> list[Any]:
        return list(self.rows)

    def snapshot(self) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        for k in range(self._n):
            vals = [r[k] for r in self.rows]
            if all(_is_zero(v) for v in vals):
                continue
            cpus = [_record_json(self.dtype, v) for v in vals]
            entries[str(k)] = {"cpus": cpus, "sum": _jsonable(self.sum(k))}
        return {**self._meta(), "ncpus": len(self.rows), "entries": entries}


class DevMap(BpfMap):
    """BPF_MAP_TYPE_DEVMAP: an array of egress ifindexes (0 = empty slot) for ``bpf_redirect_map``."""

    # `ifindexes` is the raw u32 slot storage, a plain attribute (not a property) because
    # `emu.xdp.XdpContext.redirect_map` reads it per packet; `bcast_base` codes a broadcast to this map
    # (`REDIRECT_BROADCAST` and its ordinal in its map set).
    __slots__ = ("bcast_base", "ifindexes")

    def __init__(self, name: str, spec: MapSpec, values: Any, bcast_base: int = REDIRECT_BROADCAST) -> None:
        super().__init__(name, spec)
        self._v = values
        self.ifindexes = values
        self.bcast_base = bcast_base

    def lookup(self, key: int) -> int | None:
        if 0 <= key < self._n:
            return self._v[key] or None
        return None

    def update(self, key: int, ifindex: int, flags: int = BPF_ANY) -> None:
        _check_flags(flags)
        if not 0 <= key < self._n:
            raise MapError(errno.E2BIG, f"devmap {self.name!r}: key {key} out of range 0..{self._n - 1}")
        if not isinstance(ifindex, int) or not 0 < ifindex < 1 << 32:
            raise MapError(errno.EINVAL, f"devmap {self.name!r}: {ifindex!r} is not an ifindex")
        present = self._v[key] != 0
        if flags == BPF_NOEXIST and present:
            raise MapError(errno.EEXIST, f"devmap {self.name!r}: key {key} is set (BPF_NOEXIST)")
        if flags == BPF_EXIST and not present:
            raise MapError(errno.ENOENT, f"devmap {self.name!r}: key {key} is empty (BPF_EXIST)")
        self._v[key] = ifindex

    def delete(self, key: int) -> None:
        if not 0 <= key < self._n:
            raise MapError(errno.E2BIG, f"devmap {self.name!r}: key {key} out of range 0..{self._n - 1}")
        self._v[key] = 0

    def __getitem__(self, key: int) -> int:
        v = self.lookup(key)
        if v is None:
            raise MapError(errno.ENOENT, f"devmap {self.name!r}: no device at key {key}")
        return v

    def __setitem__(self, key: int, ifindex: int) -> None:
        self.update(key, ifindex)

    def snapshot(self) -> dict[str, Any]:
        entries = {str(k): self._v[k] for k in range(self._n) if self._v[k]}
        return {"type": "devmap", "max_entries": self._n, "entries": entries}


class CpuMap(BpfMap):
    """BPF_MAP_TYPE_CPUMAP: one entry per target CPU (the key), each with its ptr_ring of ``qsize`` frames
    and an optional second XDP program the target's kthread runs (``xdp/cpumap`` programs, 5.9).

    ``bpf_redirect_map(&cpu_map, cpu, 0)`` sends a frame to CPU `cpu`: the redirecting CPU bulks it (8 a
    target), then produces the bulk into the entry's ptr_ring, dropping what does not fit.  The ring is
    shared by every producer, as the kernel's is under its producer lock: `ring_produce` reserves room
    under the map's OFD lock (one byte per entry), and the consumer, the target CPU's kthread, returns it
    with `ring_consumed` (one writer, no lock).  Its frames travel in messages (`emu.net.protocol`'s
    ``cpumap`` kind); the ring counts them from produce to the kthread taking them.

    Updates follow ``cpu_map_update_elem``: a key past ``max_entries`` is E2BIG, BPF_NOEXIST is EEXIST
    (an entry always exists), a qsize above 16384 EOVERFLOW, a CPU the host does not have ENODEV.  The
    kernel treats qsize 0 as deleting the entry; from a topology that is always a mistake, so it is
    refused (EINVAL) with that explanation: `delete` empties an entry.
    """

    __slots__ = ("_lockbase", "_lockfile", "ncpus", "qsizes", "redirect_base")

    def __init__(self, name: str, spec: MapSpec, values: Any, ncpus: int, redirect_base: int,
                 lockfile: OfdLockFile, lockbase: int) -> None:
        super().__init__(name, spec)
        self._v = values
        self.ncpus = ncpus
        # Read per packet by `emu.xdp.XdpContext.redirect_map`: the qsize field (0: no entry), a view.
        self.qsizes = values["qsize"]
        self.redirect_base = redirect_base
        self._lockfile = lockfile
        self._lockbase = lockbase

    def _check_key(self, key: int) -> None:
        if not isinstance(key, int) or not 0 <= key < self._n:
            raise MapError(errno.E2BIG, f"cpumap {self.name!r}: key {key} out of range 0..{self._n - 1}")

    def lookup(self, key: int) -> dict[str, Any] | None:
        """The entry of CPU `key` (``qsize``, ``program``), or None."""
        if not isinstance(key, int) or not 0 <= key < self._n:
            return None
        e = self._v[key]
        if not e["qsize"]:
            return None
        return {"qsize": int(e["qsize"]), "program": e["program"].decode() or None}

    def program(self, key: int) -> str | None:
        """The second program of CPU `key`'s entry ("module:function"), or None."""
        name = bytes(self._v[key]["program"]).decode()
        return name or None

    def update(self, key: int, value: Any, flags: int = BPF_ANY) -> None:
        """Set CPU `key`'s entry: `value` is its qsize, or ``{"qsize": n, "program": "module:function"}``."""
        _check_flags(flags)
        self._check_key(key)
        if flags == BPF_NOEXIST:
            raise MapError(errno.EEXIST, f"cpumap {self.name!r}: key {key} always exists (BPF_NOEXIST)")
        prog = None
        entry = f"cpumap {self.name!r}: CPU {key}'s entry"
        if isinstance(value, Mapping):
            unknown = set(value) - {"qsize", "program"}
            if unknown:
                raise MapError(errno.EINVAL, f"{entry}: unknown fields "
                                             f"{sorted(unknown)} (struct bpf_cpumap_val has qsize, program)")
            qsize, prog = value.get("qsize"), value.get("program")
        else:
            qsize = value
        if type(qsize) is not int or qsize < 0:
            raise MapError(errno.EINVAL, f"{entry}: qsize {qsize!r} is not a frame count")
        if qsize > CPU_MAP_QSIZE_MAX:
            raise MapError(errno.EOVERFLOW, f"{entry}: qsize {qsize} above the kernel's limit of "
                                            f"{CPU_MAP_QSIZE_MAX}")
        if key >= self.ncpus:
            raise MapError(errno.ENODEV, f"cpumap {self.name!r}: key {key}: the host has no CPU {key} "
                                         f"(CPUs 0..{self.ncpus - 1})")
        if qsize == 0:
            raise MapError(errno.EINVAL, f"{entry}: qsize 0 (the kernel takes it as "
                                         "deleting the entry, so nothing could be redirected to CPU "
                                         f"{key}); give the ptr_ring's size, e.g. 2048 as xdp-bench does")
        if prog is not None:
            from emu.topology.model import resolve_program  # the one place that imports program modules

            if not isinstance(prog, str):
                raise MapError(errno.EINVAL, f"{entry}: program {prog!r} is not "
                                             "a 'module:function' name")
            try:
                fn = resolve_program(prog)
            except ValueError as e:
                raise MapError(errno.EINVAL, f"{entry}: {e}") from None
            if getattr(fn, "maps", None):
                raise MapError(errno.EINVAL, f"{entry}: program {prog!r} declares "
                                             "maps; a cpumap program here runs without maps of its own")
            if len(prog.encode()) > CPUMAP_DTYPE["program"].itemsize:
                raise MapError(errno.ENAMETOOLONG, f"{entry}: program name too long")
        e = self._v[key : key + 1]
        e["qsize"] = qsize
        e["program"] = (prog or "").encode()

    def delete(self, key: int) -> None:
        self._check_key(key)
        self._v[key : key + 1]["qsize"] = 0

    def __getitem__(self, key: int) -> dict[str, Any]:
        v = self.lookup(key)
        if v is None:
            raise MapError(errno.ENOENT, f"cpumap {self.name!r}: no entry for CPU {key}")
        return v

    def __setitem__(self, key: int, value: Any) -> None:
        self.update(key, value)

    def queued(self, key: int) -> int:
        """Frames in CPU `key`'s ptr_ring now (produced, not yet taken by its kthread)."""
        e = self._v[key]
        return int(e["produced"]) - int(e["consumed"])

    def ring_produce(self, key: int, n: int) -> int:
        """``__ptr_ring_produce`` of `n` frames under the producer lock: how many fit (the first ones);
        the caller drops the rest, as ``bq_flush_to_queue`` does."""
        with self._lockfile.lock(self._lockbase + key):
            v = self._v
            # (Never below empty: a forged cpumap message refused by the consumer returns slots it never
            # held.)
            room = int(v[key]["qsize"]) - max(0, int(v[key]["produced"]) - int(v[key]["consumed"]))
            k = max(0, min(n, room))
            if k:
                v[key : key + 1]["produced"] += k
        return k

    def ring_consumed(self, key: int, n: int) -> None:
        """The kthread of CPU `key` took `n` frames off its ring (the single consumer: no lock)."""
        self._v[key : key + 1]["consumed"] += n

    def snapshot(self) -> dict[str, Any]:
        entries = {}
        for k in range(self._n):
            e = self.lookup(k)
            if e is not None:
                entries[str(k)] = {**e, "queued": self.queued(k)}
        return {"type": "cpumap", "max_entries": self._n, "entries": entries}


class HashMap(BpfMap):
    """BPF_MAP_TYPE_HASH: up to `max_entries` integer keys in a fixed open-addressing table.

    Lookups are lockless; every write takes the map's OFD lock (see the module docstring).
    """

    __slots__ = (
        "_all",
        "_cap",
        "_hdr",
        "_keys",
        "_kmax",
        "_lockfile",
        "_lockno",
        "_mask",
        "_shift",
        "_states",
        "cpu",
    )

    def __init__(
        self,
        name: str,
        spec: MapSpec,
        seg: Segment,
        place: _Place,
        rows: list[Any],
        cpu: int,
        lockfile: OfdLockFile,
    ) -> None:
        super().__init__(name, spec)
        self.cpu = cpu  # whose row `_v` is (a per-CPU map's program-side value)
        cap = place.capacity
        self._cap = cap
        self._mask = cap - 1
        self._shift = 64 - (cap.bit_length() - 1)
        self._hdr = seg.buf[place.offset : place.offset + 16].cast("Q")  # count, tombstones
        self._states = seg.buf[place.states : place.states + cap]
        kdt = spec.key_dtype
        self._keys = seg.buf[place.keys : place.keys + cap * kdt.itemsize].cast(
            _MV_FORMATS[("u", kdt.itemsize)]
        )
        self._kmax = (1 << (8 * kdt.itemsize)) - 1
        self._all = rows
        self._v = rows[cpu]
        self._lockfile = lockfile
        self._lockno = place.offset

    # -- lockless reads ---------------------------------------------------------------------------

    def _find(self, key: int) -> int:
        """The slot holding `key`, or -1."""
        if not 0 <= key <= self._kmax:
            return -1
        states = self._states
        keys = self._keys
        mask = self._mask
        i = ((key * _GOLDEN) & _M64) >> self._shift
        for _ in range(self._cap):
            s = states[i]
            if s == _USED:
                if keys[i] == key:
                    return i
            elif s == _EMPTY:
                return -1
            i = (i + 1) & mask
        return -1

    def lookup(self, key: int) -> Any:
        """The value of `key` (this CPU's, for a per-CPU map), or None."""
        i = self._find(int(key))
        return None if i < 0 else self._v[i]

    def __contains__(self, key: int) -> bool:
        return self._find(int(key)) >= 0

    def __getitem__(self, key: int) -> Any:
        i = self._find(int(key))
        if i < 0:
            raise MapError(errno.ENOENT, f"map {self.name!r}: no key {key}")
        return self._v[i]

    def __setitem__(self, key: int, value: Any) -> None:
        self.update(key, value)

    def __len__(self) -> int:
        return self._hdr[0]

    def keys(self) -> list[int]:
        states, keys = self._states, self._keys
        return [keys[i] for i in range(self._cap) if states[i] == _USED]

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys())

    def items(self) -> list[tuple[int, Any]]:
        states, keys, v = self._states, self._keys, self._v
        return [(keys[i], v[i]) for i in range(self._cap) if states[i] == _USED]

    # -- writes (under the lock) ------------------------------------------------------------------

    def _insert(self, key: int) -> int:
        """Claim a slot for a new `key` (lock held, key known absent); values are the caller's job."""
        hdr = self._hdr
        if hdr[0] >= self._n:
            raise MapError(errno.E2BIG, f"map {self.name!r} is full ({self._n} entries)")
        if hdr[0] + hdr[1] + 1 > self._cap * 3 // 4:
            self._compact()
        states = self._states
        mask = self._mask
        i = ((key * _GOLDEN) & _M64) >> self._shift
        while states[i] == _USED:
            i = (i + 1) & mask
        if states[i] == _DELETED:
            hdr[1] -= 1
        return i

    def _publish(self, i: int, key: int) -> None:
        # Key before state, so a lockless reader that sees USED sees the right key.
        self._keys[i] = key
        self._states[i] = _USED
        self._hdr[0] += 1

    def _compact(self) -> None:
        """Rehash in place to clear tombstones (lock held)."""
        states, keys = self._states, self._keys
        live = [(keys[i], [r[i] for r in self._all]) for i in range(self._cap) if states[i] == _USED]
        copies = [(k, [v.copy() if isinstance(v, np.void) else v for v in vs]) for k, vs in live]
        for i in range(self._cap):
            states[i] = _EMPTY
        self._hdr[0] = 0
        self._hdr[1] = 0
        mask = self._mask
        for k, vs in copies:
            i = ((k * _GOLDEN) & _M64) >> self._shift
            while states[i] == _USED:
                i = (i + 1) & mask
            for r, v in zip(self._all, vs, strict=True):
                r[i] = v
            self._publish(i, k)

    def _check_key(self, key: int) -> int:
        key = int(key)
        if not 0 <= key <= self._kmax:
            raise MapError(errno.EINVAL, f"map {self.name!r}: key {key} does not fit a {self.spec.key} key")
        return key

    def _store_new(self, i: int, value: Any) -> None:
        self._v[i] = value

    def update(self, key: int, value: Any, flags: int = BPF_ANY) -> None:
        _check_flags(flags)
        key = self._check_key(key)
        value = _to_record(self.dtype, value)
        with self._lockfile.lock(self._lockno):
            i = self._find(key)
            if i >= 0:
                if flags == BPF_NOEXIST:
                    raise MapError(errno.EEXIST, f"map {self.name!r}: key {key} exists (BPF_NOEXIST)")
                self._v[i] = value
                return
            if flags == BPF_EXIST:
                raise MapError(errno.ENOENT, f"map {self.name!r}: no key {key} (BPF_EXIST)")
            i = self._insert(key)
            self._store_new(i, value)
            self._publish(i, key)

    def add(self, key: int, delta: int | float = 1) -> None:
        """Add to `key`'s value, inserting it with value `delta` if absent."""
        key = self._check_key(key)
        if self._wrap is None:
            raise TypeError(f"map {self.name!r}: add() needs a scalar value type; update the fields instead")
        with self._lockfile.lock(self._lockno):
            i = self._find(key)
            if i < 0:
                i = self._insert(key)
                self._store_new(i, 0)
                self._publish(i, key)
            v = self._v
            try:
                v[i] += delta
            except (ValueError, OverflowError, TypeError):
                self._add_slow(v, i, delta)

    def delete(self, key: int) -> None:
        key = int(key)
        with self._lockfile.lock(self._lockno):
            i = self._find(key)
            if i < 0:
                raise MapError(errno.ENOENT, f"map {self.name!r}: no key {key}")
            states = self._states
            if states[(i + 1) & self._mask] == _EMPTY:
                # Nothing probes past an empty slot, so trailing tombstones can become empty again.
                states[i] = _EMPTY
                j = (i - 1) & self._mask
                while states[j] == _DELETED:
                    states[j] = _EMPTY
                    self._hdr[1] -= 1
                    j = (j - 1) & self._mask
            else:
                states[i] = _DELETED
                self._hdr[1] += 1
            self._hdr[0] -= 1

    def _views(self) -> list[Any]:
        return [self._hdr, self._states, self._keys, *self._all]

    def snapshot(self) -> dict[str, Any]:
        entries = {str(k): _record_json(self.dtype, v) for k, v in sorted(self.items())}
        return {**self._meta(), "key": self.spec.key, "entries": entries}


class PerCpuHashMap(HashMap):
    """BPF_MAP_TYPE_PERCPU_HASH: shared keys, one value per CPU per key (see the module docstring).

    Program-side `lookup`/`update`/`add` act on the current CPU's value; only inserting or deleting a
    key takes the lock.
    """

    __slots__ = ()

    def _store_new(self, i: int, value: Any) -> None:
        zero = np.zeros((), self.dtype)[()] if self.dtype.fields is not None else 0
        for r in self._all:
            r[i] = zero
        self._v[i] = value

    def update(self, key: int, value: Any, flags: int = BPF_ANY) -> None:
        _check_flags(flags)
        key = self._check_key(key)
        i = self._find(key)
        if i >= 0 and flags != BPF_NOEXIST:
            self._v[i] = _to_record(self.dtype, value)  # own row, existing key: no lock
            return
        super().update(key, value, flags)

    def add(self, key: int, delta: int | float = 1) -> None:
        i = self._find(int(key))
        if i < 0:
            super().add(key, delta)  # insert under the lock (re-checks for a racing insert)
            return
        v = self._v
        try:
            v[i] += delta
        except (ValueError, OverflowError, TypeError):
            self._add_slow(v, i, delta)

    def update_all(self, key: int, value: Any) -> None:
        """Insert or set `key` with the same value on every CPU (user space writing a per-CPU element)."""
        self.update(key, value)
        i = self._find(int(key))
        record = _to_record(self.dtype, value)
        for r in self._all:
            r[i] = record

    def values(self, key: int) -> list[Any]:
        i = self._find(int(key))
        if i < 0:
            raise MapError(errno.ENOENT, f"map {self.name!r}: no key {key}")
        return [r[i] for r in self._all]

    def sum(self, key: int) -> Any:
        vals = self.values(key)
        if self.dtype.fields is None:
            return sum(vals)
        return {n: sum(v[n].item() for v in vals) for n in self.dtype.names or ()}

    def items(self) -> list[tuple[int, Any]]:
        """(key, [value per CPU]) pairs, the user-space view of a per-CPU hash."""
        states, keys = self._states, self._keys
        return [(keys[i], [r[i] for r in self._all]) for i in range(self._cap) if states[i] == _USED]

    def snapshot(self) -> dict[str, Any]:
        entries = {}
        for k, vals in sorted(self.items()):
            cpus = [_record_json(self.dtype, v) for v in vals]
            entries[str(k)] = {"cpus": cpus, "sum": _jsonable(self.sum(k))}
        return {**self._meta(), "key": self.spec.key, "ncpus": len(self._all), "entries": entries}


# --------------------------------------------------------------------------------------------------
# Map sets


_HDR = struct.Struct("<QQQQQ")  # magic, version, ncpus, nmaps, fingerprint


class MapSet:
    """All maps of one program attachment, in one shared-memory segment.

    `create` (the coordinator) lays the maps out deterministically from the specs and zero-fills them;
    `attach` (a CPU worker) maps the same segment, checks that the specs and CPU count match, and binds
    the per-CPU maps to that worker's CPU.
    """

    def __init__(self, seg: Segment, specs: Mapping[str, MapSpec], ncpus: int, cpu: int) -> None:
        if not 0 <= cpu < ncpus:
            raise ValueError(f"cpu {cpu} out of range for {ncpus} CPUs")
        self.seg = seg
        self.name = seg.name
        self.specs = dict(specs)
        self.ncpus = ncpus
        self.cpu = cpu
        _, places = _layout(self.specs, ncpus)
        needs_lock = any(s.type in ("hash", "percpu_hash", "cpumap") for s in self.specs.values())
        self._lockfile = OfdLockFile(f"{SHM_DIR}/{seg.name}") if needs_lock else None
        self.maps: dict[str, BpfMap] = {}
        for ordinal, name in enumerate(sorted(self.specs)):
            s, p = self.specs[name], places[name]
            nrows = ncpus if s.percpu else 1
            rows = [_values_view(seg, s.dtype, p.capacity, p.values + r * p.row) for r in range(nrows)]
            m: BpfMap
            if s.type == "array":
                m = ArrayMap(name, s, rows[0])
            elif s.type == "percpu_array":
                m = PerCpuArrayMap(name, s, rows, cpu)
            elif s.type == "devmap":
                m = DevMap(name, s, rows[0], REDIRECT_BROADCAST | ordinal << 16)
            elif s.type == "cpumap":
                assert self._lockfile is not None
                m = CpuMap(name, s, rows[0], ncpus, REDIRECT_CPUMAP | ordinal << 16, self._lockfile, p.offset)
            else:
                assert self._lockfile is not None
                cls = HashMap if s.type == "hash" else PerCpuHashMap
                m = cls(name, s, seg, p, rows, cpu if s.percpu else 0, self._lockfile)
            self.maps[name] = m

    @staticmethod
    def required_bytes(specs: Mapping[str, MapSpec], ncpus: int) -> int:
        """Segment size for these maps (what `create` reserves in ``/dev/shm``)."""
        return _layout(specs, ncpus)[0]

    @classmethod
    def create(cls, name: str, specs: Mapping[str, MapSpec], ncpus: int, cpu: int = 0) -> MapSet:
        """Create the segment `name` holding zeroed maps; per-CPU program-side calls act on `cpu`."""
        if ncpus < 1:
            raise ValueError(f"ncpus must be at least 1, not {ncpus}")
        size, _ = _layout(specs, ncpus)
        seg = Segment.create(name, size)
        seg.buf[: _HDR.size] = _HDR.pack(_MAGIC, _VERSION, ncpus, len(specs), _fingerprint(specs, ncpus))
        try:
            return cls(seg, specs, ncpus, cpu)
        except BaseException:
            seg.unlink()
            seg.close()
            raise

    @classmethod
    def attach(cls, name: str, specs: Mapping[str, MapSpec], ncpus: int, cpu: int) -> MapSet:
        """Map an existing map set as CPU `cpu`; refuses a segment laid out for other specs."""
        seg = Segment.attach(name)
        try:
            magic, version, seg_ncpus, _, fp = _HDR.unpack_from(seg.buf)
            if magic != _MAGIC or version != _VERSION:
                raise ValueError(f"segment {name!r} is not a BPF map set")
            if seg_ncpus != ncpus or fp != _fingerprint(specs, ncpus) or seg.size < _layout(specs, ncpus)[0]:
                raise ValueError(f"map set {name!r} was created for other map specs or another CPU count")
            return cls(seg, specs, ncpus, cpu)
        except BaseException:
            seg.close()
            raise

    def __getitem__(self, name: str) -> BpfMap:
        return self.maps[name]

    def snapshot(self) -> dict[str, Any]:
        """JSON-able contents of every map (non-zero entries; per-CPU maps with per-CPU values and sum)."""
        return {name: m.snapshot() for name, m in self.maps.items()}

    def close(self) -> None:
        """Unmap; maps of this set must not be used afterwards."""
        for m in self.maps.values():
            m.release()
        if self._lockfile is not None:
            self._lockfile.close()
        self.seg.close()

    def unlink(self) -> None:
        """Remove the segment's name (the creator's job)."""
        self.seg.unlink()

    def __enter__(self) -> MapSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def populate(
    mapset: MapSet, initial: Mapping[str, Mapping[int | str, int | str]], ifindex_of: Callable[[str], int]
) -> None:
    """Pre-populate maps from topology params, e.g. ``{"tx_port": {0: "eth1"}}``.

    Keys may be ints or decimal strings (YAML mapping keys in topology files are strings).  String values
    are device names, resolved with `ifindex_of` (devmaps, or arrays of ifindexes).  Per-CPU elements are
    set on every CPU, as user space writing one value for all CPUs would.
    """
    for name, entries in initial.items():
        m = mapset.maps.get(name)
        if m is None:
            raise ValueError(
                f"no map {name!r} to populate (maps: {', '.join(sorted(mapset.maps)) or 'none'})"
            )
        if not isinstance(entries, Mapping):
            raise ValueError(f"map {name!r}: initial entries must be a mapping of key to value")
        for k, v in entries.items():
            try:
                key = int(k)
            except (TypeError, ValueError):
                raise ValueError(f"map {name!r}: key {k!r} is not an integer") from None
            if isinstance(m, CpuMap):  # a struct bpf_cpumap_val (qsize, program), never a device name
                m.update(key, v)
                continue
            value = ifindex_of(v) if isinstance(v, str) else v
            if isinstance(m, PerCpuArrayMap | PerCpuHashMap):
                m.update_all(key, value)
            elif isinstance(m, ArrayMap | DevMap | HashMap):
                m.update(key, value)
