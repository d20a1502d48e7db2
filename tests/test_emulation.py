"""End-to-end runs of real topologies: CPU workers, devices and traffic ports as real processes.

Every assertion is on exact counter relationships, never on timing.  Each run has its own shared-memory
prefix and ipc directory, so these tests run in parallel; after each one nothing may be left in
/dev/shm and no child process may be alive.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emu.mem.shm import PREFIX, SHM_DIR
from emu.run.coordinator import Run, RunOptions
from emu.run.report import summary
from emu.topology.file import load_topology, validate_topology_text

ROOT = Path(__file__).resolve().parent.parent
TOPO = ROOT / "topology"

pytestmark = pytest.mark.slow


def own_segments() -> list[str]:
    return [n for n in os.listdir(SHM_DIR) if n.startswith(f"{PREFIX}-{os.getpid()}-")]


def run(topo, count: int | None = None, **kw) -> dict:
    out = io.StringIO()
    report = Run(topo, RunOptions(count=count, interval=0.5, out=out, **kw)).run()
    assert own_segments() == []
    assert multiprocessing.active_children() == []
    return report


def assert_clean(r: dict) -> None:
    v = r["violations"]
    for k in ("foreign_cache_return", "recycled_before_tx_completion", "double_free", "leaked",
              "stale_generation", "bad_descriptors", "bad_messages"):
        assert v[k] == 0, (k, v)
    t = r["traffic"]
    assert t["unaccounted"] == 0 and t["corrupted"] == 0 and t["duplicates"] == 0, t
    assert t["generated"] == t["delivered"] + t["dropped"] + t["consumed"]
    p = r["pages"]
    assert p["total"] == p["accounted"] and p["in_flight"] == 0 and not p["problems"], p
    for c in r["cpus"]:
        pp = c["page_pool"]
        assert pp["hold_cnt"] == pp["release_cnt"]  # the pool was destroyed with nothing in flight


def totals(r: dict, key: str) -> int:
    return sum(c["xdp"][key] for c in r["cpus"])


def test_l2fwd_delivers_every_packet() -> None:
    topo = load_topology(TOPO / "l2fwd.yaml")
    r = run(topo, count=20_000)
    assert_clean(r)
    t = r["traffic"]
    assert t["generated"] == t["delivered"] == 20_000
    assert totals(r, "redirect") == 20_000
    eth0, eth1 = r["devices"]
    assert eth0["rx_packets"] == 20_000
    assert eth1["tx_packets"] == eth1["xdp_xmit"] == eth1["tx_completions"] == 20_000
    # Both CPUs took part (RSS over 64 flows) and every redirect went out through a devmap bulk.
    assert all(c["rx_packets"] > 0 for c in r["cpus"])
    assert sum(c["xmit_bulks"] for c in r["cpus"]) >= 20_000 // 16
    # At the peak, at least every RX ring was full at once (eth0's two and eth1's one), and never more than
    # the host's pages were out.
    host = topo.hosts["h1"]
    rings = sum(d.rx_ring_size * d.rx_queues for d in host.devices.values())
    assert rings <= r["pages"]["allocated_hwm"] <= r["pages"]["total"] == host.pages, r["pages"]
    # Every page went out and came home through its own pool.
    for c in r["cpus"]:
        pp = c["page_pool"]
        assert pp["recycle_cached"] + pp["recycle_ring"] + pp["recycle_ring_full"] >= c["rx_packets"]
    # The program (its vectorised form) counted every packet in its per-CPU map, on both CPUs.
    rxcnt = r["maps"]["h1:eth0"]["rxcnt"]["entries"]["0"]
    assert rxcnt["sum"] == 20_000 and all(rxcnt["cpus"])


def test_l2fwd_adaptive_pool_policy() -> None:
    """``pool.policy: adaptive``: the pools keep at most their measured watermark; every packet and every
    page is still accounted, and each CPU's pool row shows the watermark it reached."""
    text = (TOPO / "l2fwd.yaml").read_text()
    assert "pool: {pool_size: 4096}" in text
    topo = validate_topology_text(text.replace("pool: {pool_size: 4096}", "pool: {pool_size: 4096, policy: adaptive}"),
                                  "l2fwd.yaml")
    r = run(topo, count=20_000)
    assert_clean(r)
    t = r["traffic"]
    assert t["generated"] == t["delivered"] == 20_000
    for c in r["cpus"]:
        pp = c["page_pool"]
        assert pp["watermark"] > topo.hosts["h1"].pool.refill, pp  # measured: the RX ring's pages at least
        # Every page the pool took from the allocator went back: released past the watermark, or at the end.
        assert pp["hold_cnt"] == pp["release_cnt"] >= pp["recycle_hard_limit"]
    assert "watermark" in summary(r)


def test_l2fwd_per_packet_programs_forward_the_same() -> None:
    """``vectorised: false``: the CPUs call the program once per packet (bpf_prog_run_xdp), with the
    same counters and the same verified frames as its vectorised form."""
    text = (TOPO / "l2fwd.yaml").read_text()
    assert "params: {egress: eth1}" in text
    text = text.replace("params: {egress: eth1}", "params: {egress: eth1}\n          vectorised: false")
    topo = validate_topology_text(text, "l2fwd.yaml")
    assert topo.hosts["h1"].devices["eth0"].xdp.vectorised is False
    r = run(topo, count=10_000)
    assert_clean(r)
    assert r["traffic"]["delivered"] == 10_000 == totals(r, "redirect")
    assert r["maps"]["h1:eth0"]["rxcnt"]["entries"]["0"]["sum"] == 10_000


@pytest.mark.parametrize(("deny", "forwarded"), [(53, True), (9, False)])
def test_l2fwd_filter_parses_every_packet_and_drops_the_denied_port(deny: int, forwarded: bool) -> None:
    """The dpkt-parsing program (per packet only) in the l2fwd topology; the generator's frames all go to
    UDP port 9, so denying 9 drops every one at XDP and denying 53 forwards every one."""
    text = (TOPO / "l2fwd.yaml").read_text()
    text = text.replace('"emu.programs:l2fwd"', '"emu.programs:l2fwd_filter"')
    text = text.replace("params: {egress: eth1}", f"params: {{egress: eth1, deny_ports: [{deny}]}}")
    r = run(validate_topology_text(text, "l2fwd.yaml"), count=3_000)
    assert_clean(r)
    t = r["traffic"]
    entries = r["maps"]["h1:eth0"]["rxcnt"]["entries"]
    if forwarded:
        assert t["delivered"] == 3_000 == totals(r, "redirect") == entries["0"]["sum"], t
    else:
        assert t["dropped"] == 3_000 == totals(r, "drop") == entries["1"]["sum"] and t["delivered"] == 0, t


def test_xdp_drop_recycles_into_the_cache() -> None:
    topo = load_topology(TOPO / "xdp-drop.yaml")
    r = run(topo, count=20_000)
    assert_clean(r)
    assert totals(r, "drop") == 20_000 == r["traffic"]["dropped"]
    pp = r["cpus"][0]["page_pool"]
    ring = r["devices"][0]
    # Warm-up only: the slow path filled the RX ring once (plus at most one bulk of slack); afterwards
    # every dropped page went straight back into the cache and was reused.
    assert pp["alloc_slow"] * 64 <= topo.hosts["h1"].devices["eth0"].rx_ring_size + 64 + 64, pp
    assert pp["recycle_cached"] >= 0.9 * 20_000
    assert ring["rx_packets"] == 20_000


def test_xdp_tx_returns_frames_and_completes() -> None:
    r = run(load_topology(TOPO / "xdp-tx.yaml"), count=10_000)
    assert_clean(r)
    assert totals(r, "tx") == 10_000
    dev = r["devices"][0]
    assert dev["xdp_tx"] == dev["tx_packets"] == dev["tx_completions"] == 10_000
    assert r["traffic"]["delivered"] == 10_000  # back to the port that sent them, verified


@pytest.mark.parametrize("fallback", ["skb", "drop"])
def test_redirect_fallback(fallback: str) -> None:
    text = (TOPO / "redirect-fallback.yaml").read_text().replace(
        "redirect_fallback: skb", f"redirect_fallback: {fallback}"
    )
    r = run(validate_topology_text(text, "redirect-fallback.yaml"), count=5_000)
    assert_clean(r)
    eth1 = r["devices"][1]
    if fallback == "skb":
        assert sum(c["redirect_skb"] for c in r["cpus"]) == 5_000 == eth1["skb_xmit"]
        assert eth1["xdp_xmit"] == 0 and eth1["tx_completions"] == 0  # copies: no page went out
        assert r["traffic"]["delivered"] == 5_000
    else:
        assert sum(c["redirect_err"] for c in r["cpus"]) == 5_000
        assert r["traffic"]["delivered"] == 0 and r["traffic"]["dropped"] == 5_000


TWO_CPU = """
name: {name}
hosts:
  h1:
    cpus: 2
    {host_extra}
    devices:
      eth0:
        ifindex: 2
        rx_queues: 2
        xdp: {{program: "{program}", params: {{egress: eth1}}}}
      eth1:
        ifindex: 3
        {eth1_extra}
traffic:
  gen0: {{generate: {{flows: 32}}}}
  sink0: {{}}
links:
  - endpoints: [gen0, "h1:eth0"]
  - endpoints: ["h1:eth1", sink0]
"""


def topo_text(name: str, program: str, host_extra: str = "", eth1_extra: str = "") -> str:
    return TWO_CPU.format(name=name, program=program, host_extra=host_extra, eth1_extra=eth1_extra)


def test_shared_tx_queue_returns_pages_through_the_owners_ring() -> None:
    """eth1 has one TX queue for two CPUs (veth-style): completions for CPU 1's pages arrive on CPU 0,
    which must put them in CPU 1's ring, never into its own cache."""
    text = topo_text("shared-txq", "emu.programs:l2fwd", eth1_extra="tx_queues: 1")
    r = run(validate_topology_text(text, "t.yaml"), count=10_000)
    assert_clean(r)
    cpu0, cpu1 = r["cpus"]
    assert cpu0["tx_completions"] == 10_000 and cpu1["tx_completions"] == 0
    assert cpu0["remote_returns"] == cpu1["rx_packets"] > 0
    assert cpu1["page_pool"]["recycle_ring"] + cpu1["page_pool"]["recycle_ring_full"] >= cpu1["rx_packets"]


def test_full_xdp_tx_ring_holds_rx_back_and_loses_nothing() -> None:
    """eth1's TX rings hold 16 frames and complete 5 ms after transmit, far slower than the generator: each
    CPU queues no more than its ring holds (the device never has to refuse a frame) and leaves the rest
    in its RX ring until completions free room, so every packet still arrives."""
    text = topo_text("slow-tx", "emu.programs:l2fwd",
                     eth1_extra="tx_ring_size: 16\n        tx_completion_us: 5000")
    r = run(validate_topology_text(text, "t.yaml"), count=6_000)
    assert_clean(r)
    t = r["traffic"]
    assert t["generated"] == t["delivered"] == 6_000 and t["dropped"] == 0, t
    eth1 = r["devices"][1]
    assert eth1["xmit_full"] == 0 and eth1["xdp_xmit"] == eth1["tx_completions"] == 6_000, eth1
    assert all(c["xmit_drops"] == 0 for c in r["cpus"])
    assert sum(c["tx_ring_waits"] for c in r["cpus"]) > 0
    # The text summary says so on the line of each CPU that waited.
    waited = [c for c in r["cpus"] if c["tx_ring_waits"]]
    lines = summary(r).splitlines()
    for c in waited:
        line = next(x for x in lines if x.startswith(f"  {c['host']}/cpu{c['cpu']} "))
        assert f"tx_ring_waits {c['tx_ring_waits']:,}" in line


def test_pass_frees_skbs_on_the_stack_cpu() -> None:
    # xdp_pass declares that it takes no params: drop the template's egress.
    text = topo_text("pass", "emu.programs:xdp_pass", host_extra="stack_cpu: 1").replace(", params: {egress: eth1}", "")
    r = run(validate_topology_text(text, "t.yaml"), count=6_000)
    assert_clean(r)
    assert totals(r, "pass") == 6_000 == r["traffic"]["consumed"]
    cpu0, cpu1 = r["cpus"]
    assert cpu1["stack_rx"] == 6_000
    assert cpu1["skb_remote_free"] == cpu0["rx_packets"] > 0
    # CPU 0's pages freed on CPU 1 came back through CPU 0's ring.
    assert cpu0["page_pool"]["recycle_ring"] + cpu0["page_pool"]["recycle_ring_full"] >= cpu0["rx_packets"]


@pytest.mark.parametrize(
    "program",
    [
        "emu.programs:buggy_raise",
        "emu.programs:buggy_bad_verdict",
        "emu.programs:buggy_no_verdict",
        "emu.programs:buggy_batch_short",
    ],
)
def test_buggy_program_is_aborted_and_worker_survives(program: str) -> None:
    r = run(validate_topology_text(topo_text("buggy", program), "t.yaml"), count=3_000)
    assert_clean(r)
    assert totals(r, "aborted") == 3_000
    assert sum(c["xdp_exception"] for c in r["cpus"]) == 3_000
    assert r["traffic"]["dropped"] == 3_000


def test_duration_run_stops_and_accounts() -> None:
    topo = load_topology(TOPO / "xdp-drop.yaml")
    r = run(topo, duration=1.0)
    assert_clean(r)
    assert r["traffic"]["generated"] > 0


@pytest.mark.parametrize("txc_release", ["deferred", "immediate"])
def test_tx_completions_steered_to_the_other_cpu(txc_release: str) -> None:
    """eth1's TX completions handled by the CPU that did not transmit (tx_cpus: [1, 0], the TX IRQs'
    affinity crossed): every page goes home through its owner's recycle ring, none into a cache at
    completion, and every packet and page is accounted for."""
    text = (TOPO / "l2fwd.yaml").read_text()
    old = "        xdp_xmit: true      # eth1 implements ndo_xdp_xmit, so it can be a redirect target\n"
    assert old in text
    text = text.replace(old, old + "        tx_cpus: [1, 0]\n")
    text = text.replace("    cpus: 2\n", f"    cpus: 2\n    txc_release: {txc_release}\n")
    topo = validate_topology_text(text, "l2fwd.yaml")
    assert topo.hosts["h1"].devices["eth1"].tx_cpus == (1, 0)
    r = run(topo, count=5_000)
    assert_clean(r)
    assert r["traffic"]["delivered"] == 5_000
    # Each CPU completed the other's frames: all 5,000 returns were remote.
    assert sum(c["tx_completions"] for c in r["cpus"]) == 5_000
    assert sum(c["remote_returns"] for c in r["cpus"]) == 5_000


def scheduled_l2fwd(schedule: str, count: int | None = None) -> object:
    text = (TOPO / "l2fwd.yaml").read_text()
    old = "      pkt_size: 64\n"
    assert old in text
    extra = f"      count: {count}\n" if count else ""
    return validate_topology_text(text.replace(old, f"{old}      schedule: {schedule}\n{extra}"), "l2fwd.yaml")


def test_a_schedule_ends_the_run_with_what_its_phases_allow() -> None:
    """No count: the generator runs its phases once and is done, which ends the run.  The pacer's guarantee
    bounds what it sent: one burst plus each phase's rate x length (a slow machine sends less, never more);
    the idle phase sends nothing."""
    topo = scheduled_l2fwd("[{rate: 20kpps, for: 100ms}, {rate: 0, for: 100ms}, {rate: 5kpps, for: 200ms}]")
    gen = topo.traffic["gen0"].generate
    assert gen.count == 0 and gen.schedule == ((20_000, 100_000), (0, 100_000), (5000, 200_000))
    r = run(topo)
    assert_clean(r)
    t = r["traffic"]
    assert 0 < t["generated"] <= gen.burst + 2000 + 1000
    # What it fell behind by and gave up is counted, and is part of the same budget (never generated).
    assert 0 <= t["generated"] + t["pacer_lag"] <= gen.burst + 2000 + 1000
    assert t["generated"] == t["delivered"]


def test_a_count_still_ends_a_scheduled_run() -> None:
    topo = scheduled_l2fwd("[{rate: 20kpps, for: 60s}, {rate: 0, for: 1s}]")
    r = run(topo, count=700)
    assert_clean(r)
    assert r["traffic"]["generated"] == r["traffic"]["delivered"] == 700


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emu.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_run_json_and_live_lines(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    p = cli("run", "topology/l2fwd.yaml", "--count", "5000", "-i", "0.2", "-e", "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "Summary of 'l2fwd'" in p.stdout
    report = json.loads(out.read_text())
    assert report["traffic"]["delivered"] == 5000
    for key in ("cpus", "devices", "pages", "violations", "traffic"):
        assert key in report
    assert set(report["cpus"][0]["xdp"]) == {"aborted", "drop", "pass", "tx", "redirect"}


def test_cli_json_to_stdout_is_pure_json() -> None:
    p = cli("run", "topology/xdp-tx.yaml", "--count", "2000", "--json", "-")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["traffic"]["delivered"] == 2000


def test_cli_rejects_a_malformed_topology_before_starting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nhosts:\n  h1:\n    cpus: 1\n    devices:\n      eth0: {ifindex: 2, rx_queus: 2}\n")
    for verb in ("run", "validate"):
        p = cli(verb, str(bad))
        assert p.returncode == 2
        assert p.stderr.startswith(f"{bad}:6: "), p.stderr
        assert "rx_queus" in p.stderr
    assert own_segments() == []


def test_cli_validate_ok() -> None:
    for name in ("xdp-drop", "xdp-tx", "l2fwd", "redirect-fallback"):
        p = cli("validate", f"topology/{name}.yaml")
        assert p.returncode == 0 and ": ok:" in p.stdout, p.stderr


IMPAIRED = """
name: impaired
hosts:
  h1:
    cpus: 1
    devices:
      eth0: {ifindex: 2, xdp: {program: "emu.programs:l2fwd", params: {egress: eth1}}}
      eth1: {ifindex: 3}
traffic:
  gen0: {generate: {pkt_size: 64, flows: 8, burst: 32}}
  sink0: {}
links:
  - {endpoints: [gen0, "h1:eth0"], loss: 10%, delay: 2ms, jitter: 1ms}
  - {endpoints: ["h1:eth1", sink0], rate: 20mbit, delay: 500us}
"""


def test_link_impairments_lose_delay_and_shape_without_losing_track() -> None:
    r = run(validate_topology_text(IMPAIRED, "impaired.yaml"), count=6_000)
    assert_clean(r)
    t = r["traffic"]
    lost = t["ports"]["gen0"]["link_lost"]
    # About 10% of the frames vanish on the first cable (a very wide bound: 600 expected), each one
    # counted by the sender as link_lost; every other frame crosses both cables, delayed and shaped.
    assert 300 < lost < 900, lost
    assert t["drops"]["traffic.link_lost"] == lost
    assert t["delivered"] == 6_000 - lost and t["dropped"] == lost
    eth1 = r["devices"][1]
    assert eth1["tx_packets"] == eth1["tx_completions"] == 6_000 - lost and eth1["link_lost"] == 0



def test_frames_on_a_link_longer_than_the_drain_stall_are_waited_for() -> None:
    """A count run over a link whose delay and jitter (up to 10 s each are allowed) keep frames on the wire
    longer than `DRAIN_STALL` without any delivery: the run waits for them (`settle_stall`) instead of
    ending with them unaccounted (it did: 200 of 200 unaccounted, exit status 1, with ``delay: 10s``)."""
    from emu.run.coordinator import DRAIN_STALL

    text = IMPAIRED.replace("loss: 10%, delay: 2ms, jitter: 1ms", f"delay: {DRAIN_STALL + 1.5:g}s") \
        .replace("rate: 20mbit, delay: 500us", "jitter: 1s")
    r = run(validate_topology_text(text, "slow-wire.yaml"), count=300)
    assert_clean(r)
    assert r["traffic"]["generated"] == r["traffic"]["delivered"] == 300


TWO_GENERATORS = """
name: two-generators
hosts:
  h1:
    cpus: 1
    pages: 4096
    devices:
      eth0: {ifindex: 2, rx_ring_size: 512, xdp: {program: "emu.programs:l2fwd", params: {egress: eth2}}}
      eth1: {ifindex: 3, rx_ring_size: 512, xdp: {program: "emu.programs:l2fwd", params: {egress: eth2}}}
      eth2: {ifindex: 4, rx_ring_size: 512}
traffic:
  gen0: {generate: {count: 3000}}
  gen1: {generate: {count: 2000, pkt_size: 128}}
  sink0: {}
links:
  - endpoints: [gen0, "h1:eth0"]
  - endpoints: [gen1, "h1:eth1"]
  - endpoints: ["h1:eth2", sink0]
"""


def test_a_sink_hearing_two_generators_counts_each_ones_sequence_numbers_apart() -> None:
    """Both generators number their frames from 0; the sink must not take the second's for duplicates."""
    r = run(validate_topology_text(TWO_GENERATORS, "two.yaml"))
    assert_clean(r)
    t = r["traffic"]
    assert t["generated"] == t["delivered"] == 5000 and t["duplicates"] == 0, t
