"""End-to-end runs with page fragments (``pool.frag_size``: 2 KiB halves of 4 KiB pages, as i40e, ixgbe
and mlx5 receive): XDP_DROP, XDP_TX and l2fwd's REDIRECT deliver or drop every packet, every page comes
home (the strict audit counts buffers), the pools count pages, and ``emu pools`` shows a running run's
pages in flight."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from procs import ROOT, segments_of, start_cli, wait_for
from test_emulation import TOPO, assert_clean, run, totals

from emu.topology.file import validate_topology_text

pytestmark = pytest.mark.slow

N = 20_000


def halves(name: str) -> object:
    """Bundled topology `name` on 4 KiB pages split in 2 KiB halves (the same 48 MiB of page memory)."""
    text = (TOPO / f"{name}.yaml").read_text()
    old = "pages: 24576\n    page_size: 2048\n    pool: {pool_size: 4096}"
    assert old in text
    text = text.replace(old, "pages: 12288\n    page_size: 4096\n    pool: {pool_size: 4096, frag_size: 2048}")
    topo = validate_topology_text(text, f"{name}.yaml")
    h = topo.hosts["h1"]
    assert (h.page_size, h.pool.frag_size, h.buf_size) == (4096, 2048, 2048)
    return topo


def lives(pp: dict) -> int:
    """Pages handed out by a pool (one per allocation the kernel counts)."""
    return pp["alloc_fast"] + pp["alloc_slow"] + pp["alloc_refill"]


def returns(pp: dict) -> int:
    """Pages that came back whole (the last fragment's put), wherever they went."""
    return pp["recycle_cached"] + pp["recycle_ring"] + pp["recycle_ring_full"] + pp["recycle_hard_limit"]


def assert_pages_counted(r: dict) -> None:
    """Every page life ended in one counted return, but the page a pool was splitting at its destroy
    (its unused half dropped by page_pool_drain_frag, freed uncounted); buffers are the audit's unit."""
    for c in r["cpus"]:
        pp = c["page_pool"]
        assert 0 <= lives(pp) - returns(pp) <= 1, pp
    assert r["pages"]["total"] == 2 * 12288  # buffers
    assert r["pages"]["allocated_hwm"] <= 12288  # pages


def test_xdp_drop_in_half_pages() -> None:
    topo = halves("xdp-drop")
    r = run(topo, count=N)
    assert_clean(r)
    assert_pages_counted(r)
    assert totals(r, "drop") == N == r["traffic"]["dropped"] == r["devices"][0]["rx_packets"]
    pp = r["cpus"][0]["page_pool"]
    ring = topo.hosts["h1"].devices["eth0"].rx_ring_size
    # The RX ring of 4,096 buffers takes 2,048 pages: the slow path ran for those (and at most a bulk or
    # two of slack), and the N buffers dropped used about N / 2 page lives besides the ring's.
    assert pp["alloc_slow"] * 64 <= ring // 2 + 2 * 64, pp
    assert N // 2 <= lives(pp) <= (N + ring) // 2 + 2 * 64, pp
    assert r["pages"]["allocated_hwm"] <= ring // 2 + 2 * 64


def test_xdp_tx_in_half_pages() -> None:
    r = run(halves("xdp-tx"), count=N)
    assert_clean(r)
    assert_pages_counted(r)
    assert totals(r, "tx") == N == r["traffic"]["delivered"]  # back to the port that sent them, verified
    dev = r["devices"][0]
    assert dev["xdp_tx"] == dev["tx_packets"] == dev["tx_completions"] == N


def test_l2fwd_in_half_pages() -> None:
    r = run(halves("l2fwd"), count=N)
    assert_clean(r)
    assert_pages_counted(r)
    assert r["traffic"]["generated"] == r["traffic"]["delivered"] == N == totals(r, "redirect")
    eth0, eth1 = r["devices"]
    assert eth0["rx_packets"] == N and eth1["tx_packets"] == eth1["xdp_xmit"] == eth1["tx_completions"] == N
    assert all(c["rx_packets"] > 0 for c in r["cpus"])


DROP = """
name: fragdrop
hosts:
  h1:
    cpus: 1
    pages: 2048
    page_size: 4096
    pool: {frag_size: 2048}
    devices:
      eth0: {ifindex: 2, rx_ring_size: 1024, xdp: {program: "emu.programs:xdp_drop"}}
traffic:
  gen0: {generate: {pkt_size: 64}}
links:
  - endpoints: [gen0, "h1:eth0"]
"""


def test_emu_pools_shows_pages_in_flight_not_buffers(tmp_path: Path) -> None:
    """While the run drops traffic its RX ring of 1,024 half-page buffers holds 512 pages: the pool's
    netlink row counts pages in flight (and their bytes), as the kernel's does."""
    path = tmp_path / "fragdrop.yaml"
    path.write_text(DROP)
    p = start_cli("run", str(path), "-i", "100")
    try:
        wait_for(lambda: any(n.endswith("-stats") for n in segments_of(p.pid)) or p.poll() is not None,
                 "the run's segments")
        assert p.poll() is None, p.communicate()
        seen: list[dict] = []

        def flowing() -> bool:
            got = subprocess.run([sys.executable, "-m", "emu.cli", "pools", "--json", str(p.pid)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=60)
            assert got.returncode == 0, got.stderr
            (pool,) = json.loads(got.stdout)
            seen.append(pool)
            return pool["alloc-fast"] > 1024 and pool["inflight"] >= 512

        wait_for(flowing, "traffic through the pool")
        pool = seen[-1]
        assert 512 <= pool["inflight"] < 1024, pool
        assert pool["inflight-mem"] == pool["inflight"] * 4096
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=120)
    assert p.returncode == 0
    assert not segments_of(p.pid)


def test_a_pool_destroyed_while_it_splits_a_page_drains_the_unused_half() -> None:
    """An RX ring of 63 buffers is refilled in odd counts, so a pool usually ends the run with half a page
    it never handed out: the shutdown does not wait for it (it is not in use) and page_pool_destroy
    drains it (page_pool_drain_frag), so every page still comes home, without a stalled shutdown."""
    text = DROP.replace("rx_ring_size: 1024", "rx_ring_size: 63").replace("pages: 2048", "pages: 512")
    r = run(validate_topology_text(text, "odd.yaml"), count=3_000)
    assert_clean(r)
    assert r["stalled_shutdown"] == [] and r["traffic"]["dropped"] == 3_000
    pp = r["cpus"][0]["page_pool"]
    assert 0 <= lives(pp) - returns(pp) <= 1, pp
