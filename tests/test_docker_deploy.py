"""`emu deploy`, `emu ps` and `emu destroy` against a real Docker engine: a bundled topology other
than multihost under compose, and multihost on a single-node Docker Swarm (CURVE keys as secrets; then
one host's service scaled to 0 mid-run).

The image is the one tests/test_docker.py builds once per session (its `image` fixture).  Every test
deploys under a unique name (``ppemu-<random>``) with its own state folder (``EMU_DEPLOY_DIR``), and
always ends with `emu destroy` and a check that nothing labelled with the name remains (a failed
destroy is followed by removal by label).  The swarm test creates the swarm (``docker swarm init
--advertise-addr 127.0.0.1``) when the engine has none and leaves it afterwards; an engine that is
already a swarm manager is used as it is and left so.  Waits are on conditions with generous deadlines.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_docker import _unavailable, image  # noqa: F401  (the session's image, built once)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
COUNT = 20_000
RUN_DEADLINE = 600
EVENT_DEADLINE = 300
HOST_LOST = "host h2 lost"
HOST_LOST_ANY = re.compile(r"host \S+ lost")  # the coordinator's event when it gives a host up
PARTITION = "partition: link"
HEALED = "partition healed: link"
LIVE_LINE = re.compile(r"^Summary\s+([\d,]+) rx/s", re.MULTILINE)
VIOLATIONS = ("foreign_cache_return", "recycled_before_tx_completion", "double_free", "leaked")


def _docker(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


class Deploy:
    """One deployment under a unique name, run through the `emu` command."""

    def __init__(self, state: Path, engine: str) -> None:
        self.name = f"ppemu-{secrets.token_hex(5)}"
        self.engine = engine
        self.env = dict(os.environ, EMU_DEPLOY_DIR=str(state))
        self.env.pop("EMU_COUNT", None)
        self.dir = state / self.name

    def emu(self, *args: str, timeout: float = RUN_DEADLINE) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "emu.cli", *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def deploy(self, topology: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.emu("deploy", topology, "--engine", self.engine, "--name", self.name, *args)

    def ps(self) -> str:
        proc = self.emu("ps", self.name, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def logs(self) -> str:
        if self.engine == "swarm":
            cmd = ["docker", "service", "logs", "--raw", f"{self.name}_coordinator"]
        else:
            ids = _docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.name}",
                          "--filter", "label=com.docker.compose.service=coordinator").stdout.split()
            if not ids:
                return ""
            cmd = ["docker", "logs", ids[0]]
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=120).stdout

    def leftovers(self) -> dict[str, list[str]]:
        label = (f"label=com.docker.stack.namespace={self.name}" if self.engine == "swarm"
                 else f"label=com.docker.compose.project={self.name}")
        out = {"containers": _docker("ps", "-aq", "--filter", label).stdout.split(),
               "networks": _docker("network", "ls", "-q", "--filter", label).stdout.split()}
        if self.engine == "swarm":
            out["services"] = _docker("service", "ls", "-q", "--filter", label).stdout.split()
            out["secrets"] = _docker("secret", "ls", "-q", "--filter", label).stdout.split()
            out["configs"] = _docker("config", "ls", "-q", "--filter", label).stdout.split()
        else:
            out["volumes"] = _docker("volume", "ls", "-q", "--filter", label).stdout.split()
        return out

    def destroy(self) -> str:
        proc = self.emu("destroy", self.name, timeout=RUN_DEADLINE)
        assert proc.returncode == 0, f"emu destroy exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def force_remove(self) -> None:
        """After a failed test: whatever carries the deployment's label goes."""
        if self.engine == "swarm":
            _docker("stack", "rm", self.name, check=False)
        left = self.leftovers()
        for kind, cmd in (("services", ["service", "rm"]), ("containers", ["rm", "-f", "-v"]),
                          ("networks", ["network", "rm"]), ("volumes", ["volume", "rm", "-f"]),
                          ("secrets", ["secret", "rm"]), ("configs", ["config", "rm"])):
            if left.get(kind):
                _docker(*cmd, *left[kind], check=False)

    def text_logs(self) -> str:
        """The coordinator's log without its JSON report (for failure messages)."""
        text = self.logs()
        return text.split("\n{")[0][-6000:]

    def wait_for(self, what: str, condition: Callable[[], Any], deadline: float = EVENT_DEADLINE) -> Any:
        end = time.monotonic() + deadline
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > end:
                pytest.fail(f"{self.name}: no {what} within {deadline} s\n{self.ps()}\n{self.text_logs()}")
            time.sleep(1)

    def wait_gone(self) -> None:
        self.wait_for("removal of everything labelled with the deployment",
                      lambda: not any(self.leftovers().values()), 180)


@pytest.fixture
def deployments(image: str, tmp_path: Path) -> Iterator[Callable[[str], Deploy]]:  # noqa: F811
    made: list[Deploy] = []

    def make(engine: str) -> Deploy:
        made.append(Deploy(tmp_path / "state", engine))
        return made[-1]

    yield make
    for d in made:
        if d.dir.exists():
            d.emu("destroy", d.name)
        d.force_remove()


def _check_all_delivered(report: dict[str, Any], sent: int) -> None:
    t = report["traffic"]
    assert t["generated"] == sent and t["delivered"] == sent, t
    assert t["unaccounted"] == 0 and t["corrupted"] == 0, t
    assert not any(report["violations"].get(k) for k in VIOLATIONS), report["violations"]
    assert report["pages"]["accounted"] == report["pages"]["total"], report["pages"]
    assert not report.get("hosts_lost"), report.get("hosts_lost")


def test_deploy_compose_l2fwd(deployments: Callable[[str], Deploy]) -> None:
    """A single-host bundled topology (l2fwd: 2 CPUs, 48 MiB of pages) as a coordinator and one host."""
    d = deployments("compose")
    proc = d.deploy("topology/l2fwd.yaml", "--count", str(COUNT), "--wait")
    assert proc.returncode == 0, f"emu deploy exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n{d.text_logs()}"
    assert "Summary of 'l2fwd'" in proc.stdout, proc.stdout
    report = json.loads((d.dir / "report.json").read_text())
    _check_all_delivered(report, COUNT)
    table = d.ps()
    assert re.search(r"^coordinator\s.*exited \(0\)", table, re.MULTILINE), table
    assert re.search(r"^h1\s+h1\s.*exited \(0\)", table, re.MULTILINE), table
    assert "destroyed" in d.destroy()
    assert not d.dir.exists()
    assert not any(d.leftovers().values()), d.leftovers()


def test_partition_under_compose(deployments: Callable[[str], Deploy]) -> None:
    """multihost under compose, until stopped; h2 is cut off the links network mid-run (`docker network
    disconnect`) and put back: the coordinator reports the partition and the heal, no host is lost, and
    `emu destroy`'s final report shows every packet and page accounted for, no violation."""
    d = deployments("compose")
    proc = d.deploy("topology/multihost.yaml", "--count", "0")
    assert proc.returncode == 0, f"emu deploy exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"

    def flowing() -> bool:
        return any(int(rx.replace(",", "")) > 0 for rx in LIVE_LINE.findall(d.logs()))

    d.wait_for("live line with traffic flowing", flowing)
    net = f"{d.name}_links"
    h2 = _docker("ps", "-q", "--filter", f"label=com.docker.compose.project={d.name}",
                 "--filter", "label=com.docker.compose.service=h2").stdout.split()[0]

    def ip() -> str:
        return _docker("inspect", "-f", f"{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}",
                       h2).stdout.strip()

    before = ip()
    _docker("network", "disconnect", net, h2)
    d.wait_for("a partition reported", lambda: PARTITION in d.logs())
    # Back with its address and its links' name: connections made before the cut carry on.
    _docker("network", "connect", "--alias", "h2.links", "--alias", "h2", net, h2)
    after = ip()
    d.wait_for("the partition's heal reported", lambda: HEALED in d.logs())
    assert not HOST_LOST_ANY.search(d.logs()), d.text_logs()
    table = d.ps()
    for host in ("h1", "h2", "h3"):
        assert re.search(rf"^{host}\s+{host}\s+\S+\s+\S+\s+running", table, re.MULTILINE), table
    out = d.destroy()  # SIGTERM to the coordinator: an orderly teardown and the full report
    traffic = next((x for x in out.splitlines() if x.strip().startswith("traffic")), "")
    for phrase in ("unaccounted 0", "corrupted 0"):
        assert re.search(rf"\b{phrase}(?![\d,])", traffic), f"{phrase!r} not in {traffic!r}\n{out}"
    viol = next((x for x in out.splitlines() if x.strip().startswith("violations")), "")
    assert viol and not re.search(r" [1-9][\d,]*", viol), out
    pages = re.search(r"pages\s+total ([\d,]+)\s+accounted ([\d,]+)", out)
    assert pages and pages.group(1) == pages.group(2), out
    assert "LOST" not in out, out
    assert re.search(r"PARTITION link h\d:eth\d -> h\d:eth\d: cut at [\d.]+ s, healed", out), (before, after, out)
    d.wait_gone()


GWBRIDGE = "docker_gwbridge"  # the bridge `docker swarm init` makes for overlay networks, left by `swarm leave`


@pytest.fixture
def swarm() -> Iterator[None]:
    """A single-node swarm on this engine: created on loopback when there is none, left afterwards (with
    the gateway bridge swarm made, when there was none before)."""
    state = _docker("info", "--format", "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}").stdout.split()
    created = False
    had_bridge = bool(_docker("network", "ls", "-q", "--filter", f"name=^{GWBRIDGE}$").stdout.split())
    if state[0] == "inactive":
        _docker("swarm", "init", "--advertise-addr", "127.0.0.1")
        created = True
    elif state[:2] != ["active", "true"]:
        _unavailable(f"this engine is in a swarm but not a manager ({' '.join(state)})")
    try:
        yield
    finally:
        if created:
            _docker("swarm", "leave", "--force", check=False)
            if not had_bridge:
                _docker("network", "rm", GWBRIDGE, check=False)
        after = _docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.split()
        assert after[:1] == state[:1], f"the engine's swarm state was {state}, is now {after}"


def test_deploy_swarm_multihost(swarm: None, deployments: Callable[[str], Deploy], tmp_path: Path) -> None:
    """multihost as a stack with CURVE keys as secrets: every packet delivered and verified; destroy
    leaves nothing.  Then again until stopped, h2's service scaled to 0: the coordinator reports h2
    lost while h1 and h3 keep running."""
    keys = tmp_path / "keys"
    d = deployments("swarm")
    assert d.emu("keys", str(keys)).returncode == 0
    proc = d.deploy("topology/multihost.yaml", "--count", str(COUNT), "--keys", str(keys), "--wait")
    assert proc.returncode == 0, f"emu deploy exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n{d.text_logs()}"
    assert "(CURVE)" in d.logs()
    report = json.loads((d.dir / "report.json").read_text())
    _check_all_delivered(report, COUNT)
    assert "destroyed" in d.destroy()
    d.wait_gone()

    d = deployments("swarm")
    proc = d.deploy("topology/multihost.yaml", "--count", "0")
    assert proc.returncode == 0, f"emu deploy exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"

    def flowing() -> bool:
        return any(int(rx.replace(",", "")) > 0 for rx in LIVE_LINE.findall(d.logs()))

    d.wait_for("live line with traffic flowing", flowing)
    _docker("service", "scale", "--detach", f"{d.name}_h2=0")
    d.wait_for(f"{HOST_LOST!r} in the coordinator's log", lambda: HOST_LOST in d.logs())
    table = d.ps()
    assert LIVE_LINE.search(table), table  # the coordinator's latest live line
    for host in ("h1", "h3"):
        assert re.search(rf"^{host}\s+{host}\s+\S+\s+\S+\s+Running", table, re.MULTILINE), table
    # emu destroy stops the coordinator first (SIGTERM: an orderly teardown) and prints its summary
    out = d.destroy()
    assert re.search(r"LOST\s+hosts h2\b", out), out
    d.wait_gone()
