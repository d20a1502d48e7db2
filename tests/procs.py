"""Process helpers for the tests that run the ``emu`` command: find a run's children and segments, wait on
conditions (never on the clock: the machine is loaded), start the CLI, read its output as it comes and
wait until its live lines show traffic, see what ``ps`` shows of its processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from emu.mem.shm import PREFIX, SHM_DIR

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 60.0


def segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir(SHM_DIR) if n.startswith(f"{PREFIX}-{pid}-")]


def children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d))
    return out


def descendants_of(pid: int) -> list[int]:
    """Every live process below `pid`: a run's workers are forked by its fork server (`emu.run.launch`), so
    they are the coordinator's grandchildren."""
    out, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(cond, what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_killing(run, victim_key: str, watch: str = "h1/cpu1", after: int = 5000) -> dict:
    """Run `run` (an `emu.run.coordinator.Run`) and SIGKILL its process `victim_key` once stats row `watch`
    counts more than `after` rx_packets; returns the report, which must name the victim, alone, dead."""
    import signal

    killed: list[int] = []

    def killer() -> None:
        wait_for(lambda: run.started_ns and run.table is not None
                 and run.table.read(watch)["rx_packets"] > after, "traffic")
        victim = next(p for p in run.procs if p.key == victim_key)
        os.kill(victim.process.pid, signal.SIGKILL)
        killed.append(victim.process.pid)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    report = run.run()
    t.join(5)
    assert killed
    assert report["dead_processes"] == [victim_key]
    return report


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "emu.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=None if env is None else {**os.environ, **env})


class Lines:
    """A pipe's lines, read by a thread as they come, so that a test waits on what a process printed
    (with `wait_for`'s deadline) instead of blocking in ``readline`` on a process that went quiet."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def close(self) -> str:
        """All of it, once the process has exited and the pipe is drained."""
        self.thread.join(DEADLINE)
        return self.text()


def received(lines: Lines) -> int:
    """The largest XDP rx rate in the live lines so far (``Summary  1,112,847 rx/s ...``): above 0 once
    packets were generated and reached a CPU."""
    best = 0
    for line in list(lines.lines):
        if line.startswith("Summary") and "rx/s" in line:
            best = max(best, int(line.split()[1].replace(",", "")))
    return best


def wait_traffic(p: subprocess.Popen, out: Lines) -> None:
    """Until the run (started with a short ``-i``, not ``-q``) shows packets received."""
    wait_for(lambda: received(out) > 0 or p.poll() is not None, "packets received")
    assert p.poll() is None and received(out) > 0, out.text()


def titles(pids: list[int]) -> dict[int, str]:
    """What ``ps -ww -eo pid,args`` (never cut at a terminal width) shows for each of `pids` that is still alive."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    want = set(pids)
    out = {}
    for line in ps.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        if int(pid) in want:
            out[int(pid)] = args.strip()
    return out
