"""``emu deploy`` / ``emu destroy`` / ``emu ps``: a topology's containers as one named deployment, as
containerlab deploys, destroys and inspects a lab.

A deployment is a folder of its own (``$EMU_DEPLOY_DIR/NAME``, by default
``~/.local/state/pagepool-emu/deployments/NAME``): ``deployment.json`` (engine, topology, hosts), the
compose or stack file, and copies of the files the containers read (the topology, program modules,
CURVE keys made readable by the image's user), so the deployment does not change when they do.  The
engine runs it as the project ``NAME`` (compose) or the stack ``NAME`` (swarm), whose labels find its
containers, networks, configs and secrets again.  The coordinator prints its report as JSON on its
stdout (``--json -``; live lines go to stderr), which is how the report is collected at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from emu.deploy import compose, docker, swarm
from emu.deploy.docker import DockerError
from emu.deploy.plan import COORDINATOR, IMAGE, IMAGE_UID, Mount, Plan, make_plan
from emu.errors import BadInputError
from emu.topology.model import Topology

ENGINES = ("compose", "swarm")
STATE_FILE = "deployment.json"
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
STACK_NAMESPACE = "com.docker.stack.namespace"
SWARM_SERVICE = "com.docker.swarm.service.name"
LIVE_LINE = re.compile(r"^Summary\s+[\d,]+ rx/s.*$", re.MULTILINE)
DOWN_TIMEOUT = 30
GONE_DEADLINE = 180.0  # a stack's containers and network going away after `docker stack rm`


def deploy_root() -> Path:
    if os.environ.get("EMU_DEPLOY_DIR"):
        return Path(os.environ["EMU_DEPLOY_DIR"])
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "pagepool-emu" / "deployments"


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise BadInputError(f"deployment name {name!r}: lower-case letters, digits, '_' and '-' (at most 63), "
                            "starting with a letter or digit")
    return name


@dataclass
class Deployment:
    name: str
    engine: str
    topology: str  # the topology's name
    source: str  # the topology file it was deployed from
    hosts: list[str]
    image: str
    created: float

    @property
    def dir(self) -> Path:
        return deploy_root() / self.name

    @property
    def file(self) -> Path:
        return self.dir / ("stack.yml" if self.engine == "swarm" else "compose.yml")

    def save(self) -> None:
        (self.dir / STATE_FILE).write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, name: str) -> Deployment:
        path = deploy_root() / check_name(name) / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            known = ", ".join(all_names()) or "none"
            raise BadInputError(f"no deployment {name!r} (deployments: {known}; folder {deploy_root()})") from None
        except (ValueError, TypeError) as exc:
            raise BadInputError(f"{path}: not a deployment's state: {exc}") from None


def all_names() -> list[str]:
    root = deploy_root()
    return sorted(p.name for p in root.iterdir() if (p / STATE_FILE).is_file()) if root.is_dir() else []


# -- the files a deployment's containers read ---------------------------------------------------------

def _copy_files(plan: Plan, files: Path, keys_dir: str | None) -> tuple[Plan, str | None]:
    """Copy the topology, program modules and keys under `files`; the plan with the copies' paths."""

    def copy(m: Mount, sub: str) -> Mount:
        dest = files / sub / os.path.basename(m.source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if m.directory:
            shutil.copytree(m.source, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(m.source, dest)
        return replace(m, source=str(dest))

    plan = replace(plan, mounts=tuple(copy(m, "topology") for m in plan.mounts),
                   program_mounts=tuple(copy(m, "programs") for m in plan.program_mounts))
    if keys_dir is None:
        return plan, None
    from emu.net.security import PUBLIC_NAME, SECRET_NAME, load_keys

    load_keys(keys_dir)  # refuse a broken key set here, not in every container
    dest = files / "keys"
    dest.mkdir(parents=True)
    for f in (PUBLIC_NAME, SECRET_NAME):
        shutil.copy2(os.path.join(keys_dir, f), dest / f)
    if os.geteuid() == 0:  # the image's user must read them (the secret stays 0600)
        for p in (dest, dest / PUBLIC_NAME, dest / SECRET_NAME):
            os.chown(p, IMAGE_UID, IMAGE_UID)
    else:
        raise BadInputError(f"--keys {keys_dir}: the containers' user (uid {IMAGE_UID}) must own the copied key "
                            "files, which takes root: run emu deploy as root, or mount keys with emu compose")
    return plan, str(dest)


# -- deploy -------------------------------------------------------------------------------------------

def deploy(topo: Topology, engine: str, name: str | None, count: int | None, duration: float | None,
           keys_dir: str | None = None, image: str = IMAGE, build: bool = False, cores: int | None = None,
           out: TextIO = sys.stdout) -> Deployment:
    """Write the deployment's folder and start it; returns once its containers run."""
    if engine not in ENGINES:
        raise BadInputError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    name = check_name(name or re.sub(r"[^a-z0-9_-]", "-", f"emu-{topo.name}".lower()))
    plan = make_plan(topo, cores)
    d = Deployment(name, engine, topo.name, os.path.abspath(topo.path), list(topo.hosts), image, time.time())
    if d.dir.exists():
        raise BadInputError(f"deployment {name!r} exists already ({d.dir}): `emu destroy {name}` first, or "
                            "choose another --name")
    docker.require_engine()
    if engine == "compose":
        tool = docker.compose_tool()
    else:
        state, manager = docker.swarm_state()
        if state != "active" or not manager:
            raise DockerError(f"--engine swarm: this engine is not a swarm manager (swarm {state}): run "
                              "`docker swarm init` here or deploy from a manager node")
        if "/" in image.split(":")[0] and "." in image.split("/")[0]:
            raise BadInputError(f"--image {image}: a registry's image; a swarm without a registry runs local "
                                "images only (a name without a registry part)")
    d.dir.mkdir(parents=True)
    try:
        if build or not docker.image_exists(image):
            out.write(f"emu deploy: building image {image} (scripts/docker-build.sh; log {d.dir}/build.log)\n")
            out.flush()
            docker.build_image(image, d.dir / "build.log")
        plan, keys = _copy_files(plan, d.dir / "files", keys_dir)
        header = compose.header_text(plan, f"emu deploy --engine {engine} --name {name}")
        if engine == "compose":
            d.file.write_text(compose.render(plan, str(d.dir), count=count, duration=duration, keys_dir=keys,
                                             report_json=True, header=header))
            d.save()
            docker.run([*tool, "-p", name, "-f", str(d.file), "up", "-d", "--no-build"],
                       env=dict(os.environ, EMU_IMAGE=image), cwd=str(d.dir))
        else:
            d.file.write_text(swarm.render(plan, str(d.dir), image, count=count, duration=duration, keys_dir=keys,
                                           header=header))
            d.save()
            docker.run(["docker", "stack", "deploy", "--resolve-image", "never", "-c", str(d.file), name],
                       cwd=str(d.dir))
    except BaseException:
        if not (d.dir / STATE_FILE).exists():
            shutil.rmtree(d.dir, ignore_errors=True)  # nothing started: leave nothing behind
        raise
    return d


# -- what runs ------------------------------------------------------------------------------------------

@dataclass
class Container:
    service: str
    id: str
    node: str
    state: str  # running, exited (N), ...
    health: str


def containers(d: Deployment) -> list[Container]:
    """The deployment's containers on this machine (a swarm's tasks on other nodes: `tasks`)."""
    label = COMPOSE_PROJECT if d.engine == "compose" else STACK_NAMESPACE
    ids = docker.lines("ps", "-a", "-q", "--no-trunc", "--filter", f"label={label}={d.name}")
    out = []
    for c in docker.inspect(*ids):
        labels = c["Config"].get("Labels") or {}
        service = labels.get(COMPOSE_SERVICE) or labels.get(SWARM_SERVICE, "?").removeprefix(f"{d.name}_")
        st = c["State"]
        state = st["Status"] if st["Status"] != "exited" else f"exited ({st['ExitCode']})"
        health = (st.get("Health") or {}).get("Status", "") if st["Status"] == "running" else ""
        out.append(Container(service, c["Id"][:12], "local", state, health))
    order = {n: i for i, n in enumerate([COORDINATOR, *d.hosts])}
    return sorted(out, key=lambda c: (order.get(c.service, 99), c.id))


def tasks(d: Deployment) -> list[Container]:
    """A swarm deployment's tasks, wherever they run (``docker stack ps``)."""
    rows = docker.lines("stack", "ps", "--no-trunc", "--format",
                        "{{.Name}}\t{{.ID}}\t{{.Node}}\t{{.CurrentState}}\t{{.DesiredState}}", d.name)
    out = []
    for row in rows:
        name, tid, node, current, _desired = (row.split("\t") + [""] * 5)[:5]
        service = name.removeprefix(f"{d.name}_").split(".")[0]
        out.append(Container(service, tid[:12], node, current, ""))
    order = {n: i for i, n in enumerate([COORDINATOR, *d.hosts])}
    return sorted(out, key=lambda c: (order.get(c.service, 99), c.id))


def coordinator_logs(d: Deployment, stdout_only: bool = False) -> str:
    if d.engine == "swarm":
        return docker.logs(f"{d.name}_{COORDINATOR}", stdout_only, service=True)
    coord = [c for c in containers(d) if c.service == COORDINATOR]
    return docker.logs(coord[0].id, stdout_only) if coord else ""


def live_line(d: Deployment) -> str:
    """The coordinator's latest live summary line ('' before the first)."""
    found = LIVE_LINE.findall(coordinator_logs(d))
    return found[-1].strip() if found else ""


def coordinator_state(d: Deployment) -> str | None:
    """``running``, ``exited (N)`` ... of the coordinator; None when it has none."""
    rows = tasks(d) if d.engine == "swarm" else containers(d)
    for c in rows:
        if c.service == COORDINATOR:
            return c.state
    return None


def finished(d: Deployment) -> int | None:
    """The coordinator's exit status once it has ended, else None."""
    if d.engine == "compose":
        for c in containers(d):
            if c.service == COORDINATOR and c.state.startswith("exited"):
                return int(c.state.split("(")[1].rstrip(")"))
        return None
    ids = docker.lines("service", "ps", "-q", "--no-trunc", f"{d.name}_{COORDINATOR}")
    for t in docker.inspect(*ids):
        st = t.get("Status", {})
        if st.get("State") in ("complete", "failed", "shutdown", "rejected", "orphaned"):
            code = (st.get("ContainerStatus") or {}).get("ExitCode")
            return int(code) if code is not None else 3
    return None


def stop_coordinator(d: Deployment, timeout: int = 60) -> None:
    """SIGTERM to a running coordinator on this machine, as Ctrl-C: it tears the run down in order and
    prints its report.  (A swarm's coordinator on another node is stopped with its stack, unreported.)"""
    label = (f"{COMPOSE_SERVICE}={COORDINATOR}" if d.engine == "compose" else f"{SWARM_SERVICE}={d.name}_{COORDINATOR}")
    scope = f"{COMPOSE_PROJECT}={d.name}" if d.engine == "compose" else f"{STACK_NAMESPACE}={d.name}"
    ids = docker.lines("ps", "-q", "--filter", f"label={scope}", "--filter", f"label={label}",
                       "--filter", "status=running")
    if ids:
        docker.docker("stop", "-t", str(timeout), *ids, timeout=timeout + 60)


def report(d: Deployment) -> dict[str, Any] | None:
    """The coordinator's report (its JSON on stdout), once it printed it."""
    text = coordinator_logs(d, stdout_only=True)
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.loads(text[start:text.rindex("}") + 1])
    except ValueError:
        return None


def wait(d: Deployment, deadline: float | None = None, out: TextIO = sys.stdout, follow: bool = True) -> int:
    """Until the coordinator exits: print its new live lines; then its summary; its exit status."""
    end = None if deadline is None else time.monotonic() + deadline
    shown = 0
    while True:
        code = finished(d)
        if follow:
            found = LIVE_LINE.findall(coordinator_logs(d))
            for line in found[shown:]:
                out.write(line + "\n")
            shown = len(found)
            out.flush()
        if code is not None:
            break
        if end is not None and time.monotonic() > end:
            raise DockerError(f"deployment {d.name}: the coordinator did not finish within {deadline:.0f} s")
        time.sleep(1)
    text = coordinator_logs(d)
    if "Summary of" in text:
        out.write(text[text.rindex("Summary of"):].split("\n{")[0].rstrip() + "\n")
    rep = report(d)
    if rep is not None:
        (d.dir / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
        out.write(f"report: {d.dir / 'report.json'}\n")
    return code


# -- destroy ----------------------------------------------------------------------------------------------

def leftovers(d: Deployment) -> dict[str, list[str]]:
    """What of the deployment the engine still has: containers, networks, volumes, configs, secrets."""
    if d.engine == "compose":
        label = f"label={COMPOSE_PROJECT}={d.name}"
        return {"containers": docker.lines("ps", "-a", "-q", "--filter", label),
                "networks": docker.lines("network", "ls", "-q", "--filter", label),
                "volumes": docker.lines("volume", "ls", "-q", "--filter", label)}
    label = f"label={STACK_NAMESPACE}={d.name}"
    return {"services": docker.lines("service", "ls", "-q", "--filter", label),
            "containers": docker.lines("ps", "-a", "-q", "--filter", label),
            "networks": docker.lines("network", "ls", "-q", "--filter", label),
            "configs": docker.lines("config", "ls", "-q", "--filter", label),
            "secrets": docker.lines("secret", "ls", "-q", "--filter", label)}


def destroy(name: str, out: TextIO = sys.stdout) -> dict[str, Any] | None:
    """Stop and remove everything of the deployment, and its folder; the coordinator's report, if it
    printed one.  A deployment the engine no longer has is removed all the same."""
    d = Deployment.load(name)
    docker.require_engine()
    rep = None
    try:
        stop_coordinator(d)
        rep = report(d)
        text = coordinator_logs(d)
        if "Summary of" in text:
            out.write(text[text.rindex("Summary of"):].split("\n{")[0].rstrip() + "\n")
    except (DockerError, OSError):
        pass
    if d.engine == "compose":
        if d.file.exists():
            docker.run([*docker.compose_tool(), "-p", d.name, "-f", str(d.file), "down", "-v", "--remove-orphans",
                        "--timeout", str(DOWN_TIMEOUT)], env=dict(os.environ, EMU_IMAGE=d.image), cwd=str(d.dir))
    else:
        docker.docker("stack", "rm", d.name, check=False)
    # Whatever the engine left (a failed `down`, `stack rm` still at work): wait, then remove it by label.
    end = time.monotonic() + GONE_DEADLINE
    while True:
        left = leftovers(d)
        if not any(left.values()):
            break
        if time.monotonic() > end:
            _force_remove(left)
            left = leftovers(d)
            if any(left.values()):
                raise DockerError(f"deployment {d.name}: could not remove {left}")
            break
        if d.engine == "compose":
            _force_remove(left)
        time.sleep(1)
    if rep is not None:
        (d.dir / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    shutil.rmtree(d.dir)
    out.write(f"destroyed {d.name} ({d.engine}: {', '.join([COORDINATOR, *d.hosts])})\n")
    return rep


def _force_remove(left: dict[str, list[str]]) -> None:
    for kind, cmd in (("services", ["service", "rm"]), ("containers", ["rm", "-f", "-v"]),
                      ("networks", ["network", "rm"]), ("volumes", ["volume", "rm", "-f"]),
                      ("configs", ["config", "rm"]), ("secrets", ["secret", "rm"])):
        if left.get(kind):
            docker.docker(*cmd, *left[kind], check=False)


# -- ps -----------------------------------------------------------------------------------------------------

def ps_text(name: str | None) -> str:
    """``emu ps``: every deployment, one line each; ``emu ps NAME``: its hosts and containers."""
    if name is None:
        names = all_names()
        if not names:
            return f"no deployments (in {deploy_root()})"
        rows = ["NAME                 ENGINE   TOPOLOGY         HOSTS  COORDINATOR"]
        for n in names:
            d = Deployment.load(n)
            state = coordinator_state(d) or "absent"
            rows.append(f"{d.name:<20} {d.engine:<8} {d.topology:<16} {len(d.hosts):>5}  {state}")
        return "\n".join(rows)
    d = Deployment.load(name)
    rows = [f"deployment {d.name}: topology {d.topology!r} ({d.source}), engine {d.engine}, image {d.image}",
            "SERVICE        HOST           CONTAINER      NODE           STATE"]
    found = tasks(d) if d.engine == "swarm" else containers(d)
    seen = set()
    for c in found:
        seen.add(c.service)
        state = c.state + (f" ({c.health})" if c.health else "")
        host = "-" if c.service == COORDINATOR else c.service
        rows.append(f"{c.service:<14} {host:<14} {c.id:<14} {c.node:<14} {state}")
    for s in [COORDINATOR, *d.hosts]:
        if s not in seen:
            rows.append(f"{s:<14} {'-' if s == COORDINATOR else s:<14} {'-':<14} {'-':<14} no container")
    line = live_line(d)
    rows.append(line if line else "(no live line)")
    return "\n".join(rows)
