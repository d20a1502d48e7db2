"""xdpdump-style capture, checked with Debian's tshark: crafted frames (tests/pcap_frames.py: VLAN, QinQ,
IPv6 with extension headers, TCP with options, IPv4 fragments, ARP, a jumbo frame) replayed through the
bundled programs, captured at XDP entry, exit and transmit, and read back by tshark: frame counts per
file, the interface, queue, verdict and packet-id fields, time order, and bytes equal to what the program
should have written.  Also: the capture ring's bound (drops counted, never a wait), the snap length, and
bad ``--capture`` arguments refused with exit status 2.

tshark is installed by run-tests.sh when missing; these tests fail (they do not skip) without it.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pcap_frames import sample_frames, swap_macs

from emu import cli
from emu.datapath.capture import CAP_DTYPE, ENTRY, EXIT, CaptureTap, TapDevice, decode_record
from emu.net.packets import FrameBatch, rss_queue
from emu.net.pcap import PcapngWriter, read_frames, write_pcap
from emu.net.shmring import MsgRing
from emu.topology.file import load_topology
from emu.topology.model import max_frame

FIELDS = ("frame.number", "frame.interface_name", "frame.interface_description", "frame.interface_queue",
          "frame.packet_id", "frame.verdict.ebpf_xdp", "frame.comment", "frame.time_epoch",
          "frame.packet_flags_direction", "frame.len", "frame.cap_len", "frame.drop_count")


def tshark(path: Path) -> list[dict[str, str]]:
    exe = shutil.which("tshark")
    assert exe, "tshark is missing: install Debian's tshark (run-tests.sh does)"
    args = [exe, "-r", str(path), "-T", "fields", "-E", "separator=/t", "-E", "occurrence=f"]
    for f in FIELDS:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    return [dict(zip(FIELDS, line.split("\t"), strict=True)) for line in out.splitlines()]


def tshark_bytes(path: Path) -> list[bytes]:
    """Each frame's captured bytes, as tshark reads them (``-x`` would be text; a pcap re-export is exact)."""
    exe = shutil.which("tshark")
    assert exe, "tshark is missing: install Debian's tshark (run-tests.sh does)"
    out = path.with_suffix(".pcap")
    subprocess.run([exe, "-r", str(path), "-F", "pcap", "-w", str(out)], capture_output=True, timeout=120,
                   check=True)
    return read_frames(out, allow_cut=True).frames


# -- the tap and the file format ---------------------------------------------------------------------


def test_tap_records_round_trip_and_a_full_ring_counts_drops(run_prefix: str) -> None:
    ring = MsgRing.create(f"{run_prefix}-cap", 1 << 16)
    try:
        counters = [0, 0]
        tap = CaptureTap(MsgRing.attach(ring.seg.name), {"eth0": TapDevice(2, True, 100)}, 1, counters,
                         {"capture_packets": 0, "capture_drops": 1})
        data2d = np.arange(4 * 512, dtype=np.uint32).astype(np.uint8).reshape(4, 512)
        pages, offs, lens = np.array([1, 3]), np.array([256, 256]), np.array([60, 200])
        tap.xdp("eth0", 0, data2d, pages, offs, lens, ENTRY)
        tap.xdp("eth0", 0, data2d, pages, offs, lens, EXIT, np.array([4, 1]), np.array([3, -1]))
        tap.xdp("eth9", 0, data2d, pages, offs, lens, ENTRY)  # not captured
        entry, exit_ = decode_record(ring.get()), decode_record(ring.get())
        assert ring.get() is None and counters == [4, 0]
        assert entry.frames == [data2d[1, 256:316].tobytes(), data2d[3, 256:356].tobytes()]  # snap length 100
        assert entry.recs["len"].tolist() == [60, 200] and entry.recs["caplen"].tolist() == [60, 100]
        assert exit_.ref == entry.seq and exit_.recs["verdict"].tolist() == [4, 1]
        assert exit_.recs["target"].tolist() == [3, -1] and exit_.recs["cpu"].tolist() == [1, 1]
        # The writer fell behind: what does not fit is dropped and counted, and the next record says so.
        big = np.zeros((64, 512), np.uint8)
        for _ in range(8):
            tap.xdp("eth0", 0, big, np.arange(64), np.zeros(64, np.int64), np.full(64, 100), ENTRY)
        assert counters[1] > 0 and counters[0] + counters[1] == 4 + 8 * 64
        while ring.get() is not None:
            pass
        tap.xdp("eth0", 0, data2d, pages, offs, lens, ENTRY)
        assert decode_record(ring.get()).drops == counters[1]
        tap.close()
    finally:
        ring.unlink()
        ring.close()


def test_pcapng_fields_as_tshark_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "x.pcapng"
    with open(path, "wb") as f:
        w = PcapngWriter(f)
        i0 = w.add_interface("eth0:l2fwd()@fentry:rxq1", 128, "h1:eth0 ifindex 2, rx queue 1, XDP entry")
        i1 = w.add_interface("eth0:l2fwd()@fexit:rxq1", 128)
        w.packet(i0, 1_700_000_000_123_456_789, bytes(60), 60, flags=1, queue=1, packetid=7, comment="cpu 1")
        w.packet(i1, 1_700_000_000_123_456_790, bytes(100), 300, flags=1, queue=1, packetid=7, verdict=4,
                 dropcount=5, comment="cpu 1, redirect to ifindex 3 (eth1)")
    a, b = tshark(path)
    assert a["frame.interface_name"] == "eth0:l2fwd()@fentry:rxq1"
    assert a["frame.interface_description"] == "h1:eth0 ifindex 2, rx queue 1, XDP entry"
    assert (a["frame.interface_queue"], a["frame.packet_id"], a["frame.comment"]) == ("1", "7", "cpu 1")
    assert a["frame.time_epoch"] == "1700000000.123456789" and a["frame.verdict.ebpf_xdp"] == ""
    assert b["frame.verdict.ebpf_xdp"] == "4" and b["frame.drop_count"] == "5"
    assert (b["frame.len"], b["frame.cap_len"]) == ("300", "100")
    assert b["frame.comment"] == "cpu 1, redirect to ifindex 3 (eth1)"


# -- whole runs ------------------------------------------------------------------------------------------


def topo_file(tmp_path: Path, program: str, egress: bool, capture: str, cpus: int = 2) -> Path:
    params = ", params: {egress: eth1}" if egress else ""
    xdp = f'{{program: "emu.programs:{program}"{params}}}'
    (tmp_path / "t.yaml").write_text(f"""name: cap
hosts:
  h1:
    cpus: {cpus}
    pages: 4096
    page_size: 4096
    devices:
      eth0: {{ifindex: 2, mtu: 3500, rx_ring_size: 256, rx_queues: 2, xdp: {xdp}}}
      eth1: {{ifindex: 3, mtu: 3500, rx_ring_size: 256}}
traffic:
  gen0: {{replay: {{pcap: in.pcap, timing: rate}}}}
  sink0: {{}}
links:
  - endpoints: ["gen0", "h1:eth0"]
  - endpoints: ["h1:eth1", "sink0"]
{capture}
""")
    return tmp_path / "t.yaml"


def fitting(frames: list[bytes]) -> list[bytes]:
    """The frames a device of `topo_file` takes: MTU 3500 (the 3000-byte one fits, the 9000-byte not)."""
    return [f for f in frames if 14 <= len(f) <= max_frame(3500)]


def run(path: Path, **kw) -> dict:
    from emu.run.coordinator import Run, RunOptions

    return Run(load_topology(path), RunOptions(interval=0.5, out=io.StringIO(), **kw)).run()


def check_time_order(rows: list[dict[str, str]]) -> None:
    ts = [float(r["frame.time_epoch"]) for r in rows]  # ns resolution fits a float's 53 bits to ~0.2 us
    assert ts == sorted(ts)


@pytest.mark.slow
def test_l2fwd_capture_at_entry_exit_and_transmit(tmp_path: Path) -> None:
    frames = sample_frames()
    write_pcap(tmp_path / "in.pcap", frames)
    path = topo_file(tmp_path, "l2fwd", True, "capture: {devices: ['h1:eth0@exit', 'h1:eth1'], dir: caps}")
    r = run(path)
    assert r["traffic"]["unaccounted"] == 0 and r["traffic"]["delivered"] == 9
    assert {c["device"]: c["packets"] for c in r["capture"]} == {"h1:eth0": 18, "h1:eth1": 9}
    assert all(c["capture_drops"] == 0 for c in r["capture"])
    ins, outs = tmp_path / "caps" / "h1-eth0.pcapng", tmp_path / "caps" / "h1-eth1.pcapng"
    rows, data = tshark(ins), tshark_bytes(ins)
    assert len(rows) == 18 == len(data)
    check_time_order(rows)
    good = fitting(frames)
    queues = rss_queue(FrameBatch.from_frames(good), 2).tolist()
    entries = [(r, d) for r, d in zip(rows, data, strict=True) if "@fentry" in r["frame.interface_name"]]
    exits = [(r, d) for r, d in zip(rows, data, strict=True) if "@fexit" in r["frame.interface_name"]]
    assert sorted(d for _, d in entries) == sorted(good)  # the frames as they arrived
    assert sorted(d for _, d in exits) == sorted(swap_macs(f) for f in good)  # as l2fwd left them
    for r, d in entries:
        q = queues[good.index(d)]  # RSS: IPv4/UDP frames by their 4-tuple, the rest on queue 0
        assert r["frame.interface_queue"] == str(q) and r["frame.interface_name"].endswith(f":rxq{q}")
        assert r["frame.comment"] == f"cpu {q}" and r["frame.verdict.ebpf_xdp"] == ""
        assert int(r["frame.packet_flags_direction"], 0) == 1  # inbound
    ids = {r["frame.packet_id"]: d for r, d in entries}
    assert len(ids) == 9
    for r, d in exits:
        assert r["frame.verdict.ebpf_xdp"] == "4"  # XDP_REDIRECT
        assert r["frame.comment"].endswith("redirect to ifindex 3 (eth1)")
        assert swap_macs(ids[r["frame.packet_id"]]) == d  # the exit of the frame with that id
    tx = tshark(outs)
    assert len(tx) == 9 and all(r["frame.interface_name"].startswith("eth1:tx:txq") for r in tx)
    assert all(int(r["frame.packet_flags_direction"], 0) == 2 for r in tx)  # outbound
    check_time_order(tx)
    assert sorted(tshark_bytes(outs)) == sorted(swap_macs(f) for f in good)


@pytest.mark.slow
@pytest.mark.parametrize(("program", "verdict"), [("xdp_drop", "1"), ("xdp_tx", "3")])
def test_verdicts_of_other_programs(tmp_path: Path, program: str, verdict: str) -> None:
    frames = sample_frames()
    write_pcap(tmp_path / "in.pcap", frames)
    path = topo_file(tmp_path, program, False, "")
    cli_status = cli.main(["run", str(path), "-q", "--capture", "h1:eth0@exit", "--capture-dir", str(tmp_path / "c"),
                           "--snaplen", "64"])
    assert cli_status == 0  # every frame accounted for, as without a capture
    rows, data = tshark(tmp_path / "c" / "h1-eth0.pcapng"), tshark_bytes(tmp_path / "c" / "h1-eth0.pcapng")
    good = fitting(frames)
    exits = [r for r in rows if "@fexit" in r["frame.interface_name"]]
    assert len(exits) == 9 and all(r["frame.verdict.ebpf_xdp"] == verdict for r in exits)
    tx = [(r, d) for r, d in zip(rows, data, strict=True) if ":tx:" in r["frame.interface_name"]]
    # xdp_tx bounces every frame out of eth0 itself, MACs swapped; xdp_drop sends nothing.
    assert len(tx) == (9 if program == "xdp_tx" else 0)
    assert sorted(d for _, d in tx) == sorted(swap_macs(f)[:64] for f in good if program == "xdp_tx")
    for row in rows:  # the snap length: at most 64 bytes kept, the length on the wire intact
        assert int(row["frame.cap_len"]) == min(64, int(row["frame.len"]))
    check_time_order(rows)


@pytest.mark.parametrize(("args", "message"), [
    (["--capture", "h9:eth0"], "emu: --capture h9:eth0: no host 'h9'"),
    (["--capture", "h1:eth7"], "emu: --capture h1:eth7: host 'h1' has no device 'eth7'"),
    (["--capture", "h1:eth0@fentry"], "emu: --capture h1:eth0@fentry: the only capture point to add is '@exit'"),
    (["--capture", "h1:eth0", "--snaplen", "300000"], "emu: --snaplen 300000: at most 262144"),
    (["--capture-dir", "x"], "emu: --capture-dir/--snaplen without a device to capture"),
])
def test_bad_capture_arguments_exit_2(tmp_path: Path, args: list[str], message: str, capsys) -> None:
    write_pcap(tmp_path / "in.pcap", sample_frames())
    path = topo_file(tmp_path, "l2fwd", True, "")
    assert cli.main(["run", str(path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(message), err


def test_capture_key_is_checked_at_its_line(tmp_path: Path) -> None:
    write_pcap(tmp_path / "in.pcap", sample_frames())
    path = topo_file(tmp_path, "l2fwd", True, "capture: {devices: ['h1:eth0', 'h1:eth0@exit']}")
    from emu.topology.model import TopologyError

    with pytest.raises(TopologyError, match=r"t.yaml:16: capture: 'h1:eth0@exit' is listed twice"):
        load_topology(path)
    ok = topo_file(tmp_path, "l2fwd", True, "capture: {devices: ['h1:eth1'], snaplen: 96}")
    cfg = load_topology(ok).capture
    assert cfg is not None and cfg.devices == (("h1", "eth1", False),) and cfg.snaplen == 96
    assert cfg.dir == str(tmp_path)


def test_cap_dtype_is_packed() -> None:
    assert CAP_DTYPE.itemsize == 32  # the record layout the writer reads: no hidden padding


@pytest.mark.slow
def test_emu_capture_prints_a_line_per_frame(tmp_path: Path, capsys) -> None:
    write_pcap(tmp_path / "in.pcap", sample_frames())
    path = topo_file(tmp_path, "l2fwd", True, "")
    status = cli.main(["capture", str(path), "h1:eth0@exit"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    out = captured.out.splitlines()
    assert len(out) == 18, (out, captured.err)
    entries = [x for x in out if "l2fwd()@entry: " in x]
    exits = [x for x in out if "l2fwd()@exit[XDP_REDIRECT]: " in x]
    assert len(entries) == len(exits) == 9
    assert all("on if_index 2, rx queue " in x for x in out)
    assert all("redirect to if_index 3 (eth1)" in x for x in exits)
    text = "\n".join(entries)
    for what in ("vlan 100", "vlan 10, vlan 20", "IPv6 fd00::1 > fd00::2", "TCP, length 74", "ARP, length 42",
                 "frag id 4660 offset 800", "UDP, length 3000"):
        assert what in text, what


@pytest.mark.slow
def test_multi_host_replay_expect_and_capture_on_its_own_host(tmp_path: Path) -> None:
    """topology/multihost.yaml replaying the crafted frames through l2fwd on three hosts (three MAC
    swaps: swapped once at the sink), each host an `emu host`; h2 captures its eth0 into its file."""
    from pcap_frames import expected_l2fwd
    from test_multihost import Proc, listening, start_hosts

    frames = sample_frames()
    write_pcap(tmp_path / "in.pcap", frames)
    write_pcap(tmp_path / "exp.pcap", expected_l2fwd(frames, max_frame(3500)))
    text = (Path(__file__).resolve().parents[1] / "topology" / "multihost.yaml").read_text()
    # Every device takes the 3000-byte frame (4 KiB pages: an MTU of 3502 at most).
    text = text.replace("        ifindex: 2\n", "        ifindex: 2\n        mtu: 3500\n")
    text = text.replace("        ifindex: 3\n", "        ifindex: 3\n        mtu: 3500\n")
    gen = text[text.index("  gen0:"):text.index("  sink0: {}")]
    text = text.replace(gen, "  gen0:\n    replay: {pcap: in.pcap, timing: rate}\n")
    text = text.replace("  sink0: {}", "  sink0: {expect: {pcap: exp.pcap}}")
    (tmp_path / "mh.yaml").write_text(text)
    coord_addr = f"ipc://{tmp_path}/control"
    out = tmp_path / "report.json"
    c = Proc(tmp_path, "coord", "coordinator", str(tmp_path / "mh.yaml"), "--bind", coord_addr, "--json", str(out),
             "--status-file", str(tmp_path / "coord.status"), "--capture", "h2:eth0@exit", "--capture-dir",
             str(tmp_path / "caps"))
    hosts = {}
    try:
        listening(tmp_path)
        hosts = start_hosts(tmp_path, coord_addr)
        assert c.wait() == 0, c.text()
        for p in hosts.values():
            assert p.wait() == 0, p.text()
    finally:
        for p in [c, *hosts.values()]:
            p.stop()
    report = json.loads(out.read_text())
    t = report["traffic"]
    assert (t["generated"], t["delivered"], t["unaccounted"]) == (11, 9, 0), t
    assert t["ports"]["sink0"]["expect"]["match"] is True
    (cap,) = report["capture"]
    assert (cap["device"], cap["host"], cap["packets"], cap["capture_drops"]) == ("h2:eth0", "h2", 18, 0)
    rows = tshark(tmp_path / "caps" / "h2-eth0.pcapng")
    assert len(rows) == 18 and sum(r["frame.verdict.ebpf_xdp"] == "4" for r in rows) == 9


@pytest.mark.slow
@pytest.mark.parametrize("snaplen", [262144, 5000])
def test_multibuffer_frames_are_captured_whole_at_entry_and_exit(tmp_path: Path, snaplen: int) -> None:
    """jumbo-sg: 9018-byte frames over 3 buffers (3520 + 3520 + 1978 bytes).  At XDP entry and exit a frame's
    record holds its linear part and its fragments, up to the snap length, with the whole 9018 bytes as its
    length (bpf_xdp_output of bpf_xdp_get_buff_len), not the linear part's 3520; tshark and dpkt read the
    same.  With a snap length of 5000 the record holds the linear part and 1480 bytes of the first fragment."""
    import dpkt

    from emu.net.packets import FrameFactory, swap_macs_batch

    root = Path(__file__).resolve().parent.parent
    n = 200
    text = (root / "topology" / "jumbo-sg.yaml").read_text()
    text += f"\ncapture: {{devices: ['h1:eth0@exit', 'h1:eth1'], dir: caps, snaplen: {snaplen}}}\n"
    (tmp_path / "t.yaml").write_text(text)
    topo = load_topology(tmp_path / "t.yaml")
    r = run(tmp_path / "t.yaml", count=n)
    assert r["traffic"]["delivered"] == n and r["traffic"]["unaccounted"] == 0
    assert {c["device"]: c["packets"] for c in r["capture"]} == {"h1:eth0": 2 * n, "h1:eth1": n}
    assert all(c["capture_drops"] == 0 for c in r["capture"])
    gen = topo.traffic["gen0"].generate
    sent = FrameFactory(gen.pkt_size, gen.flows, gen.src_mac, gen.dst_mac, port=gen.port_id).build(0, n)
    fwd = FrameBatch(sent.data.copy(), sent.offsets, sent.lengths)
    swap_macs_batch(fwd.data, fwd.offsets, fwd.lengths)
    cut = min(9018, snaplen)
    want_in = sorted(f[:cut] for f in sent.to_list())
    want_out = sorted(f[:cut] for f in fwd.to_list())
    ins, outs = tmp_path / "caps" / "h1-eth0.pcapng", tmp_path / "caps" / "h1-eth1.pcapng"
    rows, data = tshark(ins), tshark_bytes(ins)
    assert len(rows) == 2 * n == len(data)
    assert {(r["frame.len"], r["frame.cap_len"]) for r in rows} == {("9018", str(cut))}
    entries = [d for r, d in zip(rows, data, strict=True) if "@fentry" in r["frame.interface_name"]]
    exits = [d for r, d in zip(rows, data, strict=True) if "@fexit" in r["frame.interface_name"]]
    assert sorted(entries) == want_in and sorted(exits) == want_out  # l2fwd_frags swapped the MACs
    # dpkt reads the pcapng too: every block's original length is the whole frame's.
    with open(ins, "rb") as f:
        got = [(len(buf), buf) for _ts, buf in dpkt.pcapng.Reader(f)]
    assert sorted(b for _, b in got) == sorted(want_in + want_out)
    # What eth1 transmitted was whole before (its TX gather): the same frames, cut at the same length.
    tx = tshark(outs)
    assert {(r["frame.len"], r["frame.cap_len"]) for r in tx} == {("9018", str(cut))}
    assert sorted(tshark_bytes(outs)) == want_out
