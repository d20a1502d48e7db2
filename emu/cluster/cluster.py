"""``emu coordinator``: the control plane of a multi-host run, alone, with every host a remote agent.

Each emulated host runs as an ``emu host NAME`` agent (its own processes and shared memory, see
`emu.cluster.hostagent`).  The coordinator binds one ROUTER socket and:

1. **registers** hosts as they say hello (in any order, before or after the coordinator starts; a host
   that restarts before the run starts simply registers again), refusing names the topology lacks;
2. **assigns** each host the topology (each runs its own part), collects where its devices listen for
   links to other hosts, hands every host its peers' addresses, and starts the traffic once all are
   cabled;
3. **watches** the counters each host sends a few times a second (also its heartbeat), printing the
   same live lines as ``emu run``; a host silent for ``--host-timeout`` seconds is **lost**: the report
   says so, the devices cabled to it see their carrier go down, and the others keep running.  A cable
   between two live hosts that carries nothing for `PARTITION_AFTER` seconds while frames wait on it is
   **partitioned** (the network between them is cut, the hosts themselves still report); when frames
   arrive again it is **healed**.  Both are reported as they happen and in the report's ``partitions``
   (`LinkWatch`); frames a cut link could not take are counted where they stopped (the sender's
   ``tx_dropped``, the CPUs' redirect errors), and those on the wire arrive after the heal;
4. **tears down** as ``emu run`` does, phase by phase across hosts (quiesce, settle, down and the wait
   for every page, exit), then merges the hosts' own reports (each audits its own pages) into one.

It is never on the packet path: frames go device to device, and counters arrive in bulk.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from emu.cluster import control
from emu.net import security
from emu.net.protocol import ProcState
from emu.net.sockets import new_context
from emu.run import expect
from emu.run import report as rep
from emu.run.coordinator import (
    READY_TIMEOUT,
    Console,
    RunError,
    RunOptions,
    generators_done,
    settle_stall,
    wait_settled,
)
from emu.topology.model import Endpoint, Topology

PING_EVERY = 1.0
PARTITION_AFTER = 3.0  # seconds a cable between live hosts may carry nothing while frames wait on it
FINAL_TIMEOUT = 60.0  # hosts join their processes and audit their pages before they report


@dataclass
class HostSlot:
    name: str
    ident: bytes | None = None
    state: str = "absent"  # absent registered assigned ready linked running home final lost failed
    heard: float = 0.0
    links: dict[str, str] = field(default_factory=dict)
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    lost: int = 0
    in_transit: int = 0
    report: dict[str, Any] | None = None

    @property
    def live(self) -> bool:
        return self.state not in ("lost", "failed")


@dataclass
class LinkWatch:
    """One direction of a cable between two hosts, watched for a partition: frames the sending device
    put on it (``tx_packets - tx_dropped - link_lost``) against frames the receiving device took
    (``rx_packets``), from the counters both hosts send."""

    name: str  # "h1:eth1 -> h2:eth0"
    tx: str  # the sending device's stats row ("h1/eth1")
    rx: str
    hosts: tuple[str, str]
    got: int = 0
    moved: float = 0.0  # when `got` last grew (or nothing waited)
    cut: float | None = None  # when the current partition was noticed
    waiting: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def check(self, rows: dict[str, dict[str, int]], now: float) -> str | None:
        """'cut' or 'healed' when the link's state changes, else None."""
        tx, rx = rows.get(self.tx), rows.get(self.rx)
        if tx is None or rx is None or not self.moved:
            self.moved = now
            return None
        sent = tx["tx_packets"] - tx["tx_dropped"] - tx["link_lost"]
        got = rx["rx_packets"]
        grew, self.got = got > self.got, got
        self.waiting = max(0, sent - got)
        if grew or not self.waiting:
            self.moved = now
            if self.cut is not None and grew:
                self.history.append({"link": self.name, "cut_s": round(self.cut, 3),
                                     "healed_s": round(now, 3), "seconds": round(now - self.cut, 3)})
                self.cut = None
                return "healed"
            return None
        if self.cut is None and now - self.moved >= PARTITION_AFTER:
            self.cut = self.moved
            return "cut"
        return None


class Cluster(Console):
    """One multi-host run driven from here."""

    def __init__(self, topo: Topology, bind: str, opts: RunOptions | None = None, keys_dir: str | None = None,
                 status_file: str | None = None, host_timeout: float = 5.0,
                 register_timeout: float | None = None) -> None:
        self.topo = topo
        self.bind = bind
        self.opts = opts or RunOptions()
        self.keys = security.load_keys(keys_dir)
        self.status_file = status_file
        self.host_timeout = host_timeout
        self.register_timeout = register_timeout
        self.slots = {name: HostSlot(name) for name in topo.hosts}
        self.events: list[str] = []
        self.interrupted = False
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self.gatekeeper: security.Gatekeeper | None = None
        self.created = time.monotonic()
        self.started = 0.0
        self.settled = 0.0
        self.first_delivery: float | None = None
        self.next_ping = 0.0
        self.bad_messages = 0
        self.address = ""
        self.peers_sent = False
        self.watches = [LinkWatch(f"{a} -> {b}", f"{a.host}/{a.name}", f"{b.host}/{b.name}", (a.host, b.host))
                        for link in topo.links for a, b in ((link.a, link.b), (link.b, link.a))
                        if a.kind == b.kind == "device" and a.host != b.host and a.host and b.host]

    def status(self, word: str) -> None:
        control.write_status(self.status_file, word)

    # -- the channel --------------------------------------------------------------------------------

    def open(self) -> None:
        self.ctx = new_context()
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 1000)
        if self.keys is not None:
            self.gatekeeper = security.Gatekeeper(self.ctx, self.keys).start()
        security.make_server(s, self.keys)
        try:
            s.bind(self.bind)
        except zmq.ZMQError as exc:
            s.close(0)
            raise RunError(f"cannot listen on {self.bind}: {exc}") from None
        if self.gatekeeper is not None:
            self.gatekeeper.watch(s)
        self.sock = s
        self.address = s.getsockopt_string(zmq.LAST_ENDPOINT)
        self.status(f"listening {self.address}")

    def close(self) -> None:
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
        if self.sock is not None:
            self.sock.close()
        if self.ctx is not None:
            self.ctx.term()

    def send(self, slot: HostSlot, kind: str, header: dict[str, Any] | None = None, payload: Any = None) -> None:
        if slot.ident is None or self.sock is None:
            return
        try:
            self.sock.send_multipart([slot.ident, control.pack(kind, header, payload)], zmq.NOBLOCK)
        except zmq.Again:
            pass

    def broadcast(self, kind: str, header: dict[str, Any] | None = None) -> None:
        for slot in self.slots.values():
            if slot.live:
                self.send(slot, kind, header)

    def pump(self, timeout_ms: int = 20) -> None:
        """Handle every message waiting (up to `timeout_ms` for the first), ping hosts, notice losses."""
        assert self.sock is not None
        if self.sock.poll(timeout_ms):
            while True:
                try:
                    parts = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.handle(parts)
        now = time.monotonic()
        if now >= self.next_ping:
            self.next_ping = now + PING_EVERY
            for slot in self.slots.values():
                if slot.live and slot.state != "absent":
                    self.send(slot, "ping")
        if self.started:
            for slot in self.slots.values():
                if slot.state in ("running", "home") and now - slot.heard > self.host_timeout:
                    self.host_lost(slot, f"no word from it for {now - slot.heard:.1f} s")
            self.watch_links(now)

    def watch_links(self, now: float) -> None:
        """Partitions: cables between live hosts that stopped carrying (`LinkWatch`)."""
        if not self.watches:
            return
        rows = self.snapshot().rows
        for w in self.watches:
            if not all(self.slots[h].live for h in w.hosts):
                continue
            change = w.check(rows, now)
            if change == "cut":
                self.event(f"partition: link {w.name} has carried nothing for {now - w.moved:.1f} s with "
                           f"{w.waiting:,} frames sent on it; hosts {w.hosts[0]} and {w.hosts[1]} still report")
            elif change == "healed":
                self.event(f"partition healed: link {w.name} carries again after {w.history[-1]['seconds']:.1f} s")

    def partitions(self) -> list[dict[str, Any]]:
        """Every partition of the run, healed or not (times in seconds since the traffic started)."""
        out = []
        for w in self.watches:
            for p in w.history:
                out.append(dict(p, cut_s=round(p["cut_s"] - self.started, 3),
                                healed_s=round(p["healed_s"] - self.started, 3)))
            if w.cut is not None:
                out.append({"link": w.name, "cut_s": round(w.cut - self.started, 3), "healed_s": None,
                            "seconds": None, "frames_waiting": w.waiting})
        return sorted(out, key=lambda p: p["cut_s"])

    def handle(self, parts: list[bytes]) -> None:
        if len(parts) != 2:
            self.refused_message(f"a {len(parts)}-part message")
            return
        ident, msg = parts
        try:
            kind, header, payload = control.unpack(msg, control.HOST_KINDS)
            name = control.field(header, "host", str)
        except control.ControlError as exc:
            self.refused_message(str(exc))
            return
        slot = self.slots.get(name)
        if slot is None:
            self.refused_message(f"{kind!r} from unknown host {name!r}")
            if kind == "hello":
                hosts = ", ".join(self.slots)
                self.sock.send_multipart([ident, control.pack(  # type: ignore[union-attr]
                    "refuse", {"reason": f"topology {self.topo.name!r} has no host {name!r} (hosts: {hosts})"})])
            return
        if kind == "hello":
            self.hello(slot, ident)
            return
        if ident != slot.ident or not slot.live:
            return  # an earlier incarnation of a host that registered again, or one declared lost
        slot.heard = time.monotonic()
        if kind in ("stats", "home", "final"):
            self.take_stats(slot, payload)
            if kind == "home":
                slot.state = "home"  # its pages are home (its report lists any stalled pool)
            elif kind == "final":
                slot.state = "final"
                slot.report = payload.get("report") if isinstance(payload, dict) else None
        elif kind == "ready" and slot.state == "assigned":
            if not isinstance(payload, dict):
                self.refused_message(f"'ready' from {name} without a payload")
                return
            slot.links = {str(k): str(v) for k, v in payload.get("links", {}).items()}
            slot.kinds = {str(k): str(v) for k, v in payload.get("kinds", {}).items()}
            slot.state = "ready"
        elif kind == "linked" and slot.state == "ready":
            slot.state = "linked"
        elif kind == "failed":
            slot.state = "failed"
            raise RunError(f"host {name} failed: {header.get('reason', '?')}")
        elif kind == "link_lost":
            self.peer_down(header.get("endpoint"))

    def refused_message(self, what: str) -> None:
        self.bad_messages += 1
        if self.bad_messages <= 5:
            self.event(f"refused a control message: {what}")

    def hello(self, slot: HostSlot, ident: bytes) -> None:
        if ident == slot.ident:
            return  # a hello sent before our assignment reached it
        if slot.state in ("absent", "registered"):
            again = slot.state == "registered"
            slot.ident, slot.state, slot.heard = ident, "registered", time.monotonic()
            self.say(f"host {slot.name} {'registered again' if again else 'registered'}")
            return
        if slot.state in ("assigned", "ready") and not self.peers_sent:
            # Restarted while setting up: nobody has its old link addresses yet, so it just starts over.
            slot.ident, slot.heard = ident, time.monotonic()
            self.event(f"host {slot.name} restarted during set-up: assigning it again")
            self.assign(slot)
            return
        reason = f"a run of {self.topo.name!r} is in progress and host {slot.name} left it"
        self.sock.send_multipart([ident, control.pack("refuse", {"reason": reason})])  # type: ignore[union-attr]
        if slot.live:
            self.host_lost(slot, "it registered again mid-run (restarted)")

    def take_stats(self, slot: HostSlot, payload: Any) -> None:
        if not isinstance(payload, dict) or not isinstance(payload.get("rows"), dict):
            self.refused_message(f"counters from {slot.name} without rows")
            return
        slot.rows = payload["rows"]
        slot.lost = int(payload.get("lost", 0))
        slot.in_transit = int(payload.get("in_transit", 0))
        for e in payload.get("events", []):
            self.event(f"{slot.name}: {e}")

    # -- losses -------------------------------------------------------------------------------------

    def host_lost(self, slot: HostSlot, why: str) -> None:
        slot.state = "lost"
        self.event(f"host {slot.name} lost: {why}; the other hosts keep running")
        for link in self.topo.links:
            for mine, other in ((link.a, link.b), (link.b, link.a)):
                if mine.kind == "device" and mine.host == slot.name and other.kind == "device":
                    self.peer_down(str(other))

    def peer_down(self, endpoint: object) -> None:
        """Tell the host of `endpoint` that its link's far end is gone."""
        if not isinstance(endpoint, str):
            return
        ep = Endpoint.parse(endpoint)
        slot = self.slots.get(ep.host or "")
        if slot is not None and slot.live:
            self.send(slot, "peer_down", {"endpoint": endpoint})

    # -- phases -------------------------------------------------------------------------------------

    def wait_for(self, states: tuple[str, ...], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        next_note = time.monotonic() + 5.0
        while True:
            waiting = [s.name for s in self.slots.values() if s.live and s.state not in states]
            if not waiting or self.interrupted:
                return
            now = time.monotonic()
            if now > deadline:
                raise RunError(f"hosts {', '.join(waiting)} did not {what} within {timeout:.0f} s")
            if now >= next_note:
                self.say(f"waiting for hosts {', '.join(waiting)} to {what}")
                next_note = now + 5.0
            self.pump()

    def assign(self, slot: HostSlot) -> None:
        slot.state = "assigned"
        self.send(slot, "assign", {"host": slot.name, "count": self.opts.count or 0},
                  {"topology": self.topo.to_dict()})

    def snapshot(self) -> rep.Snapshot:
        rows: dict[str, dict[str, int]] = {}
        kinds: dict[str, str] = {}
        lost = 0
        for slot in self.slots.values():
            rows.update(slot.rows)
            kinds.update({k: v for k, v in slot.kinds.items() if k in slot.rows})
            lost += slot.lost
        return rep.Snapshot(time.monotonic(), rows, kinds, lost)

    def generators_done(self) -> bool:
        rows = self.snapshot().rows

        def done(n: str) -> bool:
            # A generator on a lost host (or not yet heard of) sends nothing more.
            return n not in rows or rows[n]["state"] >= ProcState.DONE or not self.host_of(n).live

        return generators_done(self.topo, self.opts.count, done)

    def host_of(self, key: str) -> HostSlot:
        for slot in self.slots.values():
            if key in slot.kinds:
                return slot
        raise KeyError(key)

    def in_transit(self) -> int:
        return sum(s.in_transit for s in self.slots.values() if s.live)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.interrupted = True

    def run(self) -> dict[str, Any]:
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        self.open()
        try:
            return self._run()
        except BaseException:
            self.broadcast("abort", {"reason": "the coordinator failed"})
            raise
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)
            self.status("finished")
            self.close()

    def _run(self) -> dict[str, Any]:
        self.say(f"coordinator for {self.topo.name!r} listening on {self.address}"
                 f"{' (CURVE)' if self.keys else ''}: waiting for hosts {', '.join(self.slots)}")
        self.wait_for(("registered",), self.register_timeout or 1e9, "register")
        if self.interrupted:
            raise RunError("interrupted before every host registered")
        for slot in self.slots.values():
            self.assign(slot)
        self.wait_for(("ready",), READY_TIMEOUT + 60, "set up")
        links: dict[str, str] = {}
        for slot in self.slots.values():
            links.update(slot.links)
        for link in self.topo.links:
            a, b = str(link.a), str(link.b)
            if a in links and b in links:
                self.say(f"cabling {a} ({links[a]}) <-> {b} ({links[b]})")
        self.peers_sent = True
        for slot in self.slots.values():
            self.send(slot, "peers", None, {"links": links})
        self.wait_for(("linked",), control.LINK_TIMEOUT + 30, "cable their links")
        if self.interrupted:
            raise RunError("interrupted during set-up")
        self.say(rep.banner(self.topo))
        self.started = time.monotonic()
        for slot in self.slots.values():
            slot.state, slot.heard = "running", time.monotonic()
        self.broadcast("start")
        self.main_loop()
        self.quiesce()
        self.teardown()
        return self.report()

    def main_loop(self) -> None:
        opts = self.opts
        last = self.snapshot()
        next_line = time.monotonic() + opts.interval
        while not self.interrupted:
            self.pump()
            now = time.monotonic()
            if self.first_delivery is None and self.snapshot().delivered() > 0:
                self.first_delivery = now
            if now >= next_line:
                cur = self.snapshot()
                if set(cur.rows) == set(last.rows):
                    self.say(rep.interval_lines(self.topo, last, cur, opts.extended))
                last, next_line = cur, now + opts.interval
            if opts.duration is not None and now - self.started >= opts.duration:
                break
            if opts.duration is None and self.generators_done():
                break
            if not any(s.live for s in self.slots.values()):
                self.event("every host is lost")
                break
        if self.interrupted:
            self.event("interrupted: tearing down and reporting what ran")

    def wait_settled(self) -> None:
        # Counters arrive a few times a second: a stall is judged over a little more than a host's own.
        wait_settled(self.pump, self.snapshot, self.in_transit, settle_stall(self.topo) + 2 * self.host_timeout / 5)

    # The phases of a `Run`, across hosts: each host runs its own on our word (``quiesce`` is its
    # quiesce without the settling, which is judged here over every host's counters; ``down`` its down;
    # ``exit`` its exit, reclaim and report), and the report is built from the same kind of record.

    def quiesce(self) -> None:
        """Every host's generators stop; wait until traffic settles across hosts."""
        self.broadcast("quiesce")
        self.wait_settled()

    def teardown(self) -> None:
        """Every host brings its devices down and waits for its pages; then every host exits, reclaims
        and sends its own report (a host that does not within FINAL_TIMEOUT is lost)."""
        self.settled = time.monotonic()
        self.broadcast("down")
        self.interrupted = False  # a second Ctrl-C must not skip the wait for the pages
        self.wait_for(("home",), 60, "bring their pages home")
        for slot in self.slots.values():
            if slot.live:
                slot.state = "exit"
                self.send(slot, "exit")
        deadline = time.monotonic() + FINAL_TIMEOUT
        while any(s.live and s.state != "final" for s in self.slots.values()):
            if time.monotonic() > deadline:
                for s in self.slots.values():
                    if s.live and s.state != "final":
                        self.host_lost(s, f"no final report within {FINAL_TIMEOUT:.0f} s")
                break
            self.pump()

    def record(self) -> rep.RunRecord:
        """The run's record: the merged final counters, each surviving host's own report (its pages,
        pools and audits), and what happened here."""
        final = self.snapshot()
        lost_hosts = [s.name for s in self.slots.values() if not s.live]
        if lost_hosts:
            final.host_lost = max(0, final.unaccounted())
        return rep.RunRecord(
            topology=self.topo,
            final=final,
            elapsed=(self.settled or time.monotonic()) - (self.started or self.created),
            first_packet_s=None if self.first_delivery is None else self.first_delivery - self.created,
            parts={s.name: s.report for s in self.slots.values() if s.live and s.report is not None},
            events=list(self.events),
            processes={"coordinator": os.getpid()},
            hosts_lost=lost_hosts,
            control_refused=self.gatekeeper.refused if self.gatekeeper is not None else 0,
            bad_control_messages=self.bad_messages,
        )

    def report(self) -> dict[str, Any]:
        """The merged report (printed); then the hosts may exit."""
        record = self.record()
        report = rep.build_report(record)
        lines = expect.merge_parts(report, record.parts or {})
        report["partitions"] = self.partitions()
        self.say(rep.summary(report) + "".join(f"\n{line}" for line in lines))
        for p in report["partitions"]:
            healed = ("not healed" if p["healed_s"] is None
                      else f"healed at {p['healed_s']:.1f} s ({p['seconds']:.1f} s)")
            self.say(f"  PARTITION link {p['link']}: cut at {p['cut_s']:.1f} s, {healed}")
        # Hosts wait for this before they exit, so that `docker compose up --exit-code-from coordinator`
        # (which stops everything when the first container exits) shows the report above.
        self.broadcast("bye")
        return report
