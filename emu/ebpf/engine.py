"""Running a loaded eBPF object's XDP programs natively: the Python face of the Rust engine.

Kernel counterpart: ``bpf_prog_run_xdp`` (include/net/xdp.h) with the interpreter of kernel/bpf/core.c
and the XDP helpers of net/core/filter.c, and ``BPF_PROG_TEST_RUN`` for `Engine.run`.  The engine
(emu/ebpf/engine/, a PyO3 extension built by ``pip install``) decodes every program of the object once,
then runs one program over a whole batch of packets per call, in place in the host's page memory, every
load and store checked (see emu/ebpf/engine/src/vm.rs and docs/ebpf.md).  A fault — an access outside
the packet, the stack, the ctx or a map value, a bad helper argument, the instruction budget exhausted —
ends that packet as XDP_ABORTED, counted as ``xdp_exception``; the engine, the worker and shared memory
are unaffected.

Two modes run the same decoded programs: the JIT (emu/ebpf/engine/src/jit.rs: Cranelift compiles every
function once at load, each access checked inline or by the interpreter's own check), the default where
the host has one, and the interpreter (src/vm.rs), the reference the JIT is tested against.  ``engine=``
or the environment variable ``EMU_EBPF_ENGINE`` (``jit`` or ``interp``) chooses.

`CpuEngine` is one emulated CPU's engine (what a CPU worker holds); `Engine` is the test and benchmark
entry point over frames: ``Engine(obj, maps, ncpus).run(prog, frames, cpu, ingress_ifindex, rx_queue)``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from emu.ebpf import _engine
from emu.ebpf.maps import ObjMaps
from emu.ebpf.obj import BpfObject
from emu.errors import BadInputError
from emu.mem.shm import new_run_prefix

__all__ = ["DEFAULT_BUDGET", "ENGINES", "SUPPORTED_HELPERS", "CpuEngine", "Engine", "choose_program",
           "engine_mode", "xdp_program"]

# Instructions one packet may execute (bpf_loop callbacks and tail calls included): the kernel bounds
# programs at verification (1M processed instructions); a program looping on values the emulator's
# verifier-free engine cannot prove bounded is stopped here instead.
DEFAULT_BUDGET = 1_000_000
SUPPORTED_HELPERS = frozenset(_engine.SUPPORTED_HELPERS)
_MOVERS = frozenset((44, 54, 65))  # bpf_xdp_adjust_head, _meta, _tail
# bpf_trace_printk lines a CPU worker prints to its stderr (the run's log) at most; the rest are counted.
TRACE_PRINT_LIMIT = 200
ENGINES = ("jit", "interp")
ENGINE_ENV = "EMU_EBPF_ENGINE"


def engine_mode(engine: str | None = None) -> str:
    """`engine`, else ``$EMU_EBPF_ENGINE``, else ``jit``; BadInputError naming the source when unknown."""
    where = "engine" if engine is not None else ENGINE_ENV
    mode = engine if engine is not None else os.environ.get(ENGINE_ENV) or "jit"
    if mode not in ENGINES:
        raise BadInputError(f"{where}: unknown eBPF engine {mode!r} (one of: {', '.join(ENGINES)})")
    return mode


class CpuEngine:
    """The programs of `obj` on emulated CPU `cpu`, over the maps `maps` (attached by this process), run by
    `engine` (see `engine_mode`); ``jit`` falls back to the interpreter where the host has no JIT
    (`jit_error` says why)."""

    def __init__(self, obj: BpfObject, maps: ObjMaps, cpu: int, budget: int = DEFAULT_BUDGET,
                 trace_limit: int = 64, seed: int = 0, engine: str | None = None) -> None:
        self.obj = obj
        self.maps = maps
        self.cpu = cpu
        self.names = list(obj.programs)
        self.trace_pending = 0  # bpf_trace_printk lines the last batch left for drain_trace
        # Whether any program (a tail call reaches any) may move a packet's data or data_end.
        self.moves_packets = any(h in _MOVERS for p in obj.programs.values() for h in p.helpers)
        progs = [obj.programs[n].insns for n in self.names]
        try:
            self.native = _engine.Engine(self.names, progs, maps.mem, maps.layout, maps.lock_fd, maps.ncpus, cpu,
                                         budget, trace_limit, seed, engine_mode(engine) == "jit")
        except ValueError as exc:
            raise BadInputError(f"{obj.path}: {exc}") from None

    def index(self, prog: str) -> int:
        try:
            return self.names.index(prog)
        except ValueError:
            raise BadInputError(f"{self.obj.path}: no program {prog!r} (programs: {', '.join(self.names)})") from None

    def set_devices(self, mtus: dict[int, int]) -> None:
        """The host's devices by ifindex and their MTU (``bpf_check_mtu``)."""
        self.native.set_devices(sorted(mtus.items()))

    def run_batch(self, prog: int, mem: np.ndarray, pages: np.ndarray, offs: np.ndarray, lens: np.ndarray,
                  targets: np.ndarray, ingress_ifindex: int, rx_queue: int,
                  nfrags: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
        """Program `prog` over the packets (page ids, offsets and lengths, writable u32 arrays of any stride,
        written back after adjust_head/meta/tail) in `mem` (nbufs x buf_size uint8): their verdicts
        (int64), how many faulted or returned an unknown action, and how many moved their data or data_end
        or changed their fragments.  `targets` (int64) receives redirect targets.

        `nfrags` (XDP multi-buffer, docs/architecture.md): None when no packet has fragments, else a
        writable u8 array of each packet's nr_frags as it arrived, its fragments listed in the head
        buffer's shinfo (row tail, ``buf_size - 320``); the engine writes the new count there and into the
        shinfo when bpf_xdp_adjust_tail released or resized fragments, and frees nothing: the caller
        returns the buffers of the entries from the new count to the old one."""
        verdicts = np.empty(len(pages), dtype=np.int64)
        exc, moved, self.trace_pending = self.native.run_batch(prog, mem, mem.shape[1], pages, offs, lens, verdicts,
                                                               targets, ingress_ifindex, rx_queue, nfrags)
        return verdicts, exc, moved

    def run(self, prog: str, frames: list[bytes], ingress_ifindex: int = 1, rx_queue: int = 0,
            page_size: int = 4096) -> list[tuple[int, bytes, int]]:
        """Each frame as ``BPF_PROG_TEST_RUN`` lays it out (``bpf_prog_test_run_xdp``): at the 256-byte
        headroom of a `page_size` buffer, at most ``page_size - 256 - 320`` bytes in the linear part and
        the rest in fragments of `page_size` bytes (up to MAX_SKB_FRAGS; more is a BadInputError, the
        kernel's -ENOMEM).  The kernel does this for any XDP program, ``xdp.frags`` or not (6.18: a
        program without BPF_F_XDP_HAS_FRAGS runs over a multi-buffer frame too); the attach check is where
        frags support matters.  (r0, the frame after — linear part and fragments —, redirect target)."""
        try:
            return self.native.run_frames(self.index(prog), frames, ingress_ifindex, rx_queue, page_size)
        except ValueError as exc:
            raise BadInputError(f"{self.obj.path}: {prog}: {exc}") from None

    @property
    def jit(self) -> bool:
        """Whether the programs run compiled (False: interpreted)."""
        return bool(self.native.jit)

    @property
    def jit_error(self) -> str | None:
        """Why the JIT was asked for and the interpreter runs instead."""
        return self.native.jit_error

    @property
    def last_fault(self) -> str | None:
        return self.native.last_fault

    @property
    def faults(self) -> int:
        return self.native.faults

    def drain_trace(self) -> tuple[list[str], int]:
        """bpf_trace_printk lines since the last call, and how many the rate limit dropped."""
        return self.native.drain_trace()


class Engine:
    """All CPUs of one object, for tests and benchmarks: maps created under a scratch name (unlinked by
    `close`) unless given, one `CpuEngine` per CPU on demand."""

    def __init__(self, obj: BpfObject, maps: ObjMaps | None = None, ncpus: int = 1,
                 budget: int = DEFAULT_BUDGET, engine: str | None = None) -> None:
        self.obj = obj
        self.engine = engine_mode(engine)
        self.ncpus = ncpus
        self.budget = budget
        self._own = maps is None
        self.maps = maps if maps is not None else ObjMaps.create(f"{new_run_prefix()}-objmaps", obj.maps, ncpus)
        self.maps.globals = dict(obj.globals)
        self.maps.programs = list(obj.programs)
        self._cpus: dict[int, CpuEngine] = {}

    def cpu(self, cpu: int = 0) -> CpuEngine:
        e = self._cpus.get(cpu)
        if e is None:
            e = self._cpus[cpu] = CpuEngine(self.obj, self.maps, cpu, self.budget, engine=self.engine)
        return e

    def run(self, prog: str, frames: list[bytes], cpu: int = 0, ingress_ifindex: int = 1,
            rx_queue: int = 0) -> list[tuple[int, bytes, int]]:
        return self.cpu(cpu).run(prog, frames, ingress_ifindex, rx_queue)

    def close(self) -> None:
        self._cpus.clear()
        if self._own:
            self.maps.unlink()
        self.maps.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def choose_program(obj: BpfObject, name: str | None) -> str:
    """The XDP program to attach: `name`, or the object's only program attached at XDP (sections ``xdp``,
    ``xdp.frags``) when `name` is empty; BadInputError saying what the object has otherwise."""
    xdp = [n for n, p in obj.programs.items() if p.expected_attach == "xdp"]
    if name:
        if name not in obj.programs:
            raise BadInputError(f"{obj.path}: no program {name!r} (XDP programs: {', '.join(xdp) or 'none'})")
        if obj.programs[name].expected_attach != "xdp":
            raise BadInputError(f"{obj.path}: program {name!r} is in section {obj.programs[name].section!r}, "
                                f"not one attached at an RX queue (xdp, xdp.frags)")
        return name
    if len(xdp) != 1:
        raise BadInputError(f"{obj.path}: {len(xdp)} XDP programs ({', '.join(xdp) or 'none'}): name the one "
                            f"to attach with 'program'")
    return xdp[0]


def xdp_program(obj: BpfObject, prog: str, maps: ObjMaps, cpu: int) -> Any:
    """An `emu.xdp.context.Program` running `prog` of `obj` natively on CPU `cpu`: its vectorised form is
    one engine call per batch (descriptors' offsets and lengths written back, redirect targets per packet,
    faults counted as ``xdp_exception`` through `XdpBatch.exceptions`); its per-packet form, for
    ``vectorised: false``, runs the engine on one frame and refuses a change of the frame's length."""
    from emu.xdp.context import XDP_ABORTED, XDP_REDIRECT, Program, XdpBatch, XdpContext

    eng = CpuEngine(obj, maps, cpu)
    if eng.jit_error is not None:  # asked for the JIT, running interpreted: slower, so say it once
        sys.stderr.write(f"emu: cpu{cpu} {obj.path.name}: no JIT ({eng.jit_error}); interpreting\n")
    idx = eng.index(prog)
    moves = eng.moves_packets
    printed = [0]

    def drain() -> None:
        lines, dropped = eng.drain_trace()
        if not lines and not dropped:
            return
        room = max(0, TRACE_PRINT_LIMIT - printed[0])
        for line in lines[:room]:
            sys.stderr.write(f"bpf_trace_printk: cpu{cpu} {prog}: {line}\n")
        printed[0] += min(room, len(lines))
        maps.count_trace(cpu, len(lines), dropped)

    def setup(ctx: XdpContext) -> None:
        eng.set_devices(ctx.device_mtus())

    def batch(ctx: XdpContext, pkts: XdpBatch) -> np.ndarray:
        # A worker's descriptors are read-only views of a received message: the program gets copies, and
        # when it moved a packet's data or data_end the worker stores the new ones in the page's metadata.
        # A program that cannot move packets gets them as they are (the engine refuses to write there).
        offs, lens = pkts.offs, pkts.lens
        if moves and not offs.flags.writeable:
            offs = np.array(offs, dtype=np.uint32)
        if moves and not lens.flags.writeable:
            lens = np.array(lens, dtype=np.uint32)
        # XDP multi-buffer: each packet's nr_frags (None: no packet of the batch has fragments, no cost);
        # the engine writes the new counts when bpf_xdp_adjust_tail released fragments.
        nfrags = pkts.nfrags
        if nfrags is not None and not nfrags.flags.writeable:
            nfrags = np.array(nfrags, dtype=np.uint8)
        v, exc, moved = eng.run_batch(idx, pkts.mem, pkts.pages, offs, lens, pkts.redirect_ifindex,
                                      ctx.ingress_ifindex, ctx.rx_queue_index, nfrags)
        if moved:
            pkts.offs, pkts.lens, pkts.moved = offs, lens, True
            if nfrags is not None:
                pkts.nfrags = nfrags
        if exc:
            pkts.exceptions += exc
            pkts.fault = eng.last_fault
        if eng.trace_pending:
            drain()
        return v

    def fn(ctx: XdpContext) -> int:
        data = ctx.data
        assert data is not None
        # A frame with fragments (ctx.get_buff_len() beyond the linear part) is read whole through
        # bpf_xdp_load_bytes' face and written back through bpf_xdp_store_bytes'; the engine lays it out
        # as BPF_PROG_TEST_RUN does (its own linear part and fragments: a program reading data_end sees
        # that split, not the device's).
        total = ctx.get_buff_len()
        frame = bytes(data) if total == len(data) else _read_frame(ctx, total)
        (r0, out, target), = eng.run(prog, [frame], ctx.ingress_ifindex, ctx.rx_queue_index)
        drain()
        if len(out) != total:
            raise ValueError(f"{prog} changed the frame's length ({total} -> {len(out)} bytes): "
                             f"adjust_head/tail need the vectorised path")
        if total == len(data):
            data[:] = out
        else:
            _write_frame(ctx, out)
        if r0 == XDP_REDIRECT:
            ctx.redirect_ifindex = target
        if eng.last_fault is not None and r0 == XDP_ABORTED:
            raise RuntimeError(eng.last_fault)
        return r0

    # BPF_F_XDP_HAS_FRAGS (an xdp.frags section): what the attach check reads (dev_xdp_attach refuses a
    # program without it on a device whose MTU needs multi-buffer).
    return Program(fn, f"{obj.path.name}:{prog}", {}, setup, batch, None, frags=obj.programs[prog].frags)


# bpf_xdp_pointer refuses offsets and lengths above 0xffff: a whole frame is moved in chunks under that.
_CHUNK = 0x8000


def _read_frame(ctx: Any, total: int) -> bytes:
    """The whole multi-buffer frame (linear part and fragments) through ``ctx.load_bytes``."""
    buf = bytearray(total)
    view = memoryview(buf)
    for at in range(0, total, _CHUNK):
        if ctx.load_bytes(at, view[at:at + _CHUNK]):
            raise RuntimeError(f"bpf_xdp_load_bytes at {at} of a {total}-byte frame failed")
    return bytes(buf)


def _write_frame(ctx: Any, out: bytes) -> None:
    for at in range(0, len(out), _CHUNK):
        if ctx.store_bytes(at, out[at:at + _CHUNK]):
            raise RuntimeError(f"bpf_xdp_store_bytes at {at} of a {len(out)}-byte frame failed")
