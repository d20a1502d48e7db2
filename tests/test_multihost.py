"""Multi-host runs without Docker: ``emu coordinator`` and one ``emu host`` process per emulated host,
on loopback, through the real command line.

Each test gets its own control address (an ipc path in its tmp_path, or a TCP port the coordinator
picks) and its devices listen on ports the kernel picks, so tests run side by side under pytest-xdist.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from procs import DEADLINE, ROOT, alive, descendants_of, segments_of, wait_for

from emu.cluster import control
from emu.mem.shm import sweep_stale
from emu.net import security

pytestmark = pytest.mark.slow
TOPO = "topology/multihost.yaml"


class Proc:
    """A CLI process whose output goes to files the test can read while it runs."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.out_path, self.err_path = tmp / f"{name}.out", tmp / f"{name}.err"
        self.out, self.err = open(self.out_path, "w"), open(self.err_path, "w")
        self.p = subprocess.Popen([sys.executable, "-m", "emu.cli", *args], cwd=ROOT, stdout=self.out,
                                  stderr=self.err, text=True)

    def text(self) -> str:
        return self.out_path.read_text() + self.err_path.read_text()

    def wait(self, timeout: float = DEADLINE * 3) -> int:
        code = self.p.wait(timeout)
        self.out.close()
        self.err.close()
        return code

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(30)
        self.out.close()
        self.err.close()


def start_hosts(tmp: Path, coord: str, names: tuple[str, ...] = ("h1", "h2", "h3"), *extra: str) -> dict[str, Proc]:
    return {h: Proc(tmp, h, "host", h, "--coordinator", coord, "--status-file", str(tmp / f"{h}.status"),
                    "--coordinator-timeout", "30", *extra) for h in names}


def listening(tmp: Path) -> str:
    """The coordinator's bound address, from its status file."""
    f = tmp / "coord.status"
    wait_for(lambda: f.exists() and f.read_text().startswith("listening"), "the coordinator to listen")
    return f.read_text().split()[1]


def finish(procs: list[Proc]) -> None:
    for p in procs:
        p.stop()


def check_clean(pids: list[int]) -> None:
    sweep_stale()
    for pid in pids:
        assert segments_of(pid) == [], f"segments of {pid} left behind"


def test_hosts_before_coordinator_deliver_everything(tmp_path: Path, reliability) -> None:
    coord = f"ipc://{tmp_path}/control"
    hosts = start_hosts(tmp_path, coord, ("h1", "h2"))  # before the coordinator: they say hello until it answers
    rogue = Proc(tmp_path, "h9", "host", "h9", "--coordinator", coord)  # not in the topology: refused
    out = tmp_path / "report.json"
    c = None
    try:
        c = Proc(tmp_path, "coord", "coordinator", TOPO, "--bind", coord, "--count", "20000", "-i", "0.5",
                 "--json", str(out), "--status-file", str(tmp_path / "coord.status"))
        wait_for(lambda: "host h1 registered" in c.text(), "h1 to register")
        hosts["h1"].stop()  # h1 restarts before the run starts: it registers again
        hosts["h1"] = Proc(tmp_path, "h1-again", "host", "h1", "--coordinator", coord, "--status-file",
                           str(tmp_path / "h1.status"))
        wait_for(lambda: "host h1 registered again" in c.text(), "h1 to register again")
        hosts.update(start_hosts(tmp_path, coord, ("h3",)))
        code = c.wait()
        text = c.text()
        assert code == 0, text
        for h, p in hosts.items():
            assert p.wait(DEADLINE) == 0, p.text()
            assert (tmp_path / f"{h}.status").read_text().strip() == "finished"
        wait_for(lambda: "has no host 'h9'" in rogue.text(), "the unknown host to be refused")
    finally:
        finish([*(p for p in hosts.values()), rogue] + ([c] if c else []))
    report = json.loads(out.read_text())
    reliability("multi-host run", report)
    t = report["traffic"]
    assert t["generated"] == 20000 and t["delivered"] == 20000, t
    assert t["unaccounted"] == 0 and t["corrupted"] == 0 and t["duplicates"] == 0
    assert not any(report["violations"].values()), report["violations"]
    assert report["pages"]["total"] == report["pages"]["accounted"] == 3 * 4096
    assert report["hosts_lost"] == []
    # Every host forwarded every packet through its own pool: pages never crossed hosts.
    assert sorted(c["host"] for c in report["cpus"]) == ["h1", "h2", "h3"]
    for cpu in report["cpus"]:
        assert cpu["xdp"]["redirect"] == 20000
    assert "Summary" in text and "cabling h1:eth1" in text
    check_clean([p.p.pid for p in hosts.values()])


def test_host_killed_mid_run_is_reported_and_others_keep_running(tmp_path: Path, reliability) -> None:
    out = tmp_path / "report.json"
    c = Proc(tmp_path, "coord", "coordinator", TOPO, "--bind", "tcp://127.0.0.1:*", "--count", "0", "-i", "0.5",
             "--host-timeout", "3", "--json", str(out), "--status-file", str(tmp_path / "coord.status"))
    hosts: dict[str, Proc] = {}
    try:
        hosts = start_hosts(tmp_path, listening(tmp_path))
        wait_for(lambda: all((tmp_path / f"{h}.status").exists()
                             and "running" in (tmp_path / f"{h}.status").read_text() for h in hosts),
                 "every host to run", DEADLINE * 2)
        wait_for(lambda: "Summary" in c.out_path.read_text(), "live lines")
        victim = hosts["h2"].p
        kids = descendants_of(victim.pid)
        victim.kill()
        wait_for(lambda: "host h2 lost" in c.text(), "the coordinator to report h2 lost")
        wait_for(lambda: not any(alive(k) for k in kids), "h2's processes to exit by themselves")
        assert hosts["h1"].p.poll() is None and hosts["h3"].p.poll() is None
        c.p.send_signal(signal.SIGTERM)  # `docker compose stop`: an orderly end and a report
        code = c.wait()
        for h in ("h1", "h3"):
            assert hosts[h].wait(DEADLINE) == 0, hosts[h].text()
    finally:
        finish([*hosts.values(), c])
    text = c.text()
    assert code == 1, text  # a host was lost: the run is not a clean one
    report = json.loads(out.read_text())
    reliability("host lost mid-run", report)
    assert report["hosts_lost"] == ["h2"]
    assert "LOST     hosts h2" in text
    # The survivors' pages are all accounted for; h2's died with it.
    assert report["pages"]["total"] == report["pages"]["accounted"] == 2 * 4096
    assert report["violations"]["leaked"] == 0 and report["violations"]["foreign_cache_return"] == 0
    t = report["traffic"]
    assert t["unaccounted"] == 0 and t["corrupted"] == 0
    assert t["drops"]["fault.host_lost"] + t["drops"]["device.tx_dropped"] > 0
    check_clean([p.p.pid for p in hosts.values()])


def test_curve_refuses_and_counts_peers_without_the_key(tmp_path: Path, reliability) -> None:
    keys, other = tmp_path / "keys", tmp_path / "other"
    assert subprocess.run([sys.executable, "-m", "emu.cli", "keys", str(keys)], cwd=ROOT).returncode == 0
    security.generate_keys(str(other))
    out = tmp_path / "report.json"
    c = Proc(tmp_path, "coord", "coordinator", TOPO, "--bind", "tcp://127.0.0.1:*", "--count", "5000",
             "--keys", str(keys), "--json", str(out), "--status-file", str(tmp_path / "coord.status"))
    hosts: dict[str, Proc] = {}
    ctx = zmq.Context()
    try:
        addr = listening(tmp_path)
        # A host with the wrong keys, and one with none, knock first: neither gets in.
        bad_keys = security.load_keys(str(other))
        intruders = []
        for keyset in (bad_keys, None):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            security.make_client(s, keyset)
            s.connect(addr)
            s.send(control.pack("hello", {"host": "h1", "pid": os.getpid(), "version": 1}))
            intruders.append(s)
        hosts = start_hosts(tmp_path, addr, ("h1", "h2", "h3"), "--keys", str(keys))
        # While the run is set up, knock on a device's link port without the key too.
        wait_for(lambda: "cabling h1:eth1" in c.out_path.read_text(), "the links to be cabled", DEADLINE * 2)
        line = next(ln for ln in c.out_path.read_text().splitlines() if ln.startswith("cabling h1:eth1"))
        link_addr = line.split("(")[2].split(")")[0]
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(link_addr)
        s.send(b"not a frame", zmq.NOBLOCK)
        intruders.append(s)
        code = c.wait()
        for s in intruders:
            assert not s.poll(0, zmq.POLLIN)  # the coordinator never answered them
            s.close(0)
    finally:
        finish([*hosts.values(), c])
        ctx.term()
    text = c.text()
    assert code == 0, text
    report = json.loads(out.read_text())
    reliability("peers without the CURVE key", report, inputs=3)
    assert report["traffic"]["delivered"] == 5000 and report["traffic"]["unaccounted"] == 0
    assert report["security"]["control_refused"] >= 2, report["security"]
    assert report["security"]["link_refused"] >= 1, report["security"]
    assert report["violations"]["bad_messages"] == 0  # nothing they sent got through


def test_hosts_outlive_a_killed_coordinator_and_serve_the_next(tmp_path: Path, reliability) -> None:
    coord = f"ipc://{tmp_path}/control"
    hosts = start_hosts(tmp_path, coord, ("h1", "h2", "h3"), "--serve", "--coordinator-timeout", "4")
    first = Proc(tmp_path, "coord1", "coordinator", TOPO, "--bind", coord, "--count", "0", "-i", "0.5")
    second = None
    out = tmp_path / "report.json"
    try:
        wait_for(lambda: "Summary" in first.out_path.read_text(), "traffic through the first coordinator",
                 DEADLINE * 2)
        first.p.kill()  # the coordinator dies mid-run
        first.wait()
        # Each host notices the silence, tears its part down alone and waits for the next coordinator.
        for h, p in hosts.items():
            wait_for(lambda p=p: "ready for the next run" in p.text(), f"{h} to tear down alone", DEADLINE * 2)
            assert "tearing down on our own" in p.text()
            assert "accounted" in p.text() and p.p.poll() is None
        second = Proc(tmp_path, "coord2", "coordinator", TOPO, "--bind", coord, "--count", "5000",
                      "--json", str(out))
        code = second.wait()
        assert code == 0, second.text()
        for p in hosts.values():
            assert p.p.poll() is None  # --serve: still there for a third run
            p.p.send_signal(signal.SIGTERM)
        for p in hosts.values():
            assert p.wait(DEADLINE) in (0, 130), p.text()
    finally:
        finish([*hosts.values(), first] + ([second] if second else []))
    report = json.loads(out.read_text())
    reliability("coordinator lost mid-run", report)
    assert report["traffic"]["delivered"] == 5000 and report["traffic"]["unaccounted"] == 0
    assert report["pages"]["total"] == report["pages"]["accounted"] == 3 * 4096
    check_clean([p.p.pid for p in hosts.values()])


def test_a_cable_that_never_connects_fails_the_run_naming_it(tmp_path: Path) -> None:
    """h2 advertises an address where nothing listens (127.0.0.2; it listens on 127.0.0.1): the cables
    to it never connect, so h1 and h3 never report them plugged in and no traffic starts; after
    --link-timeout the run fails with the cable named, and every host tears down what it set up."""
    coord = f"ipc://{tmp_path}/control"
    c = Proc(tmp_path, "coord", "coordinator", TOPO, "--bind", coord, "--count", "1000",
             "--status-file", str(tmp_path / "coord.status"))
    hosts = start_hosts(tmp_path, coord, ("h1", "h3"), "--link-timeout", "3")
    hosts.update({"h2": Proc(tmp_path, "h2", "host", "h2", "--coordinator", coord, "--advertise", "127.0.0.2",
                             "--link-timeout", "3")})
    try:
        code = c.wait()
        host_codes = {h: p.wait(DEADLINE) for h, p in hosts.items()}
    finally:
        finish([*hosts.values(), c])
    text = c.text()
    assert code == 3, text
    assert "no connection to the peer within 3 s" in text, text
    assert re.search(r"link h[13]:eth[01] -> h2:eth[01] \(tcp://127\.0\.0\.2:\d+\)", text), text
    assert "Running topology" not in text  # the traffic never started
    failed = [h for h in ("h1", "h3") if "no connection to the peer" in hosts[h].text()]
    assert failed and all(host_codes[h] == 3 for h in failed), {h: p.text() for h, p in hosts.items()}
    check_clean([p.p.pid for p in hosts.values()])
