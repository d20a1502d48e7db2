"""XDP multi-buffer in the eBPF engine (the multi-buffer contract, docs/architecture.md).

Against the kernel (BPF_PROG_TEST_RUN, both engine modes): the corpus program tests/ebpf_corpus/frags.c
and the bundled xdp_l2fwd_frags.o over frames of 104 to 73,152 bytes (a linear part and up to 17
fragments, laid out as ``bpf_prog_test_run_xdp`` does), bpf_xdp_get_buff_len, _load_bytes, _store_bytes,
_adjust_tail and bpf_check_mtu at offsets around every boundary: identical r0, bytes out (fragments
included), lengths and maps.

Without the kernel: `CpuEngine.run_batch` over a numpy buffer memory with hand-built shinfo — writes land
in the frame's bytes and nowhere else, fragments released by bpf_xdp_adjust_tail are reported as the
contract says (nr_frags and `nfrags` written, the released entries keep their buffer ids), a malformed
shinfo aborts the packet without touching memory.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from emu.ebpf import asm as A
from emu.ebpf import kernel
from emu.ebpf import obj as o
from emu.ebpf.engine import Engine, xdp_program
from emu.ebpf.obj import BpfObject, MapDef, ProgDef
from emu.errors import BadInputError
from tests.ebpf_build import CORPUS_DIR, bundled, compile_c, need_kernel
from tests.test_ebpf_differential import MAC_A, MAC_B, Pair

U64 = (1 << 64) - 1
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
LINEAR = 4096 - 256 - 320  # BPF_PROG_TEST_RUN's linear part (max_data_sz) for 4 KiB pages
MAX_FRAME = LINEAR + 17 * 4096
LENGTHS = (104, 200, 1500, LINEAR - 1, LINEAR, LINEAR + 1, LINEAR + 64, LINEAR + 4095, LINEAR + 4096,
           LINEAR + 4097, 9018, LINEAR + 2 * 4096 + 1, 16000, 20000, MAX_FRAME - 1, MAX_FRAME)
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX = 0, 1, 2, 3


def lo_mtu() -> int:
    """BPF_PROG_TEST_RUN without a ctx runs on loopback (ifindex 1): its MTU, for bpf_check_mtu."""
    return int(Path("/sys/class/net/lo/mtu").read_text())


def frame(length: int, a: int, b: int, c: int, seed: int = 0) -> bytes:
    """The corpus layout (corpus.h: 16 bytes, the operands, room for results), filled to `length` with bytes
    of `seed`, so that every fragment's content differs."""
    head = MAC_B + MAC_A + b"\x88\xb5\0\0" + struct.pack("<QQQ", a & U64, b & U64, c & U64) + bytes(64)
    rnd = random.Random(seed * 100_003 + length)
    return head + rnd.randbytes(length - len(head))


def last_frag(length: int) -> int:
    return 0 if length <= LINEAR else (length - LINEAR - 1) % 4096 + 1


def pick(sel: int, v: int, k: int = 0) -> int:
    """The operand frags.c's pick() reads as (selector, value, fragment index)."""
    return sel | (v & 0x1FFFF) << 8 | (k & 7) << 24


def rw_frames(length: int) -> list[bytes]:
    rnd = random.Random(length)
    picks = [pick(0, v) for v in (0, 100, LINEAR - 1, LINEAR, length - 1, length, 0xFFFF, 0x10000, 0x1FFFF)]
    picks += [pick(1, v) for v in (0, 64, 127, 128, 129, 255)]
    picks += [pick(2, v) for v in (0, 1, 8, 64, 65, 300)]
    picks += [pick(3, v, k) for k in range(8) for v in (0, 31, 32, 33, 63) if rnd.random() < 0.5]
    out = []
    for i, a in enumerate(picks):
        n = rnd.choice((0, 7, 31, 63))
        b = (rnd.choice(picks) << 6) | n
        linear = min(length, LINEAR)  # bpf_check_mtu measures the linear part: around lo's 65536 + ETH_HLEN
        diff = rnd.choice((0, 65550 - linear, 65551 - linear, 65551 - length, -length, INT_MAX, INT_MIN, 100))
        c = (diff & 0xFFFFFFFF) << 32 | rnd.randrange(1 << 32)
        out.append(frame(length, a, b, c, i))
    # a store that fits whatever the length: 8 bytes, 8 back from the frame's end (in its last fragment)
    out.append(frame(length, pick(2, 8), pick(2, 8) << 6 | 7, 7 << 3, 99))
    out.append(frame(length, pick(0, 0x10000), pick(0, 0x10000) << 6, 0, 98))  # above 0xffff: -EFAULT
    return out


def tail_frames(length: int) -> list[bytes]:
    last = last_frag(length)
    deltas = [0, 1, -1, 13, -13, -14, -100, -LINEAR, -4095, -4096, -4097, 100, 4095, 4096, 4097, 65535, -65536,
              INT_MIN, INT_MAX, 14 - length, 13 - length, LINEAR - length, LINEAR - length - 1,
              LINEAR - length + 1, -last, 1 - last, -last - 1, 4096 - last, 4097 - last, LINEAR + 104 - length]
    rnd = random.Random(length)
    return [frame(length, 0, d, rnd.choice(deltas), i) for i, d in enumerate(deltas)] + \
        [frame(length, 0, rnd.choice(deltas), rnd.choice(deltas), 100 + i) for i in range(10)]


# -- against the kernel -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def frags_obj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_kernel()
    return compile_c(CORPUS_DIR / "frags.c", tmp_path_factory.mktemp("frags"), cflags=("-mcpu=v3",))


@pytest.fixture(scope="module", params=["jit", "interp"])
def frags_pair(request: pytest.FixtureRequest, frags_obj: Path) -> Iterator[Pair]:
    p = Pair(frags_obj, mode=str(request.param))
    p.eng.cpu(0).set_devices({1: lo_mtu()})  # lo, where the kernel's test run puts the frame
    assert all(prog.frags for prog in p.obj.programs.values())
    yield p
    p.close()


@pytest.mark.kernel
@pytest.mark.parametrize("length", LENGTHS)
def test_frags_load_store_mtu_match_kernel(length: int, frags_pair: Pair) -> None:
    results = frags_pair.compare("frags_rw", rw_frames(length))
    rets = [struct.unpack_from("<4q", out, 40) for _, out in results]
    assert {r for r, _ in results} == {XDP_TX}
    loads, stores, mtus, far = (sorted({r[i] for r in rets}) for i in range(4))
    # the cases mean something: loads and stores that worked and that the kernel refused (-EINVAL past the
    # frame's end, -EFAULT above 0xffff), bpf_check_mtu both ways
    assert {0, -14} <= set(loads) and {0, -14} <= set(stores), (loads, stores)
    if length < 0xFFFF - 64:
        assert -22 in loads and -22 in stores, (loads, stores)
    assert mtus == [0, 1] and set(far) <= {0, -22, -14}, (mtus, far)


@pytest.mark.kernel
@pytest.mark.parametrize("length", LENGTHS)
def test_frags_adjust_tail_matches_kernel(length: int, frags_pair: Pair) -> None:
    results = frags_pair.compare("frags_tail", tail_frames(length))
    lens = {len(out) for _, out in results}
    assert len(lens) > 5  # grown and shrunk by many amounts


@pytest.mark.kernel
def test_frags_beyond_max_skb_frags_refused_like_the_kernel(frags_pair: Pair) -> None:
    f = frame(MAX_FRAME + 1, 0, 0, 0)
    with pytest.raises(kernel.BpfSyscallError) as e:
        kernel.prog_test_run(frags_pair.ko.prog_fds["frags_rw"], f)
    assert e.value.errno == 12  # ENOMEM: no 18th fragment
    with pytest.raises(BadInputError, match="needs 18 fragments"):
        frags_pair.eng.run("frags_rw", [f])


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["jit", "interp"])
def test_program_without_frags_runs_over_multibuffer_test_frames_like_the_kernel(mode: str) -> None:
    """6.18's BPF_PROG_TEST_RUN splits a long frame for any XDP program, BPF_F_XDP_HAS_FRAGS or not (the
    refusal is at attach, dev_xdp_attach); the engine's test run does the same."""
    need_kernel()
    p = Pair(bundled() / "xdp_tx.o", mode=mode)
    try:
        assert not any(prog.frags for prog in p.obj.programs.values())
        p.compare("xdp_tx", [frame(n, 1, 2, 3) for n in (LINEAR + 1, 9018, 20000)])
    finally:
        p.close()


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["jit", "interp"])
def test_bundled_l2fwd_frags_matches_kernel(mode: str) -> None:
    need_kernel()
    p = Pair(bundled() / "xdp_l2fwd_frags.o", {"egress_ifindex": 3}, mode)
    try:
        prog = p.obj.programs["xdp_l2fwd_frags"]
        assert prog.section == "xdp.frags" and prog.frags
        frames = [frame(n, n, 0, 0, k) for k in range(3) for n in (64 + 40, 1514, 1519, LINEAR, 4096, 4097, 9018,
                                                                  9019, 20000, MAX_FRAME)]
        results = p.compare("xdp_l2fwd_frags", frames)
        assert {r for r, _ in results} == {4}  # XDP_REDIRECT
        assert all(out[:6] == f[6:12] and out[6:12] == f[:6] and out[12:] == f[12:]
                   for (_, out), f in zip(results, frames, strict=True))
        classes = p.eng.maps.native.lookup(p.obj.map_index("lenclass"), struct.pack("<I", 3), 0)
        assert struct.unpack("<QQ", classes) == (9, 3 * (9019 + 20000 + MAX_FRAME))
    finally:
        p.close()


# -- run_batch over hand-built shinfo (no kernel) ------------------------------------------------------------

BUF, NBUFS, HEAD = 2048, 12, 1
ROOM = BUF - 320  # a buffer's data ends here at most (the shinfo and the tailroom behind)
MAPS = [MapDef("vals", o.BPF_MAP_TYPE_ARRAY, 4, 16, 4)]


def verdict_of_r0() -> bytes:
    """XDP_PASS when the helper returned 0, else XDP_DROP."""
    return A.jmp("jne", 0, imm=0, off=2) + A.ret(XDP_PASS) + A.ret(XDP_DROP)


def prog_tail(delta: int) -> bytes:
    return A.program(A.mov(2, delta), A.call(65), verdict_of_r0())


def prog_store(at: int, n: int) -> bytes:
    """bpf_xdp_store_bytes of `n` bytes 0xee (from the stack) at frame offset `at`."""
    fill = b"".join(A.st("w", 10, -64 + 4 * i, 0xEEEEEEEE) for i in range(16))
    return A.program(fill, A.mov(2, at), A.alu64("mov", 3, 10), A.alu64("add", 3, imm=-64), A.mov(4, n),
                     A.call(190), verdict_of_r0())


class Frame:
    """A head buffer (row HEAD, data at 256) with fragments in rows of their own, its shinfo written in the
    head buffer's tailroom as the contract lays it out."""

    def __init__(self, linear: int, frags: list[tuple[int, int, int]], seed: int = 1) -> None:
        self.mem = np.random.default_rng(seed).integers(0, 256, (NBUFS, BUF), dtype=np.uint8)
        self.linear, self.frags = linear, frags
        self.shinfo(len(frags), sum(n for _, _, n in frags), frags)

    def shinfo(self, nr: int, size: int, ents: list[tuple[int, int, int]]) -> None:
        words = [nr, size] + [w for e in ents for w in e]
        self.mem[HEAD, ROOM:ROOM + 4 * len(words)] = np.frombuffer(struct.pack(f"<{len(words)}I", *words), np.uint8)

    def words(self, n: int) -> list[int]:
        return list(struct.unpack(f"<{n}I", self.mem[HEAD, ROOM:ROOM + 4 * n].tobytes()))

    def spans(self) -> list[tuple[int, int, int]]:
        return [(HEAD, 256, self.linear), *self.frags]

    def bytes_at(self, mem: np.ndarray) -> bytes:
        return b"".join(mem[r, off:off + n].tobytes() for r, off, n in self.spans())

    def run(self, prog: bytes, engine: str, nfrags: int | None = None) -> tuple[int, int, int, str | None, list[int]]:
        """(verdict, exceptions, moved, last fault, [nfrags after, offs, lens]); the memory changes in place."""
        obj = BpfObject(Path("mb.o"), {"p": ProgDef("p", "xdp.frags", prog, flags=o.BPF_F_XDP_HAS_FRAGS)}, MAPS)
        with Engine(obj, ncpus=1, engine=engine) as e:
            cpu = e.cpu(0)
            offs, lens = np.full(1, 256, dtype=np.uint32), np.full(1, self.linear, dtype=np.uint32)
            nf = np.full(1, len(self.frags) if nfrags is None else nfrags, dtype=np.uint8)
            v, exc, moved = cpu.run_batch(0, self.mem, np.full(1, HEAD, dtype=np.uint32), offs, lens,
                                          np.zeros(1, dtype=np.int64), 2, 0, nf)
            return int(v[0]), exc, moved, cpu.last_fault, [int(nf[0]), int(offs[0]), int(lens[0])]


FRAGS3 = [(3, 256, 1000), (7, 256, 1472), (5, 300, 40)]  # the last one: 40 bytes, tailroom ROOM - 340


@pytest.mark.parametrize("engine", ["jit", "interp"])
@pytest.mark.parametrize("at", [0, 100, 399, 400, 1399, 1400, 1401, 2871, 2872, 2880, 2911 - 64, 2912 - 64,
                                2913 - 64])
def test_store_bytes_lands_in_the_frame_and_nowhere_else(engine: str, at: int) -> None:
    f = Frame(400, FRAGS3)
    total = 400 + 1000 + 1472 + 40
    before = f.mem.copy()
    want = bytearray(f.bytes_at(before))
    v, exc, moved, fault, after = f.run(prog_store(at, 64), engine)
    assert exc == 0 and moved == 0 and after == [3, 256, 400], fault
    if at + 64 <= total:
        assert v == XDP_PASS
        want[at:at + 64] = b"\xee" * 64
    else:
        assert v == XDP_DROP  # -EINVAL, nothing written
    assert f.bytes_at(f.mem) == bytes(want)
    outside = before.copy()  # every byte not of the frame is as it was
    for r, off, n in f.spans():
        outside[r, off:off + n] = f.mem[r, off:off + n]
    assert (f.mem == outside).all()


@pytest.mark.parametrize("engine", ["jit", "interp"])
def test_shrink_releases_fragments_as_the_contract_says(engine: str) -> None:
    f = Frame(400, FRAGS3)
    v, exc, moved, fault, after = f.run(prog_tail(-(40 + 1472 + 10)), engine)
    assert (v, exc, moved) == (XDP_PASS, 0, 1), fault
    assert after == [1, 256, 400]  # nfrags written; data, data_end unchanged
    # nr_frags 1, xdp_frags_size 990, the kept fragment 10 bytes shorter; the released entries name their buffers
    assert f.words(2 + 9) == [1, 990, 3, 256, 990, 7, 256, 1472, 5, 300, 40]


@pytest.mark.parametrize("engine", ["jit", "interp"])
def test_shrink_past_every_fragment_makes_the_frame_linear(engine: str) -> None:
    f = Frame(400, FRAGS3)
    v, exc, moved, fault, after = f.run(prog_tail(-(2512 + 100)), engine)
    assert (v, exc, moved) == (XDP_PASS, 0, 1), fault
    assert after == [0, 256, 300]  # the frags flag cleared, data_end moved back by what remained
    assert f.words(2 + 9) == [0, 0, 3, 256, 1000, 7, 256, 1472, 5, 300, 40]
    f2 = Frame(400, FRAGS3)
    assert f2.run(prog_tail(-(2912 - 13)), engine)[:3] == (XDP_DROP, 0, 0)  # fewer than ETH_HLEN left: -EINVAL
    assert f2.words(2) == [3, 2512]


@pytest.mark.parametrize("engine", ["jit", "interp"])
def test_grow_uses_the_last_fragments_tailroom(engine: str) -> None:
    room = ROOM - 300 - 40
    f = Frame(400, FRAGS3)
    before = f.mem.copy()
    v, exc, moved, fault, after = f.run(prog_tail(room), engine)
    assert (v, exc, moved, after) == (XDP_PASS, 0, 1, [3, 256, 400]), fault
    assert f.words(2 + 9)[:2] == [3, 2512 + room] and f.words(11)[-1] == 40 + room
    assert (f.mem[5, 340:ROOM] == 0).all()  # the grown bytes are zeroed
    changed = f.mem != before
    changed[5, 340:ROOM] = False
    changed[HEAD, ROOM:ROOM + 4 * 11] = False  # the shinfo written back
    assert not changed.any()
    f2 = Frame(400, FRAGS3)
    assert f2.run(prog_tail(room + 1), engine)[:3] == (XDP_DROP, 0, 0)  # past the tailroom: -EINVAL


MALFORMED = {
    "nr_frags above 17": (lambda f: f.shinfo(18, 2512, FRAGS3), 3, "shinfo nr_frags 18"),
    "nr_frags not what arrived": (lambda f: None, 2, "shinfo nr_frags 3 (the packet arrived with 2"),
    "buffer beyond the memory": (lambda f: f.shinfo(3, 2512, [FRAGS3[0], (NBUFS, 256, 1472), FRAGS3[2]]), 3,
                                 f"fragment 1: buffer {NBUFS}"),
    "fragment into the tailroom": (lambda f: f.shinfo(3, 2512, [FRAGS3[0], (7, 256, ROOM - 255), FRAGS3[2]]), 3,
                                   "fragment 1: buffer 7 offset 256 length 1473"),
    "huge offset": (lambda f: f.shinfo(1, 16, [(3, 0xFFFFFFF0, 16)]), 1, "offset 4294967280"),
    "frags_size not the sum": (lambda f: f.shinfo(3, 9999, FRAGS3), 3, "xdp_frags_size 9999"),
}


@pytest.mark.parametrize("engine", ["jit", "interp"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_shinfo_aborts_and_touches_nothing(engine: str, case: str) -> None:
    spoil, nfrags, text = MALFORMED[case]
    f = Frame(400, FRAGS3)
    spoil(f)
    before = f.mem.copy()
    v, exc, moved, fault, after = f.run(prog_store(0, 64), engine, nfrags)
    assert (v, exc, moved) == (XDP_ABORTED, 1, 0)
    assert fault is not None and text in fault, fault
    assert after == [nfrags, 256, 400]
    assert (f.mem == before).all()


@pytest.mark.parametrize("engine", ["jit", "interp"])
def test_linear_part_into_the_shinfo_is_malformed(engine: str) -> None:
    f = Frame(ROOM - 256 + 1, FRAGS3)
    before = f.mem.copy()
    v, exc, _, fault, _ = f.run(prog_store(0, 64), engine)
    assert (v, exc) == (XDP_ABORTED, 1) and fault is not None and "runs into its shinfo" in fault
    assert (f.mem == before).all()


def test_linear_packets_ignore_the_shinfo_and_none_costs_nothing() -> None:
    """nfrags 0 (or None): the shinfo bytes are not read (garbage there is fine), helpers see one buffer."""
    f = Frame(400, [])
    f.mem[HEAD, ROOM:] = 0xFF  # garbage
    assert f.run(prog_store(336, 64), "jit", 0)[:3] == (XDP_PASS, 0, 0)
    assert f.run(prog_store(337, 64), "jit", 0)[:3] == (XDP_DROP, 0, 0)
    obj = BpfObject(Path("mb.o"), {"p": ProgDef("p", "xdp", prog_store(0, 64))}, MAPS)
    with Engine(obj, ncpus=1) as e:
        v, exc, _ = e.cpu(0).run_batch(0, f.mem, np.full(1, HEAD, dtype=np.uint32), np.full(1, 256, np.uint32),
                                       np.full(1, 400, np.uint32), np.zeros(1, np.int64), 2, 0)
        assert (v.tolist(), exc) == ([XDP_PASS], 0)


class FakeBatch:
    """What emu.xdp.context.XdpBatch gives `xdp_program(...).batch` (with mb-core's `nfrags`)."""

    def __init__(self, f: Frame, nfrags: np.ndarray | None) -> None:
        self.mem, self.pages = f.mem, np.full(1, HEAD, dtype=np.uint32)
        self.offs, self.lens = np.full(1, 256, np.uint32), np.full(1, f.linear, np.uint32)
        self.offs.flags.writeable = self.lens.flags.writeable = False  # a worker's descriptors: read-only
        self.redirect_ifindex = np.full(1, -1, dtype=np.int64)
        self.nfrags = nfrags
        self.moved, self.exceptions, self.fault = False, 0, None


class FakeCtx:
    ingress_ifindex, rx_queue_index = 2, 0

    def device_mtus(self) -> dict[int, int]:
        return {2: 9000}


def test_xdp_program_batch_passes_nfrags_and_reports_released_fragments() -> None:
    f = Frame(400, FRAGS3)
    obj = BpfObject(Path("mb.o"), {"p": ProgDef("p", "xdp.frags", prog_tail(-1500),
                                                flags=o.BPF_F_XDP_HAS_FRAGS)}, MAPS)
    with Engine(obj, ncpus=1) as e:
        prog = xdp_program(obj, "p", e.maps, 0)
        ro = np.full(1, 3, dtype=np.uint8)
        ro.flags.writeable = False
        pkts = FakeBatch(f, ro)
        assert prog.batch is not None
        v = prog.batch(FakeCtx(), pkts)  # type: ignore[arg-type]
        assert v.tolist() == [XDP_PASS] and pkts.moved and pkts.exceptions == 0
        assert pkts.nfrags.tolist() == [2] and ro.tolist() == [3]  # a copy, given back through the batch
        assert f.words(2) == [2, 1012]


class FakeMbCtx(FakeCtx):
    """A per-packet context over a multi-buffer frame, with the frags-aware helpers of the contract."""

    def __init__(self, linear: bytes, rest: bytes) -> None:
        self.buf = bytearray(linear + rest)
        self.data = memoryview(self.buf)[:len(linear)]
        self.redirect_ifindex = -1
        self.calls: list[tuple[str, int, int]] = []

    def get_buff_len(self) -> int:
        return len(self.buf)

    def load_bytes(self, off: int, buf: memoryview) -> int:
        self.calls.append(("load", off, len(buf)))
        buf[:] = self.buf[off:off + len(buf)]
        return 0

    def store_bytes(self, off: int, src: bytes) -> int:
        self.calls.append(("store", off, len(src)))
        self.buf[off:off + len(src)] = src
        return 0


def test_per_packet_form_runs_a_multibuffer_frame_whole() -> None:
    """`vectorised: false`: the frame is read through ctx.load_bytes (in chunks under bpf_xdp_pointer's
    0xffff), run as BPF_PROG_TEST_RUN lays it out, and written back through ctx.store_bytes."""
    total = 65_000  # moved in two chunks; the offset the program stores at stays under 0xffff
    obj = BpfObject(Path("mb.o"), {"p": ProgDef("p", "xdp.frags", prog_store(total - 64, 64),
                                                flags=o.BPF_F_XDP_HAS_FRAGS)}, MAPS)
    rnd = random.Random(5)
    linear, rest = rnd.randbytes(1400), rnd.randbytes(total - 1400)
    with Engine(obj, ncpus=1) as e:
        prog = xdp_program(obj, "p", e.maps, 0)
        ctx = FakeMbCtx(linear, rest)
        assert prog.fn(ctx) == XDP_PASS  # type: ignore[arg-type]
        assert bytes(ctx.buf) == linear + rest[:-64] + b"\xee" * 64
        assert all(n <= 0xFFFF for _, _, n in ctx.calls) and {k for k, _, _ in ctx.calls} == {"load", "store"}
        short = FakeMbCtx(linear[:100], b"")  # a linear frame: the bytes in place, no helper called
        prog2 = xdp_program(BpfObject(Path("l.o"), {"p": ProgDef("p", "xdp", prog_store(36, 64))}, MAPS), "p",
                            e.maps, 0)
        assert prog2.fn(short) == XDP_PASS  # type: ignore[arg-type]
        assert bytes(short.buf) == linear[:36] + b"\xee" * 64 and short.calls == []
