"""XDP multi-buffer: the Python per-packet helpers (`emu.xdp.context.XdpContext`) against the eBPF engine.

tests/ebpf_corpus/frags.c's two programs, and a Python port of each written against `XdpContext`, run over
the same multi-buffer frames laid out as a CPU worker lays them out (a head buffer at
XDP_PACKET_HEADROOM, fragments in buffers of their own, the shinfo in the head's tailroom): identical
verdicts, bytes (every buffer, the shinfo included), linear lengths and fragment counts.  The operands
reach every boundary: offsets around the linear part's end, the fragments' ends and 0xffff, lengths past
the frame's end, bpf_check_mtu's len_diff at INT_MIN and INT_MAX, bpf_xdp_adjust_tail from INT_MIN to
INT_MAX (shrinking away fragments, growing the last one past its tailroom).  The engine's side is checked
against the kernel by tests/test_ebpf_frags.py.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest

from emu.ebpf.elf import load_object
from emu.ebpf.engine import Engine
from emu.mem.page import SHINFO_TAILROOM, shinfo_view, shinfo_write
from emu.xdp.context import XdpContext
from tests.ebpf_build import CORPUS_DIR, compile_c

BUF = 4096  # one buffer a page, as jumbo-sg.yaml
HEADROOM = 256
ROOM = BUF - SHINFO_TAILROOM  # a buffer's data ends here at most (rxq->frag_size of the contract)
LINEAR = ROOM - HEADROOM
MTU = 1500
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX = 0, 1, 2, 3
IO, NOUT = 16, 8  # corpus.h's struct io: a, b, c at IO, out[] behind


def s32(v: int) -> int:
    """C's (int) of a u64."""
    v &= U32
    return v - (1 << 32) if v >> 31 else v


def pick(x: int, linear: int, length: int) -> int:
    """frags.c's pick(), in its u32 arithmetic (fragments of PAGE = 4096 bytes in its fourth case)."""
    v = (x >> 8) & 0x1FFFF
    sel = x & 3
    if sel == 0:
        r = v
    elif sel == 1:
        r = linear + (v & 0xFF) - 128
    elif sel == 2:
        r = length - (v & 0x1FF)
    else:
        r = linear + 4096 * ((x >> 24) & 7) + (v & 0x3F) - 32
    return r & U32


def io_ok(ctx: XdpContext) -> bool:
    return len(ctx.data) >= IO + 24 + 8 * NOUT  # type: ignore[arg-type]


def write_out(ctx: XdpContext, vals: list[int]) -> None:
    for k, v in enumerate(vals):
        struct.pack_into("<Q", ctx.data, IO + 24 + 8 * k, v & U64)  # type: ignore[arg-type]


def py_frags_rw(ctx: XdpContext) -> int:
    if not io_ok(ctx):
        return XDP_DROP
    a, b, c = struct.unpack_from("<QQQ", ctx.data, IO)  # type: ignore[arg-type]
    linear = len(ctx.data)  # type: ignore[arg-type]
    length = ctx.get_buff_len()
    off = pick(a, linear, length)
    n = (b & 63) + 1
    buf = bytearray(64)
    r1 = ctx.load_bytes(off, memoryview(buf)[:n])
    fold = 0
    for x in buf:
        fold = (fold * 31 + x) & U64
    buf = bytearray(((c >> (i & 7)) ^ i) & 0xFF for i in range(64))
    r2 = ctx.store_bytes(pick(b >> 6, linear, length), bytes(buf[: ((c >> 3) & 63) + 1]))
    r3, mtu = ctx.check_mtu(0, 0, s32(c >> 32), 0)
    r4 = ctx.load_bytes(a & 0x1FFFF, memoryview(buf))
    if not io_ok(ctx):
        return XDP_ABORTED
    write_out(ctx, [r1, r2, r3, r4, fold, length | linear << 32, off | n << 32, mtu])
    return XDP_TX


def py_frags_tail(ctx: XdpContext) -> int:
    if not io_ok(ctx):
        return XDP_DROP
    _, b, c = struct.unpack_from("<QQQ", ctx.data, IO)  # type: ignore[arg-type]
    r1 = ctx.adjust_tail(s32(b))
    len1 = ctx.get_buff_len()
    r2 = ctx.adjust_tail(s32(c))
    len2 = ctx.get_buff_len()
    last = bytearray(8)
    r3 = ctx.load_bytes((len2 - 8) & U32, memoryview(last))
    if not io_ok(ctx):
        return XDP_PASS
    write_out(ctx, [r1, r2, r3, len1, len2, len(ctx.data), int.from_bytes(last, "little")])  # type: ignore[arg-type]
    return XDP_TX


PY = {"frags_rw": py_frags_rw, "frags_tail": py_frags_tail}


def layout(length: int, a: int, b: int, c: int, seed: int, grow_room: int) -> tuple[np.ndarray, int, int]:
    """A buffer memory holding one frame of `length` bytes (the corpus header with operands a, b, c, then
    bytes of `seed`): the head in buffer 1, its fragments (ROOM - grow_room bytes each, the last shorter)
    in buffers 3, 5, ... at offset 0; every other byte random.  Returns (mem, linear, nfrags)."""
    rnd = random.Random(seed)
    mem = np.frombuffer(rnd.randbytes(40 * BUF), np.uint8).reshape(40, BUF).copy()
    head = b"\2" * 6 + b"\4" * 6 + b"\x88\xb5\0\0" + struct.pack("<QQQ", a & U64, b & U64, c & U64) + bytes(64)
    frame = head + rnd.randbytes(length - len(head))
    linear = min(length, LINEAR)
    mem[1, HEADROOM : HEADROOM + linear] = np.frombuffer(frame[:linear], np.uint8)
    step = ROOM - grow_room
    pieces = [frame[k : k + step] for k in range(linear, length, step)]
    bufs = [3 + 2 * i for i in range(len(pieces))]
    for bf, p in zip(bufs, pieces, strict=True):
        mem[bf, : len(p)] = np.frombuffer(p, np.uint8)
    shinfo_write(shinfo_view(mem), 1, bufs, [0] * len(bufs), [len(p) for p in pieces])
    return mem, linear, len(pieces)


@pytest.fixture(scope="module")
def frags_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(CORPUS_DIR / "frags.c", tmp_path_factory.mktemp("fragsdiff"), cflags=("-mcpu=v3",))


@pytest.fixture(scope="module", params=["jit", "interp"])
def frags_engine(request: pytest.FixtureRequest, frags_path: Path):
    with Engine(load_object(frags_path), ncpus=1, engine=str(request.param)) as e:
        e.cpu(0).set_devices({1: MTU})
        yield e


def run_engine(e: Engine, prog: str, mem: np.ndarray, linear: int, nf: int) -> tuple[int, int, int]:
    cpu = e.cpu(0)
    offs, lens = np.full(1, HEADROOM, np.uint32), np.full(1, linear, np.uint32)
    nfa = np.full(1, nf, np.uint8)
    v, _, _ = cpu.run_batch(cpu.index(prog), mem, np.ones(1, np.uint32), offs, lens, np.zeros(1, np.int64), 1, 0, nfa)
    return int(v[0]), int(lens[0]), int(nfa[0])


def run_python(prog: str, mem: np.ndarray, linear: int, nf: int) -> tuple[int, int, int]:
    ctx = XdpContext(1, 0, 0, mtus={1: MTU})
    flat = memoryview(mem.reshape(-1))
    ctx.attach_frames(mem, shinfo_view(mem), flat)
    ctx.data = flat[BUF + HEADROOM : BUF + HEADROOM + linear]
    ctx.frame_start(1, BUF + HEADROOM, nf)
    v = PY[prog](ctx)
    # what NAPI's run_frames stores back: the new data_end; nfrags from the shinfo the helper rewrote
    return v, len(ctx.data), int(shinfo_view(mem)[1, 0]) if nf else 0  # type: ignore[arg-type]


LENGTHS = (104, 1500, LINEAR, LINEAR + 1, LINEAR + 64, 9018, 3 * ROOM + 1, 20000, 65001, LINEAR + 17 * ROOM - 1)


def rw_operands(length: int, rnd: random.Random) -> list[tuple[int, int, int]]:
    def pk(sel: int, v: int, k: int = 0) -> int:
        return sel | (v & 0x1FFFF) << 8 | (k & 7) << 24

    picks = [pk(0, v) for v in (0, 100, LINEAR - 1, LINEAR, length - 1, length, 0xFFFF, 0x10000, 0x1FFFF)]
    picks += [pk(1, v) for v in (0, 64, 127, 128, 129, 255)]
    picks += [pk(2, v) for v in (0, 1, 8, 64, 65, 300)]
    picks += [pk(3, v, k) for k in range(8) for v in (0, 31, 32, 33, 63)]
    out = []
    for a in picks:
        b = rnd.choice(picks) << 6 | rnd.choice((0, 7, 31, 63))
        diff = rnd.choice((0, MTU + 14 - min(length, LINEAR), MTU + 15 - min(length, LINEAR), INT_MAX, INT_MIN,
                           -length, 100))
        out.append((a, b, (diff & U32) << 32 | rnd.randrange(1 << 32)))
    return out


def tail_operands(length: int, nf: int, rnd: random.Random, grow_room: int) -> list[tuple[int, int, int]]:
    last = 0 if nf == 0 else (length - LINEAR - 1) % (ROOM - grow_room) + 1
    deltas = [0, 1, -1, 13, -13, -14, -100, -LINEAR, -ROOM, -ROOM - 1, 100, grow_room, grow_room + 1,
              ROOM - last, ROOM - last + 1, 65535, -65536, INT_MIN, INT_MAX, 14 - length, 13 - length,
              LINEAR - length, LINEAR - length - 1, LINEAR - length + 1, -last, 1 - last, -last - 1]
    ops = [(0, d, rnd.choice(deltas)) for d in deltas] + [(0, rnd.choice(deltas), d) for d in deltas]
    return [(a, b & U64, c & U64) for a, b, c in ops]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("prog", ["frags_rw", "frags_tail"])
def test_python_helpers_match_the_engine_on_multibuffer_frames(frags_engine: Engine, prog: str, length: int) -> None:
    rnd = random.Random(length)
    grow_room = 0 if length % 2 else 200  # full fragments, or room for the last one to grow
    probe = layout(length, 0, 0, 0, 0, grow_room)
    nf = probe[2]
    ops = rw_operands(length, rnd) if prog == "frags_rw" else tail_operands(length, nf, rnd, grow_room)
    for k, (a, b, c) in enumerate(ops):
        mem, linear, nf = layout(length, a, b, c, k, grow_room)
        mine = mem.copy()
        theirs = run_engine(frags_engine, prog, mem, linear, nf)
        ours = run_python(prog, mine, linear, nf)
        where = f"{prog} length {length} operands {a:#x} {b:#x} {c:#x}"
        assert ours == theirs, where
        for m in (mem, mine):  # a released entry's size is no one's (its buffer id is the caller's to free)
            shinfo_view(m)[1, 4 + 3 * ours[2] : 2 + 3 * nf : 3] = 0
        if not np.array_equal(mem, mine):
            rows, cols = np.nonzero(mem != mine)
            raise AssertionError(f"{where}: bytes differ first at buffer {rows[0]} byte {cols[0]}: engine "
                                 f"{mem[rows[0], cols[0]]}, python {mine[rows[0], cols[0]]}")
