"""The ``emu`` command: run a topology on this machine, or across machines (``emu coordinator`` plus one
``emu host`` per emulated host), validate a topology file, make CURVE keys, sweep leftovers.

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

from emu.security import KeyFileError
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


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emu", description="pagepool-emu: emulate XDP forwarding over a per-CPU page pool."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a topology on this machine")
    coord = sub.add_parser("coordinator", help="run the control plane of a multi-host run (hosts are `emu host`)")
    for p in (run, coord):
        _add_topology(p)
        stop = p.add_mutually_exclusive_group()
        stop.add_argument("--duration", "-d", type=_positive(float), metavar="S", help="run for S seconds")
        stop.add_argument("--count", "-n", type=_non_negative_int, metavar="N",
                          help="every generator sends N packets (0: until stopped); the run ends when all "
                          "are accounted for")
        p.add_argument("-i", "--interval", type=_positive(float), default=2.0, metavar="SECONDS",
                       help="seconds between live lines (default 2)")
        p.add_argument("-e", "--extended", action="store_true", help="per-CPU and per-device rows")
        p.add_argument("--json", metavar="FILE", help="write the final report as JSON (- for stdout)")
        p.add_argument("-q", "--quiet", action="store_true", help="no live lines or summary")
    coord.add_argument("--bind", default="tcp://127.0.0.1:7700", metavar="ADDR",
                       help="zmq address the hosts connect to (default tcp://127.0.0.1:7700; loopback only "
                       "unless told otherwise)")
    coord.add_argument("--keys", metavar="DIR", help="CURVE keys made by `emu keys` (hosts need the same)")
    coord.add_argument("--host-timeout", type=_positive(float), default=5.0, metavar="S",
                       help="a host silent this long is declared lost (default 5)")
    coord.add_argument("--register-timeout", type=_positive(float), metavar="S",
                       help="give up when not every host registered within S seconds (default: wait)")
    coord.add_argument("--status-file", metavar="FILE", help="write 'listening' here once bound (healthchecks)")
    host = sub.add_parser("host", help="run one emulated host of a multi-host run")
    host.add_argument("name", help="the host's name in the coordinator's topology")
    host.add_argument("--coordinator", default="tcp://127.0.0.1:7700", metavar="ADDR",
                      help="the coordinator's address (default tcp://127.0.0.1:7700)")
    host.add_argument("--listen", default="127.0.0.1", metavar="IP",
                      help="address links from other hosts arrive on (default 127.0.0.1)")
    host.add_argument("--advertise", metavar="HOST", help="name or address peers reach us by (default: --listen)")
    host.add_argument("--link-port", type=_non_negative_int, default=0, metavar="PORT",
                      help="first TCP port for links (device i uses PORT+i; default 0: any free port)")
    host.add_argument("--keys", metavar="DIR", help="CURVE keys made by `emu keys`")
    host.add_argument("--coordinator-timeout", type=_positive(float), default=10.0, metavar="S",
                      help="tear down alone when the coordinator is silent this long (default 10)")
    host.add_argument("--status-file", metavar="FILE",
                      help="write connecting/registered/running/finished here (healthchecks)")
    host.add_argument("--serve", action="store_true", help="stay up and join the coordinator's next run")
    keys = sub.add_parser("keys", help="make the CURVE key pair a multi-host run's coordinator and hosts share")
    keys.add_argument("directory", help="where to write emu.key and emu.key_secret")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
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


def _options(args: argparse.Namespace, topo):
    from emu.coordinator import RunOptions

    to_stdout = args.json == "-"
    count = args.count if args.count else None
    opts = RunOptions(count=count, duration=args.duration, interval=args.interval,
                      extended=args.extended, quiet=args.quiet,
                      out=sys.stderr if to_stdout else sys.stdout)
    if args.count == 0:
        opts.count = None
        topo = _unbounded(topo)
    if opts.count is None and args.duration is None:
        unbounded = [n for n, p in topo.traffic.items() if p.generate is not None and not p.generate.count]
        if unbounded:
            opts.out.write(f"generators {', '.join(unbounded)} have no count: running until Ctrl-C\n")
    return opts, topo


def _unbounded(topo):
    """`--count 0`: every generator runs until the run is stopped."""
    import dataclasses

    traffic = {n: dataclasses.replace(p, generate=None if p.generate is None
                                      else dataclasses.replace(p.generate, count=0))
               for n, p in topo.traffic.items()}
    return dataclasses.replace(topo, traffic=traffic)


def _finish(args: argparse.Namespace, report: dict) -> int:
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    bad = any(report["violations"].get(k) for k in ("foreign_cache_return", "recycled_before_tx_completion",
                                                      "double_free", "leaked"))
    bad = bad or report["traffic"]["unaccounted"] != 0 or report["traffic"]["corrupted"] != 0
    bad = bad or bool(report.get("hosts_lost"))
    return 1 if bad else 0


def cmd_run(args: argparse.Namespace) -> int:
    from emu import launch

    launch.prestart()  # the workers' fork server imports their modules while this process imports its own
    from emu.coordinator import Run, RunError
    from emu.shm import ShmSpaceError

    opts, topo = _options(args, load_topology(args.topology))
    try:
        report = Run(topo, opts).run()
    except ShmSpaceError as exc:
        print(f"emu: {exc.strerror}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"emu: {exc}", file=sys.stderr)
        return 3
    return _finish(args, report)


def cmd_coordinator(args: argparse.Namespace) -> int:
    from emu.cluster import Cluster
    from emu.coordinator import RunError

    opts, topo = _options(args, load_topology(args.topology))
    try:
        cluster = Cluster(topo, args.bind, opts, keys_dir=args.keys, status_file=args.status_file,
                          host_timeout=args.host_timeout, register_timeout=args.register_timeout)
        report = cluster.run()
    except RunError as exc:
        print(f"emu: {exc}", file=sys.stderr)
        return 3
    return _finish(args, report)


def cmd_host(args: argparse.Namespace) -> int:
    from emu import launch

    launch.prestart()
    from emu.hostagent import AgentOptions, HostAgent

    opts = AgentOptions(listen=args.listen, advertise=args.advertise, link_port=args.link_port,
                        keys_dir=args.keys, status_file=args.status_file, serve=args.serve,
                        coordinator_timeout=args.coordinator_timeout)
    return HostAgent(args.name, args.coordinator, opts).serve()


def cmd_keys(args: argparse.Namespace) -> int:
    from emu.security import generate_keys

    public, secret = generate_keys(args.directory, force=args.force)
    print(f"wrote {public} and {secret}: copy the directory to the coordinator and every host, and pass "
          "--keys to each")
    return 0


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
        commands = {"run": cmd_run, "coordinator": cmd_coordinator, "host": cmd_host, "keys": cmd_keys,
                    "clean": cmd_clean}
        return commands[args.command](args)
    except TopologyError as exc:
        print(exc, file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"emu: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except (FileExistsError, KeyFileError) as exc:  # keys: existing, missing or garbled key files
        print(f"emu: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
