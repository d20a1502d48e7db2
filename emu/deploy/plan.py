"""What the containers running a topology need, whatever engine runs them: one service for the
coordinator and one per emulated host, each host's ``/dev/shm`` size and cpuset, and the files (the
topology, program modules outside the image) that must be mounted into them.

The engines' files (`emu.deploy.compose`, `emu.deploy.swarm`) are written from a `Plan`, so both size
and pin the same way.  A host's ``/dev/shm`` holds its page memory, page table and pools and the rings
between its processes (`emu.run.coordinator.host_shm_bytes`, what the host itself checks before it
creates them), plus the stats table and BPF maps; the plan gives it half as much again, rounded up to
16 MiB.  CPUs are dealt as `emu run` deals them on one machine: a host's emulated CPUs take the next
cores in turn (modulo the machine's cores), unless its ``cpu_affinity`` names them.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field

from emu.errors import BadInputError
from emu.run.coordinator import RUN_SHM_BYTES, host_shm_bytes
from emu.topology.model import HostConfig, Topology

COORDINATOR = "coordinator"  # the coordinator's service (and host) name
COORD_PORT = 7700
WORKDIR = "/srv/emu"  # the image's working directory (Dockerfile)
TOPOLOGY_DIR = f"{WORKDIR}/topology"
PROGRAMS_DIR = f"{WORKDIR}/programs"  # program modules not in the image, on PYTHONPATH
STATUS_FILE = "/run/emu/status"  # read by the healthchecks (`emu coordinator/host --status-file`)
IMAGE = "pagepool-emu:local"
IMAGE_UID = 10001  # the image's user `emu`
SHM_MARGIN = 1.5
SHM_ROUND = 16 << 20
# Modules the image has: programs from these need no mount.
IMAGE_PACKAGES = ("emu", "workers")
# A compose service name, a DNS label: what a host must be called to be one.
_SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")


@dataclass(frozen=True)
class Mount:
    """A file or directory of this machine the containers read: `source` here, `target` inside."""

    source: str
    target: str
    directory: bool = False


@dataclass(frozen=True)
class HostPlan:
    name: str
    cpus: tuple[int, ...]  # the machine's cores this host's container may use
    shm_bytes: int
    placement: dict[str, str] = field(default_factory=dict)

    @property
    def cpuset(self) -> str:
        return cpuset_text(self.cpus)

    @property
    def env(self) -> str:
        """The variable that overrides its cpuset (``EMU_CPUS_H1``)."""
        return cpus_env(self.name)


@dataclass(frozen=True)
class Plan:
    topo: Topology
    topology_target: str  # the topology file inside the coordinator's container
    hosts: tuple[HostPlan, ...]
    cores: int
    mounts: tuple[Mount, ...]  # the coordinator's: the topology
    program_mounts: tuple[Mount, ...]  # everyone's: program modules the image lacks (the coordinator validates)

    @property
    def coordinator_cpus(self) -> str:
        return cpuset_text(tuple(range(self.cores)))

    @property
    def pythonpath(self) -> str | None:
        return PROGRAMS_DIR if self.program_mounts else None


def cpus_env(name: str) -> str:
    return "EMU_CPUS_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


def cpuset_text(cores: tuple[int, ...]) -> str:
    """``0-3,6`` for cores 0, 1, 2, 3 and 6, as cpuset(7) writes a list."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cores)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [c]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def shm_size(host: HostConfig) -> int:
    """Bytes of ``/dev/shm`` to give a host's container: what it needs, with margin, in 16 MiB steps."""
    need = (host_shm_bytes(host) + RUN_SHM_BYTES) * SHM_MARGIN
    return int(-(-need // SHM_ROUND) * SHM_ROUND)


def size_text(n: int) -> str:
    """Bytes as compose writes a size (``48m``)."""
    return f"{n >> 20}m" if n % (1 << 20) == 0 else str(n)


def _program_mounts(topo: Topology) -> list[Mount]:
    """The modules of the topology's programs that the image does not have, to be mounted into every
    host (a single-file module as a file, a package as its directory), on ``PYTHONPATH``."""
    mounts: dict[str, Mount] = {}
    for host in topo.hosts.values():
        for dev in host.devices.values():
            if dev.xdp is None:
                continue
            module = dev.xdp.program.partition(":")[0]
            top = module.split(".")[0]
            if top in IMAGE_PACKAGES or top in mounts:
                continue
            spec = importlib.util.find_spec(top)
            if spec is None or spec.origin is None or spec.origin in ("built-in", "frozen"):
                continue  # the standard library (the image's Python has it too)
            origin = os.path.abspath(spec.origin)
            if "site-packages" in origin.split(os.sep) or "dist-packages" in origin.split(os.sep):
                raise BadInputError(f"topology {topo.name!r}: program module {top!r} is an installed package "
                                    f"({origin}): install it into the image instead")
            if spec.submodule_search_locations:
                mounts[top] = Mount(os.path.dirname(origin), f"{PROGRAMS_DIR}/{top}", directory=True)
            else:
                mounts[top] = Mount(origin, f"{PROGRAMS_DIR}/{os.path.basename(origin)}")
    return list(mounts.values())


def make_plan(topo: Topology, cores: int | None = None) -> Plan:
    """The plan for `topo` (read from its file, `topo.path`) on machines of `cores` cores (default:
    this machine's)."""
    cores = cores or os.cpu_count() or 1
    for name in topo.hosts:
        if name == COORDINATOR:
            raise BadInputError(f"topology {topo.name!r}: a host named {name!r} clashes with the coordinator's "
                                "service; rename it")
        if not _SERVICE_RE.match(name):
            raise BadInputError(f"topology {topo.name!r}: host {name!r} cannot name a container service "
                                "(letters, digits, '_' and '-', starting with a letter or digit)")
    hosts = []
    core = 0
    for name, host in topo.hosts.items():
        if host.cpu_affinity:
            cpus = tuple(sorted({a % cores for a in host.cpu_affinity}))
        else:
            cpus = tuple(sorted({(core + c) % cores for c in range(host.cpus)}))
            core += host.cpus
        hosts.append(HostPlan(name, cpus, shm_size(host), dict(host.placement)))
    if not topo.path:
        raise BadInputError(f"topology {topo.name!r} was not read from a file")
    source = os.path.abspath(topo.path)
    target = f"{TOPOLOGY_DIR}/{os.path.basename(source)}"
    programs = _program_mounts(topo)
    return Plan(topo, target, tuple(hosts), cores, (Mount(source, target),), tuple(programs))
