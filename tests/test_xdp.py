"""XDP verdicts, the program context and its helpers, program loading, and the bundled programs.

The bundled programs run on a real 64-byte Ethernet/IPv4/UDP frame (built with dpkt) placed at the XDP
headroom of a page-sized buffer, with their maps in a real shared-memory `MapSet` created under the
test's `run_prefix` and unlinked by the fixture, as a CPU worker would run them.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import dpkt
import numpy as np
import pytest

from emu import programs
from emu.mem.pagemem import PageSpans
from emu.mem.shm import segments_with_prefix
from emu.net.protocol import XDP_PACKET_HEADROOM as HEADROOM
from emu.xdp.bpfmaps import MapSet, MapSpec, populate
from emu.xdp.context import (
    XDP_ABORTED,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    XDP_TX,
    Program,
    XdpAction,
    XdpBatch,
    XdpContext,
    classify_verdict,
    classify_verdicts,
    load_program,
    xdp_program,
)

PAGE = 4096
SRC_MAC = bytes.fromhex("020000000102")
DST_MAC = bytes.fromhex("020000000203")
IFINDEXES = {"eth0": 2, "eth1": 3}
ROOT = Path(__file__).resolve().parent.parent


def make_frame(size: int = 64) -> bytes:
    payload = bytes(range(size - 14 - 20 - 8))  # Ethernet, IPv4 and UDP headers
    udp = dpkt.udp.UDP(sport=1234, dport=9, ulen=8 + len(payload), data=payload)
    ip = dpkt.ip.IP(
        src=bytes([10, 0, 0, 1]),
        dst=bytes([10, 0, 0, 2]),
        p=dpkt.ip.IP_PROTO_UDP,
        len=20 + udp.ulen,
        data=udp,
    )
    eth = dpkt.ethernet.Ethernet(src=SRC_MAC, dst=DST_MAC, type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
    frame = bytes(eth)  # dpkt fills in the checksums
    assert len(frame) == size
    return frame


def in_page(frame: bytes) -> tuple[bytearray, memoryview]:
    """The frame at the XDP headroom of a page, and a writable view of exactly its bytes."""
    page = bytearray(PAGE)
    page[HEADROOM : HEADROOM + len(frame)] = frame
    return page, memoryview(page)[HEADROOM : HEADROOM + len(frame)]


Loader = Callable[..., tuple[Program, XdpContext, MapSet]]


@pytest.fixture
def loaded(run_prefix: str) -> Iterator[Loader]:
    """``loaded("emu.programs:l2fwd", params={...}, cpu=0)`` -> (program, context, map set)."""
    sets: list[MapSet] = []

    def load(
        spec: str, params: Mapping[str, Any] | None = None, cpu: int = 0
    ) -> tuple[Program, XdpContext, MapSet]:
        prog = load_program(spec)
        ms = MapSet.create(f"{run_prefix}-m{len(sets)}", prog.maps, ncpus=2, cpu=cpu)
        sets.append(ms)
        params = dict(params or {})
        populate(ms, prog.initial_maps(params), IFINDEXES.__getitem__)
        ctx = prog.new_context(IFINDEXES["eth0"], 0, cpu, params, ms.maps, IFINDEXES)
        return prog, ctx, ms

    yield load
    for ms in sets:
        ms.unlink()
        ms.close()
    assert segments_with_prefix(run_prefix) == []


def run(prog: Program, ctx: XdpContext, data: memoryview) -> int:
    ctx.reset(data)
    return prog.fn(ctx)


def swapped(frame: bytes) -> bytes:
    return frame[6:12] + frame[0:6] + frame[12:]


# --------------------------------------------------------------------------------------------------
# Verdicts


def test_action_values_are_the_kernels() -> None:
    assert [int(a) for a in XdpAction] == [0, 1, 2, 3, 4]
    assert [a.name for a in XdpAction] == ["XDP_ABORTED", "XDP_DROP", "XDP_PASS", "XDP_TX", "XDP_REDIRECT"]
    assert (XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT) == tuple(XdpAction)
    assert all(type(c) is int for c in (XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT))


@pytest.mark.parametrize(
    ("ret", "expected"),
    [
        (0, (XDP_ABORTED, False)),
        (1, (XDP_DROP, False)),
        (XdpAction.XDP_PASS, (XDP_PASS, False)),
        (np.int64(3), (XDP_TX, False)),
        (4, (XDP_REDIRECT, False)),
        (5, (XDP_ABORTED, True)),
        (42, (XDP_ABORTED, True)),
        (-1, (XDP_ABORTED, True)),
        (None, (XDP_ABORTED, True)),
        ("2", (XDP_ABORTED, True)),
        (2.0, (XDP_ABORTED, True)),
        (True, (XDP_ABORTED, True)),
    ],
)
def test_classify_verdict(ret: object, expected: tuple[int, bool]) -> None:
    assert classify_verdict(ret) == expected


# --------------------------------------------------------------------------------------------------
# Context and helpers


def test_context_basics() -> None:
    params = {"egress": "eth1", "nested": {"a": 1}}
    ctx = XdpContext(2, 1, 0, params, {}, IFINDEXES)
    assert (ctx.ingress_ifindex, ctx.rx_queue_index, ctx.cpu, ctx.redirect_ifindex) == (2, 1, 0, -1)
    assert ctx.ifindex_of("eth1") == 3
    with pytest.raises(ValueError, match=r"no device 'eth9'.*eth0, eth1"):
        ctx.ifindex_of("eth9")
    with pytest.raises(TypeError):
        ctx.params["egress"] = "eth0"  # type: ignore[index]
    params["nested"]["a"] = 2
    assert ctx.params["nested"]["a"] == 1  # a private copy
    with pytest.raises(AttributeError):
        ctx.something = 1  # type: ignore[attr-defined]
    _, data = in_page(make_frame())
    ctx.redirect_ifindex = 7
    ctx.reset(data)
    assert ctx.data is data and ctx.redirect_ifindex == -1


def test_check_mtu_is_bpf_check_mtu_for_xdp() -> None:
    """``bpf_xdp_check_mtu``: the frame (or `mtu_len` + the Ethernet header) against the device's MTU + 14;
    the ingress device when ifindex is 0; -ENODEV for no device, -EINVAL for any flag; devices without an
    MTU of their own have 1500."""
    ctx = XdpContext(2, 0, 0, ifindexes=IFINDEXES, mtus={3: 9000})
    ctx.data = memoryview(bytearray(1514))
    assert ctx.check_mtu() == (0, 1500) and ctx.device_mtus() == {2: 1500, 3: 9000}
    assert ctx.check_mtu(len_diff=1) == (1, 1500)  # BPF_MTU_CHK_RET_FRAG_NEEDED
    assert ctx.check_mtu(3, len_diff=7000) == (0, 9000)
    assert ctx.check_mtu(3, mtu_len=9001) == (1, 9000)
    assert ctx.check_mtu(2, mtu_len=1500) == (0, 1500)
    assert ctx.check_mtu(7) == (-19, 0)  # -ENODEV
    assert ctx.check_mtu(flags=1) == (-22, 0)  # -EINVAL


def test_buff_len_load_and_store_bytes_are_the_helpers() -> None:
    """``bpf_xdp_get_buff_len`` / ``_load_bytes`` / ``_store_bytes`` over the frame, -EINVAL (nothing moved)
    for an empty span or one past the end, -EFAULT for an offset (a negative one is a u32 above it) or a
    length above 0xffff, as the engine's helpers (``bpf_xdp_pointer``)."""
    ctx = XdpContext(2, 0, 0)
    frame = bytearray(range(100))
    ctx.data = memoryview(frame)
    assert ctx.get_buff_len() == 100
    buf = bytearray(4)
    assert ctx.load_bytes(96, buf) == 0 and buf == bytes([96, 97, 98, 99])
    assert ctx.load_bytes(97, buf) == -22 and buf == bytes([96, 97, 98, 99])
    assert ctx.load_bytes(0, bytearray()) == -22 and ctx.load_bytes(-1, buf) == -14
    assert ctx.load_bytes(0x10000, buf) == -14 and ctx.load_bytes(0, bytearray(0x10000)) == -14
    assert ctx.store_bytes(0x10000, b"ab") == -14 and buf == bytes([96, 97, 98, 99])
    assert ctx.store_bytes(10, b"\xff\xfe") == 0 and frame[9:13] == bytes([9, 0xFF, 0xFE, 12])
    assert ctx.store_bytes(99, b"ab") == -22 and frame[99] == 99
    assert ctx.store_bytes(5, b"") == -22


def test_redirect() -> None:
    ctx = XdpContext(2, 0, 0)
    assert ctx.redirect(3) == XDP_REDIRECT and ctx.redirect_ifindex == 3
    ctx.redirect_ifindex = -1
    assert ctx.redirect(3, flags=1) == XDP_ABORTED and ctx.redirect_ifindex == -1


def test_redirect_map_hit_and_miss(run_prefix: str) -> None:
    ms = MapSet.create(f"{run_prefix}-dev", {"tx": MapSpec("devmap", 4)}, 1)
    try:
        tx = ms["tx"]
        tx.update(1, 3)
        ctx = XdpContext(2, 0, 0, maps=ms.maps)
        assert ctx.redirect_map(tx, 1) == XDP_REDIRECT and ctx.redirect_ifindex == 3
        ctx.redirect_ifindex = -1
        assert ctx.redirect_map(tx, 0) == XDP_ABORTED  # miss, flags 0
        for action in (XDP_DROP, XDP_PASS, XDP_TX):
            assert ctx.redirect_map(tx, 0, action) == action  # miss: the low flag bits are the action
        assert ctx.redirect_map(tx, 4, XDP_PASS) == XDP_PASS  # out of range is a miss
        assert ctx.redirect_map(tx, -1, XDP_PASS) == XDP_PASS
        assert ctx.redirect_ifindex == -1
        assert ctx.redirect_map(tx, 1, 1 << 13) == XDP_ABORTED  # BPF_F_BROADCAST: not emulated
        assert ctx.redirect_ifindex == -1
    finally:
        ms.unlink()
        ms.close()


# --------------------------------------------------------------------------------------------------
# Loading


def test_load_program_reads_maps_and_setup() -> None:
    prog = load_program("emu.programs:l2fwd")
    assert prog.fn is programs.l2fwd and prog.name == "emu.programs:l2fwd"
    assert set(prog.maps) == {"rxcnt"} and prog.setup is not None
    bare = load_program("emu.programs:xdp_pass")
    assert dict(bare.maps) == {} and bare.setup is None
    assert load_program("emu.programs:l2fwd_map").initial_maps({"tx_port": {0: "eth1"}, "x": 1}) == {
        "tx_port": {0: "eth1"}
    }


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("emu.programs", "module:function"),
        ("emu.no_such_module:f", "cannot import"),
        ("emu.programs:no_such_program", "no attribute"),
        ("emu.programs:__doc__", "not callable"),
    ],
)
def test_load_program_errors(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        load_program(spec)


def test_decorator_and_function_attributes() -> None:
    seen: list[XdpContext] = []

    @xdp_program(maps={"m": MapSpec("array", 1)}, setup=seen.append)
    def prog(ctx: XdpContext) -> int:
        return XDP_PASS

    p = Program.from_callable(prog)
    assert p.fn is prog and set(p.maps) == {"m"} and p.name.endswith("prog")
    with pytest.raises(ValueError, match=r"maps \['m'\] were not created"):
        p.new_context(2, 0, 0)

    def raw(ctx: XdpContext) -> int:
        return XDP_DROP

    raw.maps = {"m": "not a spec"}  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="MapSpec"):
        Program.from_callable(raw)
    raw.maps = {}  # type: ignore[attr-defined]
    raw.setup = lambda ctx: setattr(ctx, "priv", "ready")  # type: ignore[attr-defined]
    ctx = Program.from_callable(raw).new_context(2, 0, 0)
    assert ctx.priv == "ready"


# --------------------------------------------------------------------------------------------------
# Bundled programs


def test_xdp_drop_counts_per_cpu(loaded: Loader) -> None:
    prog, ctx, ms = loaded("emu.programs:xdp_drop", cpu=1)
    frame = make_frame()
    _, data = in_page(frame)
    for _ in range(3):
        assert run(prog, ctx, data) == XDP_DROP
    assert bytes(data) == frame
    rxcnt = ms["rxcnt"]
    assert rxcnt.values(0) == [0, 3] and rxcnt.values(1) == [0, 3 * 64]  # type: ignore[attr-defined]


def test_xdp_pass(loaded: Loader) -> None:
    prog, ctx, _ = loaded("emu.programs:xdp_pass")
    frame = make_frame()
    _, data = in_page(frame)
    assert run(prog, ctx, data) == XDP_PASS and bytes(data) == frame


def test_xdp_tx_swaps_macs_in_place(loaded: Loader) -> None:
    prog, ctx, _ = loaded("emu.programs:xdp_tx")
    frame = make_frame()
    page, data = in_page(frame)
    assert run(prog, ctx, data) == XDP_TX
    assert bytes(page[HEADROOM : HEADROOM + 64]) == swapped(frame)
    assert not any(page[:HEADROOM]) and not any(page[HEADROOM + 64 :])  # nothing outside the frame
    eth = dpkt.ethernet.Ethernet(bytes(data))
    assert (eth.src, eth.dst) == (DST_MAC, SRC_MAC) and isinstance(eth.data.data, dpkt.udp.UDP)


def test_l2fwd_redirects_to_egress(loaded: Loader) -> None:
    prog, ctx, ms = loaded("emu.programs:l2fwd", params={"egress": "eth1"})
    frame = make_frame()
    _, data = in_page(frame)
    assert run(prog, ctx, data) == XDP_REDIRECT
    assert ctx.redirect_ifindex == IFINDEXES["eth1"] and bytes(data) == swapped(frame)
    assert ms["rxcnt"].values(0) == [1, 0]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("params", "fragment"), [({}, "params.egress"), ({"egress": "eth9"}, "no device 'eth9'")]
)
def test_l2fwd_setup_errors(loaded: Loader, params: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        loaded("emu.programs:l2fwd", params=params)


def test_l2fwd_map(loaded: Loader) -> None:
    prog, ctx, ms = loaded("emu.programs:l2fwd_map", params={"tx_port": {"0": "eth1"}})
    frame = make_frame()
    _, data = in_page(frame)
    assert run(prog, ctx, data) == XDP_REDIRECT
    assert ctx.redirect_ifindex == 3 and bytes(data) == swapped(frame)
    ms["tx_port"].delete(0)
    assert run(prog, ctx, data) == XDP_ABORTED and ctx.redirect_ifindex == -1  # empty slot: flags 0
    assert ms["rxcnt"].sum(0) == 2  # type: ignore[attr-defined]


def test_l2fwd_filter_drops_denied_ports_and_forwards_the_rest(loaded: Loader) -> None:
    prog, ctx, ms = loaded("emu.programs:l2fwd_filter", params={"egress": "eth1", "deny_ports": [53, 9]})
    assert getattr(prog.fn, "batch", None) is None  # per packet only: what makes it CPU-heavy
    frame = make_frame()  # UDP to port 9
    _, data = in_page(frame)
    assert run(prog, ctx, data) == XDP_DROP and bytes(data) == frame
    assert ms["rxcnt"].values(1) == [1, 0]  # type: ignore[attr-defined]  # key 1 (denied), on CPU 0
    prog, ctx, ms = loaded("emu.programs:l2fwd_filter", params={"egress": "eth1", "deny_ports": [53]})
    assert run(prog, ctx, data) == XDP_REDIRECT
    assert ctx.redirect_ifindex == IFINDEXES["eth1"] and bytes(data) == swapped(frame)
    not_ip = frame[:12] + b"\x88\xb5" + frame[14:]  # a local experimental EtherType: no ports to filter
    _, data = in_page(not_ip)
    assert run(prog, ctx, data) == XDP_REDIRECT and bytes(data) == swapped(not_ip)
    rxcnt = ms["rxcnt"]
    assert rxcnt.values(0) == [2, 0] and rxcnt.values(1) == [0, 0]  # type: ignore[attr-defined]


def test_workers_load_no_packet_library_until_a_program_needs_one() -> None:
    """dpkt (4.5 MB and 45 ms a process) is imported by l2fwd_filter's setup, not with the programs: a
    CPU worker running any other program never loads it, nor PyYAML."""
    code = ("import sys, workers.cpu, workers.device, emu.programs, emu.xdp.runtime; "
            "print(sorted(m for m in ('dpkt', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize(
    ("params", "fragment"),
    [({"deny_ports": [9]}, "params.egress"), ({"egress": "eth1", "deny_ports": [70000]}, "deny_ports"),
     ({"egress": "eth1", "deny_ports": "9"}, "deny_ports")],
)
def test_l2fwd_filter_setup_errors(loaded: Loader, params: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        loaded("emu.programs:l2fwd_filter", params=params)


class CountingClock:
    """A nanosecond clock that advances `step` each time it is read, and counts the reads."""

    def __init__(self, step: int) -> None:
        self.t = 0
        self.step = step
        self.reads = 0

    def __call__(self) -> int:
        self.reads += 1
        self.t += self.step
        return self.t


@pytest.mark.parametrize("vectorised", [False, True])
def test_l2fwd_cost_spends_cost_ns_per_packet_and_forwards(
    loaded: Loader, monkeypatch: pytest.MonkeyPatch, vectorised: bool
) -> None:
    """The busy loop reads the clock until `cost_ns` per packet has passed (a counting clock stands in for
    the real one, so nothing here depends on how fast this machine is), then forwards like l2fwd."""
    clock = CountingClock(step=100)
    monkeypatch.setattr(programs, "_now_ns", clock)
    prog, ctx, ms = loaded("emu.programs:l2fwd_cost", params={"egress": "eth1", "cost_ns": 1000})
    frame = make_frame()
    if vectorised:
        rng = np.random.default_rng(7)
        mem, pages, offs, lens = random_poll(rng, 30, True)
        assert prog.batch is not None
        verdicts = prog.batch(ctx, XdpBatch(mem, pages, offs, lens))
        n, forwarded = len(pages), int(np.count_nonzero(lens >= 12))
        assert verdicts.tolist() == [XDP_REDIRECT if n_ >= 12 else XDP_DROP for n_ in lens.tolist()]
    else:
        _, data = in_page(frame)
        assert run(prog, ctx, data) == XDP_REDIRECT and bytes(data) == swapped(frame)
        assert ctx.redirect_ifindex == IFINDEXES["eth1"]
        n, forwarded = 1, 1
    # One read for the deadline, then one per 100 ns step until n x 1000 ns have passed: once per call.
    assert clock.reads == 1 + n * 1000 // 100
    assert ms["rxcnt"].values(0) == [forwarded, 0]  # type: ignore[attr-defined]


def test_l2fwd_cost_zero_reads_no_clock(loaded: Loader, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = CountingClock(step=100)
    monkeypatch.setattr(programs, "_now_ns", clock)
    prog, ctx, _ = loaded("emu.programs:l2fwd_cost", params={"egress": "eth1", "cost_ns": 0})
    _, data = in_page(make_frame())
    assert run(prog, ctx, data) == XDP_REDIRECT and clock.reads == 0


@pytest.mark.parametrize(
    ("params", "fragment"),
    [({"cost_ns": 5}, "params.egress"), ({"egress": "eth1", "cost_ns": -1}, "cost_ns must be an integer >= 0"),
     ({"egress": "eth1", "cost_ns": 1.5}, "cost_ns must be an integer")],
)
def test_l2fwd_cost_setup_errors(loaded: Loader, params: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        loaded("emu.programs:l2fwd_cost", params=params)


@pytest.mark.parametrize("name", ["xdp_tx", "l2fwd", "l2fwd_cost", "l2fwd_filter"])
def test_runt_frames_are_dropped(loaded: Loader, name: str) -> None:
    prog, ctx, _ = loaded(f"emu.programs:{name}", params={"egress": "eth1"})
    _, data = in_page(b"\x01" * 10)
    assert run(prog, ctx, data) == XDP_DROP and bytes(data) == b"\x01" * 10


def test_buggy_programs(loaded: Loader) -> None:
    _, data = in_page(make_frame())
    prog, ctx, _ = loaded("emu.programs:buggy_raise")
    with pytest.raises(RuntimeError):
        run(prog, ctx, data)
    prog, ctx, _ = loaded("emu.programs:buggy_bad_verdict")
    assert classify_verdict(run(prog, ctx, data)) == (XDP_ABORTED, True)
    prog, ctx, _ = loaded("emu.programs:buggy_no_verdict")
    assert classify_verdict(run(prog, ctx, data)) == (XDP_ABORTED, True)


# --------------------------------------------------------------------------------------------------
# Vectorised forms: the same program over a whole poll


def random_poll(rng: np.random.Generator, n: int, uniform: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                             np.ndarray]:
    """Page memory holding `n` frames (real 64-byte frames, random bytes, and runts shorter than the MACs)
    at the headroom or at random offsets, and their page ids, offsets and lengths."""
    npages = 2 * n + 3
    mem = rng.integers(0, 256, size=(npages, PAGE), dtype=np.uint8)
    pages = rng.choice(npages, size=n, replace=False).astype(np.int64)
    lens = rng.integers(0, 200, size=n).astype(np.int64)
    runts = rng.random(n) < 0.2
    lens[runts] = rng.integers(0, 12, size=int(runts.sum()))
    lens[::7] = 64
    lens[1::11] = 11  # one byte short of the two MACs
    offs = np.full(n, HEADROOM, dtype=np.int64) if uniform else rng.integers(0, PAGE - 200, size=n)
    frame = np.frombuffer(make_frame(), dtype=np.uint8)
    for k in range(0, n, 7):
        mem[pages[k], offs[k] : offs[k] + 64] = frame
    return mem, pages, offs.astype(np.int64), lens


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("xdp_drop", {}),
        ("xdp_pass", {}),
        ("xdp_tx", {}),
        ("l2fwd", {"egress": "eth1"}),
        ("l2fwd_cost", {"egress": "eth1", "cost_ns": 200}),
        ("l2fwd_map", {"tx_port": {"0": "eth1"}}),
        ("l2fwd_map", {"tx_port": {"1": "eth1"}}),  # slot 0 empty: every lookup misses
        ("redirect_cpu", {"cpu_map": {"1": 64}}),
        ("redirect_cpu", {"cpu_map": {"0": 8, "1": {"qsize": 64, "program": "emu.programs:cpumap_drop"}}}),
        ("cpumap_drop", {}),
        ("xdp_broadcast", {"tx_ports": {"0": "eth0", "1": "eth1"}}),
        ("xdp_broadcast", {"tx_ports": {"1": "eth1"}, "exclude_ingress": False}),
    ],
)
def test_vectorised_form_does_what_the_per_packet_body_does(
    loaded: Loader, name: str, params: dict, uniform: bool
) -> None:
    rng = np.random.default_rng(sum(map(ord, name)) + uniform + len(params.get("tx_port", {})))
    mem, pages, offs, lens = random_poll(rng, 300, uniform)
    assert (lens < 12).any() and (lens >= 12).any()
    spec = f"emu.programs:{name}"
    prog, ctx, ms = loaded(spec, params=params)
    vprog, vctx, vms = loaded(spec, params=params)
    assert vprog.batch is not None
    # The reference: the per-packet body, packet by packet, over one copy of the memory...
    ref = mem.copy()
    flat = memoryview(ref.reshape(-1))
    want_v, want_t = [], []
    for p, o, n in zip(pages.tolist(), offs.tolist(), lens.tolist(), strict=True):
        s = p * PAGE + o
        ctx.reset(flat[s : s + n])
        want_v.append(prog.fn(ctx))
        want_t.append(ctx.redirect_ifindex)
    # ...and the vectorised form, once, over another.
    got = mem.copy()
    pkts = XdpBatch(got, pages, offs, lens)
    res = classify_verdicts(vprog.batch(vctx, pkts), len(pages))
    assert res is not None
    verdicts, bad = res
    assert bad == 0
    assert verdicts.tolist() == want_v
    redirected = verdicts == XDP_REDIRECT
    assert pkts.redirect_ifindex[redirected].tolist() == np.asarray(want_t)[redirected].tolist()
    assert np.array_equal(got, ref)  # every byte: the frames changed alike and nothing outside them
    untouched = ("xdp_drop", "xdp_pass", "redirect_cpu", "cpumap_drop", "xdp_broadcast")  # programs that write nothing
    assert not np.array_equal(ref, mem) or name in untouched
    assert vms.snapshot() == ms.snapshot()


def test_xdp_batch_helpers(run_prefix: str) -> None:
    mem = np.zeros((4, PAGE), dtype=np.uint8)
    mem[:, 100:112] = np.arange(12, dtype=np.uint8)
    pkts = XdpBatch(mem, np.array([0, 1, 2, 3]), np.array([100, 100, 100, 100]), np.array([64, 5, 12, 0]))
    ok, rows = pkts.head(12)
    assert ok.tolist() == [True, False, True, False] and rows.shape == (2, 12)
    pkts.store_head(ok, rows[:, ::-1].copy())
    assert mem[0, 100:112].tolist() == list(range(11, -1, -1)) == mem[2, 100:112].tolist()
    assert mem[1, 100:112].tolist() == list(range(12))  # too short: untouched
    assert pkts.redirect(7, ok) == XDP_REDIRECT and pkts.redirect_ifindex.tolist() == [7, -1, 7, -1]
    # More bytes than a page holds from there: no packet is that long, none is selected, nothing raises.
    ok, rows = pkts.head(PAGE)
    assert not ok.any() and rows.shape == (0, PAGE)
    # Packets at different offsets: each read and written at its own.
    mixed = XdpBatch(mem, np.array([3, 1]), np.array([100, 40]), np.array([64, 64]))
    ok, rows = mixed.head(4)
    assert rows.tolist() == [[0, 1, 2, 3], [0, 0, 0, 0]]
    mixed.store_head(ok, np.array([[9, 9, 9, 9], [8, 8, 8, 8]], dtype=np.uint8))
    assert mem[3, 100:104].tolist() == [9] * 4 and mem[1, 40:44].tolist() == [8] * 4
    ms = MapSet.create(f"{run_prefix}-dev", {"tx": MapSpec("devmap", 4)}, 1)
    try:
        tx = ms["tx"]
        tx.update(1, 3)
        pkts = XdpBatch(mem, np.arange(4), np.full(4, 100), np.full(4, 64))
        v = pkts.redirect_map(tx, np.array([1, 0, 4, -1]), flags=XDP_PASS)
        assert v.tolist() == [XDP_REDIRECT, XDP_PASS, XDP_PASS, XDP_PASS]  # hit, empty, out of range
        assert pkts.redirect_ifindex.tolist() == [3, -1, -1, -1]
        v = pkts.redirect_map(tx, 1, np.array([False, True, False, True]))
        assert v.tolist() == [XDP_REDIRECT, XDP_REDIRECT] and pkts.redirect_ifindex.tolist() == [3, 3, -1, 3]
        assert pkts.redirect_map(tx, 1, flags=1 << 13).tolist() == [XDP_ABORTED] * 4  # not emulated
    finally:
        ms.unlink()
        ms.close()


@pytest.mark.parametrize(
    ("ret", "expected"),
    [
        (np.array([1, 2, 3]), ([1, 2, 3], 0)),
        ([4, 0, 1], ([4, 0, 1], 0)),
        (np.array([1, 9, -1], dtype=np.int8), ([1, 0, 0], 2)),  # unknown verdicts: ABORTED, counted
        (np.array([1, 2]), None),  # one short
        (np.array([[1, 2, 3]]), None),
        (np.array([True, False, True]), None),
        (np.array([1.0, 2.0, 3.0]), None),
        (None, None),
        ("abc", None),
        (3, None),
    ],
)
def test_classify_verdicts(ret: object, expected: tuple[list[int], int] | None) -> None:
    got = classify_verdicts(ret, 3)
    if expected is None:
        assert got is None
    else:
        assert got is not None and (got[0].tolist(), got[1]) == expected and got[0].dtype == np.int64


def test_page_spans_copy_whole_rows_and_refuse_bytes_outside_a_page() -> None:
    """`PageSpans` (one item per page for a byte range): a gather and a scatter are exactly the fancy-indexed
    copies they replace, in page order, repeats included, and a range past the page end is an error."""
    rng = np.random.default_rng(7)
    mem = rng.integers(0, 256, (32, PAGE), dtype=np.uint8)
    ref = mem.copy()
    spans = PageSpans(mem)
    pages = np.array([5, 0, 31, 5, 17], dtype=np.uint32)
    assert np.array_equal(spans.gather(pages, 100, 60), ref[pages.astype(np.int64), 100:160])
    rows = rng.integers(0, 256, (3, 60), dtype=np.uint8)
    spans.scatter(np.array([2, 9, 4]), PAGE - 60, rows)
    ref[[2, 9, 4], PAGE - 60 :] = rows
    assert np.array_equal(mem, ref)  # those bytes and no others
    spans.scatter(np.array([2]), 0, rows[:, :0][:1])  # zero bytes wide: nothing to do
    assert spans.gather(pages, 8, 0).shape == (5, 0) and np.array_equal(mem, ref)
    with pytest.raises(ValueError, match=f"not inside a {PAGE}-byte page"):
        spans.gather(pages, PAGE - 10, 11)
