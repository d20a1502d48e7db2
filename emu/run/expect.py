"""Golden-file results in a run's report: what each sink with ``expect`` found, as the report shows it.

A sink compares what it received with its expected capture when it exits (`emu.net.replay.compare`) and
writes the result to ``<run directory>/<port>.expect.json``; the run reads those files into the report's
``traffic.ports.<port>.expect`` (``match``, ``missing``, ``unexpected``, and the counts and first
differences behind them) and prints one line per sink, plus its first differences, after the summary.
A mismatch makes the run's exit status 1, as a failed unit test would.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emu.topology.model import Topology


def attach(report: dict[str, Any], topo: Topology, run_dir: str) -> list[str]:
    """Put each expecting sink's result into `report`; returns the summary's lines about them."""
    lines: list[str] = []
    ports = report.get("traffic", {}).get("ports", {})
    for name, port in topo.traffic.items():
        if port.expect is None or name not in ports:
            continue
        path = os.path.join(run_dir, f"{name}.expect.json")
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError):
            res = {"match": False, "missing": None, "unexpected": None,
                   "error": f"{name} wrote no comparison (did it die?)", "differences": []}
        ports[name]["expect"] = res
        verdict = "match" if res.get("match") else "MISMATCH"
        what = res.get("error") or (f"{res['received']:,} frames received, {res['expected']:,} expected "
                                    f"({'in order' if res.get('ordered') else 'as a multiset'}): "
                                    f"{res['missing']:,} missing, {res['unexpected']:,} unexpected")
        lines.append(f"  expect   {name}: {verdict} against {os.path.basename(port.expect.pcap)}: {what}")
        lines += [f"    {d}" for d in res.get("differences", [])]
    return lines


def mismatched(report: dict[str, Any]) -> list[str]:
    """The ports whose golden-file comparison failed."""
    ports = report.get("traffic", {}).get("ports", {})
    return [n for n, p in ports.items() if isinstance(p.get("expect"), dict) and not p["expect"].get("match")]


def merge_parts(report: dict[str, Any], parts: dict[str, dict[str, Any]]) -> list[str]:
    """A multi-host report: each host's golden-file results and capture files (each host compares and
    captures on its own machine) copied into the merged `report`; returns the summary's lines."""
    lines: list[str] = []
    ports = report.get("traffic", {}).get("ports", {})
    captured: list[dict[str, Any]] = []
    for hname, part in parts.items():
        for name, port in part.get("traffic", {}).get("ports", {}).items():
            if "expect" in port and name in ports:
                res = ports[name]["expect"] = port["expect"]
                verdict = "match" if res.get("match") else "MISMATCH"
                lines.append(f"  expect   {name} (on {hname}): {verdict}: {res.get('missing')} missing, "
                             f"{res.get('unexpected')} unexpected")
                lines += [f"    {d}" for d in res.get("differences", [])]
        for item in part.get("capture", []):
            captured.append(dict(item, host=hname))
            lines.append(f"  capture  {item['device']} -> {item['file']} on {hname}: {item['packets']:,} frames, "
                         f"{item['capture_drops']:,} capture drops")
    if captured:
        report["capture"] = captured
    return lines
