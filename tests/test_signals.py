"""Processes by name, SIGTERM, and a worker's last words, against real ``emu run`` commands.

During a run ``ps`` shows every process by its role (``emu: h1/cpu0``, ``emu: h1:eth1``, ``emu: gen0``,
the coordinator and the fork server), and the report lists the same names with their pids.  SIGTERM
(``docker stop``, systemd, ``timeout``) ends a run as Ctrl-C does: in order, with the final report, no
process and no shared memory left, and the exit status of the report.  A worker that dies of an
exception (injected with ``EMU_FAULT_INJECTION=1`` and SIGUSR1: the worker raises where it is, as a bug
would) is named, with its last words, in the output and the report, and the run exits 3.
Every wait is on a condition (a live line showing packets, a process's exit), never on the clock.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from procs import (
    DEADLINE,
    Lines,
    alive,
    descendants_of,
    received,
    segments_of,
    start_cli,
    titles,
    wait_for,
    wait_traffic,
)

pytestmark = pytest.mark.slow

ROLES = {"emu: run l2fwd", "emu: forkserver", "emu: h1/cpu0", "emu: h1/cpu1", "emu: h1:eth0", "emu: h1:eth1",
         "emu: gen0", "emu: sink0"}


class Cli:
    """``emu run topology/l2fwd.yaml`` with live lines every 0.2 s, its output read as it comes."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.p = start_cli("run", "topology/l2fwd.yaml", "--duration", "120", "-i", "0.2", *args, env=env)
        self.out, self.err = Lines(self.p.stdout), Lines(self.p.stderr)

    def pid_of(self, title: str) -> int:
        """The pid of the run's process that ``ps`` shows as `title`."""
        shown = titles(descendants_of(self.p.pid))
        return next(pid for pid, args in shown.items() if args == title)

    def end(self) -> tuple[int, str, str]:
        """Wait for the command to exit (killing it if it does not): status, stdout, stderr."""
        try:
            self.p.wait(DEADLINE)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
        return self.p.returncode, self.out.close(), self.err.close()

    def __enter__(self) -> Cli:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.p.poll() is None:  # a failed assertion left it running
            self.p.kill()
            self.end()


def assert_gone(cli: Cli, kids: list[int]) -> None:
    wait_for(lambda: not any(alive(k) for k in kids), "the run's processes to exit")
    assert segments_of(cli.p.pid) == []


def test_ps_shows_every_process_by_its_role(tmp_path: Path) -> None:
    report_file = tmp_path / "r.json"
    with Cli("--json", str(report_file)) as cli:
        wait_traffic(cli.p, cli.out)
        kids = descendants_of(cli.p.pid)
        everything = titles([cli.p.pid, *kids])
        # Besides ours, multiprocessing's resource tracker (it unlinks the segments of a killed run) runs
        # its own `python -c`, which we neither start by hand nor can name.
        shown = {pid: t for pid, t in everything.items() if "multiprocessing.resource_tracker" not in t}
        assert set(shown.values()) == ROLES and len(shown) == len(ROLES), everything
        assert len(everything) - len(shown) <= 1, everything
        # `comm` too (top, pgrep without -f): what prctl(PR_SET_NAME) set, cut at 15 bytes.
        for pid, title in shown.items():
            with open(f"/proc/{pid}/comm") as f:
                assert f.read().strip() == title[:15]
        cli.p.send_signal(signal.SIGTERM)
        status, _, stderr = cli.end()
    assert status == 0, stderr
    report = json.loads(report_file.read_text())
    by_title = {title: pid for pid, title in shown.items()}
    assert report["processes"] == {("coordinator" if t == "emu: run l2fwd" else t[len("emu: "):]): pid
                                   for t, pid in by_title.items() if t != "emu: forkserver"}
    assert_gone(cli, kids)


def test_sigterm_tears_down_in_order_and_reports(tmp_path: Path, reliability) -> None:
    report_file = tmp_path / "r.json"
    with Cli("--json", str(report_file)) as cli:
        wait_traffic(cli.p, cli.out)
        seen = received(cli.out)
        kids = descendants_of(cli.p.pid)
        cli.p.send_signal(signal.SIGTERM)
        status, stdout, stderr = cli.end()
    assert seen > 0  # packets flowed before the signal
    assert "interrupted: tearing down" in stderr and "Traceback" not in stderr
    assert "Summary of 'l2fwd'" in stdout
    report = json.loads(report_file.read_text())
    reliability("SIGTERM", report)
    t = report["traffic"]
    assert t["generated"] > 0 and t["delivered"] > 0
    assert t["unaccounted"] == 0 and t["corrupted"] == 0, t
    p = report["pages"]
    assert p["total"] == p["accounted"] and p["in_flight"] == 0 and not p["problems"], p
    assert report["violations"]["leaked"] == 0 and report["failures"] == []
    assert any("interrupted" in e for e in report["events"])
    assert status == 0, stderr  # an interrupted run exits with its report's status
    assert_gone(cli, kids)


def test_sigterm_before_the_run_starts_is_ctrl_c(tmp_path: Path) -> None:
    """SIGTERM while the command is still starting (its own imports, the topology's validation): the
    same one line and status as Ctrl-C there, no traceback, nothing left."""
    p = start_cli("run", "topology/l2fwd.yaml", "--duration", "120", "-q")
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=DEADLINE)
    # Either the handler was not yet installed (the interpreter was still starting: killed, -15), or it
    # was: then one line, 130, or the run's orderly teardown (0) if the signal came after the start.
    assert p.returncode in (-signal.SIGTERM, 130, 0), stderr
    assert "Traceback" not in stderr
    wait_for(lambda: not segments_of(p.pid), "no segment left")


@pytest.mark.parametrize(("victim", "kind"), [("h1/cpu1", "cpu"), ("h1:eth1", "device"), ("gen0", "traffic")])
def test_a_crashed_worker_is_named_with_its_last_words(victim: str, kind: str, tmp_path: Path, reliability) -> None:
    report_file = tmp_path / "r.json"
    with Cli("--json", str(report_file), env={"EMU_FAULT_INJECTION": "1"}) as cli:
        wait_traffic(cli.p, cli.out)
        kids = descendants_of(cli.p.pid)
        os.kill(cli.pid_of(f"emu: {victim}"), signal.SIGUSR1)
        if kind != "traffic":  # the run survives a CPU's or a device's death: end it
            wait_for(lambda: f"{victim} (pid " in cli.err.text() or cli.p.poll() is not None, "the death noticed")
            cli.p.send_signal(signal.SIGTERM)
        status, stdout, stderr = cli.end()  # a traffic port's death ends the run by itself
    report = json.loads(report_file.read_text())
    reliability(f"{kind} worker exception", report)
    assert status == 3, stderr
    [failure] = report["failures"]
    assert failure["process"] == victim and failure["kind"] == kind and failure["status"] == "exit code 1"
    words = failure["last_words"]
    assert words.startswith("InjectedFault: fault injected with SIGUSR1 (at "), words
    assert words.split(" (at ")[1].startswith(("workers/", "emu/")) and " in " in words, words
    assert f"emu: {victim} (pid {failure['pid']}) died: {words}" in stderr
    assert f"FAILED   {victim} (pid {failure['pid']}, exit code 1): {words}" in stdout
    assert report["pages"]["total"] == report["pages"]["accounted"], report["pages"]
    assert_gone(cli, kids)

