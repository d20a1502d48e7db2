"""The Docker CLI as the deployment commands use it: ``docker`` and the compose tool run as child
processes, their failures turned into one-line errors naming the command.

Nothing here knows of topologies; `emu.deploy.engine` says what to run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from emu.errors import EmuError

TIMEOUT = 600.0


class DockerError(EmuError):
    """A docker command failed (the message has its stderr), or Docker is not usable here."""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(args: Sequence[str], *, check: bool = True, timeout: float = TIMEOUT, env: dict[str, str] | None = None,
        cwd: str | None = None, capture: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; DockerError with its stderr when it fails and `check`."""
    try:
        proc = subprocess.run(list(args), stdin=subprocess.DEVNULL, capture_output=capture, text=True,
                              timeout=timeout, env=env, cwd=cwd)
    except FileNotFoundError:
        raise DockerError(f"{args[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise DockerError(f"`{' '.join(args)}` did not finish within {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        out = _tail((proc.stderr or "") + (proc.stdout or "")) if capture else ""
        raise DockerError(f"`{' '.join(args)}` exited {proc.returncode}" + (f":\n{out}" if out else ""))
    return proc


def docker(*args: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return run(["docker", *args], check=check, timeout=timeout)


def lines(*args: str) -> list[str]:
    """A docker command's output lines (``ps -q``, ``ls --format``), empty ones left out."""
    return [x for x in docker(*args).stdout.splitlines() if x.strip()]


def require_engine() -> None:
    if shutil.which("docker") is None:
        raise DockerError("docker is not installed")
    proc = run(["docker", "info", "--format", "{{json .ServerVersion}}"], check=False, timeout=60)
    if proc.returncode != 0:
        raise DockerError(f"no usable Docker engine (docker info: {_tail(proc.stderr, 2)})")


def compose_tool() -> list[str]:
    """``docker compose`` (the plugin) when it works, else ``docker-compose`` (1.29), as
    scripts/compose.sh picks."""
    if run(["docker", "compose", "version"], check=False, timeout=60).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise DockerError("neither 'docker compose' (the Compose plugin) nor 'docker-compose' is installed")


def inspect(*ids: str) -> list[dict]:
    if not ids:
        return []
    return json.loads(docker("inspect", *ids).stdout)


def image_exists(image: str) -> bool:
    return run(["docker", "image", "inspect", image], check=False, timeout=60).returncode == 0


def swarm_state() -> tuple[str, bool]:
    """(LocalNodeState, whether this node is a manager): ``inactive``, ``active``, ..."""
    out = docker("info", "--format", "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}").stdout.split()
    return (out[0] if out else "inactive"), (len(out) > 1 and out[1] == "true")


def logs(cid: str, stdout_only: bool = False, service: bool = False) -> str:
    """A container's (or swarm service's) output; both streams merged unless `stdout_only`."""
    cmd = ["docker", "service", "logs", "--raw", cid] if service else ["docker", "logs", cid]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL if stdout_only else subprocess.STDOUT, text=True,
                          timeout=120)
    return proc.stdout


def project_root() -> Path | None:
    """The source tree this package runs from, when it has the Dockerfile and build script (an
    editable install or a checkout); None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    if (root / "Dockerfile").is_file() and (root / "scripts" / "docker-build.sh").is_file():
        return root
    return None


def build_image(image: str, log: Path) -> None:
    """Build the image the offline way (scripts/docker-build.sh: the wheelhouse from the host's pip,
    a local Debian base image when no registry answers, ``docker build --network none``)."""
    root = project_root()
    if root is None:
        raise DockerError(f"image {image} is missing and this installation has no source tree to build it "
                          "from: build it with scripts/docker-build.sh in a checkout")
    env = dict(os.environ, EMU_IMAGE=image)
    with open(log, "w") as f:
        proc = subprocess.run([str(root / "scripts" / "docker-build.sh")], cwd=root, stdin=subprocess.DEVNULL,
                              stdout=f, stderr=subprocess.STDOUT, env=env, timeout=3600)
    if proc.returncode != 0:
        raise DockerError(f"scripts/docker-build.sh exited {proc.returncode} (its output: {log}):\n"
                          f"{_tail(log.read_text())}")
