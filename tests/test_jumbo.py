"""Jumbo frames: the bundled topology/jumbo.yaml (MTU 9000, 9018-byte frames, l2fwd) end to end, with every
frame verified at the sink and every page accounted for by the strict audit."""

from __future__ import annotations

import io
import multiprocessing
from pathlib import Path

import pytest

from emu.run.coordinator import Run, RunOptions
from emu.topology.file import load_topology
from emu.topology.model import max_frame

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_jumbo_topology_forwards_9018_byte_frames_and_accounts_for_every_page() -> None:
    topo = load_topology(ROOT / "topology" / "jumbo.yaml")
    gen = topo.traffic["gen0"].generate
    assert gen is not None and gen.pkt_size == max_frame(9000) == 9018
    assert {d.mtu for d in topo.hosts["h1"].devices.values()} == {9000}
    n = 5_000
    r = Run(topo, RunOptions(count=n, interval=0.5, out=io.StringIO())).run()
    assert multiprocessing.active_children() == []
    assert all(v == 0 for v in r["violations"].values()), r["violations"]
    t = r["traffic"]
    assert t["generated"] == n == t["delivered"] and t["dropped"] == 0 and t["unaccounted"] == 0
    assert t["corrupted"] == 0 and t["duplicates"] == 0 and t["ports"]["sink0"]["verified"] == n
    eth = {d["name"]: d for d in r["devices"]}
    assert eth["eth0"]["rx_packets"] == n and eth["eth0"]["rx_bytes"] == n * 9018
    assert eth["eth0"]["rx_length_errors"] == 0 and eth["eth0"]["mtu"] == 9000
    assert eth["eth1"]["xdp_xmit"] == eth["eth1"]["tx_completions"] == n and eth["eth1"]["tx_bytes"] == n * 9018
    p = r["pages"]
    assert p["total"] == p["accounted"] == p["by_state"]["free"] == 2560 and not p["problems"], p
    for c in r["cpus"]:
        assert c["page_pool"]["hold_cnt"] == c["page_pool"]["release_cnt"]
    assert sum(c["xdp"]["redirect"] for c in r["cpus"]) == n
