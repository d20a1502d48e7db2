"""The benchmark suite (bench/run.py) measures what it says it measures.

No test asserts a speed: they check that every number is there and positive, that the ratios are the
quotients of the numbers they name, that each baseline really did the work it timed (the program's own
packet counter, every transport batch received, exactly N packets at the naive sink), that violations
are summed from the emulator's reports, and that nothing is left running or in /dev/shm.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import baselines, emu_runs  # noqa: E402
from bench import run as suite  # noqa: E402
from emu.mem.shm import SHM_DIR, new_run_prefix, unlink_prefix  # noqa: E402


def _our_segments() -> set[str]:
    mine = f"ppemu-{os.getpid()}-"
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(mine)}
    except FileNotFoundError:
        return set()


@pytest.fixture
def no_leftovers():
    """Nothing this test process creates stays in /dev/shm, and no child process stays alive."""
    before = _our_segments()
    yield
    assert _our_segments() - before == set()
    left = [p.name for p in multiprocessing.active_children() if p.name.startswith(("bench-", "emu-"))]
    assert left == []


# --------------------------------------------------------------------------------------------------
# pure functions


def _emu_sample(pps: int, violations: int = 0, kind_rss: float = 60.0, fp: float = 0.8, hwm: float = 20.0,
                cpu_us: dict | None = None) -> dict:
    return {"topology": "t", "rx_pps": pps, "delivered_pps": pps, "first_packet_s": fp, "violations": violations,
            "unaccounted": 0, "corrupted": 0, "allocated_hwm_mb": hwm,
            "rss_mb": {"cpu": kind_rss, "device": kind_rss + 1},
            "rss_private_mb": {"cpu": 20.0}, "pss_mb": {"cpu": 30.0},
            "cpu_us_per_pkt": cpu_us if cpu_us is not None else {"cpu": 2.0}}


def _samples() -> dict:
    return {
        "bare": [{"pps": 3e6}, {"pps": 1e6}, {"pps": 2e6}],
        "bare-cores": [{"pps_1": 1e6, "pps_2": 1.8e6, "scaling": 1.8}, {"pps_1": 2e6, "pps_2": 3e6, "scaling": 1.5},
                       {"pps_1": 1e6, "pps_2": 2e6, "scaling": 2.0}],
        "transport": [{"desc_per_s": 5e6, "rtt_desc_per_s": 4e6, "rtt_us": 50.0}],
        "naive": [{"pps": 50_000.0}, {"pps": 70_000.0}],
        "pool": [{"fast_ns": 100.0, "ring_ns": 200.0, "allocator_ns": 150.0}],
        "xdp-drop": [_emu_sample(400_000, violations=2)],
        "xdp-tx": [_emu_sample(200_000)],
        "l2fwd": [_emu_sample(150_000, violations=1, kind_rss=70.0, fp=1.2), _emu_sample(130_000, fp=0.6, hwm=24.5),
                  _emu_sample(110_000, violations=3)],
        "l2fwd-1cpu": [_emu_sample(100_000)],
        "l2fwd-filter": [_emu_sample(30_000)],
        "l2fwd-filter-1cpu": [_emu_sample(20_000)],
    }


def test_derive_medians_ratios_and_summed_violations():
    r = suite.derive(_samples(), cli=None)
    assert r["bare_xdp_pps"] == 2_000_000
    assert r["naive_queue_pps"] == 60_000
    # Each round's own ratio, then the median: 1.8, not the 2.0 of the medians' ratio.
    assert r["bare_scaling_2_to_1"] == 1.8 and r["bare_xdp_2core_pps"] == 2_000_000
    assert r["l2fwd_pps"] == r["l2fwd_2cpu_pps"] == 130_000
    assert r["l2fwd_to_bare"] == pytest.approx(r["l2fwd_pps"] / r["bare_xdp_pps"], abs=1e-4)
    assert r["l2fwd_to_naive"] == pytest.approx(r["l2fwd_pps"] / r["naive_queue_pps"], abs=1e-4)
    assert r["scaling_2_to_1"] == pytest.approx(r["l2fwd_2cpu_pps"] / r["l2fwd_1cpu_pps"], abs=1e-4)
    assert r["drop_to_l2fwd"] == pytest.approx(r["xdp_drop_pps"] / r["l2fwd_pps"], abs=1e-4)
    assert r["filter_scaling_2_to_1"] == pytest.approx(r["l2fwd_filter_pps"] / r["l2fwd_filter_1cpu_pps"], abs=1e-4)
    assert r["violations"] == 2 + 1 + 3 == sum(x["violations"] for x in r["runs"])
    assert len(r["runs"]) == 8
    assert r["rss_mb"]["cpu"] == 70.0 and r["rss_mb"]["device"] == 71.0  # the peak over runs
    assert r["rss_mb_by_topology"] == {"xdp-drop": 61.0, "xdp-tx": 61.0, "l2fwd": 71.0, "l2fwd-1cpu": 61.0,
                                       "l2fwd-filter": 61.0, "l2fwd-filter-1cpu": 61.0}
    assert r["allocated_hwm_mb_by_topology"] == {"xdp-drop": 20.0, "xdp-tx": 20.0, "l2fwd": 24.5, "l2fwd-1cpu": 20.0,
                                                 "l2fwd-filter": 20.0, "l2fwd-filter-1cpu": 20.0}
    assert r["rss_mb"]["coordinator"] > 0  # this process, without the CLI run
    assert r["first_packet_s"] == 0.8 and r["first_packet_max_s"] == 1.2


def test_ceilings_follow_from_the_cpu_time_per_packet():
    samples = _samples()
    # One CPU: 1.5 us of CPU per packet at 1M pkt/s keeps 1.5 of 2 cores busy; two: 2.5 us at 700k.
    samples["l2fwd-1cpu"] = [_emu_sample(1_000_000, cpu_us={"cpu": 0.5, "device": 0.6, "traffic": 0.4})]
    samples["l2fwd"] = [_emu_sample(700_000, cpu_us={"cpu": 0.9, "device": 1.0, "traffic": 0.6})]
    samples["l2fwd-filter-1cpu"] = [_emu_sample(100_000, cpu_us={"cpu": 8.0, "device": 1.0, "traffic": 1.0})]
    r = suite.derive(samples, cli=None, cores=2)
    assert r["cpu_us_per_pkt_total"]["l2fwd"] == 2.5 and r["cpu_us_per_pkt_total"]["l2fwd-1cpu"] == 1.5
    assert r["cores_busy"]["l2fwd-1cpu"] == 1.5 and r["cores_busy"]["l2fwd"] == 1.75
    assert r["pps_ceiling"]["l2fwd"] == 800_000  # 2 cores / 2.5 us
    assert r["l2fwd_to_bare_ceiling"] == pytest.approx(800_000 / 2_000_000)
    assert r["scaling_2_to_1_ceiling"] == pytest.approx(2 / 1.5, abs=1e-4)  # the idle half core, at best
    assert r["filter_scaling_2_to_1_ceiling"] == pytest.approx(2 / 1.0)  # 10 us x 100k: one core busy
    targets = {t["key"]: t for t in suite.evaluate_targets(r)}
    assert targets["l2fwd_to_bare"]["ceiling"] == 0.4 and targets["l2fwd_to_bare"]["reachable"] is True
    assert targets["scaling_2_to_1"]["reachable"] is False  # 1.33 < 1.6
    assert targets["l2fwd_to_naive"]["ceiling"] is None and targets["l2fwd_to_naive"]["reachable"] is None
    # Without CPU times (a run too short to sample) there is no ceiling, not a zero one.
    samples["l2fwd-1cpu"][0]["cpu_us_per_pkt"] = {}
    assert suite.derive(samples, cli=None, cores=2)["scaling_2_to_1_ceiling"] is None


def test_cli_violations_count_too():
    cli = {"violations": 4, "coordinator_hwm_mb": 40.0, "coordinator_private_mb": 20.0,
           "coordinator_pss_mb": 25.0}
    r = suite.derive(_samples(), cli=cli)
    assert r["violations"] == 6 + 4
    assert r["rss_mb"]["coordinator"] == 40.0


def test_targets_met_and_not_met():
    r = suite.derive(_samples(), cli=None)
    targets = {t["key"]: t for t in suite.evaluate_targets(r)}
    assert set(targets) == {"l2fwd_to_bare", "l2fwd_to_naive", "drop_to_l2fwd", "scaling_2_to_1", "rss_mb",
                            "first_packet_s"}
    assert targets["l2fwd_to_bare"]["met"] is False  # 0.065
    assert targets["drop_to_l2fwd"]["met"] is True  # 400k / 130k
    assert targets["scaling_2_to_1"]["met"] is False  # 1.3
    assert targets["rss_mb"]["met"] is False  # 71 MB
    assert targets["first_packet_s"]["met"] is True  # 0.8 s
    assert targets["l2fwd_to_naive"]["goal_met"] is False


def test_cold_cli_runs_decide_the_first_packet_target():
    runs = [{"count": 20000, "wall_s": 1.0, "import_s": 0.2, "first_packet_s": 0.1, "first_packet_from_exec_s": x,
             "coordinator_hwm_mb": m, "coordinator_private_mb": 20.0, "coordinator_pss_mb": 25.0, "violations": v}
            for x, m, v in ((1.3, 40.0, 0), (0.4, 42.0, 1), (0.5, 41.0, 0))]
    cli = suite.merge_cli(runs)
    assert cli["first_packet_from_exec_s"] == 0.5 and cli["first_packet_from_exec_max_s"] == 1.3
    assert cli["coordinator_hwm_mb"] == 42.0 and cli["violations"] == 1 and cli["runs"] == 3
    r = suite.derive(_samples(), cli=cli)
    assert r["violations"] == 6 + 1
    targets = {t["key"]: t for t in suite.evaluate_targets(r)}
    # From the exec of `emu run`, not from the Run object of an already running process.
    assert "first_packet_s" not in targets
    assert targets["first_packet_from_exec_s"]["measured"] == 0.5 and targets["first_packet_from_exec_s"]["met"]


@pytest.mark.slow
def test_cli_end_to_end_times_from_the_exec(no_leftovers):
    c = emu_runs.cli_end_to_end(count=3000)
    assert c["delivered"] == 3000 and c["violations"] == 0
    # Both are read off the sink's first_rx_ns; the exec comes before the CLI creates its Run.
    assert 0 < c["first_packet_s"] <= c["first_packet_from_exec_s"] < c["wall_s"]
    assert c["coordinator_hwm_mb"] > 0


def test_sum_violations_of_a_report():
    report = {"violations": {"double_free": 1, "leaked": 2, "bad_messages": 0, "stale_generation": 3}}
    assert emu_runs.sum_violations(report) == 6


def test_topology_variants_are_validated_edits():
    one = emu_runs.case("l2fwd-1cpu")
    h = one.hosts["h1"]
    assert h.cpus == 1 and h.devices["eth0"].rx_queues == 1
    v = emu_runs.l2fwd_variant(burst=256, napi_budget=128, pages=4096, page_size=4096, ring=512, pool_size=512)
    h = v.hosts["h1"]
    assert (h.cpus, h.napi_budget, h.pages, h.page_size, h.pool.pool_size) == (2, 128, 4096, 4096, 512)
    assert all(d.rx_ring_size == d.tx_ring_size == 512 for d in h.devices.values())
    assert v.traffic["gen0"].generate.burst == 256
    assert emu_runs.kinds_of(one) == {"h1/cpu0": "cpu", "h1/eth0": "device", "h1/eth1": "device",
                                      "gen0": "traffic", "sink0": "traffic"}
    f = emu_runs.case("l2fwd-filter-1cpu")
    xdp = f.hosts["h1"].devices["eth0"].xdp
    assert f.hosts["h1"].cpus == 1 and xdp.program == "emu.programs:l2fwd_filter"
    assert xdp.params == {"egress": "eth1", "deny_ports": [53]}
    assert set(emu_runs.VARIANTS) | {"xdp-drop", "xdp-tx", "l2fwd", "l2fwd-obj"} == set(suite.EMU_CASES)
    assert emu_runs.case("l2fwd").hosts["h1"].cpus == 2


def test_proc_readers_see_this_process():
    st = baselines.proc_status(os.getpid())
    assert st["VmHWM"] > 0 and st["VmRSS"] > 0
    assert baselines.proc_cpu_seconds(os.getpid()) > 0
    assert baselines.proc_status(2**22 + 12345) == {}


def test_bare_ceiling_runs_the_program_on_every_packet(no_leftovers):
    prefix = new_run_prefix()
    bare = baselines.BareXdp(prefix, npages=128)
    try:
        before = bare.packets_counted()
        bare.run(3)
        assert bare.packets_counted() - before == 3 * 128
        assert bare.verdicts_ok
        bare.run_vectorised(2)  # the vectorised form too: every packet, every verdict a redirect
        assert bare.packets_counted() - before == 5 * 128
        assert bare.verdicts_ok
    finally:
        bare.close()
        unlink_prefix(prefix)


def test_chart_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    res = _fake_result()
    assert suite.write_chart(res, tmp_path / "c.png") is None
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    why = suite.write_chart(_fake_result(), tmp_path / "c.png")
    assert why is not None and "matplotlib" in why
    assert not (tmp_path / "c.png").exists()


def _fake_result() -> dict:
    r = suite.derive(_samples(), cli=None)
    r.update(when="now", machine={"cpu_model": "test", "usable_cores": 2}, config={"rounds": 1})
    return r


# --------------------------------------------------------------------------------------------------
# processes


@pytest.mark.slow
def test_transport_delivers_every_batch(no_leftovers):
    one = baselines.transport_one_way(50)
    assert one["batches"] == 50 and one["descs"] == 50 * baselines.BATCH and one["in_order"]
    assert one["desc_per_s"] > 0
    rtt = baselines.transport_rtt(40, window=4)
    assert rtt["batches"] == 40 and rtt["descs"] == 40 * baselines.BATCH and rtt["all_back"]
    lat = baselines.transport_rtt(5, window=1)
    assert lat["batches"] == 5 and lat["all_back"] and lat["rtt_us"] > 0


@pytest.mark.slow
def test_bare_parallel_runs_one_copy_per_core(no_leftovers):
    prefix = new_run_prefix()
    try:
        one = baselines.bare_parallel(prefix, 1, 0.05)
        assert one["cores"] == 1 and len(one["per_core_pps"]) == 1
        assert one["counted_ok"] and one["verdicts_ok"] and one["packets"] % 1024 == 0 and one["pps"] > 0
        if len(baselines.usable_cores()) >= 2:
            two = baselines.bare_parallel(prefix, 2, 0.05)
            assert len(two["per_core_pps"]) == 2 and two["counted_ok"] and two["verdicts_ok"]
            assert two["pps"] == pytest.approx(sum(two["per_core_pps"]))
        with pytest.raises(ValueError, match="usable"):
            baselines.bare_parallel(prefix, len(baselines.usable_cores()) + 1, 0.05)
    finally:
        unlink_prefix(prefix)


@pytest.mark.slow
def test_cache_handover_reads_what_the_other_core_wrote(no_leftovers):
    if len(baselines.usable_cores()) < 2:
        pytest.skip("needs two cores")
    prefix = new_run_prefix()
    try:
        h = baselines.cache_handover(prefix, rounds=5, batch=64, npages=256)
    finally:
        unlink_prefix(prefix)
    # The reader saw every byte the writer process wrote, each round.
    assert h["bytes_seen_ok"] and h["rounds"] == 5 and h["batch"] == 64
    assert h["remote_ns_per_pkt"] > 0 and h["local_ns_per_pkt"] > 0
    assert h["handover_ns_per_pkt"] == pytest.approx(h["remote_ns_per_pkt"] - h["local_ns_per_pkt"], abs=0.11)


@pytest.mark.slow
def test_cprofile_run_profiles_every_worker(no_leftovers):
    """The workers are forked from a fork server, which must have started with the profiling switch set
    (a run in this process may already have started one without it)."""
    from bench import profile_run

    res = profile_run.cprofile_run("xdp-drop", 0.6, top=5)
    assert set(res["processes"]) == {"h1/cpu0", "h1/eth0", "gen0"}
    assert res["rx_packets"] > 0
    for p in res["processes"].values():
        assert p["cpu_s"] > 0 and 0 < len(p["top"]) <= 5


@pytest.mark.slow
def test_naive_sink_receives_exactly_n(no_leftovers):
    r = baselines.naive_queue(500)
    assert r["received"] == r["sent"] == 500
    assert r["seq_ok"] and r["bad"] == 0  # each seq once, every MAC swapped by the forwarder
    assert r["pps"] == pytest.approx(500 / r["seconds"])


@pytest.mark.slow
def test_tiny_suite_writes_every_key(tmp_path, no_leftovers):
    out = tmp_path / "run.json"
    assert suite.main(["--tiny", "--no-save", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("bare_xdp_pps", "naive_queue_pps", "transport_desc_per_s", "transport_rtt_desc_per_s",
                "xdp_drop_pps", "xdp_tx_pps", "l2fwd_pps", "l2fwd_1cpu_pps", "l2fwd_2cpu_pps", "l2fwd_to_bare",
                "l2fwd_to_naive", "scaling_2_to_1", "shm_bytes_l2fwd", "first_packet_s"):
        assert isinstance(res[key], int | float) and res[key] > 0, key
    # the C object end to end and the eBPF engine alone, per bundled C program (issue 17)
    assert res["l2fwd_obj_pps"] > 0 and res["l2fwd_obj_to_l2fwd"] > 0
    assert set(res["xdp_engine_ns"]) == {"xdp_drop", "xdp_tx", "l2fwd", "l2fwd_map", "xdp_filter", "xdp_lb"}
    assert all(v > 0 for v in res["xdp_engine_ns"].values())
    assert set(res["xdp_engine_interp_ns"]) == set(res["xdp_engine_ns"])  # the interpreter, same rounds
    assert all(v > 0 for v in res["xdp_engine_interp_ns"].values())
    assert res["l2fwd_to_bare"] == pytest.approx(res["l2fwd_pps"] / res["bare_xdp_pps"], abs=1e-4)
    assert res["l2fwd_to_naive"] == pytest.approx(res["l2fwd_pps"] / res["naive_queue_pps"], abs=1e-4)
    assert res["scaling_2_to_1"] == pytest.approx(res["l2fwd_2cpu_pps"] / res["l2fwd_1cpu_pps"], abs=1e-4)
    for kind in ("cpu", "device", "traffic", "coordinator"):
        assert res["rss_mb"][kind] > 0, kind
    assert res["machine"]["cores"] >= 1 and res["machine"]["cpu_model"]
    # violations: the sum of the per-run counts, one run per emulator case and round
    assert res["violations"] == sum(r["violations"] for r in res["runs"])
    assert len(res["runs"]) == len(suite.EMU_CASES) * res["config"]["rounds"]
    assert res["violations"] == 0 and res["unaccounted"] == 0 and res["corrupted"] == 0
    # each baseline did the work it timed
    s = res["samples"]
    cfg = res["config"]
    assert all(x["counted_by_program"] == x["packets"] > 0 and x["verdicts_ok"] for x in s["bare"])
    assert all(x["vectorised_counted"] == x["vectorised_packets"] > 0 for x in s["bare"])
    assert res["bare_xdp_vectorised_pps"] > 0
    assert all(x["batches"] == cfg["transport_batches"] and x["in_order"] for x in s["transport"])
    assert all(x["rtt_batches"] == cfg["rtt_batches"] and x["rtt_all_back"] for x in s["transport"])
    assert all(x["received"] == cfg["naive_packets"] and x["seq_ok"] for x in s["naive"])
    assert all(x["delivered"] > 0 for x in s["l2fwd"] + s["xdp-tx"] + s["l2fwd-1cpu"] + s["l2fwd-filter"]
               + s["l2fwd-filter-1cpu"])
    assert res["filter_scaling_2_to_1"] == pytest.approx(res["l2fwd_filter_pps"] / res["l2fwd_filter_1cpu_pps"],
                                                         abs=1e-4)
    assert res["cores_used"] == res["machine"]["usable_cores"]
    if res["cores_used"] >= 2:
        assert all(x["counted_ok"] and x["verdicts_ok"] for x in s["bare-cores"])
        assert res["bare_scaling_2_to_1"] == pytest.approx(statistics.median(x["scaling"] for x in s["bare-cores"]),
                                                           abs=1e-4)
    # pages were handed out in every run, never more than the host's page memory
    for name in suite.EMU_CASES:
        h = emu_runs.case(name).hosts["h1"]
        assert all(0 < x["allocated_hwm_mb"] <= h.pages * h.page_size / 2**20 for x in s[name]), name
    assert set(res["allocated_hwm_mb_by_topology"]) == set(suite.EMU_CASES)
    assert {t["key"] for t in res["targets"]} >= {"l2fwd_to_bare", "scaling_2_to_1", "rss_mb"}
    assert all(isinstance(t["met"], bool) for t in res["targets"])


def test_capture_cost_is_each_rounds_own_ratio():
    samples = _samples()
    for k, s in enumerate(samples["l2fwd"]):
        s["round"] = k
    cap = [_emu_sample(75_000), _emu_sample(130_000), _emu_sample(55_000)]  # against 150k, 130k, 110k
    for k, s in enumerate(cap):
        s.update(round=k, capture_frames=900, capture_drops=100)
    samples["l2fwd-capture"] = cap
    r = suite.derive(samples, cli=None)
    assert r["l2fwd_capture_pps"] == 75_000
    assert r["capture_to_l2fwd"] == 0.5  # median of 0.5, 1.0, 0.5
    assert r["capture_kept_share"] == 0.9 and r["capture_violations"] == 0
    assert "capture_to_l2fwd" not in suite.derive(_samples(), cli=None)


@pytest.mark.slow
def test_capture_case_runs_and_removes_its_files(no_leftovers):
    topo = emu_runs.l2fwd_capture()
    try:
        s = emu_runs.run_topology(topo, 0.6)
        assert s["delivered"] > 0 and s["violations"] == 0 and s["unaccounted"] == 0
        assert s["capture_frames"] > 0 and s["capture_frames"] + s["capture_drops"] >= s["delivered"]
        assert s["capture_bytes"] > 0 and os.listdir(topo.capture.dir) == []
    finally:
        shutil.rmtree(topo.capture.dir, ignore_errors=True)
