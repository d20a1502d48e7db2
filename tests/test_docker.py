"""The container path end to end: the image (scripts/docker-build.sh) and docker-compose.yml running
topology/multihost.yaml as a coordinator and three host containers (docs/docker.md).

Skipped where no Docker engine or no compose tool is usable.  The image is built once per test session
(xdist workers take turns on a file lock, and a worker that finds it built in this session skips the
build).  Every test runs its own compose project (``-p ppemu-<random>``) with no published port, so
tests and runs in parallel never collide, and always ends with ``down -v --remove-orphans``; afterwards
nothing labelled with the project may remain.  Deadlines are generous and only bound the waits: the
tests wait on conditions (a container's state, a phrase in a log) and never assert timings.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_SH = ROOT / "scripts" / "compose.sh"
DOCKER_BUILD_SH = ROOT / "scripts" / "docker-build.sh"
BUILD_DIR = ROOT / "build"
BUILD_LOCK = BUILD_DIR / ".docker-build.lock"
BUILD_STAMP = BUILD_DIR / ".docker-build.session"
BUILD_LOG = BUILD_DIR / "docker-build.log"
IMAGE = os.environ.get("EMU_IMAGE", "pagepool-emu:local")

# -- what the coordinator prints (adjust here when the wording changes) ------------------------------
FINAL_SUMMARY = "Summary of 'multihost'"  # heads the final report
FINAL_TRAFFIC_PREFIX = "traffic"  # the report's line with generated/delivered/.../unaccounted
LIVE_LINE = re.compile(r"^Summary\s+([\d,]+) rx/s", re.MULTILINE)  # one live line per interval
HOST_LOST = "host h2 lost"  # printed when the coordinator gives a host up
FINAL_LOST = re.compile(r"\blost\b.*\bh2\b|\bh2\b.*\blost\b", re.IGNORECASE)  # the report names h2 as lost
EXIT_ALL_DELIVERED = 0  # coordinator exit status: every packet delivered, no violation
EXIT_LOSSES = 1  # ... the report shows losses or violations (a host was lost)
COUNT = 20_000

# -- deadlines (seconds): bounds on waits on a loaded 2-core machine, not expectations ---------------
BUILD_DEADLINE = 1800  # wheelhouse + debootstrap base image + image, from nothing
COMPOSE_DEADLINE = 600  # one compose command (up -d waits for the coordinator's healthcheck)
RUN_DEADLINE = 600  # a whole counted run
EVENT_DEADLINE = 300  # traffic flowing; a killed host noticed
STOP_TIMEOUT = 60  # compose stop --timeout for the coordinator
DOWN_TIMEOUT = 30  # compose down --timeout

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["docker", *args], timeout, check=check)


def _unavailable(reason: str) -> None:
    """Skip on a machine without Docker, but fail where Docker is required (CI sets EMU_REQUIRE_DOCKER):
    there a missing engine must not pass as a skipped test."""
    if os.environ.get("EMU_REQUIRE_DOCKER"):
        pytest.fail(f"EMU_REQUIRE_DOCKER is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image() -> str:
    """The project's image, built (or brought up to date) by scripts/docker-build.sh once per session."""
    if shutil.which("docker") is None:
        _unavailable("docker is not installed")
    if not _works(["docker", "info"]):
        _unavailable("no usable Docker engine (docker info failed)")
    if not (_works(["docker", "compose", "version"]) or _works(["docker-compose", "version"])):
        _unavailable("neither 'docker compose' nor 'docker-compose' is installed")

    BUILD_DIR.mkdir(exist_ok=True)
    session = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # shared by the xdist workers of one run
    with open(BUILD_LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait for it
        try:
            built = session is not None and BUILD_STAMP.exists() and BUILD_STAMP.read_text() == session
            if not (built and _works(["docker", "image", "inspect", IMAGE])):
                with open(BUILD_LOG, "w") as log:
                    proc = subprocess.run([str(DOCKER_BUILD_SH)], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, timeout=BUILD_DEADLINE)
                if proc.returncode != 0:
                    tail = "".join(BUILD_LOG.read_text().splitlines(keepends=True)[-40:])
                    pytest.fail(f"scripts/docker-build.sh exited {proc.returncode} (log: {BUILD_LOG}):\n{tail}")
                BUILD_STAMP.write_text(session or "")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return IMAGE


class Project:
    """One compose project of docker-compose.yml under a unique name."""

    def __init__(self, env: dict[str, str]) -> None:
        self.name = f"ppemu-{secrets.token_hex(5)}"
        self.env = {k: v for k, v in os.environ.items() if k not in ("COMPOSE_FILE", "COMPOSE_PROJECT_NAME")}
        self.env.update(EMU_IMAGE=IMAGE, **env)

    def compose(self, *args: str, timeout: float = COMPOSE_DEADLINE,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([str(COMPOSE_SH), "-p", self.name, *args], timeout, env=self.env, check=check)

    def container(self, service: str) -> str:
        """The id of the service's (only) container, running or not."""
        ids = _docker("ps", "-a", "-q", "--filter", f"label={PROJECT_LABEL}={self.name}",
                      "--filter", f"label={SERVICE_LABEL}={service}").stdout.split()
        assert len(ids) == 1, f"{self.name}: expected one {service} container, found {ids}\n{self.diagnostics()}"
        return ids[0]

    def state(self, cid: str) -> dict[str, Any]:
        return json.loads(_docker("inspect", "-f", "{{json .State}}", cid).stdout)

    def logs(self, cid: str) -> str:
        proc = subprocess.run(["docker", "logs", cid], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=120)
        return proc.stdout

    def wait_for(self, what: str, condition: Callable[[], Any], deadline: float) -> Any:
        end = time.monotonic() + deadline
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > end:
                pytest.fail(f"{self.name}: no {what} within {deadline} s\n{self.diagnostics()}")
            time.sleep(1)

    def wait_exited(self, cid: str, deadline: float) -> dict[str, Any]:
        def exited() -> dict[str, Any] | None:
            state = self.state(cid)
            return state if state["Status"] in ("exited", "dead") else None

        return self.wait_for(f"exit of container {cid[:12]}", exited, deadline)

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label={PROJECT_LABEL}={self.name}"
        return {
            "containers": _docker("ps", "-a", "-q", "--filter", label).stdout.split(),
            "networks": _docker("network", "ls", "-q", "--filter", label).stdout.split(),
            "volumes": _docker("volume", "ls", "-q", "--filter", label).stdout.split(),
        }

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", str(DOWN_TIMEOUT))

    def force_remove(self) -> None:
        """Last resort after a failed `down`: remove whatever still carries the project's label."""
        left = self.leftovers()
        if left["containers"]:
            _docker("rm", "-f", "-v", *left["containers"], check=False)
        if left["networks"]:
            _docker("network", "rm", *left["networks"], check=False)
        if left["volumes"]:
            _docker("volume", "rm", "-f", *left["volumes"], check=False)

    def diagnostics(self) -> str:
        out = [self.compose("ps", "-a", check=False).stdout]
        ids = _docker("ps", "-a", "-q", "--filter", f"label={PROJECT_LABEL}={self.name}", check=False).stdout.split()
        for cid in ids:
            name = _docker("inspect", "-f", "{{.Name}} {{.State.Status}} exit={{.State.ExitCode}}", cid,
                           check=False).stdout.strip()
            tail = "".join(self.logs(cid).splitlines(keepends=True)[-60:])
            out.append(f"--- {name}\n{tail}")
        return "\n".join(out)


@pytest.fixture
def project(image: str) -> Iterator[Callable[[dict[str, str]], Project]]:
    """Factory of compose projects; anything a failed `down` left behind is force-removed afterwards."""
    made: list[Project] = []

    def make(env: dict[str, str]) -> Project:
        made.append(Project(env))
        return made[-1]

    yield make
    for p in made:
        p.force_remove()


def _final_report(p: Project, logs: str) -> str:
    assert FINAL_SUMMARY in logs, f"no final summary in the coordinator's log\n{p.diagnostics()}"
    return logs[logs.rindex(FINAL_SUMMARY):]


def _assert_nothing_left(p: Project) -> None:
    assert p.leftovers() == {"containers": [], "networks": [], "volumes": []}


def test_compose_multihost_delivers_everything(project: Callable[[dict[str, str]], Project]) -> None:
    p = project({"EMU_COUNT": str(COUNT)})
    try:
        p.compose("up", "-d")
        coord = p.container("coordinator")
        state = p.wait_exited(coord, RUN_DEADLINE)
        logs = p.logs(coord)
        assert state["ExitCode"] == EXIT_ALL_DELIVERED, (
            f"coordinator exited {state['ExitCode']}\n{p.diagnostics()}")
        report = _final_report(p, logs)
        traffic = next((line for line in report.splitlines() if line.strip().startswith(FINAL_TRAFFIC_PREFIX)), "")
        for phrase in (f"delivered {COUNT:,}", "unaccounted 0", "corrupted 0"):
            assert re.search(rf"\b{re.escape(phrase)}(?![\d,])", traffic), f"{phrase!r} not in {traffic!r}\n{report}"
    finally:
        p.down()
    _assert_nothing_left(p)


def test_compose_host_killed_mid_run(project: Callable[[dict[str, str]], Project]) -> None:
    p = project({"EMU_COUNT": "0"})  # 0: the generators run until the coordinator stops
    try:
        p.compose("up", "-d")
        coord = p.container("coordinator")

        def flowing() -> bool:
            return any(int(rx.replace(",", "")) > 0 for rx in LIVE_LINE.findall(p.logs(coord)))

        p.wait_for("live line with traffic flowing", flowing, EVENT_DEADLINE)

        h2 = p.compose("ps", "-q", "h2").stdout.strip()
        assert h2, f"no h2 container\n{p.diagnostics()}"
        _docker("kill", h2)
        p.wait_for(f"{HOST_LOST!r} in the coordinator's log", lambda: HOST_LOST in p.logs(coord), EVENT_DEADLINE)
        for host in ("h1", "h3"):
            assert p.state(p.container(host))["Running"], f"{host} stopped after h2 was killed\n{p.diagnostics()}"

        # SIGTERM, like Ctrl-C: an orderly teardown and the final report
        p.compose("stop", "--timeout", str(STOP_TIMEOUT), "coordinator")
        state = p.wait_exited(coord, EVENT_DEADLINE)
        report = _final_report(p, p.logs(coord))
        assert FINAL_LOST.search(report), f"the final report does not name h2 as lost\n{report}"
        assert state["ExitCode"] == EXIT_LOSSES, f"coordinator exited {state['ExitCode']}\n{p.diagnostics()}"
    finally:
        p.down()
    _assert_nothing_left(p)
