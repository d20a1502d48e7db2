"""The report's derived metrics and ``emu sweep``: specs refused before anything runs, a tiny grid of real runs
(CSV columns, results, a PNG per plot, report.md), resuming an interrupted sweep, the bundled
experiment end to end, and the experiments of docs/experiments.md: every spec and base topology accepted,
every command and plot the document shows there."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

from emu.cli import main
from emu.errors import BadInputError
from emu.mem.pagepool import POOL_COUNTERS
from emu.run import report as rep
from emu.run.stats import CPU_COUNTERS
from emu.sweep import output, runner
from emu.sweep.spec import SweepSpec, SweepSpecError, load_spec
from emu.topology.file import validate_topology_text

ROOT = Path(__file__).resolve().parent.parent

TOPO = """\
name: tiny
hosts:
  h1:
    cpus: 1
    pages: 2048
    page_size: 2048
    pool: {pool_size: 256}
    devices:
      eth0:
        ifindex: 2
        rx_ring_size: 256
        tx_ring_size: 256
        xdp: {program: "emu.programs:xdp_tx"}
traffic:
  gen0: {generate: {pkt_size: 64, burst: 32}}
links:
  - endpoints: ["gen0", "h1:eth0"]
"""

SPEC = """\
topology: tiny.yaml
grid:
  hosts.h1.pool.pool_size: [64, 256]
repeats: 1
run: {count: 3000}
plots:
  - {x: hosts.h1.pool.pool_size, y: hit_ratio}
"""


def _write(tmp_path: Path, spec: str = SPEC, topo: str = TOPO) -> Path:
    (tmp_path / "tiny.yaml").write_text(topo)
    path = tmp_path / "spec.yaml"
    path.write_text(spec)
    return path


# -- the metrics, from known counters -------------------------------------------------------------------


def _pool(**given: int) -> dict[str, int]:
    return {name: given.get(name, 0) for name in POOL_COUNTERS}


def test_derived_metrics_from_known_counters() -> None:
    pool = _pool(recycle_cached=98, recycle_ring=1, recycle_ring_full=1, alloc_slow=5, hold_cnt=320,
                 recycle_hard_limit=10, recycle_released_refcnt=2, release_cnt=320)
    m = rep.derive_metrics(pool, delivered=5000, rx_packets=2_000_000, elapsed=2.0,
                           in_flight=[*range(1, 101)], pool_bytes=[1000, 3000],
                           violations={"double_free": 1, "leaked": 2}, cpu_s=1.5)
    assert list(m) == list(rep.METRICS)
    assert m["cpu_ns_per_pkt"] == 750.0  # 1.5 s of the CPU workers over 2 M packets
    assert m["pps"] == 2500.0
    assert m["hit_ratio"] == 0.98  # 98 / (98 + 1 + 1)
    assert m["alloc_slow_per_mpkt"] == 2.5  # 5 per 2 M packets
    assert m["page_alloc_pps"] == 160.0  # hold_cnt / s
    assert m["page_free_pps"] == 6.5  # (ring_full 1 + hard_limit 10 + released_refcnt 2) / 2 s; not release_cnt
    assert m["inflight_mean"] == 50.5 and m["inflight_p99"] == 99  # nearest rank of 1..100
    assert m["pool_memory_bytes"] == 2000
    assert m["violations"] == 3


def test_undefined_metrics_are_none() -> None:
    m = rep.derive_metrics(_pool(), delivered=0, rx_packets=0, elapsed=0.0, in_flight=[], pool_bytes=[],
                           violations={"leaked": 0})
    assert m == {"pps": None, "hit_ratio": None, "alloc_slow_per_mpkt": None, "page_alloc_pps": None,
                 "page_free_pps": None, "inflight_mean": None, "inflight_p99": None, "pool_memory_bytes": None,
                 "violations": 0, "cpu_ns_per_pkt": None}


def _part(cached: int, ring: int, samples: list[int], pool_bytes: list[int]) -> dict[str, Any]:
    """A host's own report, as much of it as the merge reads."""
    return {
        "cpus": [{"host": "h", "cpu": 0, "page_pool": _pool(recycle_cached=cached, recycle_ring=ring,
                                                             hold_cnt=64)}],
        "devices": [],
        "pages": {"total": 64, "accounted": 64, "in_flight": 0, "allocated_hwm": 64, "audits": 1,
                  "by_state": {"free": 64}, "problems": [],
                  "samples": {"period_s": rep.SAMPLE_PERIOD, "in_flight": samples, "pool_bytes": pool_bytes}},
        "violations": {"double_free": 0}, "maps": {}, "events": [], "dead_processes": [],
        "stalled_shutdown": [],
    }


def test_multi_host_metrics_come_from_summed_counters() -> None:
    """A multi-host report's hit ratio is of the summed counters (not the mean of the hosts' ratios), and its
    in-flight samples are the hosts' summed sample by sample."""
    topo = validate_topology_text(TOPO, "tiny.yaml")
    rows = {"gen0": {"generated": 4000, "received": 4000, "foreign": 0, "corrupted": 0, "duplicates": 0,
                     "link_down": 0, "link_lost": 0, "bad_messages": 0}}
    final = rep.Snapshot(0.0, rows, {"gen0": "traffic"})
    parts = {"h1": _part(90, 10, [10, 20, 30], [100, 100, 100]), "h2": _part(0, 100, [5, 5], [0, 50])}
    report = rep.build_report(rep.RunRecord(topo, final, elapsed=2.0, parts=parts))
    m = report["metrics"]
    assert m["hit_ratio"] == 0.45  # 90 / 200; the mean of 0.9 and 0.0 would also be 0.45, so also:
    assert m["page_alloc_pps"] == 64.0 and m["pps"] == 2000.0
    assert report["pages"]["samples"]["in_flight"] == [15, 25]  # the samples both hosts have
    assert m["inflight_mean"] == 20.0 and m["inflight_p99"] == 25 and m["pool_memory_bytes"] == 125
    lopsided = {"h1": _part(90, 10, [1], [0]), "h2": _part(0, 300, [1], [0])}
    m = rep.build_report(rep.RunRecord(topo, final, elapsed=2.0, parts=lopsided))["metrics"]
    assert m["hit_ratio"] == 0.225  # 90 / 400, where the hosts' mean ratio would be 0.45


def test_multi_host_cpu_time_is_summed_over_the_hosts() -> None:
    """Each host measures its own processes; the merged report adds them up and puts the CPU workers'
    time per packet received (on every host)."""
    topo = validate_topology_text(TOPO, "tiny.yaml")
    rows = {"gen0": {"generated": 4000, "received": 4000, "foreign": 0, "corrupted": 0, "duplicates": 0,
                     "link_down": 0, "link_lost": 0, "bad_messages": 0},
            "h1/cpu0": {**dict.fromkeys(CPU_COUNTERS, 0), "rx_packets": 3000},
            "h2/cpu0": {**dict.fromkeys(CPU_COUNTERS, 0), "rx_packets": 1000}}
    final = rep.Snapshot(0.0, rows, {"gen0": "traffic", "h1/cpu0": "cpu", "h2/cpu0": "cpu"})
    parts = {"h1": _part(1, 1, [1], [0]), "h2": _part(1, 1, [1], [0])}
    parts["h1"]["cpu_time_s"] = {"by_process": {"h1/cpu0": {"kind": "cpu", "s": 0.003},
                                                "h1/eth0": {"kind": "device", "s": 0.5}}}
    parts["h2"]["cpu_time_s"] = {"by_process": {"h2/cpu0": {"kind": "cpu", "s": 0.001}}}
    report = rep.build_report(rep.RunRecord(topo, final, elapsed=2.0, parts=parts))
    assert report["cpu_time_s"]["cpu"] == 0.004 and report["cpu_time_s"]["device"] == 0.5
    assert report["metrics"]["cpu_ns_per_pkt"] == 1000.0  # 4 ms over 4,000 packets


# -- specs refused before anything runs -----------------------------------------------------------------


BAD_SPECS = [
    # (what is wrong, the spec, what the message must name, the line it must point at)
    ("unknown host in a key path", SPEC.replace("hosts.h1.pool", "hosts.h9.pool"), "hosts.h9.pool.pool_size", 3),
    ("unknown key", SPEC.replace("pool_size: [", "pool_sise: ["), "pool_sise", 3),
    ("list index out of range", SPEC.replace("hosts.h1.pool.pool_size", "links.3.delay"), "links.3.delay", 3),
    ("empty grid", SPEC.replace("  hosts.h1.pool.pool_size: [64, 256]\n", "").replace("grid:", "grid: {}"),
     "grid", 2),
    ("empty value list", SPEC.replace("[64, 256]", "[]"), "hosts.h1.pool.pool_size", 3),
    ("a value the topology refuses", SPEC.replace("[64, 256]", "[64, -5]"), "pool_size", 3),
    ("a plot of an unknown metric", SPEC.replace("y: hit_ratio", "y: hit_rate"), "hit_rate", 7),
    ("a plot against an unknown key", SPEC.replace("{x: hosts.h1.pool.pool_size", "{x: hosts.h1.cpus"),
     "hosts.h1.cpus", 7),
    ("unknown top-level key", SPEC + "repeat: 3\n", "repeat", 8),
    ("a time plot of what is no time series", SPEC.replace("{x: hosts.h1.pool.pool_size, y: hit_ratio}",
                                                           "{x: time, y: hit_ratio}"), "hit_ratio", 7),
    ("a time plot's lines not a grid key", SPEC.replace("{x: hosts.h1.pool.pool_size, y: hit_ratio}",
                                                        "{x: time, y: in_flight, lines: hosts.h1.cpus}"),
     "hosts.h1.cpus", 7),
    ("run without a length", SPEC.replace("run: {count: 3000}", "run: {}"), "run", 5),
]


@pytest.mark.parametrize(("spec", "names", "line"), [b[1:] for b in BAD_SPECS], ids=[b[0] for b in BAD_SPECS])
def test_malformed_spec_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     spec: str, names: str, line: int) -> None:
    path = _write(tmp_path, spec)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:{line}: ") and names in err, err
    assert not out.exists()  # nothing ran, nothing written
    with pytest.raises(SweepSpecError):
        load_spec(str(path))


def test_every_point_is_validated_with_the_topology(tmp_path: Path) -> None:
    """Each point is the base topology with the point's values: what a point sets is in its topology."""
    path = _write(tmp_path, SPEC.replace("hosts.h1.pool.pool_size: [64, 256]",
                                         "hosts.h1.pool.pool_size: [64, 256]\n  traffic.gen0.generate.burst: [8, 16]"))
    spec = load_spec(str(path))
    got = [(p.topology.hosts["h1"].pool.pool_size, p.topology.traffic["gen0"].generate.burst) for p in spec.points]
    assert got == [(64, 8), (64, 16), (256, 8), (256, 16)]
    assert [p.params for p in spec.points][1] == {"hosts.h1.pool.pool_size": 64, "traffic.gen0.generate.burst": 16}


# -- real runs -------------------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_time_series_average_repeats_sample_by_sample(tmp_path: Path) -> None:
    """A time plot's line per grid point: the repeats' samples averaged index by index, cut to the
    shortest repeat, against the first repeat's times."""
    spec = load_spec(str(_write(tmp_path, SPEC.replace("repeats: 1", "repeats: 2")
                                + "  - {x: time, y: pool_bytes, lines: hosts.h1.pool.pool_size}\n")))
    plot = spec.plots[1]
    assert plot.x == "time" and plot.y == "pool_bytes"

    def run(size: int, pool_bytes: list[int]) -> dict[str, Any]:
        samples = {"period_s": 0.05, "t_s": [0.05 * k + 0.01 for k in range(len(pool_bytes))],
                   "pool_bytes": pool_bytes}
        return {"params": {"hosts.h1.pool.pool_size": size}, "report": {"pages": {"samples": samples}}}

    runs = [run(64, [10, 20, 30]), run(64, [30, 40]), run(256, [5, 5, 5, 5])]
    lines = output.time_series(spec, plot, runs)
    assert lines["pool_size=64"] == (pytest.approx([0.01, 0.06]), [20.0, 30.0])
    assert lines["pool_size=256"][1] == [5.0] * 4
    png = tmp_path / "t.png"
    output.draw_plot(spec, plot, runs, str(png))
    assert _png_size(png) == (640, 400)


def test_a_plot_against_list_values(tmp_path: Path) -> None:
    """A grid key whose values are lists (a device's rx_cpus, tx_cpus) is plotted by position."""
    text = SPEC.replace("hosts.h1.pool.pool_size: [64, 256]",
                        "hosts.h1.pool.pool_size: [64]\n  hosts.h1.devices.eth0.tx_cpus: [[0]]")
    text = text.replace("{x: hosts.h1.pool.pool_size, y: hit_ratio}",
                        "{x: hosts.h1.devices.eth0.tx_cpus, y: hit_ratio}")
    spec = load_spec(str(_write(tmp_path, text)))
    runs = [{"params": p.params, "metrics": dict.fromkeys(rep.METRICS, 0.5)} for p in spec.points]
    png = tmp_path / "l.png"
    output.draw_plot(spec, spec.plots[0], runs, str(png))
    assert _png_size(png) == (640, 400)


@pytest.mark.slow
def test_sweep_tiny_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, SPEC + "  - {x: time, y: alloc_slow, lines: hosts.h1.pool.pool_size}\n")
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["hosts.h1.pool.pool_size", "repeat", *rep.METRICS, *POOL_COUNTERS]
    assert [r[:2] for r in rows[1:]] == [["64", "0"], ["256", "0"]]
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 2
    for row, run in zip(rows[1:], results["runs"], strict=True):
        report = run["report"]
        assert report["traffic"]["delivered"] == 3000 and run["metrics"]["violations"] == 0
        assert run["metrics"] == report["metrics"]
        # The CSV's counters are the per-CPU counters of results.json, summed.
        col = dict(zip(rows[0], row, strict=True))
        for name in POOL_COUNTERS:
            assert int(col[name]) == sum(c["page_pool"][name] for c in report["cpus"]), name
        assert report["cpus"][0]["page_pool"]["hold_cnt"] > 0 and float(col["page_alloc_pps"]) > 0
        assert report["pages"]["samples"]["in_flight"], "sampled while traffic ran"
        # CPU time measured from /proc for every process while traffic ran, put per packet.
        assert report["cpu_time_s"]["cpu"] >= 0 and "h1/cpu0" in report["cpu_time_s"]["by_process"]
        assert run["metrics"]["cpu_ns_per_pkt"] is not None
        assert run["params"]["hosts.h1.pool.pool_size"] == int(col["hosts.h1.pool.pool_size"])
    png = out / output.plot_file(0, load_spec(str(path)).plots[0])
    assert _png_size(png) == (640, 400)
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[:2] == (400, 640)
    md = (out / "report.md").read_text()
    assert f"]({png.name})" in md and "results.csv" in md
    # The time series: every series as long as the times, the times rising, the counters never falling,
    # and the last sample's alloc_slow no more than the run's total.
    for run in results["runs"]:
        samples = run["report"]["pages"]["samples"]
        n = len(samples["t_s"])
        assert n and all(len(samples[name]) == n for name in rep.SAMPLE_SERIES)
        assert samples["t_s"] == sorted(samples["t_s"])
        for name in ("alloc_slow", "page_alloc", "page_free", "delivered", "recycle_cached", "recycle_returned"):
            assert samples[name] == sorted(samples[name]), name
        assert 0 < samples["alloc_slow"][-1] <= run["page_pool"]["alloc_slow"]
    timeplot = out / output.plot_file(1, load_spec(str(path)).plots[1])
    assert timeplot.name.endswith("-vs-time.png") and _png_size(timeplot) == (640, 400)
    assert f"]({timeplot.name})" in md and "alloc_slow over time" in md


class _Interrupt:
    """A runner that runs for real until its `stop_at`-th run, where it is interrupted as Ctrl-C would."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.ran: list[int] = []

    def __call__(self, topo, spec: SweepSpec) -> dict[str, Any]:
        if len(self.ran) + 1 == self.stop_at:
            raise KeyboardInterrupt
        self.ran.append(topo.hosts["h1"].pool.pool_size)
        return runner.run_once(topo, spec)


@pytest.mark.slow
def test_interrupted_sweep_resumes_where_it_stopped(tmp_path: Path) -> None:
    spec = load_spec(str(_write(tmp_path)))
    out = str(tmp_path / "out")
    first = _Interrupt(stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        runner.run_sweep(spec, out, runner=first, progress=io.StringIO())
    assert first.ran == [64]
    kept = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [r["params"]["hosts.h1.pool.pool_size"] for r in kept] == [64]
    again = _Interrupt()
    results = runner.run_sweep(spec, out, runner=again, progress=io.StringIO())
    assert again.ran == [256]  # only the missing run
    assert [r["params"]["hosts.h1.pool.pool_size"] for r in results["runs"]] == [64, 256]
    assert results["runs"][0] == kept[0]  # the first run's result is kept as it was, not run again
    nothing = _Interrupt()
    runner.run_sweep(spec, out, runner=nothing, progress=io.StringIO())
    assert nothing.ran == []


def test_results_of_another_run_length_are_not_mixed_in(tmp_path: Path) -> None:
    spec = load_spec(str(_write(tmp_path)))
    out = str(tmp_path / "out")
    os.makedirs(out)
    runner.save_results(out, {**runner.load_results(out, spec), "run": {"count": 1, "duration": None}})
    with pytest.raises(BadInputError, match="another topology or run length"):
        runner.run_sweep(spec, out, runner=_Interrupt(stop_at=1))


@pytest.mark.slow
def test_bundled_experiment_runs_end_to_end(tmp_path: Path) -> None:
    """experiments/pool-size.yaml, as README shows it: every run, every plot."""
    spec_path = ROOT / "experiments" / "pool-size.yaml"
    out = tmp_path / "pool-size"
    assert main(["sweep", str(spec_path), "--out", str(out)]) == 0
    spec = load_spec(str(spec_path))
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(spec.points) * spec.repeats == 6
    assert all(r["violations"] == "0" for r in rows)
    for k, plot in enumerate(spec.plots):
        assert _png_size(out / output.plot_file(k, plot)) == (640, 400)


# -- the experiments of docs/experiments.md ----------------------------------------------------------------

EXPERIMENTS = ROOT / "experiments"


def _is_spec(path: Path) -> bool:
    """An experiment file (it has a grid) rather than a base topology the experiment files name."""
    return "grid" in (yaml.safe_load(path.read_text()) or {})


SPECS = sorted(p.name for p in EXPERIMENTS.glob("*.yaml") if _is_spec(p))
BASES = sorted(p.name for p in EXPERIMENTS.glob("*.yaml") if not _is_spec(p))


@pytest.mark.parametrize("name", SPECS)
def test_every_experiment_spec_loads(name: str) -> None:
    """Each experiment file of experiments/ is accepted with every grid point (so its documented command
    runs), and its comment shows that command, writing where docs/experiments.md takes the plots from."""
    spec = load_spec(str(EXPERIMENTS / name))
    assert spec.points and spec.plots
    stem = name.removesuffix(".yaml")
    out = "/tmp/pool-size" if stem == "pool-size" else f"docs/experiments/{stem}"
    assert f"emu sweep experiments/{name} --out {out}" in (EXPERIMENTS / name).read_text()


@pytest.mark.parametrize("name", BASES)
def test_every_experiment_base_topology_validates(name: str) -> None:
    path = EXPERIMENTS / name
    validate_topology_text(path.read_text(), str(path))
    assert any(f"topology: {name}" in (EXPERIMENTS / s).read_text() for s in SPECS), f"{name}: no spec uses it"


def test_experiments_doc_shows_every_experiment_and_its_plots() -> None:
    """docs/experiments.md gives each experiment's one command, and every plot it embeds is a file there,
    one of those its spec asks for."""
    doc = (ROOT / "docs" / "experiments.md").read_text()
    for name in SPECS:
        stem = name.removesuffix(".yaml")
        if stem == "pool-size":  # README's example, not one of the experiments
            continue
        assert f"emu sweep experiments/{name} --out docs/experiments/{stem}\n" in doc, name
        made = {output.plot_file(k, p) for k, p in enumerate(load_spec(str(EXPERIMENTS / name)).plots)}
        shown = set(re.findall(rf"\]\(experiments/{re.escape(stem)}/([^)]+\.png)\)", doc))
        assert shown and shown <= made, (name, shown - made)
        for png in shown:
            assert _png_size(ROOT / "docs" / "experiments" / stem / png) == (640, 400)


def test_a_mapping_value_is_shown_by_its_values(tmp_path: Path) -> None:
    """A grid key whose values are whole sections (a device's xdp: program and params) gets legend
    labels that fit a plot: the values, a nested mapping's as key=value."""
    text = SPEC.replace("hosts.h1.pool.pool_size: [64, 256]", "hosts.h1.pool.pool_size: [64, 256]\n"
                        "  hosts.h1.devices.eth0.xdp:\n    - {program: \"emu.programs:xdp_tx\"}\n"
                        "    - {program: \"emu.programs:l2fwd_cost\", params: {egress: eth0, cost_ns: 5}}")
    text = text.replace("y: hit_ratio}", "y: hit_ratio, lines: hosts.h1.devices.eth0.xdp}")
    spec = load_spec(str(_write(tmp_path, text)))
    runs = [{"params": p.params, "metrics": dict.fromkeys(rep.METRICS, 0.5)} for p in spec.points]
    lines = output.series(spec, spec.plots[0], runs)
    assert list(lines) == ["xdp=emu.programs:xdp_tx", "xdp=emu.programs:l2fwd_cost egress=eth0 cost_ns=5"]
    assert output.show_value({"a": {1: [2, "x"]}}) == "1=[2, x]" and output.show_value([0, 1]) == "[0, 1]"
    png = tmp_path / "m.png"
    output.draw_plot(spec, spec.plots[0], runs, str(png))
    assert _png_size(png) == (640, 400)


def test_mapping_values_with_int_keys_match_their_runs_from_json(tmp_path: Path) -> None:
    """results.json gives a mapping's int keys (a cpumap's CPUs) back as strings: the plots and the table
    still find each point's runs."""
    text = SPEC.replace("hosts.h1.pool.pool_size: [64, 256]", "hosts.h1.pool.pool_size: [64, 256]\n"
                        "  hosts.h1.devices.eth0.xdp:\n"
                        "    - {program: \"emu.programs:redirect_cpu\", params: {cpu_map: {0: 256}}}")
    spec = load_spec(str(_write(tmp_path, text)))
    runs = [json.loads(json.dumps({"params": p.params, "metrics": dict.fromkeys(rep.METRICS, 0.5)}))
            for p in spec.points]
    assert runs[0]["params"]["hosts.h1.devices.eth0.xdp"]["params"]["cpu_map"] == {"0": 256}
    (points,) = output.series(spec, spec.plots[0], runs).values()
    assert [p[0] for p in points] == [64, 256]
    table = output._mean_table(spec, runs)
    assert all(" - |" not in row for row in table[2:]) and "0.5" in table[2]
