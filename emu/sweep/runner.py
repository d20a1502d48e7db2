"""Running a sweep: every grid point times its repeats, each a real run, resumable.

Each run is a `emu.run.coordinator.Run` in this process, not an ``emu run`` subprocess: the report comes back
as the dict the run built (no JSON file to pass around), the fork server that starts the workers is
started once for the whole sweep instead of once per run, and the topology each point makes was already
validated when the spec was read (`emu.sweep.spec`), so it is not parsed again.  The run installs its own
Ctrl-C/SIGTERM handler, which ends it the orderly way and returns a report of what ran; such a report
is of an interrupted run, so it is not kept: the sweep stops there (`KeyboardInterrupt`), and the next
``emu sweep`` with the same ``--out`` runs it again.

``DIR/results.json`` is rewritten (to a temporary file, then renamed) after every run, so an
interruption at any moment leaves it whole; a run whose id (`emu.sweep.spec.run_id`) is in it is not run
again.  Results of another base topology or another run length are refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from emu.errors import BadInputError
from emu.run.report import pool_totals
from emu.sweep.spec import Point, SweepSpec, run_id
from emu.topology.model import Topology

RESULTS = "results.json"
# One run: a topology and the run settings -> its report.  Replaceable (tests interrupt a sweep with it).
Runner = Callable[[Topology, SweepSpec], dict[str, Any]]


def run_once(topo: Topology, spec: SweepSpec) -> dict[str, Any]:
    """One real run of `topo` for as long as the spec says; KeyboardInterrupt when Ctrl-C or SIGTERM
    ended it early (its report is of a shortened run, not one to keep)."""
    from emu.run.coordinator import Run, RunOptions

    run = Run(topo, RunOptions(count=spec.count, duration=spec.duration, quiet=True, interval=3600.0))
    report = run.run()
    if run.interrupted:
        raise KeyboardInterrupt
    return report


def load_results(out_dir: str, spec: SweepSpec) -> dict[str, Any]:
    """``DIR/results.json`` if a sweep of this topology and run length left one, else a fresh document."""
    fresh = {"spec": os.path.abspath(spec.path), "topology": spec.topology_path,
             "topology_sha256": spec.topology_sha256, "run": spec.run_settings(), "grid": spec.grid,
             "repeats": spec.repeats, "runs": []}
    path = os.path.join(out_dir, RESULTS)
    if not os.path.exists(path):
        return fresh
    try:
        with open(path) as f:
            old = json.load(f)
        runs = old["runs"]
        same = old["topology_sha256"] == spec.topology_sha256 and old["run"] == spec.run_settings()
    except (ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"{path}: not the results of a sweep ({e}); give another --out") from None
    if not same:
        raise BadInputError(f"{path}: results of another topology or run length; give another --out")
    # Runs of grid points the spec no longer has are dropped: the outputs describe this spec's grid.
    wanted = {run_id(p.params, r) for p, r in spec.runs()}
    fresh["runs"] = [r for r in runs if r.get("id") in wanted]
    return fresh


def save_results(out_dir: str, results: dict[str, Any]) -> None:
    path = os.path.join(out_dir, RESULTS)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


class Progress:
    """A progress line per run on `out`: a bar, the run, how long it took, and the time left (the mean
    of this invocation's runs times the runs left)."""

    def __init__(self, total: int, done: int, out: TextIO) -> None:
        self.total, self.done, self.out = total, done, out
        self.durations: list[float] = []
        if done:
            print(f"sweep: {done} of {total} runs already in the results; running the other {total - done}",
                  file=out, flush=True)

    def ran(self, point: Point, repeat: int, repeats: int, seconds: float) -> None:
        self.done += 1
        self.durations.append(seconds)
        left = self.total - self.done
        eta = left * sum(self.durations) / len(self.durations)
        width = 20
        bar = "#" * (width * self.done // self.total)
        print(f"sweep: [{bar:<{width}}] {self.done}/{self.total} {point.label()} (repeat {repeat + 1}/{repeats}) "
              f"{seconds:.1f} s; {left} left, about {_fmt_s(eta)}", file=self.out, flush=True)


def run_record(point: Point, repeat: int, report: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What ``results.json`` keeps of a run: its parameters, metrics, pool counters summed over CPUs and
    the whole report (per CPU, per device)."""
    return {"id": run_id(point.params, repeat), "params": point.params, "repeat": repeat,
            "wall_s": round(seconds, 3), "metrics": report["metrics"], "page_pool": pool_totals(report["cpus"]),
            "report": report}


def run_sweep(spec: SweepSpec, out_dir: str, runner: Runner = run_once,
              progress: TextIO | None = None) -> dict[str, Any]:
    """Run every run of the spec not already in ``DIR/results.json``, saving after each; returns the
    results document.  KeyboardInterrupt propagates (after the runs done so far are saved)."""
    os.makedirs(out_dir, exist_ok=True)
    results = load_results(out_dir, spec)
    done = {r["id"] for r in results["runs"]}
    todo = [(p, r) for p, r in spec.runs() if run_id(p.params, r) not in done]
    bar = Progress(len(spec.runs()), len(spec.runs()) - len(todo), progress or sys.stderr)
    save_results(out_dir, results)  # the stale runs dropped, and the spec recorded, even if nothing runs
    for point, repeat in todo:
        t0 = time.monotonic()
        report = runner(point.topology, spec)
        seconds = time.monotonic() - t0
        results["runs"].append(run_record(point, repeat, report, seconds))
        save_results(out_dir, results)
        bar.ran(point, repeat, spec.repeats, seconds)
    # In the spec's order, whatever order the runs were made in (a resumed sweep appends).
    order = {run_id(p.params, r): k for k, (p, r) in enumerate(spec.runs())}
    results["runs"].sort(key=lambda r: order[r["id"]])
    save_results(out_dir, results)
    return results
