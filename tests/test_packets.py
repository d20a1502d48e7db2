"""Unit tests for emu.net.packets: frame layout (checked with dpkt), verification, RSS, SeqTracker, Pacer."""

from __future__ import annotations

import zlib

import dpkt
import numpy as np
import pytest
from fakes import FakeClock
from hypothesis import given, settings
from hypothesis import strategies as st

from emu.net import packets
from emu.net.packets import (
    MAGIC,
    MAX_PORT,
    MIN_PKT_SIZE,
    PAYLOAD_OFF,
    PORT_SHIFT,
    FrameBatch,
    FrameFactory,
    Pacer,
    ScheduledPacer,
    SeqTracker,
    bytes_to_mac,
    mac_to_bytes,
    rss_hash,
    rss_queue,
    swap_macs,
    swap_macs_batch,
    verify_batch,
)

SRC = "02:00:00:00:00:01"
DST = "02:00:00:00:00:02"


def factory(size: int = 128, flows: int = 16, **kw: object) -> FrameFactory:
    return FrameFactory(size, flows, SRC, DST, **kw)  # type: ignore[arg-type]


def ip_checksum_ok(hdr: bytes) -> bool:
    words = np.frombuffer(hdr, dtype=">u2").astype(np.uint32)
    s = int(words.sum())
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


# -- layout -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [MIN_PKT_SIZE, 67, 128, 1514, 9000])
def test_frames_parse_as_ethernet_ipv4_udp(size: int) -> None:
    b = factory(size, flows=4).build(100, 8)
    assert len(b) == 8 and b.stride == size
    assert b.lengths.tolist() == [size] * 8
    for i, raw in enumerate(b.to_list()):
        eth = dpkt.ethernet.Ethernet(raw)
        assert bytes_to_mac(eth.src) == SRC and bytes_to_mac(eth.dst) == DST
        ip = eth.data
        assert isinstance(ip, dpkt.ip.IP)
        assert ip.len == size - 14 and ip.p == 17 and ip.hl == 5
        assert ip_checksum_ok(raw[14:34])
        udp = ip.data
        assert isinstance(udp, dpkt.udp.UDP)
        assert udp.sum == 0 and udp.ulen == size - 34 and udp.dport == 9
        seq = 100 + i
        assert udp.sport == 9 + seq % 4
        pl = raw[PAYLOAD_OFF:]
        assert int.from_bytes(pl[0:4], "little") == MAGIC
        assert int.from_bytes(pl[4:12], "little") == seq
        assert int.from_bytes(pl[12:14], "little") == seq % 4
        assert int.from_bytes(pl[14:16], "little") == size
        filler = pl[16:-4]
        assert filler == bytes((seq + j) & 0xFF for j in range(len(filler)))
        assert int.from_bytes(pl[-4:], "little") == zlib.crc32(pl[:-4])


def test_too_small_or_bad_arguments_refused() -> None:
    with pytest.raises(ValueError, match="pkt_size"):
        factory(MIN_PKT_SIZE - 1)
    with pytest.raises(ValueError, match="flows"):
        factory(flows=0)
    with pytest.raises(ValueError, match="MAC"):
        FrameFactory(128, 1, "02:00:00:00:00", DST)


def test_many_flows_move_to_the_next_source_address() -> None:
    f = factory(MIN_PKT_SIZE, flows=65536)
    b = f.build(65526, 2)  # flows 65526 (last port) and 65527 (first of the next address)
    a, c = (dpkt.ethernet.Ethernet(x).data for x in b.to_list())
    assert (a.data.sport, bytes(a.src)) == (65535, bytes([198, 18, 0, 1]))
    assert (c.data.sport, bytes(c.src)) == (9, bytes([198, 18, 0, 2]))
    assert ip_checksum_ok(b.to_list()[1][14:34])


@given(
    size=st.integers(MIN_PKT_SIZE, 300),
    start=st.integers(0, (1 << PORT_SHIFT) - 64),
    n=st.integers(0, 40),
    flows=st.integers(1, 300),
    port=st.sampled_from([0, 1, 2, MAX_PORT]),
)
@settings(max_examples=40, deadline=None)
def test_vectorised_crc_matches_zlib(size: int, start: int, n: int, flows: int, port: int) -> None:
    b = factory(size, flows, port=port).build(start, n)
    for raw in b.to_list():
        assert int.from_bytes(raw[-4:], "little") == zlib.crc32(raw[PAYLOAD_OFF:-4])
    r = verify_batch(b)
    assert (r.ok, r.corrupted, r.foreign) == (n, 0, 0)
    assert r.seqs.tolist() == list(range(start, start + n))
    assert r.flows.tolist() == [s % flows for s in range(start, start + n)]
    assert r.ports.tolist() == [port] * n


def test_the_sequence_space_is_48_bits_and_the_port_16() -> None:
    f = factory(64, 4, port=7)
    last = f.build((1 << PORT_SHIFT) - 1, 1)
    r = verify_batch(last)
    assert (r.ok, r.seqs.tolist(), r.ports.tolist()) == (1, [(1 << PORT_SHIFT) - 1], [7])
    with pytest.raises(ValueError, match="bad sequence range"):
        f.build(1 << PORT_SHIFT, 1)
    with pytest.raises(ValueError, match="port 65536 out of range"):
        factory(64, 4, port=MAX_PORT + 1)


@pytest.mark.parametrize(("pkt_size", "flows"), [(64, 64), (64, 1), (128, 100), (300, 7), (62, 3)])
def test_frames_from_the_period_block_are_the_frames_built_field_by_field(pkt_size: int, flows: int) -> None:
    f = FrameFactory(pkt_size, flows, "02:00:00:00:00:01", "02:00:00:00:00:02", port=pkt_size % 3)
    assert f._block is not None
    rng = np.random.default_rng(pkt_size + flows)
    for seq_start, n in [(0, 256), (255, 3), (f._period - 1, 2), (12345, 1024), (2**40 + 7, 300), (9, 0)]:
        got = f.build(seq_start, n)
        assert got.data.tobytes() == f._build_direct(seq_start, n).tobytes()
        assert verify_batch(got).ok == n
    for _ in range(20):
        seq_start, n = int(rng.integers(0, 2**PORT_SHIFT - 700)), int(rng.integers(0, 700))
        assert f.build(seq_start, n).data.tobytes() == f._build_direct(seq_start, n).tobytes()


def test_filler_differs_between_sequence_numbers() -> None:
    rows = factory(200).build(0, 3).rows()
    assert rows is not None
    assert not np.array_equal(rows[0, 62:-4], rows[1, 62:-4])


# -- verification -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pos", [PAYLOAD_OFF + 5, PAYLOAD_OFF + 9, PAYLOAD_OFF + 17, 70, 127])
def test_crc_catches_a_flipped_payload_byte(pos: int) -> None:
    b = factory(128).build(0, 4)
    b.data[128 + pos] ^= 0x01
    r = verify_batch(b)
    assert (r.ok, r.corrupted, r.foreign) == (3, 1, 0)
    assert r.good.tolist() == [True, False, True, True]
    assert r.seqs.tolist() == [0, 2, 3]


def test_a_broken_magic_is_foreign() -> None:
    b = factory(128).build(0, 2)
    b.data[PAYLOAD_OFF] ^= 0x01
    r = verify_batch(b)
    assert (r.ok, r.corrupted, r.foreign) == (1, 0, 1)


def test_headers_are_not_covered_and_mac_swap_keeps_frames_valid() -> None:
    b = factory(128).build(0, 4)
    swap_macs(b.frame(1))
    swap_macs_batch(b.data, b.offsets[2:])
    assert verify_batch(b).ok == 4
    eth = dpkt.ethernet.Ethernet(b.to_list()[2])
    assert bytes_to_mac(eth.src) == DST and bytes_to_mac(eth.dst) == SRC


def test_swap_macs_batch_matches_single_swaps() -> None:
    f = factory(100)
    a = FrameBatch.concat([f.build(0, 3), factory(150).build(3, 2)])
    b = FrameBatch.concat([a])
    swap_macs_batch(a.data, a.offsets, a.lengths)
    for i in range(len(b)):
        swap_macs(b.frame(i))
    assert np.array_equal(a.data, b.data)
    with pytest.raises(ValueError):
        swap_macs(memoryview(bytearray(8)))


def test_length_field_and_truncation_are_corruption_other_traffic_is_foreign() -> None:
    good = factory(128).build(0, 3).to_list()
    truncated = good[0][:100]
    short = good[1][:50]  # magic still there, no room for the rest
    lying = bytearray(good[2])
    lying[PAYLOAD_OFF + 16] = 64  # length field says 64
    arp = bytes(dpkt.ethernet.Ethernet(type=0x0806, data=b"\x00" * 28))
    b = FrameBatch.from_frames([truncated, short, bytes(lying), arp, b"\x01" * 10, good[1]])
    r = verify_batch(b)
    assert (r.ok, r.corrupted, r.foreign) == (1, 3, 2)
    assert r.seqs.tolist() == [1]


def test_verify_uniform_and_scattered_batches_agree() -> None:
    b = factory(90).build(7, 10)
    b.data[3 * 90 + 70] ^= 0xFF
    rev = FrameBatch(b.data, b.offsets[::-1].copy(), b.lengths[::-1].copy())
    assert rev.stride == 0
    r1, r2 = verify_batch(b), verify_batch(rev)
    assert (r1.ok, r1.corrupted) == (r2.ok, r2.corrupted) == (9, 1)
    assert r2.seqs.tolist() == r1.seqs.tolist()[::-1]
    assert verify_batch(FrameBatch.from_frames([])).ok == 0


def test_uniform_short_frames_are_foreign_or_corrupted() -> None:
    assert verify_batch(FrameBatch.from_frames([b"\x00" * 40] * 3)).foreign == 3
    raw = factory(128).build(0, 2).to_list()
    r = verify_batch(FrameBatch.from_frames([x[:60] for x in raw]))
    assert (r.ok, r.corrupted, r.foreign) == (0, 2, 0)


def test_frame_batch_checks_and_compaction() -> None:
    with pytest.raises(ValueError, match="outside"):
        FrameBatch(np.zeros(10, np.uint8), np.array([5]), np.array([6]))
    with pytest.raises(ValueError, match="uint8"):
        FrameBatch(np.zeros(10, np.int32), np.array([0]), np.array([1]))
    data = np.frombuffer(b"xxABCyyDEzz", dtype=np.uint8).copy()
    b = FrameBatch(data, np.array([7, 2]), np.array([2, 3]))
    assert not b.is_compact() and b.rows() is None
    c = b.compact()
    assert c.is_compact() and c.to_list() == [b"DE", b"ABC"] == b.to_list()
    assert bytes(b.frame(1)) == b"ABC" and b.nbytes == 5


def test_mac_helpers() -> None:
    assert mac_to_bytes("02-AA-bb-00-00-ff") == bytes([2, 0xAA, 0xBB, 0, 0, 0xFF])
    assert bytes_to_mac(mac_to_bytes(SRC)) == SRC
    for bad in ["02:00:00:00:00", "02:00:00:00:00:0g", "02:00-00:00:00:00", ""]:
        with pytest.raises(ValueError):
            mac_to_bytes(bad)
    with pytest.raises(ValueError):
        bytes_to_mac(b"\x00" * 5)


# -- RSS --------------------------------------------------------------------------------------------


def udp_frame(src: str, dst: str, sport: int, dport: int) -> bytes:
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=b"x" * 30)
    ip = dpkt.ip.IP(src=bytes(map(int, src.split("."))), dst=bytes(map(int, dst.split("."))), p=17, data=udp)
    return bytes(dpkt.ethernet.Ethernet(src=mac_to_bytes(SRC), dst=mac_to_bytes(DST), data=ip))


def test_toeplitz_matches_the_microsoft_verification_vectors() -> None:
    # Microsoft "Verifying the RSS Hash Calculation", IPv4 with ports.
    vectors = [
        ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x51CCC178),
        ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xC626B0EA),
        ("24.19.198.95", 12898, "12.22.207.184", 38024, 0x5C2B394A),
    ]
    frames = [udp_frame(s, d, sp, dp) for s, sp, d, dp, _ in vectors]
    assert rss_hash(FrameBatch.from_frames(frames)).tolist() == [v[-1] for v in vectors]


@pytest.mark.parametrize("nq", [2, 4])
def test_flows_spread_over_queues_and_stay_put(nq: int) -> None:
    f = factory(128, flows=64)
    q1 = rss_queue(f.build(0, 64), nq)
    counts = np.bincount(q1, minlength=nq)
    assert counts.min() >= 64 // nq // 2, counts
    q2 = rss_queue(f.build(64 * 5, 64), nq)  # same flows, other seqs
    assert np.array_equal(q1, q2)
    b = f.build(0, 64)
    swap_macs_batch(b.data, b.offsets)
    assert np.array_equal(rss_queue(b, nq), q1)
    scattered = FrameBatch(b.data, b.offsets[::-1].copy(), b.lengths.copy())
    assert np.array_equal(rss_queue(scattered, nq), q1[::-1])


def test_non_udp_frames_go_to_queue_zero() -> None:
    udp = udp_frame("10.0.0.1", "10.0.0.2", 1000, 2000)
    tcp = bytearray(udp)
    tcp[23] = 6
    frag = bytearray(udp)
    frag[20] |= 0x20  # MF
    arp = bytes(dpkt.ethernet.Ethernet(type=0x0806, data=b"\x00" * 28))
    b = FrameBatch.from_frames([bytes(tcp), bytes(frag), arp, b"\x00" * 20, udp])
    h = rss_hash(b)
    assert h[:4].tolist() == [0, 0, 0, 0] and h[4] != 0
    assert rss_queue(b, 1).tolist() == [0] * 5
    with pytest.raises(ValueError):
        rss_queue(b, 0)


# -- SeqTracker -------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [100, None])
def test_seq_tracker_duplicates_and_missing(count: int | None) -> None:
    t = SeqTracker(count)
    assert t.record(np.array([0, 1, 2, 3, 5], dtype=np.uint64)) == 0
    assert t.record(np.array([9, 8, 8, 3], dtype=np.uint64)) == 2  # 8 twice in the batch, 3 again
    assert (t.received, t.duplicates, t.unique) == (9, 2, 7)
    assert t.missing(10) == 3
    assert t.missing_seqs(10).tolist() == [4, 6, 7]
    assert not t.complete(10)
    t.record(np.array([4, 6, 7]))
    assert t.missing(10) == 0 and t.missing(12) == 2


@pytest.mark.parametrize("runs", [1, 2, 3, 8, 9, 40])
def test_seq_tracker_counts_like_a_set_whatever_the_order(runs: int) -> None:
    """Batches made of `runs` increasing runs (as a device with several TX queues sends them), with
    repeats inside a batch, across runs and across batches: every count matches a plain set's."""
    rng = np.random.default_rng(runs)
    t, seen, dups = SeqTracker(5000), set(), 0
    for _ in range(30):
        parts = [np.sort(rng.choice(5000, size=rng.integers(1, 60), replace=False)) for _ in range(runs)]
        batch = np.concatenate(parts).astype(np.uint64)
        expect = 0
        for x in batch.tolist():
            expect += x in seen
            seen.add(x)
        dups += expect
        assert t.record(batch) == expect
    assert (t.duplicates, t.unique) == (dups, len(seen))
    assert t.missing(5000) == 5000 - len(seen)


def test_seq_tracker_complete_out_of_range_and_growth() -> None:
    t = SeqTracker(1000)
    for start in range(0, 1000, 64):
        t.record(np.arange(start, min(start + 64, 1000), dtype=np.uint64)[::-1])
    assert t.complete(1000) and t.missing_seqs(1000).size == 0
    t.record(np.array([1000, 5000]))
    assert t.out_of_range == 2 and not t.complete(1000)
    g = SeqTracker()
    g.record(np.array([3_000_000, 7]))
    assert g.unique == 2 and g.missing(3_000_001) == 3_000_001 - 2
    g.record(np.array([1 << 40]))
    assert g.out_of_range == 1


# -- Pacer ------------------------------------------------------------------------------------------


def test_pacer_token_arithmetic() -> None:
    clk = FakeClock(1000.0)
    p = Pacer(1000, 10, clock=clk)
    assert p.next_burst() == 10  # starts full
    assert p.next_burst() == 0
    assert p.wait_hint() == pytest.approx(0.001)
    clk.t += 0.0005
    assert p.next_burst() == 0
    assert p.wait_hint() == pytest.approx(0.0005)
    clk.t += 0.0005
    assert p.next_burst() == 1 and p.wait_hint() == pytest.approx(0.001)
    clk.t += 1.0  # a long pause refills only up to the burst
    assert p.next_burst(limit=4) == 4 and p.next_burst() == 6 and p.next_burst() == 0
    clk.t -= 5.0  # a clock that steps back neither grants nor takes credit
    assert p.next_burst() == 0


@given(steps=st.lists(st.floats(0, 0.01), min_size=1, max_size=200), rate=st.integers(1, 100_000))
@settings(max_examples=60, deadline=None)
def test_pacer_never_exceeds_rate_over_any_window(steps: list[float], rate: int) -> None:
    clk = FakeClock(1000.0)
    burst = 32
    p = Pacer(rate, burst, clock=clk)
    sent: list[tuple[float, int]] = []
    for dt in steps:
        clk.t += dt
        sent.append((clk.t, p.next_burst(limit=4 * burst)))  # a sender that catches up when behind
    for i in range(len(sent)):
        total = 0
        for j in range(i, len(sent)):
            total += sent[j][1]
            # 1e-3: the pacer reads the clock in whole nanoseconds
            assert total <= p.cap + rate * (sent[j][0] - sent[i][0]) + 1e-3


def test_pacer_catches_up_within_its_backlog_and_counts_the_rest() -> None:
    """A sender slower than burst / rate is owed up to the backlog and gets it back in one call; what it
    owes past the backlog is lost and counted in `lag`, and sent + lag is exactly what the rate earned."""
    clk = FakeClock(1000.0)
    p = Pacer(100_000, 64, clock=clk, backlog_s=0.010)  # 1,000 packets of backlog
    assert p.cap == 1000
    assert p.next_burst() == 64  # the first call starts the clock, with one burst in the bucket
    clk.t += 0.002  # a pass of 2 ms (a burst is due every 0.64 ms): 200 owed
    assert p.next_burst() == 64  # one burst at a time unless asked for more
    assert p.next_burst(limit=10_000) == 136 and p.lag == 0
    clk.t += 0.050  # descheduled for 50 ms: 5,000 earned, 1,000 kept, 4,000 given up
    assert p.next_burst(limit=10_000) == 1000 and p.lag == 4000
    clk.t += 0.001
    assert p.next_burst(limit=10_000) == 100 and p.lag == 4000
    assert 64 + 200 + 1000 + 100 + p.lag == 64 + 5300  # the first burst, then 53 ms at 100 kpps


def test_pacer_time_before_the_first_call_earns_nothing() -> None:
    """A pacer made long before START (the traffic port makes it at start-up) owes nothing for that time."""
    clk = FakeClock(1000.0)
    p = Pacer(1000, 10, clock=clk)
    clk.t += 5.0
    assert p.next_burst(limit=1000) == 10 and p.lag == 0
    clk.t += 1.0  # now it runs: 1,000 earned, 10 kept (the backlog is at least a burst)
    assert p.next_burst(limit=1000) == 10 and p.lag == 990


def test_schedule_lag_counts_only_phases_with_a_rate() -> None:
    clk = FakeClock(1000.0)
    p = ScheduledPacer([(10_000, 100_000), (0, 100_000), (10_000, 100_000)], burst=10, clock=clk)
    assert p.next_burst(limit=1000) == 10
    clk.t += 0.050  # 500 earned in phase 0, backlog 100
    assert p.next_burst(limit=1000) == 100 and p.lag == 400
    clk.t += 0.100  # 500 more until the idle phase (100 kept), nothing while idle
    assert p.next_burst(limit=1000) == 0 and p.phase == 1 and p.lag == 800
    clk.t += 0.060  # 10 ms into phase 2: 100 earned, plus the 100 kept from phase 0
    assert p.next_burst(limit=1000) == 100 and p.lag == 900


def test_pacer_unlimited() -> None:
    p = Pacer(0, 64, clock=FakeClock(1000.0))
    assert [p.next_burst() for _ in range(3)] == [64, 64, 64]
    assert p.wait_hint() == 0.0 and p.next_burst(limit=5) == 5
    with pytest.raises(ValueError):
        Pacer(-1, 1)
    with pytest.raises(ValueError):
        Pacer(1, 0)


def run_schedule(p: ScheduledPacer, clk: FakeClock, step: float, until: float) -> list[tuple[float, int, int]]:
    """Call `p` every `step` seconds of fake time until `until`: (time, phase, packets granted) per call."""
    out = []
    while clk.t < until:
        n = p.next_burst()
        out.append((clk.t, p.phase, n))
        clk.t = round(clk.t + step, 9)
    return out


def test_schedule_phases_follow_the_clock_and_end() -> None:
    clk = FakeClock(1000.0)
    p = ScheduledPacer([(1000, 100_000), (0, 50_000), (4000, 50_000)], burst=10, clock=clk)
    assert p.phase == -1 and not p.finished and p.rate == 0
    calls = run_schedule(p, clk, 0.001, 1000.3)
    by_phase: dict[int, int] = {}
    for _, phase, n in calls:
        by_phase[phase] = by_phase.get(phase, 0) + n
    # Phase 0 (100 ms at 1000 pps, calls at 0..99 ms): the full bucket, then one packet a millisecond;
    # the 1 earned between the last call (99 ms) and the boundary is kept through the idle phase, which
    # sends nothing and earns nothing; phase 2 (50 ms at 4000 pps, calls at 150..199 ms) adds 4 a
    # millisecond for 49 ms.  The 4 earned in its last millisecond are never asked for: at 200 ms the
    # schedule is over.
    assert by_phase[0] == 10 + 99
    assert by_phase[1] == 0
    assert by_phase[2] == 1 + 4 * 49
    assert p.finished and by_phase[3] == 0 and p.rate == 0 and p.next_burst() == 0
    # Boundaries at 100 and 150 ms after the first call, at the calls that reached them.
    first = {phase: t for t, phase, _ in reversed(calls)}
    assert first[1] == pytest.approx(1000.1) and first[2] == pytest.approx(1000.15)
    assert first[3] == pytest.approx(1000.2)


def test_schedule_wait_hint_sleeps_through_idle_phases() -> None:
    clk = FakeClock(1000.0)
    p = ScheduledPacer([(0, 20_000), (100, 10_000)], burst=4, clock=clk)
    assert p.next_burst() == 0 and p.wait_hint() == pytest.approx(0.02)
    clk.t += 0.02
    assert p.next_burst() == 4 and p.wait_hint() == pytest.approx(0.01)  # next token in 10 ms = phase end
    clk.t += 0.011
    assert p.next_burst() == 0 and p.finished and p.wait_hint() == 1.0


def test_schedule_applies_missed_boundaries_at_their_time() -> None:
    """A caller that sleeps through several phases is granted what their rates allow, no more: the rate of
    each phase is in force exactly for its length, whenever the boundary is noticed."""
    clk = FakeClock(1000.0)
    p = ScheduledPacer([(1000, 5_000), (2000, 5_000), (0, 5_000), (1000, 30_000)], burst=1000, clock=clk)
    assert p.next_burst() == 1000  # the bucket starts full
    clk.t += 0.012  # past the first two phases, into the idle one: earned 5 + 10 packets, no more
    assert p.next_burst() == 0 and p.phase == 2
    clk.t += 0.005  # into the last phase: 2 ms at 1000 pps
    assert p.next_burst() == 15 + 2 and p.phase == 3


@given(phases=st.lists(st.tuples(st.sampled_from([0, 1, 500, 20_000]), st.integers(1, 20_000)), min_size=1,
                       max_size=6),
       steps=st.lists(st.floats(0, 0.01), min_size=1, max_size=100))
@settings(max_examples=60, deadline=None)
def test_schedule_never_exceeds_its_phases(phases: list[tuple[int, int]], steps: list[float]) -> None:
    clk = FakeClock(1000.0)
    burst = 8
    p = ScheduledPacer(phases, burst, clock=clk)
    total = 0
    for dt in steps:
        total += p.next_burst()
        clk.t += dt
    total += p.next_burst()
    # The guarantee the traffic port documents: a burst plus the phases' rate x length (1e-3: whole ns).
    assert total <= burst + sum(r * us / 1e6 for r, us in phases) + 1e-3 * len(phases)


def test_schedule_refuses_empty_and_bad_phases() -> None:
    with pytest.raises(ValueError, match="at least one phase"):
        ScheduledPacer([], 1)
    with pytest.raises(ValueError, match="length > 0"):
        ScheduledPacer([(10, 0)], 1)
    with pytest.raises(ValueError, match="rate must be >= 0"):
        ScheduledPacer([(-1, 10)], 1)


def test_pacer_set_rate_at_a_past_boundary() -> None:
    clk = FakeClock(1000.0)
    p = Pacer(1000, 100, clock=clk)
    assert p.next_burst() == 100
    clk.t += 0.010
    p.set_rate(10_000, at=clk.t - 0.005)  # noticed 5 ms late: 5 ms at 1000 pps, then 5 ms at 10 000
    assert p.next_burst() == 5 + 50
    unlimited = Pacer(0, 16, clock=clk)
    unlimited.set_rate(1000)
    assert unlimited.next_burst() == 16 and unlimited.next_burst() == 0


@pytest.mark.parametrize("size", [62, 64, 94, 95, 128])
def test_table_crc_and_zlib_agree_on_every_flipped_bit(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Short uniform frames are verified with per-position CRC tables, longer ones with zlib: both must
    catch the same corruption, wherever in the CRC'd payload it is."""
    f = FrameFactory(size, 8, "02:00:00:00:00:01", "02:00:00:00:00:02")
    batch = f.build(1000, 64)
    rows = batch.rows()
    rng = np.random.default_rng(size)
    flips = rng.integers(packets.PAYLOAD_OFF + 4, size, 20)  # past the magic: ours, but corrupted
    for k, pos in enumerate(flips.tolist()):
        rows[k, pos] ^= 1 << (k % 8)
    verdicts = []
    for vmax in (packets._CRC_VECTOR_MAX, 0):
        monkeypatch.setattr(packets, "_CRC_VECTOR_MAX", vmax)
        r = verify_batch(batch)
        verdicts.append(r.good.tolist())
        assert r.ok == 64 - 20 and r.corrupted == 20
    assert verdicts[0] == verdicts[1]


def test_slice_of_uniform_and_mixed_batches() -> None:
    uniform = FrameFactory(64, 4, "02:00:00:00:00:01", "02:00:00:00:00:02").build(0, 10)
    mixed = FrameBatch.from_frames([bytes([i]) * (60 + i) for i in range(10)])
    for batch in (uniform, mixed):
        for start, stop in ((0, 10), (3, 7), (9, 10), (4, 4), (8, 20)):
            part = batch.slice(start, stop)
            assert part.to_list() == batch.to_list()[start:stop]
            assert part.is_compact() or not batch.stride
    assert uniform.slice(3, 7).stride == 64 and uniform.slice(3, 7).rows().shape == (4, 64)
