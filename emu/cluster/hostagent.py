"""``emu host NAME``: one emulated machine of a multi-host run, driven by a remote coordinator.

A host agent runs, on its own machine (or container), exactly what ``emu run`` runs for one host: the
host's page memory and pools in its own shared memory, one pinned process per emulated CPU, one per
device, and the traffic ports cabled to its devices.  Pages never leave the host.  A link to a device
on another host is a zmq TCP connection carrying frame bytes: the device binds its link ingress on
``--listen`` (port ``--link-port`` + the device's index, or any free port), the agent reports where
peers reach it (``--advertise``), and once every host has done so the coordinator tells each agent
where its devices' peers are, and the agent cables them.

The agent registers with the coordinator (retrying until one answers, so it may start first), sends
its counters a few times a second (its heartbeat), and follows the coordinator's phases.  Should the
coordinator go silent, the agent tears its part down the orderly way on its own, prints its report,
and (with ``--serve``) registers again, so a restarted coordinator finds it.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

import zmq

from emu.cluster import control
from emu.errors import ProcessFailure
from emu.net import security, wire
from emu.net.protocol import LINK
from emu.net.sockets import new_context
from emu.run import report as rep
from emu.run.coordinator import Run, RunError, RunOptions
from emu.topology.model import Endpoint, Topology, topology_from_dict

HELLO_EVERY = 1.0
STATS_EVERY = 0.25
BYE_TIMEOUT = 60.0  # after our final report, how long to wait for the coordinator's


def host_part(topo: Topology, hname: str) -> Topology:
    """The part of a topology one host runs: the host, the traffic ports cabled to its devices (a port
    with no link runs on the first host), and every link with an end here."""
    if hname not in topo.hosts:
        raise KeyError(hname)
    first = next(iter(topo.hosts))
    traffic = {}
    for name, port in topo.traffic.items():
        peer = topo.peer_of(Endpoint("traffic", None, name))
        where = peer.host if peer is not None and peer.kind == "device" else first
        if where == hname:
            traffic[name] = port

    def here(ep: Endpoint) -> bool:
        return ep.host == hname if ep.kind == "device" else ep.name in traffic

    links = tuple(link for link in topo.links if here(link.a) or here(link.b))
    return Topology(topo.name, topo.path, {hname: topo.hosts[hname]}, links, traffic, topo.capture)


@dataclass
class AgentOptions:
    listen: str = "127.0.0.1"  # where link ingresses bind
    advertise: str | None = None  # what peers connect to (default: the listen address)
    link_port: int = 0  # 0: any free port
    keys_dir: str | None = None
    status_file: str | None = None
    serve: bool = False  # stay up for the next run
    coordinator_timeout: float = 10.0
    link_timeout: float = control.LINK_TIMEOUT  # for the links to other hosts to connect
    out: TextIO = sys.stdout


class HostRun(Run):
    """`Run` of one host's part, with links to other hosts over TCP and the agent's channel serviced
    from every waiting loop."""

    def __init__(self, agent: HostAgent, full: Topology, hname: str, opts: RunOptions) -> None:
        super().__init__(host_part(full, hname), opts)
        self.agent = agent
        self.hname = hname
        self.keys_dir = agent.opts.keys_dir
        self.role = f"host {hname}"
        self.all_traffic = full.traffic  # replayed frames from other hosts' ports arrive here too
        self.sent_events = 0  # events already sent with the counters

    def tick(self) -> None:
        self.agent.service()

    def link_of(self, endpoint: str) -> tuple[str | None, str | None]:
        peer = self.topo.peer_of(Endpoint.parse(endpoint))
        if peer is None or self.is_local(peer):
            return super().link_of(endpoint)
        port = self.agent.opts.link_port
        if port:
            port += list(self.topo.hosts[self.hname].devices).index(Endpoint.parse(endpoint).name)
        return f"tcp://{self.agent.opts.listen}:{port or '*'}", None

    def remote_endpoints(self) -> dict[str, str]:
        """{local device endpoint: its remote peer endpoint} for links between hosts."""
        out = {}
        for link in self.topo.links:
            for mine, other in ((link.a, link.b), (link.b, link.a)):
                if mine.kind == "device" and mine.host == self.hname and not self.is_local(other):
                    out[str(mine)] = str(other)
        return out

    def remote_link_down(self, endpoint: str) -> None:
        self.agent.send("link_lost", {"endpoint": endpoint})

    # -- what the agent tells its coordinator, and does for it, between the phases -------------------

    def ready_info(self, advertise: str) -> dict:
        """After `launch`: where each device with a link to another host listens (at `advertise`, on the
        port it bound), and the kind of every stats row, for the coordinator's ``ready``."""
        assert self.table is not None
        links = {}
        for mine in self.remote_endpoints():
            dev = Endpoint.parse(mine)
            links[mine] = f"tcp://{advertise}:{self.table.read(f'{dev.host}/{dev.name}')['link_port']}"
        return {"links": links, "kinds": {k: spec.kind for k, spec in self.table.rows.items()}}

    def cable(self, peers: dict) -> None:
        """Between `launch` and `go`: tell each device with a link to another host where its peer
        listens, and wait until every cable's carrier is up (its connection to the peer made, not just
        its address known: traffic started before then would go nowhere for as long as zmq is still
        resolving the peer's name or connecting)."""
        assert self.table is not None
        ctx = self.agent.ctx
        assert ctx is not None
        ep = self.endpoints()
        waiting = []
        for mine, other in self.remote_endpoints().items():
            addr = peers.get(other)
            if not isinstance(addr, str):
                raise RunError(f"the coordinator gave no address for {other}, the peer of {mine}")
            dev = Endpoint.parse(mine)
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 1000)
            s.connect(ep["hosts"][self.hname]["device"][dev.name])
            s.send(wire.pack_msg(LINK, {"peer": addr}))
            s.close()
            waiting.append((f"{dev.host}/{dev.name}", f"{mine} -> {other} ({addr})"))
        timeout = self.agent.opts.link_timeout
        deadline = time.monotonic() + timeout
        while down := [cable for key, cable in waiting if not self.table.read(key)["link_up"]]:
            if time.monotonic() > deadline:
                raise RunError(f"link {'; link '.join(down)}: no connection to the peer within "
                               f"{timeout:g} s (its name does not resolve, nothing listens "
                               "there, or its CURVE key differs)")
            self.tick()
            self.check_procs()
            time.sleep(0.01)

    def local_device(self, endpoint: object) -> str | None:
        """The stats row of `endpoint` if it names one of this host's devices (a ``peer_down``'s)."""
        if not isinstance(endpoint, str):
            return None
        ep = Endpoint.parse(endpoint)
        if ep.kind != "device" or ep.host != self.hname:
            return None
        key = f"{ep.host}/{ep.name}"
        return key if self.table is not None and key in self.table.rows else None

    def progress(self) -> dict | None:
        """The counters, packets lost, pages in transit and events since the last call, for the
        coordinator's ``stats`` (None before `prepare`)."""
        if self.table is None:
            return None
        snap = self.snapshot()
        events = self.events[self.sent_events:]
        self.sent_events = len(self.events)
        return {"rows": snap.rows, "lost": snap.lost, "in_transit": self.in_transit(), "events": events}


class CoordinatorLost(ProcessFailure, RuntimeError):
    """The coordinator went silent mid-run; the message says for how long."""


class HostAgent:
    def __init__(self, name: str, coordinator: str, opts: AgentOptions | None = None) -> None:
        self.name = name
        self.coordinator = coordinator
        self.opts = opts or AgentOptions()
        self.run: HostRun | None = None
        self.sock: zmq.Socket | None = None
        self.ctx: zmq.Context | None = None
        self.inbox: list[tuple[str, dict, object]] = []
        self.heard = time.monotonic()
        self.next_stats = 0.0
        self.stop = False

    # -- output and status --------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"emu host {self.name}: {text}", file=self.opts.out, flush=True)

    def status(self, word: str) -> None:
        control.write_status(self.opts.status_file, word)

    # -- the channel --------------------------------------------------------------------------------

    def connect(self) -> None:
        self.ctx = new_context()
        self.keys = security.load_keys(self.opts.keys_dir)
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 2000)  # the final report must get out before the agent exits
        s.setsockopt(zmq.ROUTING_ID, f"{self.name}.{secrets.token_hex(4)}".encode())
        security.make_client(s, self.keys)
        s.connect(self.coordinator)
        self.sock = s

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    def send(self, kind: str, header: dict | None = None, payload: object = None) -> None:
        assert self.sock is not None
        try:
            self.sock.send(control.pack(kind, header, payload), zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected: the coordinator notices our silence and we notice its

    def receive(self, timeout_ms: int = 0) -> None:
        """Queue the coordinator's messages; garbled ones are reported once and dropped."""
        assert self.sock is not None
        if timeout_ms and not self.sock.poll(timeout_ms):
            return
        while True:
            try:
                msg = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                kind, header, payload = control.unpack(msg, control.COORD_KINDS)
            except control.ControlError as exc:
                self.say(f"refused a control message: {exc}")
                continue
            self.heard = time.monotonic()
            if kind != "ping":
                self.inbox.append((kind, header, payload))

    def service(self) -> None:
        """From the run's waiting loops: take messages, send counters, notice a silent coordinator."""
        self.receive()
        now = time.monotonic()
        if self.run is not None and now >= self.next_stats:
            self.next_stats = now + STATS_EVERY
            self.send_stats()

    def send_stats(self, kind: str = "stats", extra: dict | None = None) -> None:
        payload = None if self.run is None else self.run.progress()
        if payload is None:
            return
        if extra:
            payload.update(extra)
        self.send(kind, {"host": self.name}, payload)

    def next_message(self, kinds: tuple[str, ...], timeout: float) -> tuple[str, dict, object]:
        """Wait for one of `kinds` (others stay queued); CoordinatorLost when it goes silent."""
        deadline = time.monotonic() + timeout
        while True:
            for n, item in enumerate(self.inbox):
                if item[0] in kinds or item[0] in ("abort", "bye"):
                    return self.inbox.pop(n)
            if self.stop:
                raise KeyboardInterrupt
            if self.run is not None:
                self.run.check_procs()
                self.run.sample_pages()  # this host's pages while traffic runs, for the report's metrics
            self.service()
            if time.monotonic() - self.heard > self.opts.coordinator_timeout:
                raise CoordinatorLost(f"no word from the coordinator for {self.opts.coordinator_timeout:.0f} s")
            if time.monotonic() > deadline:
                raise RunError(f"the coordinator sent none of {', '.join(kinds)} within {timeout:.0f} s")
            self.receive(20)

    # -- one run --------------------------------------------------------------------------------------

    def register(self) -> tuple[dict, object]:
        """Say hello until the coordinator assigns this host its part of a run."""
        self.status("connecting")
        last_refusal = None
        next_hello = 0.0
        told = False
        while not self.stop:
            now = time.monotonic()
            if now >= next_hello:
                self.send("hello", {"host": self.name, "pid": os.getpid(), "version": wire.WIRE_VERSION})
                next_hello = now + HELLO_EVERY
            if not told and now > self.started + 5:
                self.say(f"waiting for the coordinator at {self.coordinator}")
                told = True
            self.receive(50)
            while self.inbox:
                kind, header, payload = self.inbox.pop(0)
                if kind == "assign":
                    return header, payload
                if kind == "refuse":
                    reason = header.get("reason")
                    if reason != last_refusal:
                        self.say(f"the coordinator refused us: {reason}; retrying")
                        last_refusal = reason
        raise KeyboardInterrupt

    def run_once(self) -> int:
        """Register, run our part, report.  Exit status as ``emu run``'s (1: problems, 3: failure)."""
        self.started = time.monotonic()
        self.inbox.clear()
        header, payload = self.register()
        self.heard = time.monotonic()
        if not isinstance(payload, dict) or "topology" not in payload:
            raise RunError("the coordinator's assignment carries no topology")
        full = topology_from_dict(payload["topology"])
        if self.name not in full.hosts:
            raise RunError(f"the coordinator's topology {full.name!r} has no host {self.name!r}")
        count = header.get("count")
        opts = RunOptions(count=count if isinstance(count, int) and count > 0 else None, quiet=True,
                          out=self.opts.out)
        self.status("registered")
        run = self.run = HostRun(self, full, self.name, opts)
        self.say(f"registered with {self.coordinator}: running {run.topo.name!r} part "
                 f"({len(run.topo.traffic)} traffic ports here)")
        try:
            return self._run(run)
        except (CoordinatorLost, KeyboardInterrupt) as exc:
            if not run.started:
                run.abort()
                raise
            why = str(exc) if isinstance(exc, CoordinatorLost) else "stopped by a signal"
            run.event(f"{why}: tearing down on our own")
            self.say(rep.summary(run.end(settle=False)))
            if isinstance(exc, KeyboardInterrupt):
                raise
            return 1
        except BaseException:
            run.abort()
            raise
        finally:
            run.cleanup()
            self.run = None

    def _run(self, run: HostRun) -> int:
        """Run's phases, each when the coordinator says: prepare and launch, report where our links
        listen, cable them to the peers' addresses, go on ``start``, quiesce, ``down`` (the pages home),
        and on ``exit`` exit, reclaim and send the report."""
        run.prepare()
        run.launch()
        self.send("ready", {"host": self.name}, run.ready_info(self.opts.advertise or self.opts.listen))
        kind, header, payload = self.next_message(("peers",), 120)
        if kind != "peers":
            return self._ended(kind, header)
        run.cable(payload.get("links", {}) if isinstance(payload, dict) else {})
        self.send("linked", {"host": self.name})
        kind, header, _ = self.next_message(("start",), 120)
        if kind != "start":
            return self._ended(kind, header)
        run.go()
        self.status("running")
        self.say("started")
        while True:
            kind, header, payload = self.next_message(("quiesce", "down", "exit", "peer_down"), 1e9)
            if kind == "quiesce":
                run.quiesce(settle=False)  # the coordinator judges when traffic settled, across hosts
            elif kind == "peer_down":
                key = run.local_device(header.get("endpoint"))
                if key is not None:
                    run.link_down(key)
            elif kind == "down":
                run.down()
                self.send_stats("home")
            elif kind == "exit":
                run.exit()
                run.reclaim()
                report = run.report()
                self.send_stats("final", {"report": report})
                self.status("finished")
                p = report["pages"]
                self.say(f"finished: pages total {p['total']:,} accounted {p['accounted']:,} "
                         f"in_flight {p['in_flight']:,}")
                self.run = None
                try:  # until the coordinator has printed the run's report (it says bye)
                    self.next_message(("bye",), BYE_TIMEOUT)
                except (CoordinatorLost, RunError, KeyboardInterrupt):
                    pass  # our part is done and reported either way
                return 0
            else:
                return self._ended(kind, header)

    def _ended(self, kind: str, header: dict) -> int:
        reason = header.get("reason", "the coordinator ended the run")
        self.say(f"run ended by the coordinator ({kind}): {reason}")
        if self.run is not None and self.run.started:
            self.run.end(settle=False)
        elif self.run is not None:
            self.run.abort()  # ended during set-up (another host failed): our processes exit too
        return 1

    def serve(self) -> int:
        """Run once (or, with `serve`, forever); returns the last run's exit status."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        self.connect()
        code = 0
        try:
            while True:
                try:
                    code = self.run_once()
                except CoordinatorLost as exc:
                    self.say(str(exc))
                    code = 1
                except RunError as exc:
                    self.say(f"run failed: {exc}")
                    self.send("failed", {"host": self.name, "reason": str(exc)[:1000]})
                    code = 3
                if not self.opts.serve or self.stop:
                    return code
                self.say("ready for the next run")
        except KeyboardInterrupt:
            return 130 if code == 0 else code
        finally:
            self.status("finished")
            self.close()
            for sig, old in handlers.items():
                signal.signal(sig, old)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop = True
        if self.run is not None:
            self.run.interrupt()
