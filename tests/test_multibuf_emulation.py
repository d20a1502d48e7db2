"""XDP multi-buffer end to end: topology/jumbo-sg.yaml (MTU 9000 on 4 KiB pages, rx-sg, an xdp.frags
program) and its variants run as real emulations, every frame verified at the sink, every buffer accounted
for by the strict audit; and the topologies a multi-buffer MTU needs are refused, with FILE:LINE, when
something is missing."""

from __future__ import annotations

import io
import multiprocessing
import os
from pathlib import Path

import pytest

from emu.run.coordinator import Run, RunOptions
from emu.topology.file import load_topology, validate_topology_text
from emu.topology.model import TopologyError, max_frame, max_sg_mtu, sg_buffers

ROOT = Path(__file__).resolve().parent.parent
JUMBO_SG = (ROOT / "topology" / "jumbo-sg.yaml").read_text()
NOSG = "[basic, redirect, ndo-xmit, rx-sg]"


def run(topo, n: int) -> dict:
    r = Run(topo, RunOptions(count=n, interval=0.5, out=io.StringIO())).run()
    assert multiprocessing.active_children() == []
    p = r["pages"]
    assert p["total"] == p["accounted"] == p["by_state"]["free"] == 8192 and not p["problems"], p
    for c in r["cpus"]:
        assert c["page_pool"]["hold_cnt"] == c["page_pool"]["release_cnt"]
    assert all(v == 0 for v in r["violations"].values()), r["violations"]
    return r


def variant(old: str, new: str) -> object:
    assert old in JUMBO_SG
    return validate_topology_text(JUMBO_SG.replace(old, new, 1), "jumbo-sg-variant.yaml")


@pytest.mark.slow
def test_jumbo_sg_forwards_9018_byte_frames_over_three_buffers_each() -> None:
    topo = load_topology(ROOT / "topology" / "jumbo-sg.yaml")
    h1 = topo.hosts["h1"]
    assert h1.page_size == 4096 and h1.multibuf and sg_buffers(max_frame(9000), 4096) == 3
    n = 3_000
    r = run(topo, n)
    t = r["traffic"]
    assert t["generated"] == n == t["delivered"] and t["dropped"] == 0 and t["unaccounted"] == 0
    assert t["corrupted"] == 0 and t["duplicates"] == 0 and t["ports"]["sink0"]["verified"] == n
    eth = {d["name"]: d for d in r["devices"]}
    assert eth["eth0"]["rx_packets"] == n and eth["eth0"]["rx_bytes"] == n * 9018
    assert eth["eth0"]["rx_sg_frames"] == n and eth["eth0"]["rx_sg_frags"] == 2 * n
    assert eth["eth1"]["tx_sg_frames"] == eth["eth1"]["tx_completions"] == n and eth["eth1"]["tx_bytes"] == n * 9018
    assert sum(c["rx_frags_frames"] for c in r["cpus"]) == n and sum(c["rx_frags"] for c in r["cpus"]) == 2 * n
    assert sum(c["rx_bytes"] for c in r["cpus"]) == n * 9018
    assert sum(c["xdp"]["redirect"] for c in r["cpus"]) == n
    # l2fwd_frags counted every frame's whole length (bpf_xdp_get_buff_len).
    (cnt,) = [m for label, m in r["maps"].items() if label.endswith("eth0")]
    entries = cnt["rxcnt"]["entries"]
    assert [entries[k]["sum"] for k in ("0", "1")] == [n, n * 9018]


@pytest.mark.slow
def test_a_redirect_to_a_device_without_ndo_xmit_sg_is_eopnotsupp_and_loses_nothing() -> None:
    old = """        tx_ring_size: 1536     # a TX descriptor per buffer: 512 jumbo frames of 3
        xdp_features: [basic, redirect, ndo-xmit, ndo-xmit-sg, rx-sg]"""
    topo = variant(old, old.replace("[basic, redirect, ndo-xmit, ndo-xmit-sg, rx-sg]", NOSG))
    n = 1_000
    r = run(topo, n)
    t = r["traffic"]
    assert t["generated"] == n and t["delivered"] == 0 and t["dropped"] == n and t["unaccounted"] == 0
    cpus = r["cpus"]
    assert sum(c["xmit_sg_drop"] for c in cpus) == n
    assert sum(c["redirect_err"] for c in cpus) == sum(c["redirect_err_errno"]["-EOPNOTSUPP"] for c in cpus) == n
    eth = {d["name"]: d for d in r["devices"]}
    assert eth["eth1"]["tx_packets"] == 0 and eth["eth0"]["rx_sg_frames"] == n


@pytest.mark.slow
def test_without_a_program_jumbo_frames_pass_to_the_stack_as_skbs_with_frags() -> None:
    topo = variant("""        xdp:
          program: "emu.programs:l2fwd_frags"
          params: {egress: eth1}
""", "")
    n = 1_000
    r = run(topo, n)
    cpus = r["cpus"]
    assert sum(c["xdp"]["pass"] for c in cpus) == sum(c["stack_rx"] for c in cpus) == n
    assert sum(c["rx_frags"] for c in cpus) == 2 * n
    assert r["traffic"]["unaccounted"] == 0


BASE = """name: t
hosts:
  h1:
    cpus: 1
    page_size: {page}
    devices:
      eth0:
        ifindex: 2
        mtu: {mtu}
        rx_ring_size: {ring}
{features}{program}"""


def refused(match: str, page: int = 4096, mtu: int = 9000, ring: int = 256, features: str = "",
            program: str = "") -> TopologyError:
    text = BASE.format(page=page, mtu=mtu, ring=ring, features=features, program=program)
    with pytest.raises(TopologyError, match=match) as e:
        validate_topology_text(text, "mb.yaml")
    return e.value


SGF = "        xdp_features: [basic, redirect, ndo-xmit, ndo-xmit-sg, rx-sg]\n"


def test_an_mtu_beyond_one_buffer_without_rx_sg_names_the_way_out() -> None:
    e = refused("needs XDP multi-buffer: give the device 'rx-sg'")
    assert str(e).startswith("mb.yaml:9:") and "max_mtu is 3502" in str(e)


def test_a_program_without_frags_support_is_refused_as_mlx5_refuses_it() -> None:
    e = refused("too big for an XDP program not aware of multi buffer", features=SGF,
                program='        xdp: {program: "emu.programs:l2fwd", params: {egress: eth0}}\n')
    assert str(e).startswith("mb.yaml:9:") and "frags=True" in str(e)


def test_an_mtu_beyond_eighteen_buffers_and_a_ring_too_small_are_refused() -> None:
    assert max_sg_mtu(1024) == 18 * (1024 - 576) - 18 < 9000
    e = refused("even with rx-sg", page=1024, features=SGF)
    assert "max_mtu is 8046" in str(e)
    e = refused("'rx_ring_size' 8 is too small for mtu 8000 with rx-sg: its largest frame takes 18", page=1024,
                mtu=8000, ring=8, features=SGF)
    assert str(e).startswith("mb.yaml:10:")


def test_a_tx_ring_smaller_than_the_largest_frames_buffers_is_refused() -> None:
    """A frame takes a TX descriptor per buffer: a TX ring of 8 can never hold a frame of 18 buffers (i40e
    would drop every one), so the topology is refused at its tx_ring_size, naming the buffers, when such
    frames can reach that ring (by redirect with ndo-xmit-sg here)."""
    text = BASE.format(page=1024, mtu=8000, ring=32, features=SGF, program="").replace(
        "        rx_ring_size: 32\n", "        rx_ring_size: 32\n        tx_ring_size: 8\n")
    with pytest.raises(TopologyError, match="'tx_ring_size' 8 is too small for mtu 8000 with rx-sg: its largest "
                                            "frame takes 18 buffers of 1024 bytes") as e:
        validate_topology_text(text, "mb.yaml")
    assert str(e.value).startswith("mb.yaml:11:") and "at least 18" in str(e.value)
    # 18 descriptors hold one such frame: accepted.
    topo = validate_topology_text(text.replace("tx_ring_size: 8", "tx_ring_size: 18"), "mb.yaml")
    assert topo.hosts["h1"].devices["eth0"].tx_ring_size == 18
    # Without a program (no XDP_TX) and without ndo-xmit-sg no multi-buffer frame reaches its TX ring.
    topo = validate_topology_text(text.replace("ndo-xmit, ndo-xmit-sg, rx-sg", "ndo-xmit, rx-sg"), "mb.yaml")
    assert topo.hosts["h1"].devices["eth0"].tx_ring_size == 8


def test_rx_sg_with_a_frags_program_or_none_is_accepted() -> None:
    for program in ("", '        xdp: {program: "emu.programs:l2fwd_frags", params: {egress: eth0}}\n'):
        topo = validate_topology_text(BASE.format(page=4096, mtu=9000, ring=256, features=SGF, program=program),
                                      "mb.yaml")
        assert topo.hosts["h1"].multibuf and topo.hosts["h1"].devices["eth0"].mtu == 9000
    # An MTU within one buffer is no multi-buffer host, rx-sg or not: it pays nothing.
    topo = validate_topology_text(BASE.format(page=4096, mtu=1500, ring=256, features=SGF, program=""), "mb.yaml")
    assert not topo.hosts["h1"].multibuf


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["h1/cpu1", "h1/eth1"])
def test_a_process_killed_holding_multibuffer_frames_strands_no_buffer(victim: str) -> None:
    """SIGKILL a CPU worker (or the egress device) while jumbo frames of 3 buffers flow: reclaim returns
    each frame whole (its fragments with its head, each to its pool) and the strict audit finds every
    buffer home."""
    from procs import run_killing

    r = run_killing(Run(load_topology(ROOT / "topology" / "jumbo-sg.yaml"), RunOptions(count=40_000, quiet=True)),
                    victim, after=2000)
    v = r["violations"]
    assert v["leaked"] == 0 and v["double_free"] == 0 and v["foreign_cache_return"] == 0, (v, r["pages"])
    p = r["pages"]
    assert p["total"] == p["accounted"] == p["by_state"]["free"] == 8192 and not p["problems"], p
    assert r["traffic"]["corrupted"] == 0


REDIRECT_CPU = (ROOT / "topology" / "redirect-cpu.yaml").read_text()


@pytest.mark.slow
def test_cpumap_takes_multibuffer_frames_whole_to_the_remote_cpu() -> None:
    """redirect-cpu with jumbo frames on 4 KiB pages: each frame (3 buffers) goes whole through the
    cpumap to CPU 1 (built into an skb with frags, freed there) or CPU 2 (dropped by its second program);
    every buffer comes home through its owner's ring."""
    text = REDIRECT_CPU.replace("page_size: 2048", "page_size: 4096", 1).replace(
        "        rx_queues: 1\n", "        rx_queues: 1\n        mtu: 9000\n"
        "        xdp_features: [basic, redirect, ndo-xmit, ndo-xmit-sg, rx-sg]\n", 1).replace(
        "pkt_size: 64", "pkt_size: 9018", 1)
    topo = validate_topology_text(text, "redirect-cpu-sg.yaml")
    assert topo.hosts["h1"].multibuf
    n = 2_000
    r = Run(topo, RunOptions(count=n, interval=0.5, out=io.StringIO())).run()
    assert multiprocessing.active_children() == []
    assert all(v == 0 for v in r["violations"].values()), r["violations"]
    p = r["pages"]
    assert p["total"] == p["accounted"] == p["by_state"]["free"] == 8192 and not p["problems"], p
    cpus = r["cpus"]
    for c in cpus:
        assert c["page_pool"]["hold_cnt"] == c["page_pool"]["release_cnt"]
    cm = [c["cpumap"] for c in cpus]
    assert sum(c["rx_frags_frames"] for c in cpus) == n
    assert sum(m["enqueue"] + m["enqueue_drop"] for m in cm) == n
    assert cm[1]["kthread_pass"] + cm[2]["kthread_drop"] == sum(m["enqueue"] for m in cm)
    assert cm[1]["kthread_pass"] > 0 and cm[2]["kthread_drop"] > 0
    assert r["traffic"]["unaccounted"] == 0


def test_an_ebpf_object_outside_xdp_frags_is_refused_on_a_multibuffer_mtu() -> None:
    obj = (ROOT / "emu" / "programs" / "bpf" / "l2fwd.o").resolve()
    if not obj.is_file():
        pytest.skip("the bundled eBPF objects are not built (scripts/build-bpf.sh)")
    program = (f"        xdp: {{object: {obj}, program: l2fwd, globals: {{egress_ifindex: eth0}}}}\n")
    from procs import segments_of

    e = refused("too big for an XDP program not aware of multi buffer: l2fwd is in section 'xdp'",
                features=SGF, program=program)
    assert str(e).startswith("mb.yaml:12:")  # the xdp key
    assert segments_of(os.getpid()) == []  # (refused before its scratch maps were made)


@pytest.mark.slow
def test_jumbo_sg_obj_runs_the_c_frags_program_over_every_buffer() -> None:
    """topology/jumbo-sg-obj.yaml: jumbo-sg with emu/programs/bpf/xdp_l2fwd_frags.o in the eBPF engine.  Every
    frame is delivered and verified, every page is home, and the object's per-CPU maps count each frame once
    with its whole length (bpf_xdp_get_buff_len: lenclass[2]) and its last 4 bytes, read from its last
    fragment (tailsum[0], the sum the generator's frames give)."""
    import struct

    import numpy as np

    from emu.net.packets import FrameFactory
    from tests.ebpf_build import bundled

    bundled()  # the C object, built where it is not yet
    topo = load_topology(ROOT / "topology" / "jumbo-sg-obj.yaml")
    assert topo.hosts["h1"].multibuf and topo.hosts["h1"].devices["eth0"].xdp.object is not None
    n = 3_000
    r = run(topo, n)
    t = r["traffic"]
    assert t["generated"] == n == t["delivered"] and t["dropped"] == 0 and t["unaccounted"] == 0
    assert t["corrupted"] == 0 and t["duplicates"] == 0 and t["ports"]["sink0"]["verified"] == n
    eth = {d["name"]: d for d in r["devices"]}
    assert eth["eth0"]["rx_sg_frames"] == n and eth["eth0"]["rx_sg_frags"] == 2 * n
    assert eth["eth1"]["tx_sg_frames"] == eth["eth1"]["tx_completions"] == n and eth["eth1"]["tx_bytes"] == n * 9018
    assert sum(c["xdp"]["redirect"] for c in r["cpus"]) == n
    assert sum(c["rx_frags_frames"] for c in r["cpus"]) == n and sum(c["rx_frags"] for c in r["cpus"]) == 2 * n
    maps = r["maps"]["h1:eth0"]
    assert maps[".rodata"]["vars"] == {"egress_ifindex": 3}
    assert maps["rxcnt"]["entries"]["0"]["sum"] == n
    # lenclass: struct {__u64 packets, bytes} per CPU, in the report as each CPU's value bytes in hex.
    assert set(maps["lenclass"]["entries"]) == {"2"}  # every frame 9018 bytes: class 2 only
    per_cpu = [struct.unpack("<QQ", bytes.fromhex(v)) for v in maps["lenclass"]["entries"]["2"]["cpus"]]
    assert len(per_cpu) == 2 and all(p for p, _ in per_cpu)  # both CPUs' RX queues had frames
    assert sum(p for p, _ in per_cpu) == n and sum(b for _, b in per_cpu) == n * 9018
    assert [p for p, _ in per_cpu] == maps["rxcnt"]["entries"]["0"]["cpus"]
    gen = topo.traffic["gen0"].generate
    sent = FrameFactory(gen.pkt_size, gen.flows, gen.src_mac, gen.dst_mac, port=gen.port_id).build(0, n)
    tails = sent.rows()[:, -4:].copy().view("<u4").astype(np.uint64)
    assert maps["tailsum"]["entries"]["0"]["sum"] == int(tails.sum())
