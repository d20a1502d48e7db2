"""eBPF objects run by the emulator end to end: the bundled l2fwd-obj topology (every packet delivered,
the audit clean, the object's maps in the report), a program that faults on every packet (each one
XDP_ABORTED and an xdp_exception, the worker goes on, every page accounted for), a program that moves
its frames (adjust_head/tail, seen by the sink), and topology errors naming the file and line."""

from __future__ import annotations

import io
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from emu.run.coordinator import Run, RunOptions
from emu.topology.file import TopologyError, load_topology, validate_topology_text
from tests.ebpf_build import bundled, compile_c
from tests.test_emulation import assert_clean, own_segments, totals

ROOT = Path(__file__).resolve().parent.parent
TOPO = ROOT / "topology"


def run(topo, count: int) -> dict:  # type: ignore[no-untyped-def]
    report = Run(topo, RunOptions(count=count, interval=0.5, out=io.StringIO())).run()
    assert own_segments() == []
    assert multiprocessing.active_children() == []
    return report


def exceptions(r: dict) -> int:
    return sum(c["xdp_exception"] for c in r["cpus"])


def topology(obj: Path, xdp_extra: str = "", program: str = "", sink: bool = True) -> str:
    prog = f"\n          program: {program}" if program else ""
    return f"""
name: obj-test
hosts:
  h1:
    cpus: 2
    pages: 2048
    page_size: 2048
    devices:
      eth0:
        ifindex: 2
        rx_ring_size: 256
        rx_queues: 2
        xdp:
          object: {obj}{prog}{xdp_extra}
      eth1:
        ifindex: 3
        rx_ring_size: 256
traffic:
  gen0:
    generate: {{pkt_size: 64, flows: 16, burst: 32}}
  sink0: {{}}
links:
  - endpoints: ["gen0", "h1:eth0"]
  - endpoints: ["h1:eth1", "sink0"]
"""


@pytest.fixture(scope="module")
def objs() -> Path:
    return bundled()


@pytest.mark.slow
def test_l2fwd_obj_delivers_every_packet(objs: Path) -> None:
    topo = load_topology(TOPO / "l2fwd-obj.yaml")
    r = run(topo, 20_000)
    assert_clean(r)
    t = r["traffic"]
    assert t["generated"] == t["delivered"] == 20_000
    assert totals(r, "redirect") == 20_000 and exceptions(r) == 0
    assert all(c["rx_packets"] > 0 for c in r["cpus"])
    maps = r["maps"]["h1:eth0"]
    assert maps["rxcnt"]["entries"]["0"]["sum"] == 20_000  # the program's per-CPU counter
    assert maps[".rodata"]["vars"] == {"egress_ifindex": 3}  # globals: {egress_ifindex: eth1}


@pytest.mark.slow
def test_l2fwd_map_object_with_populated_devmap(objs: Path, tmp_path: Path) -> None:
    text = topology(objs / "l2fwd_map.o", "\n          maps: {tx_port: {0: eth1}}")
    r = run(validate_topology_text(text, str(tmp_path / "t.yaml")), 5_000)
    assert_clean(r)
    assert r["traffic"]["delivered"] == 5_000
    assert r["maps"]["h1:eth0"]["tx_port"]["entries"] == {"0": 3}


FAULTY = """#include "xdp_common.h"
SEC("xdp")
int faulty(struct xdp_md *ctx)
{
	unsigned char *data = (void *)(long)ctx->data;

	/* no bounds check: the kernel's verifier would refuse this; the engine aborts the packet */
	return data[1900] == 7 ? XDP_PASS : XDP_DROP;
}
char _license[] SEC("license") = "GPL";
"""


@pytest.mark.slow
def test_faulting_program_aborts_each_packet_and_the_run_goes_on(objs: Path, tmp_path: Path) -> None:
    obj = compile_c(FAULTY, tmp_path, name="faulty", cflags=(f"-I{objs}",))
    r = run(validate_topology_text(topology(obj), str(tmp_path / "t.yaml")), 3_000)
    assert_clean(r)
    assert totals(r, "aborted") == exceptions(r) == 3_000
    assert r["traffic"]["dropped"] == 3_000


TRIM = """#include "xdp_common.h"
SEC("xdp")
int move(struct xdp_md *ctx)
{
	/* the frame moves 4 bytes towards its page's start (headroom in, frame copied down, tail out) */
	/* unchanged, it reaches the sink intact only if the device sends it from its new place */
	if (bpf_xdp_adjust_head(ctx, -4))
		return XDP_ABORTED;
	unsigned char *data = (void *)(long)ctx->data;
	unsigned char *end = (void *)(long)ctx->data_end;
	if (data + 68 > end)
		return XDP_ABORTED;
	__builtin_memmove(data, data + 4, 64);
	if (bpf_xdp_adjust_tail(ctx, -4))
		return XDP_ABORTED;
	return bpf_redirect(3, 0);
}
char _license[] SEC("license") = "GPL";
"""


@pytest.mark.slow
def test_adjust_head_and_tail_move_the_frame_the_sink_sees(objs: Path, tmp_path: Path) -> None:
    obj = compile_c(TRIM, tmp_path, name="move", cflags=(f"-I{objs}",))
    r = run(validate_topology_text(topology(obj), str(tmp_path / "t.yaml")), 2_000)
    assert_clean(r)
    assert r["traffic"]["delivered"] == 2_000
    assert exceptions(r) == 0 and totals(r, "redirect") == 2_000


@pytest.mark.slow
def test_adjust_head_and_tail_in_half_page_fragments(objs: Path, tmp_path: Path) -> None:
    """The same program on 2 KiB halves of 4 KiB pages (``pool.frag_size``): every second buffer starts
    at byte 2048 of its page, so the frame the sink sees intact proves the engine's data, data_end and
    headroom are the fragment's."""
    obj = compile_c(TRIM, tmp_path, name="move", cflags=(f"-I{objs}",))
    text = topology(obj)
    assert "pages: 2048\n    page_size: 2048\n" in text
    text = text.replace("pages: 2048\n    page_size: 2048\n",
                        "pages: 1024\n    page_size: 4096\n    pool: {frag_size: 2048}\n")
    topo = validate_topology_text(text, str(tmp_path / "t.yaml"))
    assert topo.hosts["h1"].buf_size == 2048
    r = run(topo, 2_000)
    assert_clean(r)
    assert r["traffic"]["delivered"] == 2_000
    assert exceptions(r) == 0 and totals(r, "redirect") == 2_000
    assert r["pages"]["total"] == 2 * 1024  # buffers


def test_topology_errors_name_the_line(objs: Path, tmp_path: Path) -> None:
    f = str(tmp_path / "t.yaml")
    cases = [
        (topology(objs / "l2fwd_map.o", "\n          maps: {tx_prot: {0: eth1}}"), 15, "no map 'tx_prot'"),
        (topology(objs / "l2fwd_map.o", "\n          maps: {tx_port: {0: eth9}}"), 15, "no device 'eth9'"),
        (topology(objs / "l2fwd_map.o", "\n          maps: {tx_port: {99: eth1}}"), 15, "E2BIG"),
        (topology(objs / "l2fwd.o", "\n          globals: {egres_ifindex: eth1}"), 15, "egres_ifindex"),
        (topology(objs / "l2fwd.o", program="l2fwd_nope"), 15, "no program 'l2fwd_nope'"),
        (topology(tmp_path / "missing.o"), 14, "no such file"),
        (topology(objs / "l2fwd.o", "\n          params: {egress: eth1}"), 15, "'params' is for a Python program"),
    ]
    for text, line, what in cases:
        with pytest.raises(TopologyError) as ei:
            validate_topology_text(text, f)
        assert what in str(ei.value) and f":{line}:" in str(ei.value), (what, str(ei.value))


def test_cli_refuses_a_bad_object_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.o"
    bad.write_bytes(b"\x7fELF" + bytes(60))
    t = tmp_path / "t.yaml"
    t.write_text(topology(bad))
    p = subprocess.run([sys.executable, "-m", "emu.cli", "validate", str(t)], capture_output=True, text=True)
    assert p.returncode == 2 and f"{t}:14:" in p.stderr, p.stderr
