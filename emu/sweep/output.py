"""A sweep's outputs, from its ``results.json``: ``results.csv`` (one row per run), one PNG per plot the spec
asks for, and ``report.md`` embedding them.

CSV columns, in this order: the grid's keys (the spec's order), ``repeat`` (0-based), the metrics
(`emu.run.report.METRICS`, empty when a metric is undefined for the run, e.g. a hit ratio without
returns), then every page-pool counter (`emu.mem.pagepool.POOL_COUNTERS`) summed over the run's CPUs.

A plot draws a metric against a grid key, one line per value of the plot's ``lines`` key (and of any
other grid key that varies, so that no two different points are averaged together): each marker is the
mean over the repeats, with the smallest and largest of them as its error bar; a grid value that is a
mapping (a whole section, such as a device's ``xdp``) is labelled by its values (`show_value`).
matplotlib draws with its Agg backend (files only, no display).  A plot with ``x: time`` draws one of the
runs' sample series (``pages.samples`` of each report in ``results.json``) against the seconds since
START, one line per grid point, averaged over the repeats sample by sample.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from emu.errors import ResourceError
from emu.mem.pagepool import POOL_COUNTERS
from emu.run.report import METRICS, SAMPLE_PERIOD
from emu.sweep.spec import TIME, PlotSpec, SweepSpec

CSV = "results.csv"
REPORT = "report.md"
PLOT_SIZE = (6.4, 4.0)  # inches
PLOT_DPI = 100  # so a plot is 640 x 400 pixels


def require_plotting(spec: SweepSpec) -> None:
    """Refuse, before any run, a spec with plots on a machine without matplotlib (an optional dependency:
    the emulator itself never draws)."""
    if not spec.plots:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ResourceError(f"{spec.path}: its plots need matplotlib: pip install 'pagepool-emu[sweep]'") from None


def csv_columns(spec: SweepSpec) -> list[str]:
    return [*spec.grid, "repeat", *METRICS, *POOL_COUNTERS]


def _cell(v: Any) -> Any:
    return "" if v is None else v


def write_csv(spec: SweepSpec, results: dict[str, Any], out_dir: str) -> str:
    path = os.path.join(out_dir, CSV)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(csv_columns(spec))
        for r in results["runs"]:
            w.writerow([*(_cell(r["params"][k]) for k in spec.grid), r["repeat"],
                        *(_cell(r["metrics"][m]) for m in METRICS), *(r["page_pool"][c] for c in POOL_COUNTERS)])
    return path


def _value(run: dict[str, Any], name: str) -> float | None:
    v = run["metrics"][name] if name in METRICS else run["page_pool"][name]
    return None if v is None else float(v)


def plot_file(k: int, plot: PlotSpec) -> str:
    def safe(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]+", "-", s).strip("-")

    return f"plot{k + 1}-{safe(plot.y)}-vs-{safe(plot.x.rsplit('.', 1)[-1])}.png"


def show_value(v: Any) -> str:
    """A grid value as a plot's legend and ticks show it: as written, except a mapping (a whole section,
    e.g. a device's ``xdp``), shown by its values, a nested mapping's as ``key=value``, without braces
    or quotes: ``{program: "emu.programs:l2fwd", params: {egress: eth1}}`` -> ``emu.programs:l2fwd
    egress=eth1`` (the legend of a mapping written out in full is wider than the plot)."""
    if not isinstance(v, dict):
        return str(v)
    parts = []
    for x in v.values():
        if isinstance(x, dict):
            parts += [f"{k}={str(y).replace(chr(39), '')}" for k, y in x.items()]
        else:
            parts.append(str(x))
    return " ".join(parts)


def _matches(params: dict[str, Any], fixed: dict[str, Any]) -> bool:
    """Whether a run's parameters have the `fixed` values, compared as ``results.json`` holds them (JSON:
    a mapping's int keys, e.g. a cpumap's CPUs, come back from it as strings)."""
    return all(json.dumps(params[k], sort_keys=True) == json.dumps(v, sort_keys=True) for k, v in fixed.items())


def _label(fixed: dict[str, Any]) -> str:
    """A line's label: the last part of each grid key it fixes, and the value."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={show_value(v)}" for k, v in fixed.items())


Line = list[tuple[Any, float, float, float]]  # (x value, mean, min, max) per x


def series(spec: SweepSpec, plot: PlotSpec, runs: list[dict[str, Any]]) -> dict[str, Line]:
    """The plot's lines: label -> [(x value, mean, min, max)] over the repeats, in the grid's x order;
    x values where no run has the metric defined are left out."""
    others = [k for k in spec.grid if k != plot.x and k != plot.lines and len(spec.grid[k]) > 1]
    groups = [k for k in ([plot.lines] if plot.lines else []) + others]
    out: dict[str, Line] = {}
    for combo in itertools.product(*(spec.grid[k] for k in groups)):
        fixed = dict(zip(groups, combo, strict=True))
        label = _label(fixed) or plot.y
        points = []
        for x in spec.grid[plot.x]:
            ys = [y for r in runs if _matches(r["params"], {**fixed, plot.x: x})
                  and (y := _value(r, plot.y)) is not None]
            if ys:
                points.append((x, sum(ys) / len(ys), min(ys), max(ys)))
        if points:
            out[label] = points
    return out


TimeLine = tuple[list[float], list[float]]  # (seconds since START, mean over repeats) per sample


def time_series(spec: SweepSpec, plot: PlotSpec, runs: list[dict[str, Any]]) -> dict[str, TimeLine]:
    """A time plot's lines: label -> the sample series `plot.y` of the runs of one grid point (one line
    per value of `lines` and of any other grid key that varies), averaged over the repeats sample by
    sample (as many samples as the shortest repeat has), against the first repeat's times."""
    groups = ([plot.lines] if plot.lines else []) + [k for k in spec.grid if k != plot.lines and len(spec.grid[k]) > 1]
    out: dict[str, TimeLine] = {}
    for combo in itertools.product(*(spec.grid[k] for k in groups)):
        fixed = dict(zip(groups, combo, strict=True))
        label = _label(fixed) or plot.y
        mine = [r["report"]["pages"]["samples"] for r in runs if _matches(r["params"], fixed)]
        mine = [s for s in mine if s.get(plot.y)]
        if not mine:
            continue
        n = min(len(s[plot.y]) for s in mine)
        t = mine[0].get("t_s") or [k * mine[0]["period_s"] for k in range(n)]
        out[label] = (list(t[:n]), [sum(s[plot.y][k] for s in mine) / len(mine) for k in range(n)])
    return out


@contextmanager
def _figure(path: str, xlabel: str, ylabel: str, title: str) -> Iterator[Any]:
    """A matplotlib axes to draw on; on exit its labels, grid and legend, saved to `path` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and safe in a process without one
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=PLOT_DPI)
    finally:
        plt.close(fig)


def draw_time_plot(spec: SweepSpec, plot: PlotSpec, runs: list[dict[str, Any]], path: str) -> None:
    with _figure(path, "seconds since START", plot.y, f"{plot.y} over time") as ax:
        for label, (t, ys) in time_series(spec, plot, runs).items():
            ax.plot(t, ys, drawstyle="steps-post", label=label)


def draw_plot(spec: SweepSpec, plot: PlotSpec, runs: list[dict[str, Any]], path: str) -> None:
    if plot.x == TIME:
        draw_time_plot(spec, plot, runs, path)
        return
    xs = spec.grid[plot.x]
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
    # Non-numeric x values (``200kpps``, ``5ms``) are placed evenly, in the grid's order, and labelled.
    # (By position, not a dict: a value may be a list, e.g. a device's tx_cpus.)
    where = (lambda x: x) if numeric else xs.index
    with _figure(path, plot.x, plot.y, f"{plot.y} against {plot.x.rsplit('.', 1)[-1]}") as ax:
        for label, pts in series(spec, plot, runs).items():
            px = [where(p[0]) for p in pts]
            mean = [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(px, mean, yerr=err, marker="o", capsize=3, label=label)
        if numeric and len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 16:
            ax.set_xscale("log", base=2)  # pool sizes, rates: spread over orders of magnitude
        if not numeric:
            ax.set_xticks(range(len(xs)), [show_value(x) for x in xs])


def _mean_table(spec: SweepSpec, runs: list[dict[str, Any]]) -> list[str]:
    head = [*spec.grid, *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for point in spec.points:
        mine = [r for r in runs if _matches(r["params"], point.params)]
        cells = [str(v) for v in point.params.values()]
        for m in METRICS:
            vals = [v for r in mine if (v := r["metrics"][m]) is not None]
            cells.append(f"{sum(vals) / len(vals):,.4g}" if vals else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_outputs(spec: SweepSpec, results: dict[str, Any], out_dir: str) -> list[str]:
    """results.csv, the plots and report.md; returns the files written."""
    runs = results["runs"]
    written = [write_csv(spec, results, out_dir)]
    md = [f"# Sweep of {os.path.basename(spec.topology_path)}", "",
          f"Spec `{spec.path}`; topology `{spec.topology_path}` (sha256 {spec.topology_sha256[:12]}); each run "
          + (f"{spec.count:,} packets per generator" if spec.count else f"{spec.duration:g} s")
          + f"; {len(runs)} runs ({len(spec.points)} grid points x {spec.repeats} repeats).", "",
          "Data: [results.csv](results.csv) (one row per run), [results.json](results.json) (every report).", ""]
    for k, plot in enumerate(spec.plots):
        name = plot_file(k, plot)
        draw_plot(spec, plot, runs, os.path.join(out_dir, name))
        written.append(os.path.join(out_dir, name))
        by = f", one line per {plot.lines}" if plot.lines else ""
        if plot.x == TIME:
            md += [f"## {plot.y} over time", "", f"The runs' samples (every {SAMPLE_PERIOD:g} s from START), "
                   f"mean over repeats{by}.", "", f"![{plot.y} over time]({name})", ""]
            continue
        md += [f"## {plot.y} against {plot.x}", "", f"Mean over repeats, min to max as error bars{by}.", "",
               f"![{plot.y} against {plot.x}]({name})", ""]
    md += ["## Means over repeats", "", *_mean_table(spec, runs), ""]
    path = os.path.join(out_dir, REPORT)
    with open(path, "w") as f:
        f.write("\n".join(md))
    written.append(path)
    return written
