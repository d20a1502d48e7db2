"""A topology as a Docker Swarm stack (``docker stack deploy``): the services of the compose file, for
a swarm of one or more machines.

What swarm does differently, and how the stack makes up for it:

- **No ``shm_size``**: each host's ``/dev/shm`` is a tmpfs mount of the plan's size.
- **No ``depends_on``**: the services start in any order; a host says hello until the coordinator
  answers, and the coordinator waits for every host to register, so the order does not matter.  The
  healthchecks stay (``docker service ps`` shows a task healthy once it registered).
- **No ``cpuset``**: a host's CPU workers pin themselves to the node's cores (``cpu_affinity``, else
  consecutive cores; core k is the (k mod n)-th of the n usable ones), and placement spreads hosts
  over nodes: a host's ``placement`` (``{node.labels.emu: rack1}``) becomes a constraint
  ``node.labels.emu == rack1``.
- **No bind mounts across machines**: the topology and the program modules the image lacks are
  swarm configs, CURVE keys are swarm secrets (``/run/secrets/emu.key`` and ``emu.key_secret``,
  readable by the image's user only).
- **Restarts**: ``restart_policy: none``: a host that dies is reported lost, never restarted mid-run
  as a stranger to the run.
- **Names**: the overlay network is internal and attachable; services use ``endpoint_mode: dnsrr``
  (a host's name resolves to its task, no virtual IP in between).

The image must be on every node (no registry here): ``docker stack deploy --resolve-image never``
with an image name without a registry part uses each node's local image.
"""

from __future__ import annotations

from typing import Any

from emu.deploy.compose import (
    COORDINATOR_HEALTH,
    HOST_HEALTH,
    LINKS,
    NETWORK,
    coordinator_command,
    default_count,
    dump,
    host_command,
    link_alias,
    stop_args,
    volume_path,
)
from emu.deploy.plan import COORDINATOR, IMAGE_UID, Plan
from emu.errors import BadInputError

SECRETS_DIR = "/run/secrets"
KEY_FILES = ("emu.key", "emu.key_secret")


def constraint(key: str, value: str) -> str:
    return f"{key} == {value}"


def render(plan: Plan, out_dir: str, image: str, *, count: int | None = None, duration: float | None = None,
           keys_dir: str | None = None, header: str = "") -> str:
    """The stack file's text; files are named relative to `out_dir`, the stack file's folder."""
    keys = None if keys_dir is None else SECRETS_DIR
    configs: dict[str, Any] = {}
    secrets: dict[str, Any] = {}

    def config_refs(mounts) -> list[dict[str, Any]]:
        refs = []
        for m in mounts:
            if m.directory:
                raise BadInputError(f"--engine swarm: program package {m.source} is a folder, and swarm configs are "
                                    "files: install the package into the image, or make it one module file")
            name = "f_" + m.target.rsplit("/", 1)[-1].replace(".", "_")
            configs[name] = {"file": volume_path(m.source, out_dir)}
            refs.append({"source": name, "target": m.target, "uid": str(IMAGE_UID), "mode": 0o444})
        return refs

    def secret_refs() -> list[dict[str, Any]]:
        if keys_dir is None:
            return []
        refs = []
        for f in KEY_FILES:
            name = f.replace(".", "_")
            secrets[name] = {"file": volume_path(f"{keys_dir}/{f}", out_dir)}
            refs.append({"source": name, "target": f, "uid": str(IMAGE_UID), "mode": 0o400})
        return refs

    def common(name: str, placement: dict[str, str]) -> dict[str, Any]:
        deploy: dict[str, Any] = {"mode": "replicated", "replicas": 1, "endpoint_mode": "dnsrr",
                                  "restart_policy": {"condition": "none"}}
        if placement:
            deploy["placement"] = {"constraints": [constraint(k, v) for k, v in placement.items()]}
        svc: dict[str, Any] = {"image": image, "init": True, "hostname": name, "stop_grace_period": "30s",
                               "networks": [NETWORK], "deploy": deploy}
        return svc

    services: dict[str, Any] = {}
    coord = common(COORDINATOR, {})
    coord["command"] = coordinator_command(plan, stop_args(count, duration, default_count(plan)), keys, True)
    coord["healthcheck"] = dict(COORDINATOR_HEALTH)
    programs = config_refs(plan.program_mounts)
    coord["configs"] = config_refs(plan.mounts) + programs  # it validates the topology: its programs
    if programs:
        coord["environment"] = {"PYTHONPATH": plan.pythonpath}
    if keys:
        coord["secrets"] = secret_refs()
    services[COORDINATOR] = coord
    for h in plan.hosts:
        svc = common(h.name, h.placement)
        svc["command"] = host_command(h.name, keys)
        svc["networks"] = {NETWORK: {}, LINKS: {"aliases": [link_alias(h.name)]}}
        svc["healthcheck"] = dict(HOST_HEALTH)
        svc["volumes"] = [{"type": "tmpfs", "target": "/dev/shm", "tmpfs": {"size": h.shm_bytes}}]
        if programs:
            svc["configs"] = programs
            svc["environment"] = {"PYTHONPATH": plan.pythonpath}
        if keys:
            svc["secrets"] = secret_refs()
        services[h.name] = svc
    doc: dict[str, Any] = {"version": "3.8", "services": services,
                           "networks": {n: {"driver": "overlay", "internal": True, "attachable": True}
                                        for n in (NETWORK, LINKS)}}
    if configs:
        doc["configs"] = configs
    if secrets:
        doc["secrets"] = secrets
    return header + dump(doc)

