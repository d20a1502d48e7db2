"""The report built from a run's record (`emu.run.report.RunRecord`), without a process: one record type and
one builder for a run on this machine and for a multi-host run, so their reports cannot drift apart."""

from __future__ import annotations

from emu.mem import pagepool
from emu.mem.page import PageState
from emu.mem.pagepool import pool_of
from emu.run import report as rep
from emu.run.stats import StatsTable
from emu.topology.file import validate_topology_text

TOPO = """
name: rec
hosts:
  h1:
    cpus: 2
    devices:
      eth0: {ifindex: 2}
traffic:
  gen0: {generate: {count: 10}}
links:
  - endpoints: [gen0, "h1:eth0"]
"""


def test_one_record_one_report_for_one_machine_and_for_several(page_memory, run_prefix: str) -> None:
    """A run on this machine and a multi-host run whose one host sent that same report build their
    reports through the same `build_report`: the same keys, the same pages and violations."""
    topo = validate_topology_text(TOPO, "rec.yaml")
    pm = page_memory(npages=256, ncpus=2)
    pool0 = pool_of(pm, 0, owner=True)
    assert len(pool0.alloc(3, PageState.XDP, holder=0)) == 3
    table = StatsTable.create(f"{run_prefix}-stats", [("cpu", "h1/cpu0"), ("cpu", "h1/cpu1"),
                                                      ("device", "h1/eth0"), ("traffic", "gen0")])
    try:
        final = rep.snapshot(table, 0.0, lost=2)
        record = rep.RunRecord(topo, final, elapsed=1.0,
                               pages={"h1": rep.HostPages.of(pm, pagepool.audit(pm, strict=True))},
                               events=["something"], dead=["h1/cpu1"], processes={"coordinator": 1})
        single = rep.build_report(record)
        merged = rep.build_report(rep.RunRecord(topo, final, elapsed=1.0, parts={"h1": single},
                                                processes={"coordinator": 1}, control_refused=0,
                                                bad_control_messages=0))
        lost_all = rep.build_report(rep.RunRecord(topo, final, elapsed=1.0, parts={}, hosts_lost=["h1"]))
    finally:
        table.unlink()
        table.close()
    assert set(merged) - set(single) == {"security", "bad_control_messages"}
    assert set(single) <= set(lost_all)
    for key in ("cpus", "devices", "pages", "violations", "traffic", "dead_processes", "processes"):
        assert merged[key] == single[key], key
    # The slow path took one refill of 64 from the allocator: 3 out, 61 cached, none freed yet.
    assert single["pages"]["total"] == 256 and single["pages"]["in_flight"] == 64
    assert single["cpus"][0]["page_pool"]["cached"] == 61 and single["cpus"][1]["page_pool"]["cached"] == 0
    assert single["violations"]["leaked"] == 64 and single["traffic"]["drops"]["fault.lost"] == 2
    assert merged["events"] == ["h1: something"] and single["dead_processes"] == ["h1/cpu1"]
    assert lost_all["cpus"] == [] and lost_all["hosts_lost"] == ["h1"]
