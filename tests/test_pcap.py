"""pcap replay, golden files and imix: reading and writing capture files, the replay source's timing and
loops, recognising replayed frames by content, golden comparisons, imix sizes, refusing bad files at
validation (FILE:LINE naming the capture and the frame, exit 2), and whole runs of the bundled example.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from pcap_frames import TS0, expected_l2fwd, sample_frames, swap_macs, udp4

from emu import cli
from emu.net.imix import ImixFactory, imix_pattern
from emu.net.packets import MIN_PKT_SIZE, verify_batch
from emu.net.pcap import PcapError, PcapngWriter, read_frames, write_pcap
from emu.net.replay import ReplayIndex, ReplaySource, compare, content_key, prepare_frames
from emu.topology.file import IMIX, load_topology
from emu.topology.model import TopologyError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "topology" / "replay.yaml"


# -- capture files ----------------------------------------------------------------------------------


def test_pcap_round_trip_keeps_bytes_and_timestamps(tmp_path: Path) -> None:
    frames = sample_frames()
    ts = [TS0 + k * 1_000_000 for k in range(len(frames))]
    write_pcap(tmp_path / "a.pcap", frames, ts)
    got = read_frames(tmp_path / "a.pcap")
    assert got.frames == frames and got.ts_ns == ts


def test_pcap_in_nanoseconds_and_big_endian(tmp_path: Path) -> None:
    frame = udp4()
    hdr = struct.pack(">IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1)
    rec = struct.pack(">IIII", 5, 123, len(frame), len(frame)) + frame
    (tmp_path / "ns.pcap").write_bytes(hdr + rec)
    got = read_frames(tmp_path / "ns.pcap")
    assert got.frames == [frame] and got.ts_ns == [5_000_000_123]


def test_pcapng_written_here_reads_back(tmp_path: Path) -> None:
    with open(tmp_path / "a.pcapng", "wb") as f:
        w = PcapngWriter(f)
        w.add_interface("eth0", 65535)
        w.add_interface("eth1", 65535)
        w.packet(0, 1_000, b"\x01" * 60, 60, queue=1, verdict=3, comment="cpu 0")
        w.packet(1, 2_000, b"\x02" * 61, 61, flags=2)
    got = read_frames(tmp_path / "a.pcapng")
    assert got.frames == [b"\x01" * 60, b"\x02" * 61] and got.ts_ns == [1_000, 2_000]


def _pcapng_one(linktype: int, frame: bytes) -> bytes:
    def block(t: int, body: bytes) -> bytes:
        return struct.pack("<II", t, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))

    shb = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    idb = block(1, struct.pack("<HHI", linktype, 0, 0))
    epb = block(6, struct.pack("<IIIII", 0, 0, 7, len(frame), len(frame)) + frame + bytes(-len(frame) % 4))
    return shb + idb + epb


@pytest.mark.parametrize(("data", "message"), [
    (b"", "too short for a header"),
    (b"\x00" * 40, "not a pcap or pcapng file (magic 0x00000000)"),
    (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 113), "link type 113 (LINUX_SLL (cooked)) is not Ethernet"),
    (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + struct.pack("<IIII", 0, 0, 60, 60) + bytes(60)
     + struct.pack("<IIII", 0, 0, 60, 60) + bytes(10), "frame 2: truncated: 60 bytes announced, 10 left"),
    (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + bytes(7), "frame 1: truncated record header"),
    (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 96, 1) + struct.pack("<IIII", 0, 0, 60, 1514) + bytes(60),
     "frame 1: captured 60 of its 1514 bytes (snap length)"),
    (_pcapng_one(101, bytes(60)), "frame 1: interface 0 has link type 101 (RAW (IP)), not Ethernet"),
    (_pcapng_one(1, bytes(60))[:-9], "frame 1: truncated block"),
])
def test_bad_capture_files_are_refused_naming_file_and_frame(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.pcap"
    path.write_bytes(data)
    with pytest.raises(PcapError) as e:
        read_frames(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_missing_capture_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PcapError, match="no such capture file"):
        read_frames(tmp_path / "nope.pcap")


def test_bundled_example_is_what_the_crafting_module_makes() -> None:
    frames = sample_frames()
    assert read_frames(ROOT / "topology/pcap/l2fwd-in.pcap").frames == frames
    assert read_frames(ROOT / "topology/pcap/l2fwd-expected.pcap").frames == expected_l2fwd(frames, 4096 - 256)


# -- replaying ---------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _prep(n: int = 4, gap_ns: int = 1_000_000, max_frame: int = 3840):
    from emu.net.pcap import PcapFrames

    frames = [udp4(bytes([k]) * 10) for k in range(n)]
    return prepare_frames(PcapFrames("x", frames, [TS0 + k * gap_ns for k in range(n)]), max_frame)


def test_original_timing_sends_each_frame_at_its_offset_loop_after_loop() -> None:
    clock = Clock()
    src = ReplaySource(_prep(4, 1_000_000), loop=2, timing="original", rate=0, burst=64, clock=clock)
    sent = []
    batch, k, _ = src.next_batch(256)
    sent.append(k)  # t=0: the first frame
    assert k == 1 and len(batch) == 1
    clock.t += 0.0015
    sent.append(src.next_batch(256)[1])  # 1.5 ms: the second
    clock.t += 0.002
    sent.append(src.next_batch(256)[1])  # 3.5 ms: third and fourth; the loop ends
    assert sent == [1, 1, 2] and src.loops_done == 1 and not src.finished
    assert src.next_batch(256)[1] == 0  # the second loop starts one mean gap after the last frame
    clock.t += 0.001
    assert src.next_batch(256)[1] == 1
    clock.t += 1.0
    assert src.next_batch(256)[1] == 3 and src.finished
    assert src.next_batch(256) == (None, 0, 0)


def test_rate_timing_paces_with_the_token_bucket() -> None:
    clock = Clock()
    src = ReplaySource(_prep(100), loop=0, timing="rate", rate=1000, burst=10, clock=clock)
    assert src.next_batch(256)[1] == 10  # the bucket starts full
    assert src.next_batch(256)[1] == 0
    clock.t += 0.005
    assert src.next_batch(256)[1] == 5


def test_frames_that_do_not_fit_are_skipped_and_counted() -> None:
    from emu.net.pcap import PcapFrames

    frames = [udp4(), bytes(8), udp4(bytes(2000)), udp4()]
    prep = prepare_frames(PcapFrames("x", frames, [0, 1, 2, 3]), 1000, dst_mac="02:00:00:00:00:09")
    assert prep.oversize == 1 and prep.runts == 1
    assert prep.frames[0][:6] == bytes.fromhex("020000000009") and prep.frames[1] == bytes(8)  # a runt has no MAC
    src = ReplaySource(prep, loop=1, timing="rate", rate=0, burst=64)
    batch, k, skipped = src.next_batch(256)
    assert k == 4 and skipped == 2 and len(batch) == 2
    assert src.skipped == {"runt": 1, "oversize": 1}


def test_index_knows_replayed_frames_by_content_after_the_macs() -> None:
    frames = [udp4(b"a"), udp4(b"b"), udp4(b"a")]
    idx = ReplayIndex()
    idx.add(frames, 2)  # each occurrence may arrive twice (loop 2): "a" four times, "b" twice
    arrived = [swap_macs(f) for f in frames * 2] + [udp4(b"a"), udp4(b"zz")]
    known, dups = idx.classify(arrived)
    assert known == 7 and dups == 1
    assert content_key(udp4(b"a")) == content_key(swap_macs(udp4(b"a")))


def test_compare_as_multiset_and_in_order() -> None:
    a, b, c = udp4(b"a"), udp4(b"b"), udp4(b"c")
    assert compare([a, b], [b, a], ordered=False)["match"]
    res = compare([a, b], [b, a], ordered=True)
    assert not res["match"] and res["missing"] == 2 and res["unexpected"] == 2
    assert res["differences"][0].startswith("frame 0: offset ")
    res = compare([a, b, c], [a, swap_macs(b)], ordered=False)
    assert (res["missing"], res["unexpected"]) == (2, 1)
    assert res["differences"][0].startswith("expected frame 1 vs arrived frame 1: offset 3: expected 00 00 02")
    assert "expected frame 2: never arrived" in res["differences"]


# -- imix --------------------------------------------------------------------------------------------


def test_imix_pattern_is_exact_over_a_period() -> None:
    pat = imix_pattern(IMIX)
    counts = np.bincount(pat)
    assert counts.tolist() == [7 * 21, 4 * 21, 21]  # 256 // 12 = 21 periods of 7:4:1


def test_imix_frames_verify_and_follow_the_mix() -> None:
    f = ImixFactory(IMIX, 16, "02:00:00:ff:00:01", "02:00:00:00:00:02")
    batch = f.build(1000, 2 * f.period)
    res = verify_batch(batch)
    assert res.ok == len(batch) and res.seqs.tolist() == list(range(1000, 1000 + 2 * f.period))
    sizes = np.bincount(batch.lengths.astype(np.int64), minlength=1519)
    assert (sizes[64], sizes[570], sizes[1518]) == (2 * 7 * 21, 2 * 4 * 21, 2 * 21)
    assert f.build(1000 + 5, 3).to_list() == batch.slice(5, 8).to_list()  # a frame's size depends on seq only


# -- topology files ----------------------------------------------------------------------------------


def _topo(tmp_path: Path, traffic: str, page_size: int = 4096, mtu: int | None = 3500) -> Path:
    """A generator or replay port into l2fwd on a host of `page_size` pages; both devices of MTU `mtu` (None:
    the default), 3500 taking the sample capture's 3000-byte frame on 4 KiB pages."""
    m = "" if mtu is None or page_size != 4096 else f"mtu: {mtu}, "
    text = f"""name: t
hosts:
  h1:
    cpus: 1
    pages: 1024
    page_size: {page_size}
    devices:
      eth0: {{ifindex: 2, {m}rx_ring_size: 256, xdp: {{program: "emu.programs:l2fwd", params: {{egress: eth1}}}}}}
      eth1: {{ifindex: 3, {m}rx_ring_size: 256}}
traffic:
{traffic}
links:
  - endpoints: ["gen0", "h1:eth0"]
  - endpoints: ["h1:eth1", "sink0"]
"""
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


def test_replay_keys_are_read_relative_to_the_topology(tmp_path: Path) -> None:
    write_pcap(tmp_path / "in.pcap", sample_frames())
    path = _topo(tmp_path, """  gen0:
    replay: {pcap: in.pcap, loop: 3, timing: rate, rate: 10kpps, rewrite: {dst_mac: "02:00:00:00:00:02"}}
  sink0: {expect: {pcap: in.pcap, ordered: true}}""", page_size=2048)
    topo = load_topology(path)
    rp = topo.traffic["gen0"].replay
    assert rp is not None and rp.pcap == str(tmp_path / "in.pcap") and rp.loop == 3 and rp.rate == 10_000
    assert rp.max_frame == 1454 + 18 and rp.dst_mac == "02:00:00:00:00:02" and rp.src_mac is None
    assert topo.traffic["sink0"].expect.ordered
    from emu.topology.model import topology_from_dict

    assert topology_from_dict(json.loads(json.dumps(topo.to_dict()))) == topo


@pytest.mark.parametrize(("pkt_size", "mix"), [("imix", IMIX), ("[[64, 3], [1000, 1]]", ((64, 3), (1000, 1)))])
def test_pkt_size_imix(tmp_path: Path, pkt_size: str, mix: tuple) -> None:
    path = _topo(tmp_path, f"  gen0: {{generate: {{pkt_size: {pkt_size}}}}}\n  sink0: {{}}")
    gen = load_topology(path).traffic["gen0"].generate
    assert gen.imix == mix and gen.pkt_size == max(s for s, _ in mix)


@pytest.mark.parametrize(("traffic", "message"), [
    ("  gen0: {replay: {pcap: nope.pcap}}", "t.yaml:11: gen0: replay: 'pcap': {d}/nope.pcap: no such capture file"),
    ("  gen0: {replay: {pcap: bad.pcap}}", "t.yaml:11: gen0: replay: 'pcap': {d}/bad.pcap: frame 2: truncated"),
    ("  gen0: {replay: {pcap: sll.pcap}}", "t.yaml:11: gen0: replay: 'pcap': {d}/sll.pcap: link type 113"),
    ("  gen0: {replay: {pcap: good.pcap}, generate: {}}", "t.yaml:11: gen0: 'replay' and 'generate' are mutually"),
    ("  gen0: {replay: {pcap: good.pcap, rate: 5}}", "t.yaml:11: gen0: replay: 'rate' needs 'timing: rate'"),
    ("  gen0: {generate: {}}\n  sink0: {expect: {pcap: nope.pcap}}", "t.yaml:12: sink0: expect: 'pcap': "),
    ("  gen0: {generate: {pkt_size: [[64, 1], [30, 1]]}}", "t.yaml:11: gen0: generate: 'pkt_size' entry 1: size"),
    ("  gen0: {generate: {pkt_size: imix}}", "t.yaml:11: gen0: generate: 'pkt_size' 1518 is longer than"),
])
def test_bad_replay_inputs_exit_2_naming_the_file(tmp_path: Path, traffic: str, message: str, capsys) -> None:
    frame = udp4()
    write_pcap(tmp_path / "good.pcap", [frame])
    (tmp_path / "bad.pcap").write_bytes((tmp_path / "good.pcap").read_bytes() + struct.pack("<IIII", 0, 0, 60, 60))
    (tmp_path / "sll.pcap").write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 113))
    if "sink0" not in traffic:
        traffic += "\n  sink0: {}"
    path = _topo(tmp_path, traffic, page_size=1024)
    with pytest.raises(TopologyError):
        load_topology(path)
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"{tmp_path}/" + message.format(d=tmp_path)), err


def test_min_pkt_size_still_holds_for_a_mix() -> None:
    with pytest.raises(ValueError):
        ImixFactory([(MIN_PKT_SIZE - 1, 1)], 1, "02:00:00:ff:00:01", "02:00:00:00:00:02")


# -- whole runs --------------------------------------------------------------------------------------


def _run(path: Path, **kw) -> dict:
    from emu.run.coordinator import Run, RunOptions

    out = io.StringIO()
    report = Run(load_topology(path), RunOptions(interval=0.5, out=out, **kw)).run()
    report["_out"] = out.getvalue()
    return report


@pytest.mark.slow
def test_bundled_example_replays_and_matches() -> None:
    r = _run(EXAMPLE)
    t = r["traffic"]
    assert t["unaccounted"] == 0 and t["corrupted"] == 0 and t["duplicates"] == 0, t
    assert t["generated"] == 11 == t["delivered"] + t["dropped"] + t["consumed"]
    assert t["drops"]["traffic.replay_oversize"] == 1 and t["drops"]["traffic.replay_runt"] == 1
    sink = t["ports"]["sink0"]
    assert sink["replayed"] == 9 and sink["foreign"] == 0
    assert sink["expect"]["match"] and sink["expect"]["missing"] == sink["expect"]["unexpected"] == 0
    assert "expect   sink0: match against l2fwd-expected.pcap" in r["_out"]
    assert cli.report_status(r) == 0


@pytest.mark.slow
def test_a_golden_mismatch_names_the_first_differences_and_fails(tmp_path: Path) -> None:
    frames = sample_frames()
    write_pcap(tmp_path / "in.pcap", frames)
    # Expected: what l2fwd sends, but frame 2 of it with a changed byte 20 and the last frame left out.
    exp = expected_l2fwd(frames, 3840)
    exp[2] = exp[2][:20] + bytes([exp[2][20] ^ 0xFF]) + exp[2][21:]
    write_pcap(tmp_path / "exp.pcap", exp[:-1])
    path = _topo(tmp_path, """  gen0: {replay: {pcap: in.pcap, loop: 2, timing: rate}}
  sink0: {expect: {pcap: exp.pcap}}""")
    r = _run(path)
    t = r["traffic"]
    assert t["unaccounted"] == 0 and t["generated"] == 22 and t["delivered"] == 18 and t["duplicates"] == 0
    res = t["ports"]["sink0"]["expect"]
    # 18 arrived (9 twice); 16 expected; frame 2 changed: 2 missing (its two copies), 4 unexpected.
    assert (res["match"], res["expected"], res["received"]) == (False, 8, 18)
    assert res["missing"] == 1 + 0 and res["unexpected"] == 11
    assert any("offset 20" in d for d in res["differences"]), res["differences"]
    assert "MISMATCH" in r["_out"] and cli.report_status(r) == 1


@pytest.mark.slow
def test_imix_run_delivers_every_packet(tmp_path: Path) -> None:
    path = _topo(tmp_path, "  gen0: {generate: {pkt_size: imix, count: 5000}}\n  sink0: {}")
    r = _run(path)
    t = r["traffic"]
    assert t["generated"] == 5000 and t["unaccounted"] == 0 and t["corrupted"] == 0 and t["duplicates"] == 0
    # The first 5000 frames of the pattern: exact per period, the last partial period's by its runs.  (On a
    # machine so loaded that a queue finds no buffer for a second, the device drops frames, rx_dropped:
    # accounted for, but then which sizes arrived is not known.)
    pat = imix_pattern(IMIX)
    sizes = np.array([s for s, _ in IMIX])[pat[np.arange(5000) % len(pat)]]
    if t["dropped"] == 0:
        assert t["delivered"] == 5000 and t["ports"]["sink0"]["rx_bytes"] == int(sizes.sum())
    else:
        assert t["dropped"] == t["drops"]["device.rx_dropped"]


@pytest.mark.parametrize("loop", [-1, 2**32 + 1])
def test_replay_loop_bounds(tmp_path: Path, loop: int) -> None:
    write_pcap(tmp_path / "in.pcap", [udp4()])
    path = _topo(tmp_path, f"  gen0: {{replay: {{pcap: in.pcap, loop: {loop}}}}}\n  sink0: {{}}")
    with pytest.raises(TopologyError, match=r"t.yaml:11: gen0: replay: 'loop' must be between 0 and 4294967296"):
        load_topology(path)


def test_dpkt_reads_what_we_write(tmp_path: Path) -> None:
    """Cross-check with dpkt's readers: the classic pcap file and the xdpdump-style pcapng."""
    import dpkt

    frames = sample_frames()
    ts = [TS0 + k * 1_000_000 for k in range(len(frames))]
    write_pcap(tmp_path / "a.pcap", frames, ts)
    with open(tmp_path / "a.pcap", "rb") as f:
        got = list(dpkt.pcap.Reader(f))
    assert [bytes(b) for _, b in got] == frames
    assert [round(t * 1e6) for t, _ in got] == [t // 1000 for t in ts]
    with open(tmp_path / "a.pcapng", "wb") as f:
        w = PcapngWriter(f)
        w.add_interface("eth0:l2fwd()@fentry:rxq0", 65535, "h1:eth0 ifindex 2")
        for k, fr in enumerate(frames):
            w.packet(0, ts[k], fr, len(fr), flags=1, queue=0, packetid=k + 1, comment="cpu 0")
    with open(tmp_path / "a.pcapng", "rb") as f:
        assert [bytes(b) for _, b in dpkt.pcapng.Reader(f)] == frames
