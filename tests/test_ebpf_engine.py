"""The native eBPF engine: instruction semantics at edge values (as the kernel's interpreter defines them),
memory safety (every out-of-region access, bad helper pointer or exhausted budget ends the packet as
XDP_ABORTED, and the engine goes on), the helpers, and the batch entry point over page memory.  Every
test runs in both engines, the JIT and the interpreter (the autouse fixture `engine_mode`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emu.ebpf import asm as A
from emu.ebpf import obj as o
from emu.ebpf.engine import Engine
from emu.ebpf.obj import BpfObject, MapDef, ProgDef
from emu.xdp.bpfmaps import REDIRECT_BROADCAST

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
# helper ids (include/uapi/linux/bpf.h)
LOOKUP, UPDATE, DELETE, TRACE, SMP_ID, TAIL_CALL, REDIRECT = 1, 2, 3, 6, 8, 12, 23
PERF_OUT, CSUM_DIFF, ADJ_HEAD, REDIRECT_MAP, ADJ_META, ADJ_TAIL = 25, 28, 44, 51, 54, 65
RINGBUF_OUT, CHECK_MTU, LOOP, BUFF_LEN, LOAD_BYTES, STORE_BYTES, PERCPU_LOOKUP = 130, 163, 181, 188, 189, 190, 195



@pytest.fixture(autouse=True, params=["jit", "interp"])
def engine_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every engine a test makes runs in this mode (emu.ebpf.engine reads EMU_EBPF_ENGINE per engine)."""
    monkeypatch.setenv("EMU_EBPF_ENGINE", request.param)
    return str(request.param)


OUT = MapDef("out", o.BPF_MAP_TYPE_ARRAY, 4, 8, 1, section=".bss", data=bytes(8))


def make(progs: dict[str, bytes], maps: list[MapDef] | None = None) -> BpfObject:
    return BpfObject(Path("test.o"), {n: ProgDef(n, "xdp", p) for n, p in progs.items()}, [OUT, *(maps or [])])


def run(prog: bytes, frames: list[bytes] | None = None, maps: list[MapDef] | None = None, ncpus: int = 1,
        cpu: int = 0) -> tuple[list[tuple[int, bytes, int]], Engine]:
    e = Engine(make({"p": prog}, maps), ncpus=ncpus)
    try:
        return e.run("p", frames or [bytes(64)], cpu=cpu), e
    finally:
        e.close()


def value(body: bytes, frame: bytes = bytes(64)) -> int:
    """Call `body` as a sub-program (it leaves its result in r0 and may exit), then store r0 into the `out`
    map: the full 64 bits."""
    prog = A.program(A.call_local(5), A.ld_map_value(1, 0), A.stx("dw", 1, 0, 0), A.ret(XDP_PASS), body, A.exit_())
    e = Engine(make({"p": prog}))
    try:
        (r0, _, _), = e.run("p", [frame])
        assert r0 == XDP_PASS, e.cpu().last_fault
        return e.maps.lookup("out", 0)
    finally:
        e.close()


def ld(reg: int, v: int) -> bytes:
    return A.ld_imm64(reg, v)


# ---------------------------------------------------------------------------------------------- ALU

ALU_CASES = [
    # (name, body, expected 64-bit r0)
    ("add64 wraps", ld(0, M64) + A.alu64("add", 0, imm=1), 0),
    ("add32 zero-extends", ld(0, M64) + A.alu32("add", 0, imm=1), 0),
    ("add32 of imm -1", A.mov(0, 0) + A.alu32("add", 0, imm=-1), M32),
    ("mov32 zero-extends", ld(0, M64) + A.alu32("mov", 0, 0), M32),
    ("mov64 imm sign-extends", A.mov(0, -1), M64),
    ("mov32 imm", A.alu32("mov", 0, imm=-1), M32),
    ("sub64 below zero", A.mov(0, 0) + A.alu64("sub", 0, imm=1), M64),
    ("mul64 wraps", ld(0, 1 << 63) + A.alu64("mul", 0, imm=2), 0),
    ("mul32", ld(0, 0x1_0000_0003) + A.alu32("mul", 0, imm=0x5555_5556), (3 * 0x5555_5556) & M32),
    ("div64 unsigned", ld(0, M64) + A.alu64("div", 0, imm=2), M64 // 2),
    ("div64 by zero is 0", A.mov(0, 7) + A.mov(1, 0) + A.alu64("div", 0, 1), 0),
    ("div32 by zero is 0", ld(0, M64) + A.mov(1, 0) + A.alu32("div", 0, 1), 0),
    ("mod64 by zero keeps dst", ld(0, M64 - 5) + A.mov(1, 0) + A.alu64("mod", 0, 1), M64 - 5),
    ("mod32 by zero keeps dst, zero-extended", ld(0, M64 - 5) + A.mov(1, 0) + A.alu32("mod", 0, 1), M32 - 5),
    ("div32 uses low halves", ld(0, 0x5_0000_0010) + ld(1, 0x7_0000_0004) + A.alu32("div", 0, 1), 4),
    ("sdiv64", A.mov(0, -7) + A.alu64("sdiv", 0, imm=2), (-3) & M64),
    ("smod64", A.mov(0, -7) + A.alu64("smod", 0, imm=2), (-1) & M64),
    ("sdiv64 INT_MIN / -1", ld(0, 1 << 63) + A.mov(1, -1) + A.alu64("sdiv", 0, 1), 1 << 63),
    ("smod64 INT_MIN % -1", ld(0, 1 << 63) + A.mov(1, -1) + A.alu64("smod", 0, 1), 0),
    ("sdiv64 by zero", A.mov(0, -7) + A.mov(1, 0) + A.alu64("sdiv", 0, 1), 0),
    ("smod64 by zero", A.mov(0, -7) + A.mov(1, 0) + A.alu64("smod", 0, 1), (-7) & M64),
    ("sdiv32", A.alu32("mov", 0, imm=-9) + A.alu32("sdiv", 0, imm=2), (-4) & M32),
    ("smod32 by zero zero-extends", A.mov(0, -7) + A.mov(1, 0) + A.alu32("smod", 0, 1), (-7) & M32),
    ("sdiv32 INT_MIN / -1", A.alu32("mov", 0, imm=-(1 << 31)) + A.alu32("sdiv", 0, imm=-1), 1 << 31),
    ("lsh64 by reg masks to 6 bits", A.mov(0, 1) + A.mov(1, 65) + A.alu64("lsh", 0, 1), 2),
    ("lsh32 by reg masks to 5 bits", A.mov(0, 1) + A.mov(1, 33) + A.alu32("lsh", 0, 1), 2),
    ("lsh32 drops high bits", A.mov(0, 3) + A.alu32("lsh", 0, imm=31), 1 << 31),
    ("rsh64 logical", A.mov(0, -16) + A.alu64("rsh", 0, imm=60), 0xF),
    ("arsh64", A.mov(0, -16) + A.alu64("arsh", 0, imm=2), (-4) & M64),
    ("arsh32 zero-extends", A.alu32("mov", 0, imm=-(1 << 31)) + A.alu32("arsh", 0, imm=4), 0xF800_0000),
    ("neg64", A.mov(0, 5) + A.alu64("neg", 0), (-5) & M64),
    ("neg32", A.mov(0, 5) + A.alu32("neg", 0), (-5) & M32),
    ("xor/or/and", A.mov(0, 0b1100) + A.alu64("xor", 0, imm=0b1010) + A.alu64("or", 0, imm=0x100)
     + A.alu64("and", 0, imm=0x1FF), 0x106),
    ("and imm sign-extends", ld(0, M64) + A.alu64("and", 0, imm=-2), M64 - 1),
    ("movsx8", A.mov(1, 0x180) + A.alu64("mov", 0, 1, off=8), (-128) & M64),
    ("movsx16", A.mov(1, 0x8001) + A.alu64("mov", 0, 1, off=16), (-0x7FFF) & M64),
    ("movsx32", ld(1, 0x8000_0000) + A.alu64("mov", 0, 1, off=32), (-(1 << 31)) & M64),
    ("movsx32 alu32 form", A.mov(1, 0xFF) + A.alu32("mov", 0, 1, off=8), M32),
    ("bswap16", ld(0, 0x1122_3344_5566_7788) + A.bswap(0, 16), 0x8877),
    ("bswap32", ld(0, 0x1122_3344_5566_7788) + A.bswap(0, 32), 0x8877_6655),
    ("bswap64", ld(0, 0x1122_3344_5566_7788) + A.bswap(0, 64), 0x8877_6655_4433_2211),
    ("to_be16", ld(0, 0x1122_3344_5566_7788) + A.endian(0, 16, True), 0x8877),
    ("to_le16 truncates", ld(0, 0x1122_3344_5566_7788) + A.endian(0, 16, False), 0x7788),
    ("to_le32 truncates", ld(0, 0x1122_3344_5566_7788) + A.endian(0, 32, False), 0x5566_7788),
    ("to_le64", ld(0, 0x1122_3344_5566_7788) + A.endian(0, 64, False), 0x1122_3344_5566_7788),
]


@pytest.mark.parametrize(("body", "want"), [c[1:] for c in ALU_CASES], ids=[c[0] for c in ALU_CASES])
def test_alu(body: bytes, want: int) -> None:
    assert value(body) == want


# ---------------------------------------------------------------------------------------------- jumps

def branch(cond: bytes) -> int:
    """1 when the jump in `cond` (to +1, skipping ``r0 = 0``) is taken."""
    return value(A.program(A.mov(0, 1), cond, A.mov(0, 0)))


JMP_CASES = [
    ("jgt unsigned", ld(1, M64) + A.jmp("jgt", 1, imm=1, off=1), 1),
    ("jsgt signed", ld(1, M64) + A.jmp("jsgt", 1, imm=1, off=1), 0),
    ("jslt signed", A.mov(1, -5) + A.jmp("jslt", 1, imm=-4, off=1), 1),
    ("jlt reg", A.mov(1, 3) + A.mov(2, 4) + A.jmp("jlt", 1, 2, off=1), 1),
    ("jle equal", A.mov(1, 4) + A.jmp("jle", 1, imm=4, off=1), 1),
    ("jsge", A.mov(1, -1) + A.jmp("jsge", 1, imm=0, off=1), 0),
    ("jsle", A.mov(1, -1) + A.jmp("jsle", 1, imm=0, off=1), 1),
    ("jset", A.mov(1, 6) + A.jmp("jset", 1, imm=8, off=1), 0),
    ("jne", A.mov(1, 6) + A.jmp("jne", 1, imm=8, off=1), 1),
    ("jeq imm sign-extends", ld(1, M64) + A.jmp("jeq", 1, imm=-1, off=1), 1),
    ("jeq32 low half only", ld(1, 0x1_0000_0000) + A.jmp32("jeq", 1, imm=0, off=1), 1),
    ("jeq64 all bits", ld(1, 0x1_0000_0000) + A.jmp("jeq", 1, imm=0, off=1), 0),
    ("jsgt32 signed low half", ld(1, 0x0000_0000_8000_0000) + A.jmp32("jsgt", 1, imm=0, off=1), 0),
    ("jgt32 unsigned", ld(1, 0x0000_0000_8000_0000) + A.jmp32("jgt", 1, imm=0, off=1), 1),
    ("jslt32 reg", A.mov(1, -1) + A.mov(2, 0) + A.jmp32("jslt", 1, 2, off=1), 1),
    ("ja", A.ja(1), 1),
    ("gotol", A.gotol(1), 1),
]


@pytest.mark.parametrize(("cond", "want"), [c[1:] for c in JMP_CASES], ids=[c[0] for c in JMP_CASES])
def test_jumps(cond: bytes, want: int) -> None:
    assert branch(cond) == want


def test_backward_loop() -> None:
    # r0 = sum(1..10) with a backward jump
    body = A.program(A.mov(0, 0), A.mov(1, 10), A.alu64("add", 0, 1), A.alu64("sub", 1, imm=1),
                     A.jmp("jne", 1, imm=0, off=-3))
    assert value(body) == 55


# ---------------------------------------------------------------------------------------------- memory

def test_stack_and_sign_extending_loads() -> None:
    body = A.program(ld(1, 0x80FF_8000_F0F1_F2F3), A.stx("dw", 10, 1, -8), A.ldsx("b", 0, 10, -8),
                     A.ldsx("h", 2, 10, -8), A.ldsx("w", 3, 10, -4), A.alu64("add", 0, 2), A.alu64("add", 0, 3))
    want = (-0x0D) + (-0x0D0D) + (-0x7F00_8000)
    assert value(body) == want & M64


def test_stores_of_each_size() -> None:
    body = A.program(A.st("dw", 10, -8, -1), A.st("w", 10, -8, 0), A.st("h", 10, -4, 0x1234), A.st("b", 10, -1, 0x56),
                     A.ldx("dw", 0, 10, -8))
    assert value(body) == 0x56FF_1234_0000_0000  # byte -2 keeps the first store's 0xff


ATOMIC_CASES = [
    ("add64", "dw", "add", 10, 3, 13, 3),
    ("fetch_add64", "dw", "fetch_add", 10, 3, 13, 10),
    ("fetch_or32", "w", "fetch_or", 0b1010, 0b0101, 0b1111, 0b1010),
    ("fetch_and64", "dw", "fetch_and", 0b1110, 0b0111, 0b0110, 0b1110),
    ("fetch_xor32", "w", "fetch_xor", 0xFF, 0x0F, 0xF0, 0xFF),
    ("xchg64", "dw", "xchg", 5, 9, 9, 5),
    ("xchg32", "w", "xchg", 5, 9, 9, 5),
]


@pytest.mark.parametrize(("size", "op", "mem", "arg", "after", "src_after"), [c[1:] for c in ATOMIC_CASES],
                         ids=[c[0] for c in ATOMIC_CASES])
def test_atomics(size: str, op: str, mem: int, arg: int, after: int, src_after: int) -> None:
    base = A.program(A.st("dw", 10, -8, 0), A.st(size, 10, -8, mem), A.mov(2, arg), A.atomic(size, op, 10, 2, -8))
    assert value(base + A.ldx(size, 0, 10, -8)) == after
    if op.startswith("fetch") or op == "xchg":
        assert value(base + A.alu64("mov", 0, 2)) == src_after


@pytest.mark.parametrize("size", ["w", "dw"])
def test_cmpxchg(size: str) -> None:
    def go(expect: int) -> tuple[int, int]:
        base = A.program(A.st("dw", 10, -8, 0), A.st(size, 10, -8, 7), A.mov(0, expect), A.mov(2, 42),
                         A.atomic(size, "cmpxchg", 10, 2, -8))
        return value(base), value(base + A.ldx(size, 0, 10, -8))
    assert go(7) == (7, 42)  # r0 = the old value; swapped
    assert go(8) == (7, 7)  # not swapped


def test_ctx_fields_and_packet_pointers() -> None:
    # r0 = data_end - data + ingress_ifindex * 1000 + rx_queue_index * 100000
    body = A.program(A.ldx("w", 2, 1, 0), A.ldx("w", 3, 1, 4), A.ldx("w", 4, 1, 12), A.ldx("w", 5, 1, 16),
                     A.alu64("mov", 0, 3), A.alu64("sub", 0, 2), A.alu64("mul", 4, imm=1000), A.alu64("add", 0, 4),
                     A.alu64("mul", 5, imm=100000), A.alu64("add", 0, 5), A.alu64("mov", 6, 0),
                     A.ld_map_value(1, 0), A.stx("dw", 1, 6, 0), A.ret(XDP_PASS))
    e = Engine(make({"p": body}))
    try:
        assert e.cpu().run("p", [bytes(60)], ingress_ifindex=7, rx_queue=3)[0][0] == XDP_PASS
        assert e.maps.lookup("out", 0) == 60 + 7000 + 300000
    finally:
        e.close()


def test_program_writes_packet_in_place() -> None:
    # swap the MAC addresses (bytes 0-5 and 6-11), XDP_TX
    swap = []
    for k in range(6):
        swap += [A.ldx("b", 5, 2, k), A.ldx("b", 6, 2, 6 + k), A.stx("b", 2, 6, k), A.stx("b", 2, 5, 6 + k)]
    prog = A.program(A.ldx("w", 2, 1, 0), A.ldx("w", 3, 1, 4), A.alu64("mov", 4, 2), A.alu64("add", 4, imm=14),
                     A.jmp("jgt", 4, 3, off=len(swap) + 2), *swap, A.ret(XDP_TX), A.ret(XDP_DROP))
    frame = bytes(range(1, 7)) + bytes(range(11, 17)) + b"\x08\x00" + b"payload"
    (r0, out, _), = run(prog, [frame])[0]
    assert r0 == XDP_TX
    assert out == bytes(range(11, 17)) + bytes(range(1, 7)) + frame[12:]
    assert run(prog, [bytes(10)])[0][0][0] == XDP_DROP


# ---------------------------------------------------------------------------------------------- safety

def aborted(prog: bytes, frame: bytes = bytes(64), maps: list[MapDef] | None = None) -> str:
    """Run `prog` on a frame that faults, then on one more frame (the engine goes on); the fault's text."""
    e = Engine(make({"p": prog, "ok": A.ret(XDP_PASS)}, maps))
    try:
        res = e.run("p", [frame])
        assert res[0][0] == XDP_ABORTED
        assert e.cpu().faults == 1
        assert e.run("ok", [frame])[0][0] == XDP_PASS
        return e.cpu().last_fault or ""
    finally:
        e.close()


PKT = A.program(A.ldx("w", 2, 1, 0), A.ldx("w", 3, 1, 4))


@pytest.mark.parametrize(("name", "prog", "text"), [
    ("load past data_end", PKT + A.ldx("b", 0, 2, 64) + A.exit_(), "outside"),
    ("load straddling data_end", PKT + A.ldx("w", 0, 2, 62) + A.exit_(), "outside"),
    ("load at data_end pointer", PKT + A.ldx("b", 0, 3, 0) + A.exit_(), "outside"),
    ("store into the headroom", PKT + A.st("b", 2, -1, 1) + A.exit_(), "outside"),
    ("store far below the packet", PKT + A.st("w", 2, -300, 1) + A.exit_(), "outside"),
    ("stack above the frame", A.ldx("dw", 0, 10, 4096) + A.exit_(), "stack"),
    ("stack below everything", A.st("dw", 10, -4104, 0) + A.exit_(), "stack"),
    ("scalar as a pointer", A.mov(1, 4096) + A.ldx("w", 0, 1, 0) + A.exit_(), "bad pointer"),
    ("null pointer", A.mov(1, 0) + A.st("w", 1, 0, 0) + A.exit_(), "bad pointer"),
    ("store into the ctx", A.st("w", 1, 0, 0) + A.exit_(), "ctx"),
    ("8-byte ctx load", A.ldx("dw", 0, 1, 0) + A.exit_(), "ctx"),
    ("ctx beyond xdp_md", A.ldx("w", 0, 1, 24) + A.exit_(), "ctx"),
    ("map value past its end", A.ld_map_value(1, 0) + A.ldx("dw", 0, 1, 8) + A.exit_(), "map value"),
    ("map pointer dereferenced", A.ld_map(1, 0) + A.ldx("w", 0, 1, 0) + A.exit_(), "bad pointer"),
    ("atomic on the packet", PKT + A.mov(4, 1) + A.atomic("w", "add", 2, 4, 0) + A.exit_(), "atomic"),
    ("misaligned atomic", A.st("dw", 10, -16, 0) + A.mov(4, 1) + A.atomic("dw", "add", 10, 4, -12) + A.exit_(),
     "misaligned"),
    ("budget exhausted", A.ja(-1), "budget"),
    ("helper key from a scalar", A.ld_map(1, 0) + A.mov(2, 1234) + A.call(LOOKUP) + A.exit_(), "bad pointer"),
    ("helper map from a scalar", A.mov(1, 0) + A.alu64("mov", 2, 10) + A.alu64("add", 2, imm=-8)
     + A.st("w", 2, 0, 0) + A.call(LOOKUP) + A.exit_(), "not a map"),
    ("csum_diff reads past the packet", PKT + A.alu64("mov", 1, 2) + A.mov(2, 0) + A.alu64("mov", 3, 1)
     + A.alu64("add", 3, imm=60) + A.mov(4, 8) + A.mov(5, 0) + A.call(CSUM_DIFF) + A.exit_(), "outside"),
    ("xdp_load_bytes into the ctx", A.alu64("mov", 6, 1) + A.mov(2, 0) + A.alu64("mov", 3, 6) + A.mov(4, 4)
     + A.call(LOAD_BYTES) + A.exit_(), "ctx"),
])
def test_faults_abort_the_packet(name: str, prog: bytes, text: str) -> None:
    assert text in aborted(prog)


def test_rodata_is_read_only() -> None:
    ro = MapDef(".rodata", o.BPF_MAP_TYPE_ARRAY, 4, 8, 1, map_flags=o.BPF_F_RDONLY_PROG, section=".rodata",
                data=(5).to_bytes(8, "little"))
    assert "read-only" in aborted(A.ld_map_value(1, 1) + A.st("w", 1, 0, 9) + A.ret(2), maps=[ro])
    (r0, _, _), = run(A.ld_map_value(1, 1) + A.ldx("w", 0, 1, 0) + A.exit_(), maps=[ro])[0]
    assert r0 == 5


def test_unknown_action_is_aborted_in_a_batch(run_prefix: str) -> None:
    pm_mem = np.zeros((4, 1024), dtype=np.uint8)
    e = Engine(make({"p": A.ret(42)}))
    try:
        pages = np.array([0, 1], dtype=np.uint32)
        offs = np.array([256, 256], dtype=np.uint32)
        lens = np.array([60, 60], dtype=np.uint32)
        targets = np.full(2, -1, dtype=np.int64)
        v, exc, _ = e.cpu().run_batch(0, pm_mem, pages, offs, lens, targets, 1, 0)
        assert list(v) == [XDP_ABORTED, XDP_ABORTED] and exc == 2
    finally:
        e.close()
    # ... and r0's upper half is ignored, as the kernel's u32 act is
    with Engine(make({"p": A.ld_imm64(0, (7 << 32) | XDP_PASS) + A.exit_()})) as e2:
        v, exc, _ = e2.cpu().run_batch(0, pm_mem, pages, offs, lens, targets, 1, 0)
        assert list(v) == [XDP_PASS, XDP_PASS] and exc == 0


def test_batch_faults_touch_no_other_page() -> None:
    # A program storing 0xAA at data[-1]..: every store outside [data, data_end) faults; the other pages
    # and the headroom stay untouched.
    prog = A.program(A.ldx("w", 2, 1, 0), A.ldx("w", 3, 1, 4), A.st("b", 2, 0, 0xAA), A.alu64("mov", 4, 2),
                     A.alu64("add", 4, imm=-1), A.st("b", 4, 0, 0xBB), A.ret(XDP_PASS))
    mem = np.zeros((3, 1024), dtype=np.uint8)
    e = Engine(make({"p": prog}))
    try:
        pages = np.array([1], dtype=np.uint32)
        offs, lens = np.array([256], dtype=np.uint32), np.array([64], dtype=np.uint32)
        v, exc, _ = e.cpu().run_batch(0, mem, pages, offs, lens, np.full(1, -1, dtype=np.int64), 1, 0)
        assert v[0] == XDP_ABORTED and exc == 1
        assert mem[1, 256] == 0xAA and mem[1, 255] == 0
        assert not mem[0].any() and not mem[2].any()
        # a descriptor pointing outside the page memory is refused, not followed
        v, exc, _ = e.cpu().run_batch(0, mem, np.array([7], dtype=np.uint32), offs, lens,
                                   np.full(1, -1, dtype=np.int64), 1, 0)
        assert v[0] == XDP_ABORTED and exc == 1
    finally:
        e.close()


# ---------------------------------------------------------------------------------------------- calls

def test_bpf_to_bpf_call_saves_r6_r9_and_gets_its_own_frame() -> None:
    prog = A.program(
        A.mov(6, 100), A.st("dw", 10, -8, 5), A.mov(1, 7), A.call_local(4),  # -> callee
        A.ldx("dw", 2, 10, -8), A.alu64("add", 0, 2), A.alu64("add", 0, 6), A.exit_(),
        # callee: r0 = r1 * 2, clobbering r6 and its own stack slot
        A.mov(6, 1), A.st("dw", 10, -8, 99), A.alu64("mov", 0, 1), A.alu64("mul", 0, imm=2), A.exit_(),
    )
    assert value(prog) == 14 + 5 + 100


def test_call_depth_is_bounded() -> None:
    # infinite recursion: a fault at the 9th frame, not a crash
    assert "call depth" in aborted(A.program(A.call_local(-1), A.exit_()))


def test_callee_reaches_caller_stack_through_a_pointer() -> None:
    prog = A.program(A.st("dw", 10, -8, 11), A.alu64("mov", 1, 10), A.alu64("add", 1, imm=-8), A.call_local(1),
                     A.exit_(), A.ldx("dw", 0, 1, 0), A.exit_())
    assert value(prog) == 11


def prog_array(n: int = 4) -> MapDef:
    return MapDef("jmp", o.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, n)


def test_tail_call() -> None:
    # entry: tail call slot 0 (-> "second", returns TX); a missing slot falls through
    entry = A.program(A.ld_map(2, 1), A.mov(3, 0), A.call(TAIL_CALL), A.ret(XDP_DROP))
    miss = A.program(A.ld_map(2, 1), A.mov(3, 3), A.call(TAIL_CALL), A.ret(XDP_DROP))
    e = Engine(make({"entry": entry, "miss": miss, "second": A.ret(XDP_TX)}, [prog_array()]))
    try:
        e.maps.populate({"jmp": {0: "second"}}, lambda n: 0)
        assert e.run("entry", [bytes(64)])[0][0] == XDP_TX
        assert e.run("miss", [bytes(64)])[0][0] == XDP_DROP
    finally:
        e.close()


def test_tail_calls_stop_after_33() -> None:
    # a program tail-calling itself counts in r6... no: registers survive a tail call, so count in a map
    body = A.program(A.ld_map_value(6, 0), A.ldx("dw", 7, 6, 0), A.alu64("add", 7, imm=1), A.stx("dw", 6, 7, 0),
                     A.ld_map(2, 1), A.mov(3, 0), A.call(TAIL_CALL), A.ret(XDP_PASS))
    e = Engine(make({"self": body}, [prog_array(1)]))
    try:
        e.maps.populate({"jmp": {0: "self"}}, lambda n: 0)
        assert e.run("self", [bytes(64)])[0][0] == XDP_PASS
        assert e.maps.lookup("out", 0) == 34  # the first run and 33 tail calls
    finally:
        e.close()


def test_loop_helper() -> None:
    # bpf_loop(10, cb, &stack, 0): cb adds its index into *ctx; stops when cb returns 1 at i == 6
    prog = A.program(
        A.st("dw", 10, -8, 0), A.mov(1, 10), A.ld_func(2, 9), A.alu64("mov", 3, 10), A.alu64("add", 3, imm=-8),
        A.mov(4, 0), A.call(LOOP), A.ldx("dw", 1, 10, -8), A.alu64("lsh", 0, imm=32), A.alu64("or", 0, 1),
        A.exit_(),
        # cb(i, ctx):
        A.ldx("dw", 3, 2, 0), A.alu64("add", 3, 1), A.stx("dw", 2, 3, 0), A.mov(0, 0),
        A.jmp("jne", 1, imm=6, off=1), A.mov(0, 1), A.exit_(),
    )
    v = value(prog)
    assert v >> 32 == 7 and v & M32 == sum(range(7))


# ---------------------------------------------------------------------------------------------- helpers

def test_redirect_and_flags() -> None:
    ok = run(A.mov(1, 9) + A.mov(2, 0) + A.call(REDIRECT) + A.exit_())[0][0]
    assert ok[0] == XDP_REDIRECT and ok[2] == 9
    bad = run(A.mov(1, 9) + A.mov(2, 1) + A.call(REDIRECT) + A.exit_())[0][0]
    assert bad[0] == XDP_ABORTED and bad[2] == -1


@pytest.mark.parametrize("mtype", [o.BPF_MAP_TYPE_DEVMAP, o.BPF_MAP_TYPE_DEVMAP_HASH])
@pytest.mark.parametrize("vsize", [4, 8])
def test_redirect_map(mtype: int, vsize: int) -> None:
    dm = MapDef("tx_port", mtype, 4, vsize, 8)

    def go(key: int, flags: int) -> tuple[int, bytes, int]:
        prog = A.ld_map(1, 1) + A.mov(2, key) + A.mov(3, flags) + A.call(REDIRECT_MAP) + A.exit_()
        e = Engine(make({"p": prog}, [dm]))
        try:
            e.maps.populate({"tx_port": {0: "eth1"}}, {"eth1": 3}.__getitem__)
            return e.run("p", [bytes(64)])[0]
        finally:
            e.close()

    assert go(0, 0)[::2] == (XDP_REDIRECT, 3)
    assert go(1, XDP_PASS)[::2] == (XDP_PASS, -1)  # miss: the fallback action in flags' low bits
    assert go(1, 0)[0] == XDP_ABORTED
    # BPF_F_EXCLUDE_INGRESS alone: a plain lookup; an unknown flag bit aborts
    assert go(0, 1 << 4)[::2] == (XDP_REDIRECT, 3) and go(1, 1 << 4 | XDP_PASS)[::2] == (XDP_PASS, -1)
    assert go(0, 1 << 5 | 1 << 3)[0] == XDP_ABORTED
    # BPF_F_BROADCAST: the key and the fallback bits ignored, the target the map's broadcast code (the map's
    # index in the object, 1 here, and BPF_F_EXCLUDE_INGRESS in bit 0) for the worker's broadcast path
    assert go(7, 1 << 3 | XDP_PASS)[::2] == (XDP_REDIRECT, REDIRECT_BROADCAST | 1 << 16)
    assert go(0, 1 << 3 | 1 << 4)[::2] == (XDP_REDIRECT, REDIRECT_BROADCAST | 1 << 16 | 1)


def test_adjust_head_tail_meta() -> None:
    def go(helper: int, delta: int) -> tuple[int, bytes]:
        prog = A.program(A.alu64("mov", 6, 1), A.mov(2, delta), A.call(helper), A.alu64("mov", 7, 0),
                         A.ldx("w", 2, 6, 0), A.ldx("w", 3, 6, 4), A.alu64("mov", 0, 3), A.alu64("sub", 0, 2),
                         A.alu64("lsh", 7, imm=32), A.alu64("or", 0, 7), A.ld_map_value(1, 0), A.stx("dw", 1, 0, 0),
                         A.ret(XDP_PASS))
        e = Engine(make({"p": prog}))
        try:
            (_, out, _), = e.run("p", [bytes(range(64))])
            return e.maps.lookup("out", 0), out
        finally:
            e.close()

    rc, out = go(ADJ_HEAD, -20)
    assert rc == 84 and out == bytes(20) + bytes(range(64))  # grown into the headroom
    rc, out = go(ADJ_HEAD, 14)
    assert rc == 50 and out == bytes(range(14, 64))
    assert go(ADJ_HEAD, -(256 - 40) - 1)[0] >> 32 == (-22) & M32  # beyond the xdp_frame: -EINVAL
    assert go(ADJ_HEAD, 51)[0] >> 32 == (-22) & M32  # fewer than ETH_HLEN bytes left
    rc, out = go(ADJ_TAIL, -4)
    assert rc == 60 and out == bytes(range(60))
    rc, out = go(ADJ_TAIL, 8)
    assert rc == 72 and out == bytes(range(64)) + bytes(8)  # the grown tail is cleared
    assert go(ADJ_TAIL, 4096)[0] >> 32 == (-22) & M32
    assert go(ADJ_META, -8)[0] == 64
    assert go(ADJ_META, -6)[0] >> 32 == (-13) & M32  # not a multiple of 4: -EACCES
    assert go(ADJ_META, -36)[0] >> 32 == (-13) & M32  # more than 32 bytes


def test_meta_is_accessible_after_adjust_meta() -> None:
    prog = A.program(A.alu64("mov", 6, 1), A.mov(2, -4), A.call(ADJ_META), A.ldx("w", 2, 6, 8),
                     A.st("w", 2, 0, 0x11223344), A.ldx("w", 0, 2, 0), A.exit_())
    assert run(prog)[0][0][0] == 0x11223344
    prog_bad = A.program(A.ldx("w", 2, 1, 0), A.ldx("w", 0, 2, -4), A.exit_())  # no metadata yet
    assert "outside" in aborted(prog_bad)


def test_csum_diff_matches_ones_complement() -> None:
    # replace 4 bytes of the frame: csum_diff(from, 4, to, 4, 0), folded, equals the incremental checksum
    prog = A.program(A.ldx("w", 6, 1, 0), A.st("w", 10, -4, 0x0A000001), A.alu64("mov", 1, 6), A.mov(2, 4),
                     A.alu64("mov", 3, 10), A.alu64("add", 3, imm=-4), A.mov(4, 4), A.mov(5, 0), A.call(CSUM_DIFF),
                     A.exit_())
    frame = bytes([0xC0, 0xA8, 0x00, 0x01]) + bytes(60)
    (r0, _, _), = run(prog, [frame])[0]
    old = int.from_bytes(frame[:4], "little")
    new = 0x0A000001
    s = ((~old) & M32) + new
    while s >> 32:
        s = (s & M32) + (s >> 32)
    assert r0 == s
    assert run(A.mov(2, 3) + A.mov(4, 0) + A.call(CSUM_DIFF) + A.exit_())[0][0][0] == (-22) & M32


def test_load_store_bytes_and_buff_len() -> None:
    prog = A.program(A.alu64("mov", 6, 1), A.mov(2, 2), A.alu64("mov", 3, 10), A.alu64("add", 3, imm=-8),
                     A.mov(4, 4), A.call(LOAD_BYTES), A.alu64("mov", 1, 6), A.mov(2, 10), A.alu64("mov", 3, 10),
                     A.alu64("add", 3, imm=-8), A.mov(4, 4), A.call(STORE_BYTES), A.alu64("mov", 1, 6),
                     A.call(BUFF_LEN), A.exit_())
    (r0, out, _), = run(prog, [bytes(range(64))])[0]
    assert r0 == 64 and out[10:14] == bytes([2, 3, 4, 5])
    beyond = A.program(A.mov(2, 62), A.alu64("mov", 3, 10), A.alu64("add", 3, imm=-8), A.mov(4, 4),
                       A.call(LOAD_BYTES), A.exit_())
    assert run(beyond)[0][0][0] == (-22) & M32


def _check_mtu_prog() -> bytes:
    """r0 = mtu << 8 | bpf_check_mtu(ctx, 0, &mtu, 0, 0) of the ingress device."""
    return A.program(A.st("w", 10, -4, 0), A.mov(2, 0), A.alu64("mov", 3, 10), A.alu64("add", 3, imm=-4),
                     A.mov(4, 0), A.mov(5, 0), A.call(CHECK_MTU), A.ldx("w", 1, 10, -4), A.alu64("lsh", 1, imm=8),
                     A.alu64("or", 0, 1), A.exit_())


def test_check_mtu_reads_the_mtus_of_the_host_s_devices_from_the_context() -> None:
    """A worker's engine learns the devices' MTUs from the program's context (the topology's `mtu`)."""
    from emu.ebpf.engine import xdp_program
    from emu.xdp.context import XdpContext

    with Engine(make({"p": _check_mtu_prog()})) as e:
        p = xdp_program(e.obj, "p", e.maps, 0)
        ctx = XdpContext(2, 0, 0, ifindexes={"eth0": 2, "eth1": 3}, mtus={2: 9000, 3: 1454})
        assert p.setup is not None
        p.setup(ctx)
        ctx.data = memoryview(bytearray(3000))
        assert p.fn(ctx) == 9000 << 8
        ctx2 = XdpContext(3, 0, 0, ifindexes={"eth0": 2, "eth1": 3}, mtus={2: 9000, 3: 1454})
        p.setup(ctx2)
        ctx2.data = memoryview(bytearray(1469))
        assert p.fn(ctx2) == (1454 << 8) | 1  # 1469 > 1454 + 14: FRAG_NEEDED


def test_check_mtu() -> None:
    prog = A.program(A.st("w", 10, -4, 0), A.mov(2, 0), A.alu64("mov", 3, 10), A.alu64("add", 3, imm=-4),
                     A.mov(4, 0), A.mov(5, 0), A.call(CHECK_MTU), A.ldx("w", 1, 10, -4), A.alu64("lsh", 1, imm=8),
                     A.alu64("or", 0, 1), A.exit_())
    e = Engine(make({"p": prog}))
    try:
        e.cpu().set_devices({1: 1500, 2: 100})
        assert e.cpu().run("p", [bytes(64)], ingress_ifindex=1)[0][0] == 1500 << 8
        assert e.cpu().run("p", [bytes(200)], ingress_ifindex=2)[0][0] == (100 << 8) | 1  # FRAG_NEEDED
        assert e.cpu().run("p", [bytes(64)], ingress_ifindex=5)[0][0] == (-19) & M32  # -ENODEV
    finally:
        e.close()


def test_smp_processor_id_and_percpu_lookup() -> None:
    pc = MapDef("pc", o.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 2)
    # *pc[0] (this CPU) += cpu + 1, then r0 = lookup_percpu(pc, 0, cpu 1) value
    prog = A.program(A.call(SMP_ID), A.alu64("mov", 6, 0), A.st("w", 10, -4, 0), A.ld_map(1, 1),
                     A.alu64("mov", 2, 10), A.alu64("add", 2, imm=-4), A.call(LOOKUP), A.jmp("jeq", 0, imm=0, off=3),
                     A.alu64("add", 6, imm=1), A.stx("dw", 0, 6, 0), A.ja(0), A.ld_map(1, 1), A.alu64("mov", 2, 10),
                     A.alu64("add", 2, imm=-4), A.mov(3, 1), A.call(PERCPU_LOOKUP), A.jmp("jeq", 0, imm=0, off=2),
                     A.ldx("dw", 0, 0, 0), A.exit_(), A.ret(99))
    e = Engine(make({"p": prog}, [pc]), ncpus=2)
    try:
        assert e.run("p", [bytes(64)], cpu=0)[0][0] == 0
        assert e.run("p", [bytes(64)], cpu=1)[0][0] == 2
        assert e.maps.lookup("pc", 0) == [1, 2]
    finally:
        e.close()


def test_trace_printk_and_events() -> None:
    fmt = b"pkt %d len %u\0"
    rb = MapDef("events", o.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096)
    stores = b"".join(A.st("b", 10, -16 + k, c) for k, c in enumerate(fmt))
    prog = A.program(stores, A.alu64("mov", 1, 10), A.alu64("add", 1, imm=-16), A.mov(2, len(fmt)), A.mov(3, -5),
                     A.mov(4, 64), A.call(TRACE), A.ld_map(1, 1), A.alu64("mov", 2, 10), A.alu64("add", 2, imm=-16),
                     A.mov(3, 8), A.mov(4, 0), A.call(RINGBUF_OUT), A.exit_())
    e = Engine(make({"p": prog}, [rb]))
    try:
        assert [r[0] for r in e.run("p", [bytes(64)] * 3)] == [0, 0, 0]
        lines, dropped = e.cpu().drain_trace()
        assert lines == ["pkt -5 len 64"] * 3 and dropped == 0
        assert e.maps.events("events") == (3, 24)
        assert e.maps.snapshot()["events"]["events"] == 3
    finally:
        e.close()


def test_map_helpers_from_the_program() -> None:
    h = MapDef("h", o.BPF_MAP_TYPE_HASH, 8, 8, 4)
    # h[7] = 1 (BPF_NOEXIST), then h[7] += 1 through the looked-up pointer, then delete h[9] (ENOENT)
    prog = A.program(A.st("dw", 10, -8, 7), A.st("dw", 10, -16, 1), A.ld_map(1, 1), A.alu64("mov", 2, 10),
                     A.alu64("add", 2, imm=-8), A.alu64("mov", 3, 10), A.alu64("add", 3, imm=-16), A.mov(4, 1),
                     A.call(UPDATE), A.alu64("mov", 6, 0),
                     A.ld_map(1, 1), A.alu64("mov", 2, 10), A.alu64("add", 2, imm=-8), A.call(LOOKUP),
                     A.jmp("jeq", 0, imm=0, off=2), A.mov(1, 1), A.atomic("dw", "add", 0, 1, 0),
                     A.st("dw", 10, -8, 9), A.ld_map(1, 1), A.alu64("mov", 2, 10), A.alu64("add", 2, imm=-8),
                     A.call(DELETE), A.alu64("lsh", 0, imm=32), A.alu64("or", 0, 6), A.ld_map_value(1, 0),
                     A.stx("dw", 1, 0, 0), A.ret(XDP_PASS))
    e = Engine(make({"p": prog}, [h]))
    try:
        e.run("p", [bytes(64)])
        assert e.maps.lookup("h", 7) == 2
        assert e.maps.lookup("out", 0) == ((-2) & M32) << 32  # update 0, delete -ENOENT
        e.run("p", [bytes(64)])
        assert e.maps.lookup("h", 7) == 3
        assert e.maps.lookup("out", 0) & M32 == (-17) & M32  # BPF_NOEXIST on an existing key: -EEXIST
    finally:
        e.close()


def test_unsupported_helper_refused_at_load() -> None:
    from emu.errors import BadInputError
    with Engine(make({"p": A.call(9999) + A.exit_()})) as e, \
            pytest.raises(BadInputError, match="insn 0: unsupported helper 9999"):
        e.cpu()


def test_batch_writes_back_offsets_and_targets() -> None:
    # adjust_head(+14) then redirect to ifindex 5: descriptors' offset and length follow the program
    prog = A.program(A.alu64("mov", 6, 1), A.mov(2, 14), A.call(ADJ_HEAD), A.mov(1, 5), A.mov(2, 0),
                     A.call(REDIRECT), A.exit_())
    desc = np.zeros(3, dtype=[("page", "<u4"), ("gen", "<u4"), ("off", "<u4"), ("len", "<u4"), ("owner", "<u2"),
                              ("aux", "<u2")])
    desc["page"] = [0, 2, 1]
    desc["off"] = 256
    desc["len"] = [64, 100, 20]
    mem = np.zeros((3, 2048), dtype=np.uint8)
    e = Engine(make({"p": prog}))
    try:
        targets = np.full(3, -1, dtype=np.int64)
        v, exc, _ = e.cpu().run_batch(0, mem, desc["page"], desc["off"], desc["len"], targets, 1, 0)
        assert exc == 0 and list(v) == [XDP_REDIRECT] * 3
        assert list(targets) == [5, 5, 5]
        assert list(desc["off"]) == [270, 270, 256]  # a 20-byte frame cannot lose 14 bytes (ETH_HLEN left)
        assert list(desc["len"]) == [50, 86, 20]
    finally:
        e.close()


def test_engine_supports_exactly_the_loaders_helpers() -> None:
    # one table (emu/ebpf/helpers.py) for the loader, `emu inspect` and the docs; the engine implements each
    from emu.ebpf.engine import SUPPORTED_HELPERS
    from emu.ebpf.helpers import HELPERS

    assert {i for i, _ in HELPERS} == set(SUPPORTED_HELPERS)


def test_tail_called_program_gets_the_ctx() -> None:
    # the target reads ctx->data_end - ctx->data through r1, as the kernel hands it the ctx
    target = A.program(A.ldx("w", 2, 1, 0), A.ldx("w", 3, 1, 4), A.alu64("mov", 0, 3), A.alu64("sub", 0, 2),
                       A.exit_())
    entry = A.program(A.ld_map(2, 1), A.mov(3, 0), A.call(TAIL_CALL), A.ret(XDP_DROP))
    e = Engine(make({"entry": entry, "len": target}, [prog_array()]))
    try:
        e.maps.populate({"jmp": {0: "len"}}, lambda n: 0)
        assert e.run("entry", [bytes(60)])[0][0] == 60, e.cpu().last_fault
    finally:
        e.close()
