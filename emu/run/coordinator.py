"""The coordinator: the control plane of a run.  It is never on the per-packet path.

It reads the topology, creates each host's shared memory (page memory and pools, BPF maps, the stats
table), starts and supervises the processes (one per emulated CPU, pinned; one per device; one per
traffic port), tells them when to start and stop through control words in shared memory, watches
their counters and heartbeats, audits page conservation, and tears everything down in the kernel's
order:

1. QUIESCE: generators stop; forwarding goes on until every generated packet is delivered or counted
   in a named drop counter (or nothing moves any more);
2. DOWN (``ndo_stop``): devices hand posted RX buffers back and deliver outstanding TX completions,
   CPUs stop refilling; the coordinator waits until every CPU and device has said so and every page
   a live process holds has come home, printing the kernel's ``page_pool_release_retry() stalled pool
   shutdown`` warning while some stay in flight.  It waits on that condition, never for a fixed time:
   a process that dies or hangs meanwhile is noticed as at any time, and the pages it held are
   reclaimed; only a new Ctrl-C or SIGTERM ends the wait early (the pools are then destroyed with pages
   in flight, which the audit reports);
3. EXIT: CPU workers destroy their pools (cache and ring back to the page allocator) and everyone
   exits (one that stops beating for `HUNG_NS` is killed and counted dead); the final strict audit
   counts every page, then every segment is unlinked.

These are `Run`'s phases (prepare, start, quiesce, teardown, reclaim, then the report), which ``emu run``
runs in order and a host agent of a multi-host run drives one by one as its coordinator says.  Ctrl-C
and SIGTERM (what ``docker stop``, systemd and ``timeout`` send) both end a run this same way, from any
phase.  A process that dies is noticed from its exit status (`check_procs`); the report's
``failures`` name it, with its last words when it died of an exception (`emu.run.process.last_words`);
the pages a dead worker stranded are reclaimed by `emu.mem.reclaim`.  The report is built from a plain
record of the run (`emu.run.report.RunRecord`), the same one a multi-host run fills.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from emu.errors import ProcessFailure
from emu.mem import pagepool, reclaim
from emu.mem.page import HOME, PageState
from emu.mem.pagemem import PageMemory, required_shm_bytes
from emu.mem.pagepool import PoolParams
from emu.mem.shm import SHM_DIR, ShmSpaceError, new_run_prefix, shm_free_bytes, sweep_stale, unlink_prefix
from emu.net.protocol import DEVICE_BIT, LINK_DOWN_BIT, Cmd, ProcState, device_code, transit_code
from emu.net.shmring import RING_BYTES, MsgRing
from emu.run import capture, expect, launch, pools
from emu.run import report as rep
from emu.run.process import ProcSpec, cpu_seconds, read_last_words
from emu.run.procname import process_name
from emu.run.stats import StatsTable
from emu.topology.model import Endpoint, HostConfig, Topology
from workers import cpu as cpu_worker
from workers import device as device_worker
from workers import traffic as traffic_worker

READY_TIMEOUT = 60.0  # spawning a dozen Python processes on a loaded 2-core machine can take a while
DRAIN_STALL = 3.0  # seconds without progress after which traffic is declared settled
STALL_WARN_S = 1.0  # between "stalled pool shutdown" warnings (the kernel's DEFER_WARN_INTERVAL is 60 s)
HUNG_NS = 15_000_000_000  # this long without a heartbeat: declared hung and killed (generous: 2 loaded cores)


class RunError(ProcessFailure, RuntimeError):
    """A run could not start or a process failed; the message says which and why."""


@dataclass
class RunOptions:
    count: int | None = None  # overrides every generator's count
    duration: float | None = None
    interval: float = 2.0
    extended: bool = False
    quiet: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    # Workers raise InjectedFault where they are when sent SIGUSR1, as a bug would (tests; off unless
    # asked for, or ``EMU_FAULT_INJECTION=1`` in the environment of `emu run` / `emu host`).
    fault_injection: bool = field(default_factory=lambda: os.environ.get("EMU_FAULT_INJECTION") == "1")
    # With the topology's `capture`: print each captured frame's line (``emu capture``) instead of files.
    capture_printer: Callable[[str], None] | None = None


@dataclass
class Proc:
    kind: str
    key: str
    process: multiprocessing.process.BaseProcess
    last_words: str = ""  # the file its last words go to

    @property
    def name(self) -> str:
        """Its name in ``ps``, the events and the report: ``h1/cpu0``, ``h1:eth1``, ``gen0``."""
        return process_name(self.kind, self.key)


def death(code: int) -> str:
    """How a process ended, from its exit code: ``signal 9`` (SIGKILL) or ``exit code 1``."""
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def generators_done(topo: Topology, count: int | None, done: Callable[[str], bool]) -> bool:
    """Whether every cabled generator has sent its count (`count` overrides the topology's) or run its
    schedule to the end; False while any runs without either.  `done(name)` says whether that generator
    has finished."""
    gens = [n for n, p in topo.traffic.items()
            if (p.generate is not None or p.replay is not None)
            and topo.peer_of(Endpoint("traffic", None, n)) is not None]
    if not gens:
        return False
    for n in gens:
        gen = topo.traffic[n].generate or topo.traffic[n].replay
        if not gen.ends(count):
            return False  # runs until stopped
        if not done(n):
            return False
    return True


def settle_stall(topo: Topology) -> float:
    """Seconds without progress after which traffic counts as settled: `DRAIN_STALL`, plus the longest a
    frame can stay on one of the topology's links once sent (its ``delay`` + ``jitter``, and one message's
    serialisation at its ``rate``), so that frames still on an impaired wire (``delay: 10s`` is allowed)
    are waited for instead of being reported unaccounted."""
    from emu.net.link import LINK_BYTES

    on_wire = 0.0
    for link in topo.links:
        imp = link.impair
        wire = (imp.delay_us + imp.jitter_us) / 1e6
        if imp.rate_bps:
            wire += LINK_BYTES * 8 / imp.rate_bps
        on_wire = max(on_wire, wire)
    return DRAIN_STALL + on_wire


def wait_settled(step: Callable[[], None], snapshot: Callable[[], rep.Snapshot], in_transit: Callable[[], int],
                 stall: float, stop: Callable[[], bool] = lambda: False) -> None:
    """After QUIESCE (one host or many): until every generated packet is delivered, dropped or consumed
    and no page carries one, or until the totals stop moving for `stall` seconds (`settle_stall`), or
    `stop()` (a new Ctrl-C or SIGTERM).  `step` waits a little and watches the processes (or hosts)."""
    last_sig, last_change = None, time.monotonic()
    while True:
        s = snapshot()
        if s.unaccounted() == 0 and in_transit() == 0:
            return
        if stop():
            return
        sig = (s.delivered(), s.dropped(), s.consumed())
        now = time.monotonic()
        if sig != last_sig:
            last_sig, last_change = sig, now
        elif now - last_change > stall:
            return
        step()


def pages_pending(pm: PageMemory, hname: str, holders: Mapping[int, str]) -> dict[str, int]:
    """Pages of host `hname` out of their pools and held by one of `holders` (holder code -> process
    key: the live processes), by the pool that owns them (``h1/cpu0``; ``h1/no pool`` for
    ``xdpf_clone`` copies): what ``page_pool_release_retry`` still waits for.  A page a dead process
    held is not waited for: nobody will return it, `emu.mem.reclaim` does."""
    st = pm.state.copy()
    holder = pm.holder.copy()
    owner = pm.owner.copy()
    waiting = ~HOME[st] & np.isin(holder, np.fromiter(holders, dtype=np.int64, count=len(holders)))
    out = {f"{hname}/cpu{c}": int(np.count_nonzero(waiting & (owner == c))) for c in range(pm.ncpus)}
    out[f"{hname}/no pool"] = int(np.count_nonzero(waiting & ((owner < 0) | (owner >= pm.ncpus))))
    return out


def stalled_warning(pool_id: int, inflight: int, sec: int, where: str) -> str:
    """The kernel's warning for a pool whose shutdown waits on pages in flight, in its format
    (``page_pool_release_retry``: ``"%s() stalled pool shutdown: id %u, %d inflight %d sec"``), with the
    pool's place in the run in parentheses: `pool_id` is its id as ``emu pools`` and the report's
    ``page_pools`` show it (0 for pages of no pool, ``xdpf_clone`` copies), `where` is ``h1/cpu0``."""
    return f"page_pool_release_retry() stalled pool shutdown: id {pool_id}, {inflight} inflight {sec} sec ({where})"


def wait_pools_released(pending: Callable[[], dict[str, int]], downed: Callable[[], bool],
                        step: Callable[[], None], warn: Callable[[str], None], stop: Callable[[], bool],
                        clock: Callable[[], float] = time.monotonic,
                        pool_ids: Mapping[str, int] | None = None) -> bool:
    """After DOWN (``page_pool_release_retry``): until every live CPU and device has acknowledged DOWN
    (`downed`: no CPU refills an RX ring any more, every device handed its posted buffers back) and
    no page is out with a live holder (`pending`, by pool).  Both are needed: a CPU pass begun before
    DOWN may post a whole ring after every page was seen home.  No time limit: while pages are out
    their holders are alive (`step` watches the processes, and a dead or hung one's pages stop being
    waited for), so they come home; every `STALL_WARN_S` the pools still waiting are named to `warn`,
    in the kernel's words (`stalled_warning`, with each pool's id from `pool_ids` by `pending`'s key).
    Returns False when `stop()` (a new Ctrl-C or SIGTERM) ended the wait first."""
    start = clock()
    next_warn = start + STALL_WARN_S
    while True:
        out = pending()
        if downed() and not any(out.values()):
            return True
        if stop():
            return False
        now = clock()
        if now >= next_warn:
            for key, n in out.items():
                if n:
                    warn(stalled_warning((pool_ids or {}).get(key, 0), n, int(now - start), key))
            next_warn = now + STALL_WARN_S
        step()


def ring_pairs(host: HostConfig) -> list[tuple[str, str]]:
    """Producer -> consumer pairs of a host's shared-memory rings: each CPU with each device, both ways,
    and each CPU to each other CPU (skbs freed on the stack CPU)."""
    cpus = [f"cpu{c}" for c in range(host.cpus)]
    pairs = [(c, d) for c in cpus for d in host.devices] + [(d, c) for c in cpus for d in host.devices]
    return pairs + [(a, b) for a in cpus for b in cpus if a != b]


RUN_SHM_BYTES = 1 << 20  # a run's stats table and BPF maps, besides its hosts' page memory and rings


def host_shm_bytes(host: HostConfig) -> int:
    """Bytes of ``/dev/shm`` one host's page memory and rings take (a container's ``shm_size`` is sized
    from it, `emu.deploy.plan`)."""
    return (required_shm_bytes(host.pages, host.page_size, host.cpus, pool_params(host))
            + len(ring_pairs(host)) * (RING_BYTES + 4096))


def pool_params(host: HostConfig) -> PoolParams:
    p = host.pool
    return PoolParams(p.cache_size, p.refill, p.pool_size, p.recycle_limit, p.policy, p.frag_size)


class Console:
    """What a run says: live lines and the summary on `opts.out`, events (kept for the report) on stderr."""

    opts: RunOptions
    events: list[str]

    def say(self, text: str) -> None:
        if not self.opts.quiet:
            print(text, file=self.opts.out, flush=True)

    def event(self, text: str) -> None:
        self.events.append(text)
        print(f"emu: {text}", file=sys.stderr, flush=True)


class Run(Console):
    """One run of a topology on this machine, in phases:

    ``prepare()``  create the shared memory: page memories and pools, stats table, rings, BPF maps;
    ``start()``    spawn every process, wait until all are ready, START (``launch()`` then ``go()``);
    ``quiesce()``  QUIESCE, and wait until traffic settles;
    ``teardown()`` DOWN and wait for the pages home (``down()``), EXIT and join (``exit()``);
    ``reclaim()``  give back what dead processes stranded (`emu.mem.reclaim`);
    ``report()``   the final report, built from the run's `record()` (a `report.RunRecord`).

    `run()` is these in order (with `main_loop` between start and quiesce), under its own Ctrl-C and
    SIGTERM handling; `end()` is quiesce to report.  Whoever drives the phases itself calls `abort()`
    when one raises and `cleanup()` at the end, as `run()` does.  Between the phases, `check_procs`
    (from every waiting loop) notices dead and hung processes and takes them offline.
    """

    def __init__(self, topo: Topology, opts: RunOptions | None = None) -> None:
        self.topo = topo
        self.all_traffic = topo.traffic  # every port of the topology (a host agent's Run has its own part)
        self.opts = opts or RunOptions()
        self.prefix = new_run_prefix()
        self.run_dir = ""
        self._links: dict[str, str] | None = None
        self.pms: dict[str, PageMemory] = {}
        self.mapsets: list = []
        self.rings: list[MsgRing] = []
        self.ring_names: dict[str, dict[str, str]] = {}  # host -> {"cpu0>eth1": segment name}
        # endpoint -> (ring it transmits into, ring it receives from), for links with both ends here
        self.link_rings: dict[str, tuple[str, str]] = {}
        self.table: StatsTable | None = None
        self.procs: list[Proc] = []
        self.events: list[str] = []
        self.created_ns = time.monotonic_ns()
        self.started_ns = 0
        self.cpu_at_start: dict[str, tuple[str, float]] = {}
        self.cpu_used: dict[str, tuple[str, float]] = {}
        self.settled_ns = 0
        self.stalled: list[str] = []
        self.interrupted = False
        self.signals = 0  # Ctrl-Cs and SIGTERMs so far: one during a teardown's wait ends that wait
        self.dead: set[str] = set()
        # The processes that died, by name: how, and their last words ("failures" in the report).
        self.failures: list[dict] = []
        self.ending = False  # a process whose loss the run cannot go on without died: end it now
        self.role = "coordinator"  # this process's name in the report's `processes`
        self.dead_pools: list[tuple[str, int]] = []  # (host, cpu) of dead CPUs, whose pools we destroyed
        self.dead_links: list[reclaim.DeadLink] = []  # cables of dead devices
        self.offline: dict[str, int] = {}
        self.lost = 0  # packets in pages reclaimed from dead processes
        self.audits = 0  # conservation audits taken while traffic ran
        self.audit_problems: list[str] = []
        self.keys_dir: str | None = None  # CURVE keys for links that leave the machine
        # The page tables sampled while traffic runs, for the report's in-flight and pool-memory metrics
        # (at the end every page is home, so only samples show them).
        self.samples: list[rep.PageSample] = []
        self.next_sample = 0.0
        self.capture: capture.CaptureSession | None = None  # `capture` of the topology (emu.run.capture)
        self.captured: list[dict] = []  # what the capture wrote, once closed

    def tick(self) -> None:
        """Called from every waiting loop; a host agent services its coordinator channel here."""

    # -- set-up -----------------------------------------------------------------------------------

    def check_space(self) -> None:
        need = sum(host_shm_bytes(host) for host in self.topo.hosts.values()) + RUN_SHM_BYTES
        free = shm_free_bytes()
        if need > free:
            raise ShmSpaceError(
                28, f"{SHM_DIR} has {free:,} bytes free but topology {self.topo.name!r} needs {need:,} bytes; "
                "give it more (docker: --shm-size / shm_size) or use fewer pages"
            )

    def prepare(self) -> None:
        """The first phase: create the run's shared memory (each host's page memory and pools, the stats
        table, the rings between its processes and of the cables with both ends here, the programs' BPF
        maps).  Nothing runs yet."""
        from emu.xdp import runtime as xdp_runtime

        sweep_stale()
        self.check_space()
        self.run_dir = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        rows: list[tuple[str, str]] = []
        ids = pools.pool_identities(self.topo.hosts.values())
        for hname, host in self.topo.hosts.items():
            pm = self.pms[hname] = PageMemory.create(
                f"{self.prefix}-{hname}", host.pages, host.page_size, host.cpus, pool_params(host),
                multibuf=host.multibuf,
            )
            for c in range(host.cpus):  # the pools' netlink identities (`emu.run.pools`)
                ident = ids[(hname, c)]
                pagepool.page_pool_list(pm, c, ident.id, ident.ifindex, ident.napi_id)
            rows += [("cpu", f"{hname}/cpu{c}") for c in range(host.cpus)]
            rows += [("device", f"{hname}/{d}") for d in host.devices]
        rows += [("traffic", name) for name in self.topo.traffic]
        self.table = StatsTable.create(f"{self.prefix}-stats", rows)
        for hname, host in self.topo.hosts.items():
            names = self.ring_names[hname] = {}
            for src, dst in ring_pairs(host):
                name = names[f"{src}>{dst}"] = f"{self.prefix}-{hname}-ring-{src}-{dst}"
                self.rings.append(MsgRing.create(name))
        # A cable between two processes of this machine is a pair of rings, one per direction (the link
        # socket stays, for doorbells, strangers and cables to other hosts).
        for k, link in enumerate(self.topo.links):
            if self.is_local(link.a) and self.is_local(link.b):
                ab, ba = f"{self.prefix}-link{k}-ab", f"{self.prefix}-link{k}-ba"
                self.rings += [MsgRing.create(ab), MsgRing.create(ba)]
                self.link_rings[str(link.a)] = (ab, ba)
                self.link_rings[str(link.b)] = (ba, ab)
        self.maps: dict[str, dict[str, str]] = {}
        for hname, host in self.topo.hosts.items():
            names, sets = xdp_runtime.create_maps(f"{self.prefix}-{hname}", host)
            self.maps[hname] = names
            self.mapsets += sets
        if self.topo.capture is not None:
            self.capture = capture.CaptureSession(self.topo, self.prefix, self.opts.capture_printer)
            self.capture.prepare()
            self.capture.start()

    def endpoints(self) -> dict:
        d = self.run_dir
        ep: dict = {"hosts": {}, "link": {}}
        for hname, host in self.topo.hosts.items():
            ep["hosts"][hname] = {
                "cpu": {c: f"ipc://{d}/{hname}-cpu{c}" for c in range(host.cpus)},
                "device": {dev: f"ipc://{d}/{hname}-{dev}" for dev in host.devices},
                "rings": dict(self.ring_names.get(hname, {})),
            }
            for dev in host.devices:
                ep["link"][f"{hname}:{dev}"] = f"ipc://{d}/{hname}-{dev}.link"
        for name in self.topo.traffic:
            ep["link"][name] = f"ipc://{d}/tp-{name}.link"
        return ep

    def link_of(self, endpoint: str) -> tuple[str | None, str | None]:
        """(address this endpoint binds for its link ingress, its peer's ingress address)."""
        peer = self.topo.peer_of(Endpoint.parse(endpoint))
        if peer is None:
            return None, None
        if self._links is None:
            self._links = self.endpoints()["link"]
        return self._links[endpoint], self._links[str(peer)]

    def link_ring_eps(self, endpoint: str) -> dict[str, str]:
        """The link rings of `endpoint`, as its spec's endpoints (none for a cable to another host)."""
        rings = self.link_rings.get(endpoint)
        return {} if rings is None else {"link_ring_out": rings[0], "link_ring_in": rings[1]}

    def impair_of(self, endpoint: str) -> object | None:
        """The impairment of the link `endpoint` sends on, for its LinkShaper (None: a perfect wire)."""
        link = self.topo.link_of(Endpoint.parse(endpoint))
        return link.impair if link is not None and link.impair.active else None

    def is_local(self, ep: Endpoint) -> bool:
        """Whether an endpoint runs in this process group (always, for a run of a whole topology)."""
        return ep.name in self.topo.traffic if ep.kind == "traffic" else ep.host in self.topo.hosts

    def spawn(self) -> None:
        assert self.table is not None
        mp = launch.worker_context()
        ep = self.endpoints()
        rows = self.table.specs()
        core = 0
        common = dict(stats_name=self.table.seg.name, stats_rows=rows, parent_pid=os.getpid())
        specs: list[tuple[ProcSpec, object]] = []
        for hname, host in self.topo.hosts.items():
            hep = ep["hosts"][hname]
            for c in range(host.cpus):
                pinned = host.cpu_affinity[c] if host.cpu_affinity else core
                core += 1
                spec = ProcSpec(
                    "cpu", f"{hname}/cpu{c}", host=host, host_prefix=f"{self.prefix}-{hname}", cpu=c,
                    core=pinned, endpoints=dict(hep), maps=self.maps[hname], **common,
                )
                specs.append((spec, cpu_worker.main))
            for dev in host.devices:
                bind, peer = self.link_of(f"{hname}:{dev}")
                spec = ProcSpec(
                    "device", f"{hname}/{dev}", host=host, host_prefix=f"{self.prefix}-{hname}", device=dev,
                    endpoints=dict(hep, link_bind=bind, link_peer=peer, **self.link_ring_eps(f"{hname}:{dev}")),
                    options={"impair": self.impair_of(f"{hname}:{dev}"), "keys_dir": self.keys_dir}, **common,
                )
                specs.append((spec, device_worker.main))
        for name, port in self.topo.traffic.items():
            bind, peer = self.link_of(name)
            if bind is None:
                bind = ep["link"][name]
            spec = ProcSpec(
                "traffic", name, port=port,
                endpoints={"link_bind": bind, "link_peer": peer, **self.link_ring_eps(name)},
                options={"count": self.opts.count, "impair": self.impair_of(name), **self.replay_options(name)},
                **common,
            )
            specs.append((spec, traffic_worker.main))
        for spec, target in specs:
            spec.last_words = os.path.join(self.run_dir, spec.key.replace("/", "-") + ".last-words")
            spec.options["fault_injection"] = self.opts.fault_injection
            cap = None if self.capture is None else self.capture.options_for(spec.key)
            if cap is not None:
                spec.options["capture"] = cap
            p = mp.Process(target=target, args=(spec,), name=f"emu-{spec.key}", daemon=True)
            p.start()
            self.procs.append(Proc(spec.kind, spec.key, p, spec.last_words))

    def replay_options(self, name: str) -> dict:
        """What traffic port `name` needs to account for replayed frames (`emu.net.replay`): every replay
        port's file and loop count, and where to write its golden-file comparison."""
        replays = [(p.replay.pcap, p.replay.loop, p.replay.dst_mac, p.replay.src_mac)
                   for p in self.all_traffic.values() if p.replay is not None]
        out: dict = {"replays": replays} if replays else {}
        if self.topo.traffic[name].expect is not None:
            out["expect_out"] = os.path.join(self.run_dir, f"{name}.expect.json")
        return out

    def processes(self) -> dict[str, int]:
        """Name -> pid of this run's processes (this one under its `role`), for the report."""
        pids = {self.role: os.getpid()}
        pids.update({p.name: p.process.pid for p in self.procs if p.process.pid is not None})
        return pids

    def wait_ready(self) -> None:
        assert self.table is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            states = {p.key: self.table.read(p.key)["state"] for p in self.procs}
            self.check_procs()
            if all(s >= ProcState.READY for s in states.values()) or self.interrupted:
                return
            if time.monotonic() > deadline:
                late = [k for k, s in states.items() if s < ProcState.READY]
                raise RunError(f"processes not ready after {READY_TIMEOUT:.0f} s: {', '.join(late)}")
            self.tick()
            time.sleep(0.01)

    def check_procs(self) -> None:
        """Notice dead or hung processes.  Once traffic started, a CPU worker's or a device's death is
        survived (its RX queues or its link go offline and its pages are reclaimed) and a traffic port's
        ends the run in order; before, any death ends the run with an error.  Either way the process
        is named with its last words, and the run's exit status is 3."""
        assert self.table is not None
        now = time.monotonic_ns()
        for p in self.procs:
            if p.key in self.dead:
                continue
            code = p.process.exitcode
            hung = None
            row = self.table.read(p.key)
            if code is None and row["state"] >= ProcState.READY:
                beat = row["heartbeat_ns"]
                if now - beat > HUNG_NS:
                    hung = f"sent no heartbeat for {(now - beat) / 1e9:.1f} s"
                    self.event(f"{p.kind} {p.key} {hung}: killing it")
                    p.process.kill()
                    p.process.join(5)
                    code = p.process.exitcode
            if code is None or (code == 0 and row["cmd"] >= Cmd.EXIT):
                continue
            words = self.failed(p, code, hung)
            if not self.started_ns:
                raise RunError(f"{p.kind} process {p.name} died ({death(code)}): {words}")
            if p.kind == "cpu":
                self.cpu_died(p, code)
            elif p.kind == "device":
                self.device_died(p, code)
            else:
                self.traffic_died(p, code)

    def failed(self, proc: Proc, code: int, hung: str | None = None) -> str:
        """Record a dead process for the report and say its last words; returns them.  A process killed
        by a signal says none: its last words are the signal's name."""
        words = read_last_words(proc.last_words) or hung or (
            f"killed by {signal_name(code)}" if code < 0 else "exited without a word")
        self.failures.append({"process": proc.name, "kind": proc.kind, "pid": proc.process.pid,
                              "status": death(code), "last_words": words})
        self.event(f"{proc.name} (pid {proc.process.pid}) died: {words}")
        return words

    def traffic_died(self, proc: Proc, code: int) -> None:
        """A traffic port is gone: its link goes down and the run ends in order (what it generated and
        what was on its way to it can no longer be accounted for)."""
        self.dead.add(proc.key)
        self.event(f"traffic port {proc.key} died ({death(code)}): its link goes down; ending the run")
        peer = self.topo.peer_of(Endpoint("traffic", None, proc.key))
        if peer is not None and peer.kind == "device" and self.is_local(peer):
            self.link_down(f"{peer.host}/{peer.name}")
        self.ending = True

    def cpu_died(self, proc: Proc, code: int) -> None:
        """A CPU worker is gone: take its CPU offline everywhere, then reclaim every page it owned or held.

        Devices first drop its RX queues' posted buffers and move its TX completions to a live CPU, and
        every process acknowledges; only then are the page table's pages that name the dead CPU as their
        holder or owner reclaimed, so no live process still uses a page the coordinator frees.
        """
        assert self.table is not None
        self.dead.add(proc.key)
        hname, cpu_s = proc.key.split("/")
        cpu = int(cpu_s[3:])
        host = self.topo.hosts[hname]
        pm = self.pms[hname]
        self.event(f"cpu {proc.key} died ({death(code)}): taking it offline")
        self._offline(hname, cpu, {})
        got = reclaim.reclaim_cpu(pm, cpu)
        self.dead_pools.append((hname, cpu))
        self.lost += got.packets
        queues = [f"{d}:{q}" for d, dev in host.devices.items() for q in range(dev.rx_queues)
                  if dev.rx_cpus[q] == cpu]
        self.event(f"cpu {proc.key}: reclaimed {got.pages} pages ({got.packets} carried packets, counted lost); "
                   f"RX queues {', '.join(queues) or 'none'} offline; its TX completions moved to live CPUs")

    def _offline(self, hname: str | None, bit: int, extra: dict[str, int]) -> None:
        """Add `bit` to a host's offline mask, tell every live process of the host (and `extra` rows,
        e.g. a dead device's link peer, their own values), and wait until each has applied it.  With
        `hname` None only the `extra` rows are told."""
        assert self.table is not None
        want: dict[str, int] = {}
        if hname is not None:
            self.offline[hname] = self.offline.get(hname, 0) | (1 << bit)
            mask = self.offline[hname]
            want = {p.key: mask for p in self.procs if p.key.startswith(hname + "/") and p.key not in self.dead}
        for key, value in extra.items():
            if key not in self.dead:
                want[key] = want.get(key, 0) | value
        for key, value in want.items():
            want[key] = value = value | self.table.read(key)["offline"]
            self.table.set_word(key, "offline", value)
        deadline = time.monotonic() + 10.0
        while any(self.table.read(k)["offline_ack"] != v for k, v in want.items()):
            if time.monotonic() > deadline:
                late = [k for k, v in want.items() if self.table.read(k)["offline_ack"] != v]
                raise RunError(f"{', '.join(late)} did not acknowledge the loss of a process")
            self.tick()
            time.sleep(0.005)
        time.sleep(0.05)  # messages already on their way to the dead process have landed in its socket

    def device_died(self, proc: Proc, code: int) -> None:
        """A device is gone: its link goes down (the peer counts what it can no longer send), CPUs stop
        posting and transmitting to it (redirects to it become redirect_err), and the pages it held —
        posted RX buffers, frames queued or awaiting TX completion — are reclaimed."""
        assert self.table is not None
        self.dead.add(proc.key)
        hname, dname = proc.key.split("/")
        host = self.topo.hosts[hname]
        index = list(host.devices).index(dname)
        self.event(f"device {proc.key} died ({death(code)}): its link goes down")
        peer = self.topo.peer_of(Endpoint("device", hname, dname))
        extra: dict[str, int] = {}
        peer_key = None
        if peer is not None and not self.is_local(peer):
            self.remote_link_down(str(peer))
            peer = None
        if peer is not None:
            peer_key = str(peer) if peer.kind == "traffic" else f"{peer.host}/{peer.name}"
            extra[peer_key] = 1 << LINK_DOWN_BIT
        self._offline(hname, DEVICE_BIT + index, extra)
        got = reclaim.reclaim_device(self.pms[hname], device_code(index))
        self.lost += got.packets
        self.dead_links.append(reclaim.DeadLink(proc.key, peer_key, None if peer is None else peer.kind))
        self.event(f"device {proc.key}: reclaimed {got.pages} pages; {got.packets} queued frames lost; "
                   f"link to {peer} down")

    def remote_link_down(self, endpoint: str) -> None:
        """The peer of a dead device runs on another host (only in a host agent's run, which tells the
        coordinator)."""

    def link_down(self, key: str) -> None:
        """The far end of this row's link is gone (a device on a lost host): carrier down."""
        self.event(f"{key}: link peer lost: carrier down")
        self._offline(None, 0, {key: 1 << LINK_DOWN_BIT})

    def wire_losses(self) -> int:
        """Frames lost on dead devices' cables so far (`reclaim.wire_losses`)."""
        table = self.table
        assert table is not None
        return reclaim.wire_losses(self.dead_links, table.read, self.dead)

    # -- the run ----------------------------------------------------------------------------------

    def generators_done(self) -> bool:
        table = self.table
        assert table is not None
        return generators_done(self.topo, self.opts.count, lambda n: table.read(n)["state"] >= ProcState.DONE)

    def snapshot(self) -> rep.Snapshot:
        assert self.table is not None
        return rep.snapshot(self.table, time.monotonic(), self.lost + self.wire_losses())

    def _on_signal(self, signum: int, frame: object) -> None:
        self.interrupt()

    def interrupt(self) -> None:
        """End the run the orderly way at the next check (what Ctrl-C and SIGTERM do): safe from a
        signal handler, as it only sets a flag."""
        self.interrupted = True
        self.signals += 1

    # -- the phases ---------------------------------------------------------------------------------
    # run() = prepare, start, main_loop, end (= quiesce, teardown, reclaim, report).  A caller driving the
    # phases itself (a host agent, a test injecting a fault) calls them in this order and, whatever
    # happens, `abort` on an exception and `cleanup` at the end, as `_run` does.

    def run(self) -> dict:
        """Prepare, start, run, end; returns the final report.  Always cleans up.

        Ctrl-C or SIGTERM at any point ends the run the orderly way: quiesce, bring devices down, wait
        for the pages, report what ran.  SIGTERM is what ``docker stop``, systemd and ``timeout`` send, so
        it must not kill the run half-way: its processes would be left to notice on their own, and no
        report would say what ran.
        """
        self.interrupted = False
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(self) -> dict:
        try:
            self.prepare()
            self.start()
            self.main_loop()
            return self.end()
        except BaseException:
            self.abort()
            raise
        finally:
            self.cleanup()

    def start(self) -> None:
        """Spawn every process, wait until all are ready, start the traffic (`launch`, then `go`)."""
        self.launch()
        self.go()

    def launch(self) -> None:
        """Spawn every process and wait until all are ready (a host agent cables its links to other hosts
        after this, before `go`)."""
        self.spawn()
        self.wait_ready()

    def go(self) -> None:
        """START: generators begin.  From here a process's death is survived (`check_procs`)."""
        assert self.table is not None
        self.say(rep.banner(self.topo))
        self.started_ns = time.monotonic_ns()
        self.cpu_at_start = self.cpu_times()
        self.table.command_all(Cmd.START)

    def cpu_times(self) -> dict[str, tuple[str, float]]:
        """Process key -> (kind, CPU seconds used so far), for every live worker process."""
        out = {}
        for p in self.procs:
            s = None if p.process.pid is None else cpu_seconds(p.process.pid)
            if s is not None:
                out[p.key] = (p.kind, s)
        return out

    @property
    def started(self) -> bool:
        """Whether `go` has run: the run has traffic to end and report on."""
        return self.started_ns != 0

    def sample_pages(self, force: bool = False) -> None:
        """Sample the page tables (`report.sample_pages`) if `report.SAMPLE_PERIOD` has passed since the
        last sample (or `force`), from START until traffic has settled (the run's `elapsed`).  Called by
        every loop that waits while traffic runs: the main loop, settling, a host agent's message loop."""
        now = time.monotonic()
        if not self.started or self.settled_ns or not self.pms or (now < self.next_sample and not force):
            return
        self.next_sample = now + rep.SAMPLE_PERIOD
        # With the time since START and the packets delivered so far: the report's time series.
        delivered = rep.snapshot(self.table, now).delivered() if self.table is not None else 0
        self.samples.append(rep.sample_pages(self.pms, (time.monotonic_ns() - self.started_ns) / 1e9, delivered))

    def quiesce(self, settle: bool = True) -> None:
        """QUIESCE: generators stop; unless `settle` is False (a multi-host run's coordinator judges that
        across hosts, or the run must end now), wait until every generated packet is accounted for or
        nothing moves any more."""
        assert self.table is not None
        # At least one sample, however short the run (a few thousand packets end before the first period).
        self.sample_pages(force=True)
        self.table.command_all(Cmd.QUIESCE)
        if settle:
            self.wait_settled()

    def teardown(self) -> None:
        """After `quiesce`: bring devices down and wait for the pages (`down`), then everyone exits
        (`exit`)."""
        self.down()
        self.exit()

    def down(self) -> None:
        """DOWN (``ndo_stop``): devices hand posted buffers back and deliver outstanding TX completions;
        wait for every page to come home (``page_pool_release_retry``), warning while some stay out."""
        assert self.table is not None
        self.settled_ns = time.monotonic_ns()
        # CPU time each process used while traffic ran (START to settled), for the report's cpu_time_s.
        self.cpu_used = {key: (kind, s - self.cpu_at_start[key][1])
                         for key, (kind, s) in self.cpu_times().items() if key in self.cpu_at_start}
        self.table.command_all(Cmd.DOWN)
        self.wait_pages_home()

    def exit(self) -> None:
        """EXIT: CPU workers destroy their pools and every process exits; join them (killing stragglers)."""
        assert self.table is not None
        self.table.command_all(Cmd.EXIT)
        self.join()

    def reclaim(self) -> None:
        """After `exit`: what dead processes stranded goes home (`emu.mem.reclaim`).  Dead CPUs' pools are
        destroyed again (pages came back to their rings since), then, if anything died, every page still
        out is returned, counting the packets it carried as lost, and pages a kill left marked as pooled
        but in no pool are freed.  Without a death, pages still out are a leak, left for the audit."""
        for hname, cpu in self.dead_pools:
            reclaim.drain_pools(self.pms[hname], [cpu])
        if not self.dead:
            return
        for hname, pm in self.pms.items():
            got = reclaim.reclaim_stranded(pm)
            self.lost += got.packets
            if got.pages:
                self.event(f"{hname}: reclaimed {got.pages} pages stranded by dead processes "
                           f"({got.packets} carried packets, counted lost)")
            torn = reclaim.free_torn(pm)
            if torn:
                self.event(f"{hname}: {torn} pages a killed process left marked as pooled but in no "
                           "pool went back to the page allocator")

    def record(self) -> rep.RunRecord:
        """The run's record for its report: the final counters, the strict audit of every host's pages,
        and what happened.  After `reclaim`."""
        final = self.snapshot()
        firsts = [final.rows[k]["first_rx_ns"] for k in final.keys("traffic") if final.rows[k]["first_rx_ns"]]
        first = (min(firsts) - self.created_ns) / 1e9 if firsts else None
        from emu.xdp import runtime as xdp_runtime

        return rep.RunRecord(
            topology=self.topo,
            final=final,
            elapsed=(self.settled_ns - self.started_ns) / 1e9,
            first_packet_s=first,
            pages={h: rep.HostPages.of(pm, pagepool.audit(pm, strict=True)) for h, pm in self.pms.items()},
            maps=xdp_runtime.snapshot_maps(self.mapsets),
            live_audits=self.audits,
            audit_problems=list(self.audit_problems),
            events=list(self.events),
            failures=list(self.failures),
            processes=self.processes(),
            stalled=list(self.stalled),
            dead=sorted(self.dead),
            samples=list(self.samples),
            cpu_s=dict(self.cpu_used),
        )

    def report(self) -> dict:
        """Build the final report from the run's record, and print its summary."""
        report = rep.build_report(self.record())
        lines = expect.attach(report, self.topo, self.run_dir)
        lines += self.close_capture(report)
        self.say(rep.summary(report) + "".join(f"\n{line}" for line in lines))
        return report

    def end(self, settle: bool = True) -> dict:
        """End a started run from wherever it is: quiesce (settling unless told not to), teardown,
        reclaim, report."""
        self.quiesce(settle)
        self.teardown()
        self.reclaim()
        return self.report()

    def main_loop(self) -> None:
        opts = self.opts
        start = time.monotonic()
        last = self.snapshot()
        next_line = start + opts.interval
        try:
            while not self.interrupted and not self.ending:
                time.sleep(0.02)
                self.check_procs()
                self.sample_pages()
                now = time.monotonic()
                if now >= next_line:
                    self.audit_live()
                    cur = self.snapshot()
                    self.say(rep.interval_lines(self.topo, last, cur, opts.extended))
                    last, next_line = cur, now + opts.interval
                if opts.duration is not None and now - start >= opts.duration:
                    break
                if opts.duration is None and self.generators_done():
                    break
        except KeyboardInterrupt:
            self.interrupted = True
        if self.interrupted:
            self.event("interrupted: tearing down and reporting what ran")

    def audit_live(self) -> None:
        """Page conservation while traffic runs (the state histogram; exact structures only at the end)."""
        for hname, pm in self.pms.items():
            audit = pagepool.audit(pm, strict=False)
            self.audits += 1
            if not audit.ok:
                for prob in audit.problems:
                    self.audit_problems.append(f"{hname}: {prob}")
                    self.event(f"audit: {hname}: {prob}")

    def wait_settled(self) -> None:
        """After QUIESCE: until every generated packet is accounted for, or nothing moves (for longer than
        a frame can stay on the wire), or a new Ctrl-C or SIGTERM."""
        signals = self.signals

        def step() -> None:
            time.sleep(0.02)
            self.check_procs()
            self.sample_pages()

        wait_settled(step, self.snapshot, self.in_transit, settle_stall(self.topo), lambda: self.signals != signals)

    def in_transit(self) -> int:
        """Pages carrying packets (received, queued or awaiting TX completion)."""
        n = 0
        for pm in self.pms.values():
            st = pm.state
            n += int(((st == PageState.XDP) | (st == PageState.TX_QUEUED) | (st == PageState.TX_INFLIGHT)
                      | (st == PageState.SKB)).sum())
        return n

    def wait_pages_home(self) -> None:
        """After DOWN: every live CPU and device acknowledged it and every page they hold came home
        (`wait_pools_released`); a new Ctrl-C or SIGTERM stops waiting."""
        table = self.table
        assert table is not None
        signals = self.signals
        watched = [p for p in self.procs if p.kind in ("cpu", "device")]

        def pending() -> dict[str, int]:
            out: dict[str, int] = {}
            for hname, pm in self.pms.items():
                out.update(pages_pending(pm, hname, self.live_holders(hname)))
            return out

        def downed() -> bool:
            return all(table.read(p.key)["state"] >= ProcState.DOWN for p in watched if p.key not in self.dead)

        def step() -> None:
            self.check_procs()
            self.tick()
            time.sleep(0.02)

        def warn(msg: str) -> None:
            self.stalled.append(msg)
            self.event(msg)

        # The pools' ids as `emu pools` and the report show them (`pages_pending`'s keys; no pool: 0).
        ids = {f"{hname}/cpu{c}": int(pm.pool_ctl[c][pagepool.P_ID])
               for hname, pm in self.pms.items() for c in range(pm.ncpus)}
        if not wait_pools_released(pending, downed, step, warn, lambda: self.signals != signals, pool_ids=ids):
            left = sum(pending().values())
            self.event(f"interrupted during the shutdown: pools destroyed with {left} pages still in flight")

    def live_holders(self, hname: str) -> dict[int, str]:
        """Holder code -> key of the live CPUs and devices of host `hname` (see `emu.net.protocol`)."""
        host = self.topo.hosts[hname]
        codes = {c: f"{hname}/cpu{c}" for c in range(host.cpus)}
        codes.update({device_code(i): f"{hname}/{d}" for i, d in enumerate(host.devices)})
        # Pages on their way from a device to a CPU are the CPU's to wait for: it takes the message, or,
        # the device dead, takes them back itself (`NapiCore.reclaim_transit`).
        codes.update({transit_code(i, c): f"{hname}/cpu{c}"
                      for i in range(len(host.devices)) for c in range(host.cpus)})
        local = {p.key for p in self.procs}
        return {code: key for code, key in codes.items() if key in local and key not in self.dead}

    def join(self) -> None:
        """After EXIT: until every process has exited.  One still there once it sent no heartbeat for
        `HUNG_NS` (or after a new Ctrl-C or SIGTERM) is killed and counted dead, so that `reclaim` takes
        back what it held."""
        table = self.table
        assert table is not None
        signals = self.signals
        since = time.monotonic_ns()
        while True:
            alive = [p for p in self.procs if p.process.is_alive()]
            if not alive:
                return
            now = time.monotonic_ns()
            for p in alive:
                idle = now - max(since, table.read(p.key)["heartbeat_ns"])
                if idle <= HUNG_NS and self.signals == signals:
                    continue
                why = f"did not exit: sent no heartbeat for {idle / 1e9:.1f} s" if idle > HUNG_NS else \
                    "did not exit before a new interrupt"
                self.event(f"{p.kind} process {p.key} {why}; killing it")
                p.process.kill()
                p.process.join(5)
                if p.key not in self.dead:
                    self.failed(p, p.process.exitcode if p.process.exitcode is not None else -signal.SIGKILL, why)
                    self.dead.add(p.key)
                    if p.kind == "cpu":
                        hname, cpu = p.key.split("/")
                        self.dead_pools.append((hname, int(cpu[3:])))
            alive[0].process.join(0.05)

    def abort(self) -> None:
        if self.table is not None:
            try:
                self.table.command_all(Cmd.EXIT)
            except Exception:
                pass
        for p in self.procs:
            p.process.join(3)
            if p.process.is_alive():
                p.process.kill()
                p.process.join(3)

    def close_capture(self, report: dict | None = None) -> list[str]:
        """Write the rest of the capture and close its files (after EXIT: every producer is done); with
        `report`, put what was written in its ``capture`` and return the summary's lines."""
        if self.capture is not None:
            self.captured = self.capture.close()
            for err in self.capture.errors:
                self.event(f"capture: {err}")
            self.capture = None
        if report is None or not self.captured:
            return []
        final = self.snapshot()
        lines = []
        for item in self.captured:
            # A CPU's drops may be of any device it captures (one ring per process): a bound, exact when
            # each CPU serves one captured device.
            item["capture_drops"] = sum(final.rows[k].get("capture_drops", 0) for k in item.pop("producers"))
            where = f" -> {item['file']}" if item["file"] else ""
            lines.append(f"  capture  {item['device']}{where}: {item['packets']:,} frames, "
                         f"{item['capture_drops']:,} capture drops")
        report["capture"] = self.captured
        return lines

    def cleanup(self) -> None:
        self.close_capture()
        for ring in self.rings:
            ring.unlink()
            ring.close()
        self.rings = []
        for _, ms in self.mapsets:
            try:
                ms.unlink()
                ms.close()
            except Exception:
                pass
        for pm in self.pms.values():
            pm.unlink()
            pm.close()
        if self.table is not None:
            self.table.unlink()
            self.table.close()
        unlink_prefix(self.prefix)
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
