"""The kernel side: a `BpfObject` loaded into the running kernel with ``bpf(2)``, the kernel's verifier as
the judge of its programs, and ``BPF_PROG_TEST_RUN`` as the reference the engine is tested against.

Kernel counterpart: ``union bpf_attr`` of ``BPF_MAP_CREATE``, ``BPF_PROG_LOAD``, ``BPF_PROG_TEST_RUN``,
``BPF_MAP_*_ELEM``, ``BPF_MAP_GET_NEXT_KEY`` and ``BPF_MAP_FREEZE`` (include/uapi/linux/bpf.h), called through
``syscall(SYS_bpf, ...)`` with ctypes, as libbpf's ``bpf.c`` wraps them; no libbpf needed.  Maps are created
the way libbpf creates them (global-data maps filled and ``.rodata`` frozen; a ``perf_event_array`` without
``max_entries`` sized to the possible CPUs), and programs loaded with an ``fd_array`` (the instructions keep
their ``BPF_PSEUDO_MAP_IDX`` form), type ``BPF_PROG_TYPE_XDP`` and the expected attach type of their section.
A program the verifier rejects raises `KernelRejected` with the verifier's log (loaded again with log level 1,
as libbpf does).  Every descriptor is closed by `KernelObject.close` (a context manager).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from emu.ebpf.btf import Btf
from emu.ebpf.obj import (
    BPF_F_RDONLY_PROG,
    BPF_MAP_TYPE_LRU_PERCPU_HASH,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_PERCPU_HASH,
    BPF_MAP_TYPE_PERF_EVENT_ARRAY,
    BpfObject,
    MapDef,
)
from emu.errors import ObjectError

__all__ = ["BpfSyscallError", "KernelObject", "KernelRejected", "available", "load", "map_items", "map_lookup",
           "map_update", "possible_cpus", "prog_test_run", "verify_object_programs", "verify_topology"]

SYS_bpf = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)

BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
BPF_PROG_LOAD, BPF_PROG_TEST_RUN, BPF_BTF_LOAD, BPF_MAP_FREEZE = 5, 10, 18, 22
BPF_PROG_TYPE_XDP = 6
BPF_XDP_DEVMAP, BPF_XDP_CPUMAP, BPF_XDP = 33, 35, 37
ATTACH_TYPES = {"xdp": BPF_XDP, "xdp/devmap": BPF_XDP_DEVMAP, "xdp/cpumap": BPF_XDP_CPUMAP}
PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH}

ATTR_SIZE = 160  # covers every field used here (BPF_PROG_LOAD's ends at 144 in 6.x)
LOG_SIZE = 16 << 20  # the verifier's log of a large program at level 1 fits; libbpf's default retry size
XDP_MD = struct.Struct("<6I")  # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfSyscallError(OSError):
    """A ``bpf(2)`` command failed (``errno`` set; the message names the command and the object)."""


class KernelRejected(ObjectError):
    """The kernel refused to load a program; `log` is the verifier's log."""

    def __init__(self, file: str, where: str, message: str, log: str = "") -> None:
        super().__init__(file, where, message)
        self.log = log

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.file, self.where, self.message, self.log))


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret = _libc.syscall(SYS_bpf, cmd, attr, ATTR_SIZE)
    if ret < 0:
        e = ctypes.get_errno()
        raise BpfSyscallError(e, f"bpf({what}): {os.strerror(e)}")
    return int(ret)


def _attr(*fields: tuple[str, int, int]) -> ctypes.Array[ctypes.c_char]:
    """A zeroed ``union bpf_attr`` with (format, offset, value) fields packed in."""
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    for fmt, off, value in fields:
        struct.pack_into(fmt, buf, off, value)
    return buf


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def available() -> tuple[bool, str]:
    """Whether this process may use ``bpf(2)`` (a tiny array map is created and closed), and if not why."""
    try:
        fd = _bpf(BPF_MAP_CREATE, _attr(("<I", 0, 2), ("<I", 4, 4), ("<I", 8, 4), ("<I", 12, 1)), "MAP_CREATE")
    except BpfSyscallError as e:
        reason = {errno.EPERM: "bpf(2) not permitted (needs root or CAP_BPF; unprivileged BPF is disabled)",
                  errno.ENOSYS: "bpf(2) does not exist here (kernel without CONFIG_BPF_SYSCALL, or seccomp)"}
        return False, reason.get(e.errno or 0, str(e))
    os.close(fd)
    return True, "bpf(2) available"


def possible_cpus() -> int:
    """The kernel's possible CPUs (what per-CPU map values are sized by), from /sys/devices/system/cpu/possible."""
    try:
        text = open("/sys/devices/system/cpu/possible").read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def _map_name(name: str) -> bytes:
    # The kernel takes [A-Za-z0-9_.] and 15 characters (BPF_OBJ_NAME_LEN); libbpf shortens the same way.
    return re.sub(r"[^A-Za-z0-9_.]", "_", name)[:15].encode()


def create_map(m: MapDef) -> int:
    """A new map as libbpf creates it; its fd."""
    max_entries = m.max_entries
    if m.type == BPF_MAP_TYPE_PERF_EVENT_ARRAY and max_entries == 0:
        max_entries = possible_cpus()
    key_size, value_size = m.key_size, m.value_size
    if m.type == BPF_MAP_TYPE_PERF_EVENT_ARRAY:
        key_size, value_size = key_size or 4, value_size or 4
    attr = _attr(("<I", 0, m.type), ("<I", 4, key_size), ("<I", 8, value_size), ("<I", 12, max_entries),
                 ("<I", 16, m.map_flags))
    name = _map_name(m.name)
    attr[28:28 + len(name)] = name
    fd = _bpf(BPF_MAP_CREATE, attr, f"MAP_CREATE {m.name}")
    try:
        if m.data is not None:
            map_update(fd, struct.pack("<I", 0), m.data)
            if m.map_flags & BPF_F_RDONLY_PROG:
                # libbpf freezes .rodata, so that the verifier may read its values as constants
                _bpf(BPF_MAP_FREEZE, _attr(("<I", 0, fd)), f"MAP_FREEZE {m.name}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, _attr(("<I", 0, fd), ("<Q", 8, _addr(k)), ("<Q", 16, _addr(v)), ("<Q", 24, flags)),
         "MAP_UPDATE_ELEM")


def map_lookup(fd: int, key: bytes, value_size: int, percpu: bool = False) -> bytes | list[bytes] | None:
    """The value at `key` (one bytes per possible CPU for a per-CPU map), None when there is none."""
    stride = (value_size + 7) & ~7
    size = stride * possible_cpus() if percpu else value_size
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(max(size, 1))
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, _attr(("<I", 0, fd), ("<Q", 8, _addr(k)), ("<Q", 16, _addr(v))), "MAP_LOOKUP")
    except BpfSyscallError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    raw = v.raw[:size]
    if percpu:
        return [raw[i * stride:i * stride + value_size] for i in range(possible_cpus())]
    return raw


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key, by ``BPF_MAP_GET_NEXT_KEY`` from no key."""
    cur: ctypes.Array[ctypes.c_char] | None = None
    while True:
        nxt = ctypes.create_string_buffer(max(key_size, 1))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, _attr(("<I", 0, fd), ("<Q", 8, _addr(cur)), ("<Q", 16, _addr(nxt))),
                 "MAP_GET_NEXT_KEY")
        except BpfSyscallError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        yield nxt.raw[:key_size]
        cur = nxt


def map_items(fd: int, m: MapDef) -> dict[bytes, bytes | list[bytes]]:
    """A whole map's contents (per-CPU maps: a list of values per key), for comparing with the engine's."""
    out: dict[bytes, bytes | list[bytes]] = {}
    percpu = m.type in PERCPU_TYPES
    for k in map_keys(fd, m.key_size):
        v = map_lookup(fd, k, m.value_size, percpu)
        if v is not None:
            out[k] = v
    return out


@dataclass
class KernelObject:
    """An object's maps and programs in the kernel: fds by the object's map index and program name."""

    obj: BpfObject
    map_fds: list[int] = field(default_factory=list)
    prog_fds: dict[str, int] = field(default_factory=dict)
    btf_fd: int = -1

    def close(self) -> None:
        for fd in [*self.prog_fds.values(), *self.map_fds, *([self.btf_fd] if self.btf_fd >= 0 else [])]:
            os.close(fd)
        self.prog_fds.clear()
        self.map_fds.clear()
        self.btf_fd = -1

    def __enter__(self) -> KernelObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map_fd(self, name: str) -> int:
        return self.map_fds[self.obj.map_index(name)]

    def items(self, name: str) -> dict[bytes, bytes | list[bytes]]:
        return map_items(self.map_fd(name), self.obj.maps[self.obj.map_index(name)])


def _load_btf(raw: bytes) -> int:
    """``BPF_BTF_LOAD`` of the object's BTF; -1 when the kernel refuses it (libbpf then loads without)."""
    buf = ctypes.create_string_buffer(raw, len(raw))
    try:
        return _bpf(BPF_BTF_LOAD, _attr(("<Q", 0, _addr(buf)), ("<I", 16, len(raw))), "BTF_LOAD")
    except BpfSyscallError as e:
        if e.errno in (errno.EPERM, errno.ENOSYS):
            raise
        return -1


def _func_info(ko: KernelObject, name: str) -> ctypes.Array[ctypes.c_char] | None:
    """``struct bpf_func_info`` records (insn_off, BTF FUNC id) of every function of the linked program:
    the verifier wants them for bpf_loop callbacks and global functions, as libbpf passes them."""
    p = ko.obj.programs[name]
    if ko.btf_fd < 0 or not p.funcs or ko.obj.btf is None:
        return None
    btf = _btf_of(ko.obj)
    recs = []
    for off, fname in sorted(p.funcs):
        type_id = btf.func_id(fname)
        if type_id is None:
            return None
        recs.append(struct.pack("<II", off, type_id))
    raw = b"".join(recs)
    return ctypes.create_string_buffer(raw, len(raw))


def _btf_of(obj: BpfObject) -> Btf:
    assert obj.btf is not None
    return Btf(obj.btf)


def _load_prog(ko: KernelObject, name: str, log_level: int) -> tuple[int, str]:
    p = ko.obj.programs[name]
    finfo = _func_info(ko, name)
    insns = ctypes.create_string_buffer(p.insns, len(p.insns))
    lic = ctypes.create_string_buffer((ko.obj.license or "").encode() + b"\0")
    fds = (ctypes.c_int * max(len(ko.map_fds), 1))(*ko.map_fds)
    log = ctypes.create_string_buffer(LOG_SIZE) if log_level else None
    attr = _attr(("<I", 0, BPF_PROG_TYPE_XDP), ("<I", 4, p.insn_count), ("<Q", 8, _addr(insns)),
                 ("<Q", 16, _addr(lic)), ("<I", 24, log_level), ("<I", 28, LOG_SIZE if log_level else 0),
                 ("<Q", 32, _addr(log)), ("<I", 44, p.flags), ("<I", 68, ATTACH_TYPES[p.expected_attach]),
                 ("<Q", 120, ctypes.addressof(fds)))
    if finfo is not None:
        for fmt, off, value in (("<I", 72, ko.btf_fd), ("<I", 76, 8), ("<Q", 80, _addr(finfo)),
                                ("<I", 88, len(finfo) // 8)):
            struct.pack_into(fmt, attr, off, value)
    pname = _map_name(name)
    attr[48:48 + len(pname)] = pname
    try:
        return _bpf(BPF_PROG_LOAD, attr, f"PROG_LOAD {name}"), ""
    except BpfSyscallError as e:
        text = log.value.decode("utf-8", "replace") if log is not None else ""
        if not log_level:
            raise
        if e.errno in (errno.EPERM, errno.ENOSYS) and not text:
            raise
        return -1, text or str(e)


def load(obj: BpfObject, programs: Iterable[str] | None = None) -> KernelObject:
    """Create `obj`'s maps and load its programs (all, or those named); raises `KernelRejected` with the
    verifier's log for a program the kernel refuses, `BpfSyscallError` when ``bpf(2)`` itself fails."""
    ko = KernelObject(obj)
    try:
        if obj.btf is not None:
            ko.btf_fd = _load_btf(obj.btf)
        for m in obj.maps:
            ko.map_fds.append(create_map(m))
        for name in programs if programs is not None else obj.programs:
            try:
                fd, _ = _load_prog(ko, name, 0)
            except BpfSyscallError as e:
                if e.errno in (errno.EPERM, errno.ENOSYS):
                    raise
                fd, log = _load_prog(ko, name, 1)
                if fd < 0:
                    raise KernelRejected(str(obj.path), name, "kernel verifier rejected it:\n"
                                         + _log_tail(log), log) from None
            ko.prog_fds[name] = fd
    except BaseException:
        ko.close()
        raise
    return ko


def _log_tail(log: str, lines: int = 20) -> str:
    tail = [ln for ln in log.rstrip().splitlines() if ln.strip()][-lines:]
    return "\n".join("  " + ln for ln in tail)


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, ctx: bytes | None = None,
                  out_size: int | None = None) -> tuple[int, bytes, int]:
    """``BPF_PROG_TEST_RUN`` of an XDP program on one frame: (return value, the frame after the program, the
    kernel's mean duration per run in ns).  `ctx` is a ``struct xdp_md`` (`XDP_MD`; data 0, data_end
    ``len(data)``).  A frame longer than ``4096 - 256 - 320`` bytes is XDP multi-buffer in the kernel
    (``bpf_prog_test_run_xdp``: the rest in up to 17 page fragments; a program from an ``xdp.frags`` section
    is loaded with ``BPF_F_XDP_HAS_FRAGS``) and the bytes out are the linear part then the fragments; the
    default `out_size` leaves a page of room for bpf_xdp_adjust_tail's growth."""
    din = ctypes.create_string_buffer(data, len(data))
    size = out_size if out_size is not None else len(data) + 4096
    dout = ctypes.create_string_buffer(size)
    cin = ctypes.create_string_buffer(ctx, len(ctx)) if ctx is not None else None
    attr = _attr(("<I", 0, prog_fd), ("<I", 8, len(data)), ("<I", 12, size), ("<Q", 16, _addr(din)),
                 ("<Q", 24, _addr(dout)), ("<I", 32, repeat),
                 ("<I", 40, len(ctx) if ctx is not None else 0), ("<Q", 48, _addr(cin)))
    _bpf(BPF_PROG_TEST_RUN, attr, "PROG_TEST_RUN")
    retval, out_len, duration = struct.unpack_from("<I", attr, 4)[0], struct.unpack_from("<I", attr, 12)[0], \
        struct.unpack_from("<I", attr, 36)[0]
    return retval, dout.raw[:out_len], duration


_said_unavailable = False


def verify_object_programs(obj: BpfObject, programs: Iterable[str] | None = None,
                           warn: Callable[[str], None] | None = None) -> bool:
    """Load `obj`'s programs (all, or those named) into the kernel and unload them: the kernel's verifier as
    the judge, as ``emu validate`` and ``emu run`` use it.  Raises `KernelRejected` (exit status 2 from the
    CLI) for a program it rejects.  Where ``bpf(2)`` is not permitted, says so once through `warn` (a
    callable taking a message; default: stderr) and returns False; True when every program passed."""
    global _said_unavailable
    ok, reason = available()
    if not ok:
        if not _said_unavailable:
            _said_unavailable = True
            msg = f"emu: not verifying eBPF programs with the kernel: {reason}"
            if warn is not None:
                warn(msg)
            else:
                import sys

                print(msg, file=sys.stderr)
        return False
    with load(obj, programs):
        pass
    return True


def verify_topology(topo: Any, warn: Callable[[str], None] | None = None) -> int:
    """The kernel as the verifier of a topology's eBPF objects: every program of every object a device
    attaches (with the device's globals set, as the run will load it) is loaded into the kernel and
    unloaded, as ``emu validate`` and ``emu run`` do before anything starts.  Raises `KernelRejected`
    (``FILE:program: kernel verifier rejected it:`` and the log's last lines; exit status 2) for one the
    kernel refuses.  Where ``bpf(2)`` is not permitted, says so once and returns 0; else how many
    objects were verified."""
    from emu.xdp.runtime import load_xdp_object

    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    n = 0
    for host in topo.hosts.values():
        for dev in host.devices.values():
            if dev.xdp is None or getattr(dev.xdp, "object", None) is None:
                continue
            obj, _ = load_xdp_object(dev, host)
            key = (str(obj.path), tuple(sorted((m.name, (m.data or b"").hex()) for m in obj.maps)))
            if key in seen:
                continue
            seen.add(key)
            if not verify_object_programs(obj, warn=warn):
                return 0
            n += 1
    return n
