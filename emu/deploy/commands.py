"""The ``emu compose``, ``emu deploy``, ``emu destroy`` and ``emu ps`` commands: arguments in, files
and containers out (`emu.deploy.compose`, `emu.deploy.engine`)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable

from emu.deploy import compose, engine
from emu.deploy.plan import make_plan
from emu.errors import BadInputError


def _compose_command(args: argparse.Namespace) -> str:
    """The command line that writes this file again (recorded in its header)."""
    words = ["emu", "compose", args.topology]
    for opt in ("cores", "build_context", "keys", "count", "duration"):
        value = getattr(args, opt)
        if value is not None:
            words += [f"--{opt.replace('_', '-')}", str(value)]
    if args.output != "-":
        words += ["-o", args.output]
    return shlex.join(words)


def compose_text(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The compose file `args` ask for, and its hosts' names."""
    from emu.topology.file import load_topology

    plan = make_plan(load_topology(args.topology), args.cores)
    if args.keys is not None and not os.path.isdir(args.keys):
        raise BadInputError(f"--keys {args.keys}: not a directory (make one with `emu keys {args.keys}`)")
    out_dir = os.getcwd() if args.output == "-" else os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise BadInputError(f"-o {args.output}: directory {out_dir} does not exist")
    text = compose.render(plan, out_dir, count=args.count, duration=args.duration, build_context=args.build_context,
                          keys_dir=None if args.keys is None else os.path.abspath(args.keys),
                          header=compose.header_text(plan, _compose_command(args)))
    return text, [h.name for h in plan.hosts]


def cmd_compose(args: argparse.Namespace) -> int:
    text, hosts = compose_text(args)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}: services coordinator, {', '.join(hosts)}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from emu.topology.file import load_topology

    topo = load_topology(args.topology)
    d = engine.deploy(topo, args.engine, args.name, args.count, args.duration, keys_dir=args.keys,
                      image=args.image, build=args.build, cores=args.cores)
    print(f"deployed {d.name} ({d.engine}): coordinator, {', '.join(d.hosts)}; `emu ps {d.name}`, "
          f"`emu destroy {d.name}`", flush=True)
    if not args.wait:
        print(engine.ps_text(d.name))
        return 0
    return engine.wait(d)


def cmd_destroy(args: argparse.Namespace) -> int:
    engine.destroy(args.name)
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    print(engine.ps_text(args.name))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "compose": cmd_compose, "deploy": cmd_deploy, "destroy": cmd_destroy, "ps": cmd_ps,
}
