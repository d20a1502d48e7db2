"""``emu compose``: a topology as a Docker Compose file, one service for the coordinator and one per
emulated host (the repository's ``docker-compose.yml`` is this for ``topology/multihost.yaml``).

Every service runs the project's image (never pulled: ``pull_policy: never``), with ``init`` (tini
forwards SIGTERM and reaps the workers), no published port and ``restart: "no"``; the hosts start once
the coordinator's healthcheck passes (``depends_on: service_healthy``: it writes its status file once it
listens) and are healthy once registered.  Each host gets the ``shm_size`` and ``cpuset`` of the plan
(`emu.deploy.plan`; ``EMU_CPUS_<HOST>`` overrides a cpuset), the coordinator the topology file mounted
read-only, the hosts the program modules the image lacks.  The file is the Compose Spec without a
``version:`` key, which docker-compose 1.29 and the compose v2 plugin both read.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

import yaml

from emu.deploy.plan import COORD_PORT, COORDINATOR, STATUS_FILE, Mount, Plan, size_text

KEYS_TARGET = "/keys"
NETWORK = "emu"  # the control channel: the coordinator and every host
LINKS = "links"  # the cables between hosts: hosts only, so a host can be cut off them alone (a partition)


def link_alias(host: str) -> str:
    """The name a host's links are reached by: on the links network only."""
    return f"{host}.{LINKS}"
IMAGE_REF = "${EMU_IMAGE:-pagepool-emu:local}"


class _Dumper(yaml.SafeDumper):
    """Block style, but lists of scalars (a command, a healthcheck test) in flow style; no anchors (each
    service reads whole)."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(x, str | int) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _list)


def dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=False)


def volume_path(path: str, out_dir: str) -> str:
    """A bind mount's source as compose reads it: relative to the compose file's folder (``./x``) when
    it lies under it, else absolute."""
    rel = os.path.relpath(path, out_dir)
    return path if rel.startswith("..") else "./" + rel


def stop_args(count: int | None, duration: float | None, default_count: int) -> list[str]:
    """How the coordinator's run ends: ``--duration S``, or ``--count`` (``EMU_COUNT`` overrides it)."""
    if duration is not None:
        return ["--duration", f"{duration:g}"]
    return ["--count", f"${{EMU_COUNT:-{default_count if count is None else count}}}"]


def default_count(plan: Plan) -> int:
    """The generators' own count when they share one (0, until stopped, when they have none)."""
    counts = {p.generate.count for p in plan.topo.traffic.values() if p.generate is not None}
    return max(counts) if counts else 0


def coordinator_command(plan: Plan, stop: list[str], keys: str | None, report_json: bool) -> list[str]:
    """`keys`: where the CURVE keys are in the container (None: no CURVE)."""
    cmd = ["emu", "coordinator", plan.topology_target, "--bind", f"tcp://0.0.0.0:{COORD_PORT}", *stop,
           "--status-file", STATUS_FILE, "-i", "1"]
    if keys is not None:
        cmd += ["--keys", keys]
    if report_json:
        cmd += ["--json", "-"]  # the report alone on stdout, live lines and summary on stderr
    return cmd


def host_command(name: str, keys: str | None) -> list[str]:
    """`keys`: where the CURVE keys are in the container (None: no CURVE)."""
    cmd = ["emu", "host", name, "--coordinator", f"tcp://{COORDINATOR}:{COORD_PORT}", "--listen", "0.0.0.0",
           "--advertise", link_alias(name), "--status-file", STATUS_FILE]
    return cmd + (["--keys", keys] if keys is not None else [])


COORDINATOR_HEALTH = {
    # the coordinator writes its status file once it listens
    "test": ["CMD-SHELL", f"test -f {STATUS_FILE}"], "interval": "1s", "timeout": "5s", "retries": 180,
}
HOST_HEALTH = {
    # a host writes `connecting`, then `registered`, `running`, `finished` to its status file
    "test": ["CMD-SHELL", f"test -f {STATUS_FILE} && ! grep -q connecting {STATUS_FILE}"],
    "interval": "2s", "timeout": "5s", "retries": 90,
}


def render(plan: Plan, out_dir: str, *, count: int | None = None, duration: float | None = None,
           build_context: str | None = None, keys_dir: str | None = None, report_json: bool = False,
           header: str = "") -> str:
    """The compose file's text; paths are written relative to `out_dir`, the compose file's folder."""
    keys = None if keys_dir is None else KEYS_TARGET

    def mounts(ms: tuple[Mount, ...]) -> list[str]:
        out = [f"{volume_path(m.source, out_dir)}:{m.target}:ro" for m in ms]
        if keys_dir is not None:
            out.append(f"{volume_path(os.path.abspath(keys_dir), out_dir)}:{KEYS_TARGET}:ro")
        return out

    def common(name: str, cpus: str) -> dict[str, Any]:
        svc: dict[str, Any] = {"image": IMAGE_REF}
        if build_context is not None:
            svc["build"] = {"context": build_context, "dockerfile": "Dockerfile", "network": "none",
                            "args": {"BASE_IMAGE": "${BASE_IMAGE:-python:3.11-slim}"}}
        svc.update({"pull_policy": "never", "init": True, "stop_grace_period": "30s", "restart": "no",
                    "networks": [NETWORK], "hostname": name, "cpuset": cpus})
        return svc

    services: dict[str, Any] = {}
    coord = common(COORDINATOR, f"${{EMU_CPUS_COORDINATOR:-{plan.coordinator_cpus}}}")
    coord["command"] = coordinator_command(plan, stop_args(count, duration, default_count(plan)), keys, report_json)
    coord["volumes"] = mounts(plan.mounts + plan.program_mounts)  # it validates the topology: its programs
    if plan.pythonpath:
        coord["environment"] = {"PYTHONPATH": plan.pythonpath}
    coord["healthcheck"] = dict(COORDINATOR_HEALTH)
    services[COORDINATOR] = coord
    for h in plan.hosts:
        svc = common(h.name, f"${{{h.env}:-{h.cpuset}}}")
        svc["networks"] = {NETWORK: {}, LINKS: {"aliases": [link_alias(h.name)]}}
        svc["shm_size"] = size_text(h.shm_bytes)
        svc["command"] = host_command(h.name, keys)
        vols = mounts(plan.program_mounts)
        if vols:
            svc["volumes"] = vols
        if plan.pythonpath:
            svc["environment"] = {"PYTHONPATH": plan.pythonpath}
        svc["healthcheck"] = dict(HOST_HEALTH)
        svc["depends_on"] = {COORDINATOR: {"condition": "service_healthy"}}
        services[h.name] = svc
    # no route out of the project's networks: the emulator only talks between its own containers
    doc = {"services": services, "networks": {NETWORK: {"internal": True}, LINKS: {"internal": True}}}
    return header + dump(doc)


def header_text(plan: Plan, command: str) -> str:
    """The comment heading a written file: what it runs and how it was made."""
    hosts = ", ".join(f"{h.name} (cpuset {h.cpuset}, shm {size_text(h.shm_bytes)})" for h in plan.hosts)
    lines = [f"# Topology {plan.topo.name!r} as containers: the coordinator and the emulated hosts {hosts}.",
             f"# Written by `{command}`:",
             "# edit the topology and write it again rather than editing this file (docs/docker.md).",
             "# Override a cpuset with " + ", ".join(h.env for h in plan.hosts) + " or EMU_CPUS_COORDINATOR, the",
             "# packet count with EMU_COUNT (0: until stopped), the image with EMU_IMAGE."]
    return "\n".join(textwrap.fill(x, 110, subsequent_indent="#   ") if len(x) > 110 else x for x in lines) + "\n"
