"""The netlink view of the page pools (`emu.run.pools`): the mapping from a pool's counters and words to
``ynl``'s attributes, the report's ``page_pools``, ``emu pools`` against a run in progress, and a pool
destroyed with pages still out, listed as detached."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from procs import ROOT, segments_of, start_cli, wait_for
from test_faults import STALL, end_with_frames_awaiting_completion

from emu.mem.page import PageState
from emu.mem.pagepool import (
    P_DESTROYED,
    P_DETACH_TIME,
    P_OWNER_PID,
    P_WORDS,
    POOL_COUNTERS,
    POOL_STATS,
    C,
    page_pool_list,
    pool_of,
)
from emu.run import pools
from emu.run import report as rep
from emu.run.coordinator import Run, RunOptions
from emu.topology.file import load_topology, validate_topology_text

# Two devices; CPU 1 services eth0's queue 1 and eth1's queue 0, CPU 2 no RX queue at all.
TWO_DEVICES = """
name: twodev
hosts:
  h1:
    cpus: 3
    devices:
      eth0: {ifindex: 4, rx_queues: 2, rx_cpus: [0, 1]}
      eth1: {ifindex: 7, rx_queues: 1, rx_cpus: [1]}
  h2:
    cpus: 1
    devices:
      eth0: {ifindex: 2}
"""


def test_identities_number_pools_in_host_cpu_order_with_their_first_rx_queue() -> None:
    topo = validate_topology_text(TWO_DEVICES, "twodev.yaml")
    ids = pools.pool_identities(topo.hosts.values())
    n = pools.MIN_NAPI_ID
    # NAPI instances per host in (device, queue) order: h1 eth0q0, eth0q1, eth1q0; h2 eth0q0.
    assert ids == {
        ("h1", 0): pools.PoolIdentity(1, 4, n),
        ("h1", 1): pools.PoolIdentity(2, 4, n + 1),  # eth0 comes first; its eth1 queue is not shown
        ("h1", 2): pools.PoolIdentity(3, 0, 0),  # services no RX queue
        ("h2", 0): pools.PoolIdentity(4, 2, n),  # NAPI ids are per host, pool ids per run
    }


def _counters(**values: int) -> np.ndarray:
    row = np.zeros(len(POOL_COUNTERS), dtype=np.int64)
    for name, v in values.items():
        row[C[name]] = v
    return row


def test_netlink_pool_maps_every_field_with_the_kernels_names() -> None:
    stats = {name: 10 + i for i, name in enumerate(POOL_STATS)}
    row = _counters(**stats, hold_cnt=640, release_cnt=600, double_free=5)
    ctl = np.zeros(P_WORDS, dtype=np.int64)
    page_pool_list_words(ctl, 3, 2, 8200)
    ctl[P_OWNER_PID] = 1234
    d = pools.netlink_pool(row, ctl, 4096)
    assert d == {
        "id": 3, "ifindex": 2, "napi-id": 8200, "inflight": 40, "inflight-mem": 40 * 4096,
        "alloc-fast": 10, "alloc-slow": 11, "alloc-slow-high-order": 12, "alloc-empty": 13, "alloc-refill": 14,
        "alloc-waive": 15, "recycle-cached": 16, "recycle-cache-full": 17, "recycle-ring": 18,
        "recycle-ring-full": 19, "recycle-released-refcnt": 20,
    }
    assert pools.listed(ctl, d["inflight"])
    # Destroyed with 40 pages out: detached, no NAPI any more, still listed until they return.
    ctl[P_DESTROYED], ctl[P_DETACH_TIME] = 1, 5000
    d = pools.netlink_pool(row, ctl, 4096)
    assert d["detach-time"] == 5000 and "napi-id" not in d and d["inflight"] == 40
    assert pools.listed(ctl, 40) and not pools.listed(ctl, 0)
    # No netdev: no ifindex attribute, never a 0; not listed before its worker claimed it.
    ctl[:] = 0
    page_pool_list_words(ctl, 1, 0, 0)
    d = pools.netlink_pool(_counters(), ctl, 4096)
    assert "ifindex" not in d and "napi-id" not in d and "detach-time" not in d
    assert not pools.listed(ctl, 0)
    assert [p["id"] for p in pools.renumbered([{"id": 1}, {"id": 1}, {"id": 2}])] == [1, 2, 3]


def page_pool_list_words(ctl: np.ndarray, pool_id: int, ifindex: int, napi_id: int) -> None:
    """`page_pool_list` on a bare control-word row (it writes a page memory's row the same way)."""

    class Fake:
        pool_ctl = ctl[None, :]

    page_pool_list(Fake, 0, pool_id, ifindex, napi_id)  # type: ignore[arg-type]


def test_destroy_with_pages_out_detaches_and_without_only_frees(page_memory) -> None:
    pm = page_memory(npages=256, ncpus=2)
    for cpu in range(2):
        page_pool_list(pm, cpu, cpu + 1, 2, pools.MIN_NAPI_ID + cpu)
    busy, idle = pool_of(pm, 0, owner=True), pool_of(pm, 1, owner=True)
    assert len(busy.alloc(3, PageState.XDP, holder=0)) == 3
    before = int(time.clock_gettime(time.CLOCK_BOOTTIME))
    assert busy.drain() == 3 and idle.drain() == 0
    assert before <= int(pm.pool_ctl[0, P_DETACH_TIME]) <= int(time.clock_gettime(time.CLOCK_BOOTTIME))
    assert int(pm.pool_ctl[1, P_DETACH_TIME]) == 0 and int(pm.pool_ctl[1, P_DESTROYED]) == 1
    first = int(pm.pool_ctl[0, P_DETACH_TIME])
    pm.pool_ctl[0, P_DETACH_TIME] = first - 100  # a later destroy (reclaim) keeps the first time
    busy.drain()
    assert int(pm.pool_ctl[0, P_DETACH_TIME]) == first - 100


SMALL = """
name: small
hosts:
  h1:
    cpus: 2
    pages: 1024
    devices:
      eth0: {ifindex: 2, rx_queues: 2, rx_ring_size: 128, xdp: {program: "emu.programs:xdp_drop"}}
traffic:
  gen0: {generate: {count: 3000}}
links:
  - endpoints: [gen0, "h1:eth0"]
"""


@pytest.mark.slow
def test_report_lists_every_pool_with_the_cpus_counters() -> None:
    report = Run(validate_topology_text(SMALL, "small.yaml"), RunOptions(quiet=True)).run()
    assert report["traffic"]["generated"] == 3000 and report["traffic"]["unaccounted"] == 0
    pps = report["page_pools"]
    assert [p["id"] for p in pps] == [1, 2]
    assert [p["napi-id"] for p in pps] == [pools.MIN_NAPI_ID, pools.MIN_NAPI_ID + 1]
    for p, cpu in zip(pps, report["cpus"], strict=True):
        assert p["ifindex"] == 2 and p["inflight"] == 0 and p["inflight-mem"] == 0 and "detach-time" not in p
        for name, nl in pools.NETLINK_STATS.items():
            assert p[nl] == cpu["page_pool"][name], nl
    assert sum(p["alloc-fast"] for p in pps) > 0
    # A multi-host run's report merges its hosts' through the same builder: ids unique across hosts.
    merged = rep._merged_sections(rep.RunRecord(None, None, 0.0), {"a": report, "b": report})  # type: ignore[arg-type]
    assert [p["id"] for p in merged["page_pools"]] == [1, 2, 3, 4]
    assert merged["page_pools"][2]["alloc-fast"] == pps[0]["alloc-fast"]


def _pools_json(pid: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emu.cli", "pools", "--json", str(pid)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_emu_pools_lists_a_running_runs_pools_and_their_counters_grow() -> None:
    topo = load_topology(str(ROOT / "topology/l2fwd.yaml"))
    p = start_cli("run", "topology/l2fwd.yaml", "--count", "0", "-i", "100")
    try:
        wait_for(lambda: any(n.endswith("-stats") for n in segments_of(p.pid)) or p.poll() is not None,
                 "the run's segments")
        assert p.poll() is None, p.communicate()
        seen: list[list[dict]] = []

        def flowed() -> bool:
            got = _pools_json(p.pid)
            assert got.returncode == 0, got.stderr
            seen.append(json.loads(got.stdout))
            return len(seen[-1]) == topo.hosts["h1"].cpus and all(q["alloc-fast"] > 0 for q in seen[-1])

        wait_for(flowed, "traffic through every pool")
        first = seen[-1]

        def grew() -> bool:
            return flowed() and all(b["alloc-fast"] > a["alloc-fast"] for a, b in zip(first, seen[-1], strict=True))

        wait_for(grew, "the counters to grow")
        last = seen[-1]
        ids = pools.pool_identities(topo.hosts.values())
        assert [q["id"] for q in last] == [ids[("h1", c)].id for c in range(topo.hosts["h1"].cpus)]
        for q in last:
            assert q["ifindex"] == 2 and "detach-time" not in q and q["napi-id"] >= pools.MIN_NAPI_ID
            assert q["inflight-mem"] == q["inflight"] * topo.hosts["h1"].page_size
        text = subprocess.run([sys.executable, "-m", "emu.cli", "pools", str(p.pid)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert text.returncode == 0 and "1 h1/cpu0, 2 h1/cpu1" in text.stdout and "'alloc-fast':" in text.stdout
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=120)
    assert p.returncode == 0
    assert not segments_of(p.pid)
    gone = subprocess.run([sys.executable, "-m", "emu.cli", "pools", str(p.pid)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and f"run {p.pid} is not in progress" in gone.stderr


# test_faults' stall, its TX completions as far away as a topology allows (10 s).
STUCK = STALL.replace("tx_completion_us: 3000000", "tx_completion_us: 10000000")


@pytest.mark.slow
def test_pool_destroyed_with_pages_in_flight_stays_listed_detached(monkeypatch) -> None:
    """TX completions 10 s away (the most a topology allows), and a Ctrl-C once the shutdown warned that
    it stalled: the shutdown stops waiting, the CPU worker destroys its pool with pages still out, and
    the pool stays listed, detached, with its in-flight count: live (`emu pools` before the run's
    segments go) and in the report, whose audit counts the leak (made on purpose: not a fault for the
    reliability summary)."""

    def tick(run: Run) -> None:  # the waiting loops' hook: Ctrl-C, once the first warning is out
        if run.stalled and not run.interrupted:
            run.interrupt()

    monkeypatch.setattr(Run, "tick", tick)
    report, live = end_with_frames_awaiting_completion(
        STUCK, lambda run: pools.live_pools(pools.LiveRun(run.prefix, os.getpid(), ("h1",))))
    (pool,) = report["page_pools"]
    out = report["pages"]["total"] - report["pages"]["by_state"]["free"]
    assert pool["inflight"] == out >= 100 and pool["inflight-mem"] == out * 4096
    assert 0 < pool["detach-time"] <= time.clock_gettime(time.CLOCK_BOOTTIME)
    assert "napi-id" not in pool and pool["ifindex"] == 2
    assert report["violations"]["leaked"] == out
    assert live == [("h1/cpu0", pool)]
