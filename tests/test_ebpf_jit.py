"""The JIT against the interpreter, its reference: random instruction streams (ALU at edge values, loads and
stores through the packet, the stack, the ctx, map values and stray pointers, atomics, jumps back and forth,
helpers, bpf-to-bpf calls, bpf_loop callbacks, tail calls, malformed instructions) run through both over
the same page memory: the same verdicts, the same bytes in every page (so an access the JIT let through
that the interpreter refused would show as a byte changed somewhere, or a fault missing), the same
descriptors, redirect targets, fault messages and map memory — or both refuse the program at load.

Then the JIT's own contract, directly: out-of-bounds accesses abort that packet with ``xdp_exception`` and
leave every other byte of the page memory as it was, and the mode is chosen as documented."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emu.ebpf import asm as A
from emu.ebpf import obj as o
from emu.ebpf.engine import Engine, engine_mode
from emu.ebpf.obj import BpfObject, MapDef, ProgDef
from emu.errors import BadInputError

PAGE, NPAGES, HEADROOM = 1024, 8, 256
BUDGET = 300  # backward jumps, calls and loop iterations per packet: random loops end quickly
# maps: 0 an array of 16-byte values, 1 a hash, 2 a prog_array holding the program itself (tail calls)
MAPS = [MapDef("vals", o.BPF_MAP_TYPE_ARRAY, 4, 16, 4),
        MapDef("h", o.BPF_MAP_TYPE_HASH, 4, 8, 8),
        MapDef("jmp", o.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 2)]
EDGES = (0, 1, 2, 7, 8, 14, 31, 32, 63, 64, 0x7FFFFFFF, -0x80000000, -1, -2, 0xFF, 0x1234, -7)
# helpers whose results are the same in both engines (no clocks): the ids of emu/ebpf/engine's table
SMP_ID, PRANDOM, LOOKUP, UPDATE, DELETE, TAIL_CALL, REDIRECT, CSUM_DIFF = 8, 7, 1, 2, 3, 12, 23, 28
ADJ_HEAD, ADJ_META, ADJ_TAIL, LOOP, BUFF_LEN, LOAD_BYTES, STORE_BYTES = 44, 54, 65, 181, 188, 189, 190
FUZZ_CHUNKS, FUZZ_PER_CHUNK = 8, 400  # 3200 programs, spread over the xdist workers


class Gen:
    """A random program: a main body, then a callee and a bpf_loop callback it may call."""

    def __init__(self, rng: random.Random) -> None:
        self.r = rng
        self.main: list[Any] = []  # bytes, or ("call", ) / ("func", dst) to resolve once the layout is known

    def imm(self) -> int:
        return self.r.choice(EDGES) if self.r.random() < 0.7 else self.r.randrange(-(1 << 31), 1 << 31)

    def reg(self) -> int:
        return self.r.randrange(10)

    def base(self) -> int:
        # r7 the packet, r9 a map value, r10 the stack, r6 the ctx, else anything (a scalar, a stale pointer)
        return self.r.choice((7, 7, 7, 9, 9, 10, 10, 10, 6, self.reg()))

    def off(self, base: int) -> int:
        if base == 10:
            return -self.r.randrange(1, 80) if self.r.random() < 0.97 else self.r.choice((8, -4100))
        return self.r.choice((0, 0, 2, 4, 6, 8, 8, 12, 14, 16, 23, 40, 60, -1, 200))

    def alu(self) -> bytes:
        wide = self.r.random() < 0.6
        op = self.r.choice(list(A.ALU))
        f = A.alu64 if wide else A.alu32
        dst = self.reg()
        off = self.r.choice((0, 0, 8, 16, 32)) if op == "mov" else 0
        if op == "neg" or self.r.random() < 0.5:
            return f(op, dst, imm=self.imm())
        return f(op, dst, self.r.randrange(11), off=off)

    def mem(self) -> bytes:
        size = self.r.choice(("b", "h", "w", "dw"))
        b = self.base()
        off = self.off(b)
        k = self.r.randrange(4)
        if k == 0:
            return A.ldx(size, self.reg(), b, off)
        if k == 1 and size != "dw":
            return A.ldsx(size, self.reg(), b, off)
        if k == 2:
            return A.st(size, b, off, self.imm())
        return A.stx(size, b, self.r.randrange(11), off)

    def atomic(self) -> bytes:
        size = self.r.choice(("w", "dw"))
        b = self.r.choice((9, 10, 7))
        off = self.r.choice((0, 8, 4)) if b == 9 else self.r.choice((-8, -16, -4, 0))
        return A.atomic(size, self.r.choice(list(A.ATOMIC)), b, self.r.randrange(10), off)

    def jump(self) -> bytes:
        off = self.r.randrange(-6, 7)
        if self.r.random() < 0.15:
            return A.ja(off) if self.r.random() < 0.7 else A.gotol(off)
        f = A.jmp if self.r.random() < 0.6 else A.jmp32
        op = self.r.choice([k for k in A.JMP if k != "ja"])
        if self.r.random() < 0.5:
            return f(op, self.reg(), imm=self.imm(), off=off)
        return f(op, self.reg(), self.r.randrange(11), off=off)

    def key(self, at: int) -> bytes:
        return A.st("w", 10, at, self.r.randrange(6)) + A.alu64("mov", 2, 10) + A.alu64("add", 2, imm=at)

    def helper(self) -> list[Any]:
        r = self.r
        k = r.randrange(14)
        reload = A.ldx("w", 7, 6, 0) + A.ldx("w", 8, 6, 4)  # data, data_end again after a helper moved them
        if k == 0:
            return [A.call(r.choice((SMP_ID, PRANDOM)))]
        if k == 1:
            return [A.ld_map(1, r.choice((0, 1))), self.key(-4), A.call(LOOKUP),
                    A.ldx(r.choice(("w", "dw", "b")), self.reg(), 0, r.choice((0, 8, 12, 16)))]
        if k == 2:
            return [A.st("dw", 10, -16, self.imm()), A.ld_map(1, r.choice((0, 1, 1))), self.key(-4),
                    A.alu64("mov", 3, 10), A.alu64("add", 3, imm=-16), A.mov(4, r.randrange(3)), A.call(UPDATE)]
        if k == 3:
            return [A.ld_map(1, r.choice((0, 1))), self.key(-4), A.call(DELETE)]
        if k == 4:
            return [A.alu64("mov", 1, 7), A.mov(2, 4 * r.randrange(4)), A.alu64("mov", 3, 10),
                    A.alu64("add", 3, imm=-16), A.mov(4, r.choice((0, 4, 8, 5))), A.mov(5, self.imm()),
                    A.call(CSUM_DIFF)]
        if k in (5, 6, 7):
            h = (ADJ_HEAD, ADJ_TAIL, ADJ_META)[k - 5]
            return [A.alu64("mov", 1, 6), A.mov(2, r.choice((-64, -20, -4, 0, 4, 8, 20, -300, 900))), A.call(h),
                    reload]
        if k == 8:
            return [A.mov(1, r.randrange(5)), A.mov(2, r.choice((0, 0, 1))), A.call(REDIRECT)]
        if k == 9:
            return [A.alu64("mov", 1, 6), A.call(BUFF_LEN)]
        if k == 10:
            return [A.alu64("mov", 1, 6), A.mov(2, r.randrange(70)), A.alu64("mov", 3, 10),
                    A.alu64("add", 3, imm=-32), A.mov(4, r.choice((1, 4, 16, 32, 40))),
                    A.call(r.choice((LOAD_BYTES, STORE_BYTES)))]
        if k == 11:
            return [A.alu64("mov", 1, 6), A.ld_map(2, 2), A.mov(3, r.randrange(3)), A.call(TAIL_CALL)]
        if k == 12:
            return [("call",)]
        return [A.mov(1, r.randrange(6)), ("func", 2), A.alu64("mov", 3, 10), A.alu64("add", 3, imm=-8),
                A.mov(4, 0), A.call(LOOP)]

    def body(self, n: int, helpers: bool) -> list[Any]:
        out: list[Any] = []
        for _ in range(n):
            x = self.r.random()
            if x < 0.35:
                out.append(self.alu())
            elif x < 0.6:
                out.append(self.mem())
            elif x < 0.67:
                out.append(self.atomic())
            elif x < 0.8:
                out.append(self.jump())
            elif x < 0.93 and helpers:
                out.extend(self.helper())
            elif x < 0.95:
                out.append(A.ld_imm64(self.reg(), self.r.getrandbits(64)))
            elif x < 0.96:  # anything at all: an unknown opcode, a bad width, a jump far away
                out.append(bytes(self.r.getrandbits(8) for _ in range(8)))
            else:
                out.append(A.ret(self.r.randrange(6)))
        return out

    def program(self) -> bytes:
        prologue = [A.alu64("mov", 6, 1), A.ldx("w", 7, 6, 0), A.ldx("w", 8, 6, 4), A.ld_map_value(9, 0)]
        main = prologue + self.body(self.r.randrange(4, 30), True) + [A.ret(self.r.randrange(6))]
        callee = [*self.body(self.r.randrange(1, 8), False), A.exit_()]
        callback = [A.mov(0, self.r.choice((0, 0, 1))), *self.body(self.r.randrange(0, 5), False), A.exit_()]
        size = sum(8 if isinstance(p, tuple) and p[0] == "call" else 16 if isinstance(p, tuple) else len(p)
                   for p in main) // 8
        ncallee = sum(len(c) for c in callee) // 8
        out, at = [], 0
        for p in main:
            if isinstance(p, tuple) and p[0] == "call":  # the callee starts right after main
                p = A.call_local(size - at - 1)
            elif isinstance(p, tuple):  # the callback right after the callee
                p = A.ld_func(p[1], size + ncallee - at - 1)
            out.append(p)
            at += len(p) // 8
        return b"".join(out) + b"".join(callee) + b"".join(callback)


def run_both(prog: bytes, seed: int) -> None:
    """`prog` in the JIT and in the interpreter over the same packets in the same page memory: equal."""
    obj = BpfObject(Path(f"fuzz{seed}.o"), {"p": ProgDef("p", "xdp", prog)}, MAPS)
    rng = np.random.default_rng(seed)
    mem0 = rng.integers(0, 256, (NPAGES, PAGE), dtype=np.uint8)
    lens0 = np.array([14, 60, 64, 300, 120, 33], dtype=np.uint32)
    pages0 = np.arange(1, 1 + len(lens0), dtype=np.uint32)  # pages 0 and 7 hold no packet: guards
    got: dict[str, Any] = {}
    for mode in ("jit", "interp"):
        try:
            e = Engine(obj, ncpus=1, budget=BUDGET, engine=mode)
        except BadInputError as exc:
            got[mode] = ("refused", str(exc))
            continue
        try:
            e.maps.populate({"jmp": {0: "p"}}, lambda _d: 1)
            cpu = e.cpu(0)
            assert cpu.jit == (mode == "jit"), cpu.jit_error
        except BadInputError as exc:
            got[mode] = ("refused", str(exc))
            e.close()
            continue
        try:
            mem, offs, lens = mem0.copy(), np.full(len(lens0), HEADROOM, dtype=np.uint32), lens0.copy()
            targets = np.full(len(lens0), -7, dtype=np.int64)
            verdicts, exc, moved = cpu.run_batch(cpu.index("p"), mem, pages0, offs, lens, targets, 2, 0)
            got[mode] = (verdicts.tolist(), exc, moved, mem.tobytes(), offs.tolist(), lens.tolist(),
                         targets.tolist(), cpu.faults, cpu.last_fault, bytes(e.maps.mem))
        finally:
            e.close()
    j, i = got["jit"], got["interp"]
    if j != i:
        names = ("verdicts", "exceptions", "moved", "page memory", "offsets", "lengths", "targets", "faults",
                 "last fault", "map memory")
        diff = [n for n, a, b in zip(names, j, i, strict=False) if a != b] if len(j) == len(i) else ["outcome"]
        short = {k: v[:2] if v[0] == "refused" else (v[0], v[1], v[8]) for k, v in got.items()}
        raise AssertionError(f"seed {seed}: JIT and interpreter differ in {diff}: {short}\nprogram {prog.hex()}")


@pytest.mark.parametrize("chunk", range(FUZZ_CHUNKS))
def test_jit_matches_interpreter_on_random_programs(chunk: int) -> None:
    for k in range(FUZZ_PER_CHUNK):
        seed = chunk * FUZZ_PER_CHUNK + k
        run_both(Gen(random.Random(seed)).program(), seed)


def test_the_fuzzer_reaches_faults_helpers_and_clean_exits() -> None:
    """The random programs are not all refused or all faulting: each kind of outcome is common enough for
    the comparison above to mean something."""
    kinds = {"refused": 0, "fault": 0, "ok": 0, "moved": 0}
    for seed in range(300):
        obj = BpfObject(Path("f.o"), {"p": ProgDef("p", "xdp", Gen(random.Random(seed)).program())}, MAPS)
        e = Engine(obj, ncpus=1, budget=BUDGET, engine="jit")
        try:
            try:
                cpu = e.cpu(0)
            except BadInputError:
                kinds["refused"] += 1
                continue
            mem = np.zeros((2, PAGE), dtype=np.uint8)
            offs, lens = np.full(1, HEADROOM, dtype=np.uint32), np.full(1, 64, dtype=np.uint32)
            _v, exc, moved = cpu.run_batch(0, mem, np.ones(1, dtype=np.uint32), offs, lens,
                                           np.zeros(1, dtype=np.int64), 2, 0)
            kinds["fault" if exc else "ok"] += 1
            kinds["moved"] += moved
        finally:
            e.close()
    assert kinds["refused"] >= 10 and kinds["fault"] >= 50 and kinds["ok"] >= 50 and kinds["moved"] >= 3, kinds


# ---- the JIT's safety contract, directly ----

def _batch(prog: bytes, engine: str, npages: int = 4) -> tuple[np.ndarray, np.ndarray, int, str | None]:
    """`prog` over one 64-byte packet in page 1 of `npages` pages of 0x5a: (verdicts, memory after, exceptions,
    last fault)."""
    obj = BpfObject(Path("t.o"), {"p": ProgDef("p", "xdp", prog)}, MAPS)
    with Engine(obj, ncpus=1, engine=engine) as e:
        cpu = e.cpu(0)
        assert cpu.jit == (engine == "jit")
        mem = np.full((npages, PAGE), 0x5A, dtype=np.uint8)
        offs, lens = np.full(1, HEADROOM, dtype=np.uint32), np.full(1, 64, dtype=np.uint32)
        v, exc, _ = cpu.run_batch(0, mem, np.ones(1, dtype=np.uint32), offs, lens, np.zeros(1, dtype=np.int64), 2, 0)
        return v, mem, exc, cpu.last_fault


OOB = {
    "store past data_end": (A.ldx("w", 2, 1, 4) + A.st("b", 2, 0, 1), "outside [data_meta 0, data_end 64)"),
    "store before data": (A.ldx("w", 2, 1, 0) + A.st("dw", 2, -8, 1), "outside [data_meta 0, data_end 64)"),
    "store into the next page": (A.ldx("w", 2, 1, 0) + A.st("w", 2, PAGE, 1), "packet offset 1024"),
    "load far below": (A.ldx("w", 2, 1, 0) + A.alu64("sub", 2, imm=0x10000) + A.ldx("b", 3, 2, 0),
                       "outside [data_meta 0"),
    "store below the stack": (A.st("dw", 10, -4100, 1), "outside the stack"),
    "store above the stack": (A.st("b", 10, 0, 1), "outside the stack"),
    "scalar as a pointer": (A.mov(2, 0x1000) + A.st("b", 2, 0, 1), "through a bad pointer"),
    "past a map value": (A.ld_map_value(2, 0) + A.st("dw", 2, 12, 1), "of a map value of 16 bytes"),
    "ctx store": (A.st("w", 1, 0, 1), "ctx store"),
    "endless loop": (A.ja(-1), f"budget of {1_000_000} backward jumps"),
}


@pytest.mark.parametrize("case", sorted(OOB))
def test_jit_out_of_bounds_aborts_and_touches_nothing(case: str) -> None:
    body, text = OOB[case]
    prog = body + A.ret(2)
    v, mem, exc, fault = _batch(prog, "jit")
    assert v.tolist() == [0] and exc == 1, fault
    assert fault is not None and text in fault, fault
    assert (mem == 0x5A).all()  # not a byte written anywhere: not the packet's page, not its neighbours
    assert (v.tolist(), mem.tobytes(), exc, fault) == (lambda r: (r[0].tolist(), r[1].tobytes(), r[2], r[3]))(
        _batch(prog, "interp"))


def test_jit_in_bounds_writes_land_where_the_interpreter_puts_them() -> None:
    prog = A.program(A.ldx("w", 2, 1, 0), A.ldx("w", 3, 1, 4), A.st("b", 2, 0, 1), A.st("dw", 3, -8, -1),
                     A.st("h", 10, -2, 7), A.ldx("h", 4, 10, -2), A.stx("b", 2, 4, 5), A.ret(3))
    v, mem, exc, _ = _batch(prog, "jit")
    assert v.tolist() == [3] and exc == 0
    changed = np.flatnonzero(mem.reshape(-1) != 0x5A).tolist()
    base = PAGE + HEADROOM
    assert changed == [base, base + 5, *range(base + 56, base + 64)]
    assert mem.reshape(-1)[base + 5] == 7


def test_engine_mode_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMU_EBPF_ENGINE", raising=False)
    assert engine_mode() == "jit"
    monkeypatch.setenv("EMU_EBPF_ENGINE", "interp")
    assert engine_mode() == "interp"
    assert engine_mode("jit") == "jit"
    monkeypatch.setenv("EMU_EBPF_ENGINE", "fast")
    with pytest.raises(BadInputError, match="EMU_EBPF_ENGINE: unknown eBPF engine 'fast'"):
        engine_mode()
    with pytest.raises(BadInputError, match="engine: unknown eBPF engine 'llvm'"):
        engine_mode("llvm")
