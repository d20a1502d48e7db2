"""The ``emu`` command: run a topology on this machine, validate a topology file, sweep leftovers.

Conventions follow xdp-bench and containerlab: ``-i`` is the interval between live lines (default 2 s),
``-e`` shows per-CPU and per-device rows, ``--json FILE`` (``-`` for stdout) writes the final report;
a malformed topology prints ``FILE:LINE: message`` and exits with status 2 before anything starts.

Exit status: 0 for a run whose report has no violation and no unaccounted packet, 1 otherwise (so a
script can trust it), 2 for bad input, 3 when the run could not start or a process failed.
"""

from __future__ import annotations

import argparse
import json
import sys

from emu.topology import TopologyError, load_topology


def _add_topology(p: argparse.ArgumentParser) -> None:
    p.add_argument("topology", help="topology YAML file (see topology/README.md)")


def _positive(kind: type):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, not {text!r}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emu", description="pagepool-emu: emulate XDP forwarding over a per-CPU page pool."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a topology on this machine")
    _add_topology(run)
    stop = run.add_mutually_exclusive_group()
    stop.add_argument("--duration", "-d", type=_positive(float), metavar="S", help="run for S seconds")
    stop.add_argument("--count", "-n", type=_positive(int), metavar="N",
                      help="every generator sends N packets; the run ends when all are accounted for")
    run.add_argument("-i", "--interval", type=_positive(float), default=2.0, metavar="SECONDS",
                     help="seconds between live lines (default 2)")
    run.add_argument("-e", "--extended", action="store_true", help="per-CPU and per-device rows")
    run.add_argument("--json", metavar="FILE", help="write the final report as JSON (- for stdout)")
    run.add_argument("-q", "--quiet", action="store_true", help="no live lines or summary")
    val = sub.add_parser("validate", help="check a topology file without running it")
    _add_topology(val)
    val.add_argument("--json", action="store_true", help="print the parsed topology as JSON")
    sub.add_parser("clean", help="remove shared memory left by runs whose coordinator was killed")
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    topo = load_topology(args.topology)
    if args.json:
        print(json.dumps(topo.to_dict(), indent=2))
    else:
        cpus = sum(h.cpus for h in topo.hosts.values())
        devs = sum(len(h.devices) for h in topo.hosts.values())
        print(f"{args.topology}: ok: topology {topo.name!r}: {len(topo.hosts)} hosts, {cpus} CPUs, "
              f"{devs} devices, {len(topo.links)} links, {len(topo.traffic)} traffic ports")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from emu.coordinator import Run, RunError, RunOptions
    from emu.shm import ShmSpaceError

    topo = load_topology(args.topology)
    to_stdout = args.json == "-"
    opts = RunOptions(count=args.count, duration=args.duration, interval=args.interval,
                      extended=args.extended, quiet=args.quiet,
                      out=sys.stderr if to_stdout else sys.stdout)
    if args.count is None and args.duration is None:
        unbounded = [n for n, p in topo.traffic.items() if p.generate is not None and not p.generate.count]
        if unbounded:
            opts.out.write(f"generators {', '.join(unbounded)} have no count: running until Ctrl-C\n")
    try:
        report = Run(topo, opts).run()
    except ShmSpaceError as exc:
        print(f"emu: {exc.strerror}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"emu: {exc}", file=sys.stderr)
        return 3
    if args.json:
        text = json.dumps(report, indent=2)
        if to_stdout:
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    bad = any(report["violations"][k] for k in ("foreign_cache_return", "recycled_before_tx_completion",
                                                  "double_free", "leaked"))
    bad = bad or report["traffic"]["unaccounted"] != 0 or report["traffic"]["corrupted"] != 0
    return 1 if bad else 0


def cmd_clean(args: argparse.Namespace) -> int:
    from emu.shm import sweep_stale

    removed = sweep_stale()
    print(f"removed {len(removed)} stale shared-memory segments" + (": " + ", ".join(removed) if removed else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "run":
            return cmd_run(args)
        return cmd_clean(args)
    except TopologyError as exc:
        print(exc, file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"emu: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
