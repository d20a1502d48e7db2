"""The ``emu`` command: run a topology on this machine, or across machines (``emu coordinator`` plus one
``emu host`` per emulated host), validate a topology file, run a sweep of experiments over a grid of
topology keys, make CURVE keys, remove leftovers.

Conventions follow xdp-bench and containerlab: ``-i`` is the interval between live lines (default 2 s),
``-e`` shows per-CPU and per-device rows, ``--json FILE`` (``-`` for stdout) writes the final report;
a malformed topology prints ``FILE:LINE: message`` and exits with status 2 before anything starts.

Every failure ends in one line on stderr naming what and where: ``emu: <message>`` (or, for an error
located in a topology file, ``FILE:LINE: message``, the form editors and CI annotations jump to), never
a traceback; ``emu --debug ...`` prints the traceback too.  Errors map to exit statuses by family
(`emu.errors`), not class by class:

* 0: a run whose report has no violation, no corrupted and no unaccounted packet;
* 1: a run that has one of those, or lost a host (so a script can trust a 0);
* 2: bad input (`BadInputError`: a malformed topology, key file or message; a file that cannot be read
  or written) or too little of a resource (`ResourceError`: ``/dev/shm``); nothing was started;
* 3: a process failed (`ProcessFailure`, or a worker that died during the run: the report names it
  with its last words) or the run could not start; also an internal error (a bug in the emulator);
* 130: interrupted (Ctrl-C or SIGTERM) before a run had anything to report.

An interrupted run reports: Ctrl-C and SIGTERM (``docker stop``, systemd, ``timeout``) both tear it down
in order, print and write the final report, and exit 0, 1 or 3 from it like a run that ended by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable

from emu.errors import EXIT_BAD_INPUT, EXIT_PROCESS_FAILURE, BadInputError, EmuError, exit_status

# 128 + SIGINT, what a shell reports for a command Ctrl-C ended; SIGTERM is handled as Ctrl-C.
EXIT_INTERRUPTED = 130


def _add_topology(p: argparse.ArgumentParser) -> None:
    p.add_argument("topology", help="topology YAML file (see topology/README.md)")


def _add_no_kernel_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-kernel-verify", action="store_true",
                   help="do not load the topology's eBPF objects into the kernel to have its verifier check "
                   "them first (done where bpf(2) is permitted)")


def _kernel_verify(args: argparse.Namespace, topo) -> None:
    """The kernel's verifier on the topology's eBPF objects, unless --no-kernel-verify (emu.ebpf.kernel)."""
    if getattr(args, "no_kernel_verify", False):
        return
    if not any(d.xdp is not None and getattr(d.xdp, "object", None) for h in topo.hosts.values()
               for d in h.devices.values()):
        return  # no object: not even the bpf(2) probe
    from emu.ebpf.kernel import verify_topology

    verify_topology(topo, lambda msg: print(msg, file=sys.stderr))


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
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print its traceback before the one-line message")
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
        _add_no_kernel_verify(p)
        p.add_argument("--capture", action="append", metavar="HOST:DEV[@exit]",
                       help="write the device's frames (XDP entry, transmitted; @exit: also after the program, "
                       "with its verdict) to DIR/HOST-DEV.pcapng, as xdpdump does (repeatable)")
        p.add_argument("--capture-dir", metavar="DIR", help="where --capture writes (default: the current directory)")
        p.add_argument("--snaplen", type=_positive(int), metavar="BYTES",
                       help="bytes of each captured frame kept (default 262144, as xdpdump)")
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
    host.add_argument("--link-timeout", type=_positive(float), metavar="S",
                      help="fail the run when a link to another host is not connected within S seconds of "
                           "getting its peer's address (default: emu.cluster.control.LINK_TIMEOUT, 90)")
    host.add_argument("--status-file", metavar="FILE",
                      help="write connecting/registered/running/finished here (healthchecks)")
    host.add_argument("--serve", action="store_true", help="stay up and join the coordinator's next run")
    keys = sub.add_parser("keys", help="make the CURVE key pair a multi-host run's coordinator and hosts share")
    keys.add_argument("directory", help="where to write emu.key and emu.key_secret")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
    val = sub.add_parser("validate", help="check a topology file without running it")
    _add_topology(val)
    val.add_argument("--json", action="store_true", help="print the parsed topology as JSON")
    _add_no_kernel_verify(val)
    sub.add_parser("clean", help="remove shared memory left by runs whose coordinator was killed")
    pools = sub.add_parser("pools", help="show the page pools of a run in progress, as `ynl --family netdev "
                           "--dump page-pool-get` and `page-pool-stats-get` show them")
    pools.add_argument("run", nargs="?", metavar="RUN",
                       help="the pid of its `emu run` / `emu host`, or its segment prefix (needed when "
                       "several runs are in progress)")
    pools.add_argument("--json", action="store_true", help="print the pools as one JSON list, as `ynl "
                       "--output-json` does")
    insp = sub.add_parser("inspect", help="show an eBPF object's programs, maps, globals and helpers, and "
                          "whether the emulator supports each")
    insp.add_argument("object", help="an eBPF object file (clang -O2 -g -target bpf)")
    insp.add_argument("--json", action="store_true", help="print it as JSON")
    insp.add_argument("-d", "--disassemble", action="store_true", help="also print each program's instructions")
    cap = sub.add_parser("capture", help="run a topology and print one line per frame of one device, as "
                         "xdpdump does without -w")
    _add_topology(cap)
    cap.add_argument("device", metavar="HOST:DEV[@exit]", help="the device (@exit: also after the XDP program)")
    cstop = cap.add_mutually_exclusive_group()
    cstop.add_argument("--duration", "-d", type=_positive(float), metavar="S", help="run for S seconds")
    cstop.add_argument("--count", "-n", type=_non_negative_int, metavar="N", help="every generator sends N packets")
    cap.add_argument("--snaplen", type=_positive(int), metavar="BYTES", help="bytes of each frame decoded")
    sweep = sub.add_parser("sweep", help="run a topology over a grid of its keys; write a CSV, plots and a report")
    sweep.add_argument("spec", help="experiment file (README: Sweeps)")
    sweep.add_argument("--out", required=True, metavar="DIR",
                       help="where results.csv, results.json, the plots and report.md go; runs already in "
                       "DIR/results.json are not run again")
    # -- containers (emu.deploy; docs/docker.md) --
    comp = sub.add_parser("compose", help="write a Docker Compose file for a topology (coordinator + one "
                          "service per host)")
    _add_topology(comp)
    comp.add_argument("-o", "--output", default="-", metavar="FILE", help="where to write it (default: stdout)")
    comp.add_argument("--keys", metavar="DIR", help="mount this CURVE key set (`emu keys`) and pass --keys")
    comp.add_argument("--cores", type=_positive(int), metavar="N",
                      help="cores of the machine the containers run on, for the cpusets (default: this one's)")
    comp.add_argument("--build-context", metavar="DIR",
                      help="add a build section (the repository, relative to the file) for `compose up --build`")
    cstop = comp.add_mutually_exclusive_group()
    cstop.add_argument("--count", "-n", type=_non_negative_int, metavar="N",
                       help="the run's default --count (EMU_COUNT overrides; default: the generators' own)")
    cstop.add_argument("--duration", "-d", type=_positive(float), metavar="S", help="run for S seconds")
    dep = sub.add_parser("deploy", help="run a topology as containers (compose or swarm), like containerlab deploy")
    _add_topology(dep)
    dep.add_argument("--engine", choices=("compose", "swarm"), default="compose",
                     help="docker compose on this machine (default), or a stack on a Docker Swarm")
    dep.add_argument("--name", metavar="NAME", help="the deployment's name (default: emu-TOPOLOGY)")
    dstop = dep.add_mutually_exclusive_group()
    dstop.add_argument("--count", "-n", type=_non_negative_int, metavar="N",
                       help="every generator sends N packets (0: until destroyed)")
    dstop.add_argument("--duration", "-d", type=_positive(float), metavar="S", help="run for S seconds")
    dep.add_argument("--keys", metavar="DIR", help="CURVE keys (`emu keys`) for the control channel and links")
    dep.add_argument("--image", default="pagepool-emu:local", metavar="IMAGE",
                     help="the image (default pagepool-emu:local; built when missing)")
    dep.add_argument("--build", action="store_true", help="rebuild the image first (scripts/docker-build.sh)")
    dep.add_argument("--cores", type=_positive(int), metavar="N", help="cores per machine, for the cpusets")
    dep.add_argument("--wait", action="store_true",
                     help="follow the live lines until the run ends; exit with the coordinator's status")
    des = sub.add_parser("destroy", help="stop and remove a deployment's containers, networks, secrets")
    des.add_argument("name", help="the deployment's name")
    dps = sub.add_parser("ps", help="list deployments, or one deployment's hosts, containers and live line")
    dps.add_argument("name", nargs="?", help="the deployment's name")
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    from emu.topology.file import load_topology  # PyYAML and the schema: only the commands that read a file

    topo = load_topology(args.topology)
    _kernel_verify(args, topo)
    if args.json:
        print(json.dumps(topo.to_dict(), indent=2))
    else:
        cpus = sum(h.cpus for h in topo.hosts.values())
        devs = sum(len(h.devices) for h in topo.hosts.values())
        print(f"{args.topology}: ok: topology {topo.name!r}: {len(topo.hosts)} hosts, {cpus} CPUs, "
              f"{devs} devices, {len(topo.links)} links, {len(topo.traffic)} traffic ports")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from emu.ebpf.inspect import format_text, inspect_object

    info = inspect_object(args.object, disassemble=args.disassemble)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def _check_output(path: str | None) -> None:
    """Refuse a ``--json`` file that cannot be written before the run, not after it (the run's report
    would be lost)."""
    if not path or path == "-":
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BadInputError(f"--json {path}: is a directory")
    if not os.path.isdir(parent):
        raise BadInputError(f"--json {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise BadInputError(f"--json {path}: not writable")


def _options(args: argparse.Namespace, topo):
    from emu.run.coordinator import RunOptions

    _check_output(args.json)
    to_stdout = args.json == "-"
    count = args.count if args.count else None
    opts = RunOptions(count=count, duration=args.duration, interval=args.interval,
                      extended=args.extended, quiet=args.quiet,
                      out=sys.stderr if to_stdout else sys.stdout)
    if args.count == 0:
        opts.count = None
        topo = _unbounded(topo)
    if opts.count is None and args.duration is None:
        unbounded = [n for n, p in topo.traffic.items() if p.generate is not None and not p.generate.ends()]
        if unbounded:
            opts.out.write(f"generators {', '.join(unbounded)} have no count: running until Ctrl-C\n")
    return opts, topo


def _with_capture(topo, specs: list[str] | None, directory: str | None, snaplen: int | None):
    """The topology with ``--capture`` devices (added to its own ``capture``), ``--capture-dir`` and
    ``--snaplen``; `BadInputError` for a device it does not have."""
    import dataclasses

    from emu.topology.model import CaptureConfig
    from emu.topology.schema import MAX_SNAPLEN

    if not specs and directory is None and snaplen is None:
        return topo
    if snaplen is not None and snaplen > MAX_SNAPLEN:
        raise BadInputError(f"--snaplen {snaplen}: at most {MAX_SNAPLEN}")
    base = topo.capture or CaptureConfig((), os.getcwd())
    devices = list(base.devices)
    for text in specs or []:
        try:
            dev = CaptureConfig.parse_device(text, topo.hosts)
        except ValueError as e:
            raise BadInputError(f"--capture {text}: {str(e).partition(': ')[2]}") from None
        devices = [d for d in devices if d[:2] != dev[:2]] + [dev]
    if not devices:
        raise BadInputError("--capture-dir/--snaplen without a device to capture (--capture HOST:DEV)")
    if directory is not None and os.path.exists(directory) and not os.path.isdir(directory):
        raise BadInputError(f"--capture-dir {directory}: not a directory")
    cfg = CaptureConfig(tuple(devices), os.path.abspath(directory) if directory is not None else base.dir,
                        snaplen or base.snaplen)
    return dataclasses.replace(topo, capture=cfg)


def _unbounded(topo):
    """`--count 0`: every generator runs until the run is stopped."""
    import dataclasses

    traffic = {n: dataclasses.replace(p, generate=None if p.generate is None
                                      else dataclasses.replace(p.generate, count=0))
               for n, p in topo.traffic.items()}
    return dataclasses.replace(topo, traffic=traffic)


def report_status(report: dict) -> int:
    """A finished (or interrupted) run's exit status from its report: 3 when a process died, 1 for a
    violation, an unaccounted or corrupted packet or a lost host, else 0."""
    if report.get("failures"):
        return EXIT_PROCESS_FAILURE
    bad = any(report["violations"].get(k) for k in ("foreign_cache_return", "recycled_before_tx_completion",
                                                      "double_free", "leaked"))
    bad = bad or report["traffic"]["unaccounted"] != 0 or report["traffic"]["corrupted"] != 0
    bad = bad or bool(report.get("hosts_lost"))
    ports = report["traffic"].get("ports", {})  # a golden file that did not match fails like a unit test
    bad = bad or any(isinstance(p, dict) and p.get("expect", {}).get("match") is False for p in ports.values())
    return 1 if bad else 0


def _finish(args: argparse.Namespace, report: dict) -> int:
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return report_status(report)


def cmd_run(args: argparse.Namespace) -> int:
    from emu.run import launch

    launch.prestart()  # the workers' fork server imports their modules while this process imports its own
    from emu.run.coordinator import Run
    from emu.run.procname import set_title
    from emu.topology.file import load_topology

    topo = _with_capture(load_topology(args.topology), args.capture, args.capture_dir, args.snaplen)
    opts, topo = _options(args, topo)
    _kernel_verify(args, topo)
    set_title(f"run {topo.name}")
    return _finish(args, Run(topo, opts).run())


def cmd_capture(args: argparse.Namespace) -> int:
    """``emu capture TOPOLOGY HOST:DEV[@exit]``: run it, printing each frame of the device as it comes."""
    import dataclasses

    from emu.run import launch

    launch.prestart()
    from emu.run.coordinator import Run, RunOptions
    from emu.run.procname import set_title
    from emu.topology.file import load_topology

    topo = load_topology(args.topology)
    topo = dataclasses.replace(topo, capture=None)  # only the device asked for
    topo = _with_capture(topo, [args.device], None, args.snaplen)
    count = args.count if args.count else None
    def printer(line: str) -> None:
        try:
            print(line, flush=True)
        except BrokenPipeError:
            # `emu capture ... | head`: as tcpdump, stop writing; stdout goes nowhere from now on, so that
            # the interpreter's own flush at exit does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise

    opts = RunOptions(count=count, duration=args.duration, quiet=True, out=sys.stderr, capture_printer=printer)
    if args.count == 0:
        opts.count = None
        topo = _unbounded(topo)
    set_title(f"capture {topo.name}")
    report = Run(topo, opts).run()
    for item in report.get("capture", []):
        print(f"{item['packets']:,} packets captured, {item['capture_drops']:,} dropped by the capture ring",
              file=sys.stderr)
    return report_status(report)


def cmd_coordinator(args: argparse.Namespace) -> int:
    from emu.cluster.cluster import Cluster
    from emu.run.procname import set_title
    from emu.topology.file import load_topology

    topo = _with_capture(load_topology(args.topology), args.capture, args.capture_dir, args.snaplen)
    opts, topo = _options(args, topo)
    _kernel_verify(args, topo)
    set_title(f"coordinator {topo.name}")
    cluster = Cluster(topo, args.bind, opts, keys_dir=args.keys, status_file=args.status_file,
                      host_timeout=args.host_timeout, register_timeout=args.register_timeout)
    return _finish(args, cluster.run())


def cmd_host(args: argparse.Namespace) -> int:
    from emu.run import launch

    launch.prestart()
    from emu.cluster.hostagent import AgentOptions, HostAgent
    from emu.run.procname import set_title

    set_title(f"host {args.name}")
    opts = AgentOptions(listen=args.listen, advertise=args.advertise, link_port=args.link_port,
                        keys_dir=args.keys, status_file=args.status_file, serve=args.serve,
                        coordinator_timeout=args.coordinator_timeout)
    if args.link_timeout is not None:
        opts.link_timeout = args.link_timeout
    return HostAgent(args.name, args.coordinator, opts).serve()


def cmd_keys(args: argparse.Namespace) -> int:
    from emu.net.security import generate_keys

    public, secret = generate_keys(args.directory, force=args.force)
    print(f"wrote {public} and {secret}: copy the directory to the coordinator and every host, and pass "
          "--keys to each")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from emu.sweep.spec import load_spec  # reads and checks every grid point: before anything starts

    spec = load_spec(args.spec)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise BadInputError(f"--out {args.out}: not a directory")
    from emu.sweep.output import require_plotting, write_outputs

    require_plotting(spec)
    from emu.run import launch

    launch.prestart()
    from emu.sweep.runner import run_sweep

    results = run_sweep(spec, args.out)
    for path in write_outputs(spec, results, args.out):
        print(f"wrote {path}")
    bad = [r["id"] for r in results["runs"] if r["metrics"]["violations"] or r["report"]["traffic"]["unaccounted"]]
    if bad:
        print(f"emu: {len(bad)} runs had violations or unaccounted packets: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def cmd_clean(args: argparse.Namespace) -> int:
    from emu.mem.shm import sweep_stale

    removed = sweep_stale()
    print(f"removed {len(removed)} stale shared-memory segments" + (": " + ", ".join(removed) if removed else ""))
    return 0


def cmd_pools(args: argparse.Namespace) -> int:
    """``emu pools [--json] [RUN]``: the run's page pools (`emu.run.pools`).

    Exit status as ``ynl`` and ``ip`` have it: an empty dump is no error, so with no run in progress
    ``--json`` prints ``[]`` and exits 0 (a script polls it like ``ynl --dump``); the text form, read by
    a person, says so on stderr and exits 1, as ``ip link show dev X`` does for a missing device.  A RUN
    that is not in progress is that missing device in both forms (1); several runs in progress and no
    RUN is ambiguous input (2), naming them."""
    from emu.run import pools

    runs = pools.find_runs()
    chosen = pools.select_runs(runs, args.run)
    if not chosen:
        if args.run is None and args.json:
            print("[]")
            return 0
        what = f"run {args.run} is not" if args.run is not None else "no run is"
        print(f"emu: {what} in progress on this machine", file=sys.stderr)
        return 1
    if len(chosen) > 1:
        names = ", ".join(f"{r.prefix} (pid {r.pid})" for r in chosen)
        print(f"emu: {len(chosen)} runs are in progress: name one (emu pools PID): {names}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run = chosen[0]
    found = pools.live_pools(run)
    if args.json:
        print(json.dumps([p for _, p in found]))
    else:
        print(pools.dump_text(run, found))
    return 0


def cmd_deployment(args: argparse.Namespace) -> int:
    """``emu compose``, ``deploy``, ``destroy``, ``ps``: containers (`emu.deploy.commands`)."""
    from emu.deploy import commands

    return commands.COMMANDS[args.command](args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "coordinator": cmd_coordinator, "host": cmd_host, "keys": cmd_keys, "clean": cmd_clean,
    "validate": cmd_validate, "sweep": cmd_sweep, "pools": cmd_pools, "capture": cmd_capture,
    "inspect": cmd_inspect,
    "compose": cmd_deployment, "deploy": cmd_deployment, "destroy": cmd_deployment, "ps": cmd_deployment,
}


def error_line(exc: BaseException) -> str:
    """The one line an error ends in: ``emu: <message>``; an error located in a file (a topology's
    ``FILE:LINE: message``) is printed as it is, the form compilers use and editors parse."""
    text = str(exc)
    where = getattr(exc, "file", None)
    if isinstance(where, str) and text.startswith(f"{where}:"):
        return text
    return f"emu: {text}"


def os_error_line(exc: OSError) -> str:
    """``emu: FILE: what`` for a file the system refused (missing, a directory, not permitted...)."""
    what = exc.strerror or str(exc)
    name = exc.filename
    if name is None or str(name) in what:
        return f"emu: {what}"
    return f"emu: {name}: {what}"


def _sigterm_is_ctrl_c(signum: int, frame: object) -> None:
    # Until a run installs its own handler (it then tears down in order on either signal), SIGTERM
    # interrupts exactly as Ctrl-C does: KeyboardInterrupt, which every phase already handles.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = None
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # not when embedded in a program that set one
        previous = signal.signal(signal.SIGTERM, _sigterm_is_ctrl_c)

    def fail(line: str, status: int) -> int:
        if args.debug:
            traceback.print_exc()
        print(line, file=sys.stderr, flush=True)
        return status

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return fail("emu: interrupted", EXIT_INTERRUPTED)
    except EmuError as exc:
        return fail(error_line(exc), exit_status(exc))
    except OSError as exc:
        # A file named on the command line (or in a topology) that cannot be used is bad input; an
        # OSError about no file at all (no memory, too many open files) means the run could not start.
        return fail(os_error_line(exc), EXIT_BAD_INPUT if exc.filename is not None else EXIT_PROCESS_FAILURE)
    except Exception as exc:
        hint = "" if args.debug else " (run with --debug for the traceback)"
        return fail(f"emu: internal error: {type(exc).__name__}: {exc}{hint}", EXIT_PROCESS_FAILURE)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
