"""What a run shows: xdp-bench-style interval lines, the final summary and the JSON report.

Everything here is computed from counters (the stats table, the pools' counters in the page table), so
the numbers a script reads from ``--json`` are the ones the lines showed.  Traffic is accounted so that
every generated packet ends ``delivered`` (at a traffic port), ``dropped`` (in a named drop counter),
or ``consumed`` (passed to the emulated host stack); ``unaccounted`` is what is left and is 0 in a
correct run.

The final report is built from a plain `RunRecord` that the run fills (`emu.run.coordinator.Run` on one
machine, `emu.cluster.cluster.Cluster` across hosts, from the hosts' own reports): this module reads no run
object, so both kinds of run report through the same `build_report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from emu.mem.page import H_ORDER0_ALLOC, H_ORDER0_FREE, IN_USE_STATES, PageState
from emu.mem.pagepool import P_WATERMARK, POOL_COUNTERS, POOL_STATS, C
from emu.net.protocol import CONTROL
from emu.run import pools
from emu.run.stats import StatsTable

if TYPE_CHECKING:
    from emu.mem.pagemem import PageMemory
    from emu.mem.pagepool import Audit
    from emu.topology.model import Topology

CPU_DROPS = ("xdp_drop", "xdp_aborted", "redirect_err", "xdp_tx_full", "xmit_drops", "cpumap_enqueue_drop",
             "cpumap_kthread_drop", "redirect_bcast_empty")
# (rx_length_errors is no traffic drop: a run's generators and replays send no frame longer than the MTUs on
# their way, so only a stranger's frames are counted there, as bad_messages counts a stranger's messages.)
DEVICE_DROPS = ("rx_dropped", "tx_dropped", "link_lost")
# The derived metrics of every report (its ``metrics`` key), in this order: the sweep's CSV columns too.
METRICS = ("pps", "hit_ratio", "alloc_slow_per_mpkt", "page_alloc_pps", "page_free_pps", "inflight_mean",
           "inflight_p99", "pool_memory_bytes", "violations", "cpu_ns_per_pkt")
SAMPLE_PERIOD = 0.05  # seconds between the samples of the page table taken while traffic runs
# CPU counters reported as they are, next to the fixed keys.
CPU_EXTRA = (
    "rx_packets", "rx_bytes", "xdp_tx_full", "xmit_drops", "xmit_bulks", "redirect_skb", "stack_rx",
    "skb_remote_free", "tx_completions", "remote_returns", "rx_posted", "rx_alloc_fail", "polls",
    "tx_ring_waits", "bad_descriptors", "bad_messages", "xdpf_clone", "redirect_bcast_empty",
    "rx_frags_frames", "rx_frags", "xdp_frags_released", "xmit_sg_drop",
)
# Redirect errors by errno: the CPU counter and the name xdp-bench's redirect_err breakdown prints.
REDIRECT_ERRNOS = (("redirect_err_einval", "-EINVAL"), ("redirect_err_enetdown", "-ENETDOWN"),
                   ("redirect_err_eopnotsupp", "-EOPNOTSUPP"), ("redirect_err_enomem", "-ENOMEM"),
                   ("redirect_err_emsgsize", "-EMSGSIZE"))
# The cpumap counters (xdp-bench redirect-cpu's enqueue and kthread lines), in each CPU's `cpumap`.
CPU_CPUMAP = (
    "cpumap_enqueue", "cpumap_enqueue_drop", "cpumap_enqueue_bulks", "cpumap_kthread_processed",
    "cpumap_kthread_drop", "cpumap_kthread_pass", "cpumap_kthread_redirect", "cpumap_kthread_sched",
    "cpumap_gro_flush",
)


@dataclass
class Snapshot:
    t: float
    rows: dict[str, dict[str, int]]
    kinds: dict[str, str]
    lost: int = 0  # packets in pages the coordinator reclaimed from dead processes
    host_lost: int = 0  # packets that vanished with a lost host (a multi-host run's survivors can't tell more)

    def keys(self, kind: str) -> list[str]:
        return [k for k, v in self.kinds.items() if v == kind]

    def total(self, kind: str, name: str) -> int:
        return sum(self.rows[k][name] for k in self.keys(kind))

    def generated(self) -> int:
        return self.total("traffic", "generated")

    def delivered(self) -> int:
        """Frames of our generators that reached a traffic port (foreign frames are not the run's)."""
        return self.total("traffic", "received") - self.total("traffic", "foreign")

    def drops(self) -> dict[str, int]:
        out = {f"cpu.{n}": self.total("cpu", n) for n in CPU_DROPS}
        out.update({f"device.{n}": self.total("device", n) for n in DEVICE_DROPS})
        out["traffic.link_down"] = self.total("traffic", "link_down")
        out["traffic.link_lost"] = self.total("traffic", "link_lost")
        # Replayed frames no device could take (emu.net.replay); .get: a host from before replay has none.
        for name in ("replay_oversize", "replay_runt"):
            out[f"traffic.{name}"] = sum(self.rows[k].get(name, 0) for k in self.keys("traffic"))
        out["fault.lost"] = self.lost
        out["fault.host_lost"] = self.host_lost
        return out

    def dropped(self) -> int:
        return sum(self.drops().values())

    def consumed(self) -> int:
        return self.total("cpu", "stack_rx")

    def cloned(self) -> int:
        """Extra packets a devmap broadcast made (one per clone): each ends delivered, dropped or consumed
        like a generated one."""
        return self.total("cpu", "xdpf_clone")

    def unaccounted(self) -> int:
        return self.generated() + self.cloned() - self.delivered() - self.dropped() - self.consumed()


def snapshot(table: StatsTable, t: float, lost: int = 0) -> Snapshot:
    rows = {key: table.read(key) for key in table.rows}
    return Snapshot(t, rows, {key: spec.kind for key, spec in table.rows.items()}, lost)


def fmt(n: float, width: int = 13) -> str:
    return f"{round(n):>{width},}"


def banner(topo: Topology) -> str:
    parts = []
    for hname, host in topo.hosts.items():
        for dname, dev in host.devices.items():
            prog = dev.xdp.program if dev.xdp else "(none: XDP_PASS)"
            parts.append(
                f"{hname}:{dname} (ifindex {dev.ifindex}; {dev.rx_queues} rxq, {dev.tx_queues} txq; "
                f"xdp_xmit {'on' if dev.xdp_xmit else 'off'}; {dev.profile}, xdp-features "
                f"{','.join(dev.xdp_features) or 'none'}) running {prog}"
            )
    cpus = sum(h.cpus for h in topo.hosts.values())
    return f"Running topology {topo.name!r} on {cpus} emulated CPUs:\n  " + "\n  ".join(parts)


def interval_lines(topo: Topology, a: Snapshot, b: Snapshot, extended: bool) -> str:
    dt = max(b.t - a.t, 1e-9)

    def rate(kind: str, name: str, keys: list[str] | None = None) -> float:
        keys = keys if keys is not None else b.keys(kind)
        return sum(b.rows[k][name] - a.rows[k][name] for k in keys) / dt

    def drops(keys: list[str]) -> float:
        return sum(rate("cpu", n, keys) for n in CPU_DROPS)

    cpu_keys = b.keys("cpu")
    dev_keys = b.keys("device")
    err = drops(cpu_keys) + sum(rate("device", n, dev_keys) for n in DEVICE_DROPS)
    lines = [
        f"{'Summary':<14}{fmt(rate('cpu', 'rx_packets'))} rx/s{fmt(err)} err,drop/s"
        f"{fmt(rate('cpu', 'xdp_redirect'))} redir/s{fmt(rate('device', 'tx_packets'))} xmit/s"
    ]
    if extended or err:
        for k in cpu_keys:
            lines.append(
                f"  {k:<12}{fmt(rate('cpu', 'rx_packets', [k]))} pkt/s{fmt(drops([k]))} drop/s"
                f"{fmt(rate('cpu', 'xdp_exception', [k]))} error/s{fmt(rate('cpu', 'xdp_redirect', [k]))} redir/s"
            )
    if extended:
        # xdp-bench redirect-cpu: each CPU's enqueues into cpumap rings, and each kthread's work.
        for k in cpu_keys:
            if b.rows[k]["cpumap_enqueue"] + b.rows[k]["cpumap_enqueue_drop"] > a.rows[k]["cpumap_enqueue"] + \
                    a.rows[k]["cpumap_enqueue_drop"]:
                lines.append(f"  {k:<12}{fmt(rate('cpu', 'cpumap_enqueue', [k]))} enq/s"
                             f"{fmt(rate('cpu', 'cpumap_enqueue_drop', [k]))} enq_drop/s")
            if b.rows[k]["cpumap_kthread_processed"] > a.rows[k]["cpumap_kthread_processed"]:
                lines.append(f"  {k + ' kthread':<12}{fmt(rate('cpu', 'cpumap_kthread_processed', [k]))} pkt/s"
                             f"{fmt(rate('cpu', 'cpumap_kthread_drop', [k]))} drop/s"
                             f"{fmt(rate('cpu', 'cpumap_kthread_sched', [k]))} sched/s")
        for k in dev_keys:
            lines.append(
                f"  {k:<12}{fmt(rate('device', 'rx_packets', [k]))} rx/s{fmt(rate('device', 'rx_dropped', [k]))}"
                f" rx_drop/s{fmt(rate('device', 'tx_packets', [k]))} tx/s"
                f"{fmt(rate('device', 'tx_completions', [k]))} txc/s"
            )
        for k in b.keys("traffic"):
            lines.append(
                f"  {k:<12}{fmt(rate('traffic', 'generated', [k]))} gen/s"
                f"{fmt(rate('traffic', 'received', [k]))} recv/s"
            )
    return "\n".join(lines)


def _pool_report(counters: np.ndarray, pm_cache: int, pm_ring: int) -> dict[str, int]:
    d = {name: int(counters[C[name]]) for name in POOL_COUNTERS}
    d["inflight"] = d["hold_cnt"] - d["release_cnt"]
    d["cached"] = pm_cache
    d["ring"] = pm_ring
    return d


def _headline(name: str, final: Snapshot, traffic: dict[str, Any], elapsed: float,
              first_packet_s: float | None) -> dict[str, Any]:
    return {
        "topology": name,
        "elapsed_s": round(elapsed, 3),
        "first_packet_s": None if first_packet_s is None else round(first_packet_s, 3),
        "delivered_pps": round(traffic["delivered"] / elapsed) if elapsed > 0 else 0,
        "rx_pps": round(final.total("cpu", "rx_packets") / elapsed) if elapsed > 0 else 0,
    }


def traffic_section(final: Snapshot) -> dict[str, Any]:
    """Where every generated packet went, from the final counters."""
    return {
        "generated": final.generated(),
        "cloned": final.cloned(),
        "delivered": final.delivered(),
        "dropped": final.dropped(),
        "consumed": final.consumed(),
        "corrupted": final.total("traffic", "corrupted"),
        "duplicates": final.total("traffic", "duplicates"),
        "unaccounted": final.unaccounted(),
        # Packets paced generators owed but fell too far behind to send: the rate offered fell short by
        # this much (not a loss: they were never generated).
        "pacer_lag": sum(final.rows[k].get("pacer_lag", 0) for k in final.keys("traffic")),
        "drops": final.drops(),
        "ports": {k: {n: v for n, v in final.rows[k].items() if n not in CONTROL} for k in final.keys("traffic")},
    }


@dataclass
class HostPages:
    """One host's page memory at the end of a run, as the report shows it: each pool's counters, how
    many pages its cache and ring keep, the allocator's high-water mark and the final strict audit.
    A copy, so the record outlives the shared memory."""

    pool_counters: np.ndarray  # (cpus, counters), the pools' counters
    cached: list[int]  # pages in each CPU's alloc cache
    ring: list[int]  # pages in each CPU's recycle ring
    allocated_hwm: int
    audit: Audit
    # The pools' control words (their netlink identity and detach time: `emu.run.pools`) and page size.
    pool_ctl: np.ndarray | None = None
    page_size: int = 0
    policy: str = "fixed"  # the pools' recycling policy: an adaptive pool's row shows its watermark
    # Pages the page allocator gave xdpf_clone (devmap broadcast), and those that came back to it.
    clones: tuple[int, int] = (0, 0)

    @classmethod
    def of(cls, pm: PageMemory, audit: Audit) -> HostPages:
        ctl = pm.pool_ctl
        return cls(pm.pool_counters.copy(), [int(ctl[c][0]) for c in range(pm.ncpus)],
                   [int(ctl[c][2] - ctl[c][1]) for c in range(pm.ncpus)], pm.allocated_hwm, audit,
                   ctl.copy(), pm.page_size, pm.params.policy,
                   (int(pm.header[H_ORDER0_ALLOC]), int(pm.header[H_ORDER0_FREE])))


@dataclass(frozen=True)
class PageSample:
    """One look at the page tables while traffic runs: pages in flight (out of every pool and of the page
    allocator: allocated, posted for RX, in XDP, queued or in flight for TX, held by an skb) and the bytes
    of the pages the pools keep (alloc caches and recycle rings); with the time since START, the pools'
    page-allocator counters so far (summed over CPUs: ``alloc_slow``, pages taken = ``hold_cnt``, pages
    given back while running = recycle_ring_full + recycle_hard_limit + recycle_released_refcnt, as
    `derive_metrics` counts them), the adaptive watermarks (summed; 0 for `fixed`) and the packets
    delivered so far, and the returns to the pools so far (``recycle_cached``, and ``recycle_returned`` =
    recycle_cached + recycle_ring + recycle_ring_full, `hit_ratio`'s denominator), so that a run's report
    shows them over time (`SAMPLE_SERIES`)."""

    in_flight: int
    pool_bytes: int
    t_s: float = 0.0
    alloc_slow: int = 0
    page_alloc: int = 0
    page_free: int = 0
    watermark: int = 0
    delivered: int = 0
    recycle_cached: int = 0
    recycle_returned: int = 0


# The report's time series (``pages.samples``): one list per name, one entry per sample, next to ``t_s``.
SAMPLE_SERIES = ("in_flight", "pool_bytes", "alloc_slow", "page_alloc", "page_free", "watermark", "delivered",
                 "recycle_cached", "recycle_returned")
# The returns `hit_ratio` divides by: so far, recycle_cached / recycle_returned is the hit ratio while
# traffic ran (the report's `hit_ratio` also counts the posted RX buffers that come home at ndo_stop).
_RETURNED = [C["recycle_cached"], C["recycle_ring"], C["recycle_ring_full"]]
_FREED = [C["recycle_ring_full"], C["recycle_hard_limit"], C["recycle_released_refcnt"]]


def sample_pages(pms: dict[str, PageMemory], t_s: float = 0.0, delivered: int = 0) -> PageSample:
    """A `PageSample` of every host's page table, from its state histogram (a snapshot without locks: the
    states are single bytes, so each page is counted in one state, if not the same instant for all), and
    of its pools' counters; `t_s` (seconds since START) and `delivered` come from the caller."""
    in_flight = pool_bytes = alloc_slow = page_alloc = page_free = watermark = cached = returned = 0
    for pm in pms.values():
        hist = np.bincount(pm.state, minlength=len(PageState))
        in_flight += int(hist[list(IN_USE_STATES)].sum())
        pool_bytes += int(hist[PageState.CACHE] + hist[PageState.RING]) * pm.buf_size  # buffers, not pages
        cnt = pm.pool_counters
        alloc_slow += int(cnt[:, C["alloc_slow"]].sum())
        page_alloc += int(cnt[:, C["hold_cnt"]].sum())
        page_free += int(cnt[:, _FREED].sum())
        watermark += int(pm.pool_ctl[:, P_WATERMARK].sum())
        cached += int(cnt[:, C["recycle_cached"]].sum())
        returned += int(cnt[:, _RETURNED].sum())
    return PageSample(in_flight, pool_bytes, round(t_s, 3), alloc_slow, page_alloc, page_free, watermark,
                      delivered, cached, returned)


def _samples_section(samples: list[PageSample]) -> dict[str, Any]:
    return {"period_s": SAMPLE_PERIOD, "t_s": [s.t_s for s in samples],
            **{name: [getattr(s, name) for s in samples] for name in SAMPLE_SERIES}}


def _merge_samples(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The hosts' sample series summed sample by sample: every host samples every `SAMPLE_PERIOD` from its
    START to its end of traffic, so sample k of each is about the same instant (``t_s`` is the first
    host's).  Only the samples every host has are kept (a host that started a little later has a few
    fewer)."""
    series = [p for p in parts if p.get("in_flight")]
    n = min((len(p["in_flight"]) for p in series), default=0)
    out: dict[str, Any] = {"period_s": SAMPLE_PERIOD,
                           "t_s": list(series[0].get("t_s", [k * SAMPLE_PERIOD for k in range(n)]))[:n] if series
                           else []}
    for name in SAMPLE_SERIES:
        out[name] = [sum(p.get(name, [0] * n)[k] for p in series) for k in range(n)]
    return out


def pool_totals(cpus: list[dict[str, Any]]) -> dict[str, int]:
    """Every page-pool counter (`POOL_COUNTERS`) summed over the report's CPUs (of every host)."""
    return {name: sum(int(c["page_pool"][name]) for c in cpus) for name in POOL_COUNTERS}


def _p99(values: list[int]) -> int:
    """The 99th percentile by nearest rank: the smallest sample that at least 99 % of them do not exceed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def cpu_time_section(cpu_s: dict[str, tuple[str, float]]) -> dict[str, Any]:
    """The report's ``cpu_time_s``: CPU seconds (user + system, from ``/proc``) each kind of process used
    while traffic ran, and each process's (by stats row), so that a run's CPU cost can be put per packet."""
    by_kind = {"cpu": 0.0, "device": 0.0, "traffic": 0.0}
    for kind, s in cpu_s.values():
        by_kind[kind] = by_kind.get(kind, 0.0) + s
    return {**{k: round(v, 3) for k, v in by_kind.items()},
            "by_process": {key: {"kind": kind, "s": round(s, 3)} for key, (kind, s) in sorted(cpu_s.items())}}


def derive_metrics(pool: dict[str, int], delivered: int, rx_packets: int, elapsed: float,
                   in_flight: list[int], pool_bytes: list[int], violations: dict[str, int],
                   cpu_s: float | None = None) -> dict[str, Any]:
    """The report's ``metrics`` (`METRICS`), from counters summed over every CPU of every host, so a
    multi-host run's are recomputed from its summed counters, never averaged from its hosts' ratios.
    A ratio or rate whose denominator is 0 (no recycling, no packet, no time) is None.

    * ``pps``: delivered packets per second of the run (START to the end of traffic).
    * ``hit_ratio``: recycle_cached / (recycle_cached + recycle_ring + recycle_ring_full): of the pages
      returned to their pool, the share that went straight into its alloc cache.  This is the ratio mlx5's
      deferred page release moved from 31 % to 98 %: returns that miss the cache go to the ring, or
      past a full ring back to the page allocator.
    * ``alloc_slow_per_mpkt``: slow-path allocations (each a bulk of up to `refill` pages from the
      page allocator) per million packets received by XDP.
    * ``page_alloc_pps``: pages taken from the page allocator per second: ``hold_cnt``, which
      `emu.mem.pagepool` bumps by each slow-path bulk's actual size (the initial fill of the RX rings
      included).
    * ``page_free_pps``: pages given back to the page allocator per second while the run ran:
      recycle_ring_full (past a full ring) + recycle_hard_limit (past `recycle_limit`) +
      recycle_released_refcnt (left the pool because someone else still held a reference; freed at their
      last ``put_page``).  Not ``release_cnt``, which also counts the pools' destruction at the end of
      the run, when every cached page goes back.
    * ``inflight_mean``, ``inflight_p99``: pages in flight (out of every pool and of the allocator), the
      mean and the 99th percentile over the samples taken every `SAMPLE_PERIOD` while traffic ran.
    * ``pool_memory_bytes``: the mean, over the same samples, of the bytes of the pages the pools kept
      (alloc caches and recycle rings; at the end they are empty, so the samples are what shows it).
    * ``violations``: the sum of the report's violation counters (0 in a correct run).
    * ``cpu_ns_per_pkt``: CPU time the emulated CPUs' worker processes used while traffic ran (`cpu_s`
      seconds, ``/proc``'s utime + stime) per packet received by XDP: the data path's cost per packet,
      recycling included (None when not measured, e.g. a multi-host run's).  The emulator's cost, not a
      kernel's: compare runs of one machine.
    """
    returned = pool["recycle_cached"] + pool["recycle_ring"] + pool["recycle_ring_full"]
    freed = pool["recycle_ring_full"] + pool["recycle_hard_limit"] + pool["recycle_released_refcnt"]

    def per_s(n: int) -> float | None:
        return round(n / elapsed, 1) if elapsed > 0 else None

    return {
        "pps": per_s(delivered),
        "hit_ratio": round(pool["recycle_cached"] / returned, 6) if returned else None,
        "alloc_slow_per_mpkt": round(pool["alloc_slow"] * 1e6 / rx_packets, 3) if rx_packets else None,
        "page_alloc_pps": per_s(pool["hold_cnt"]),
        "page_free_pps": per_s(freed),
        "inflight_mean": round(sum(in_flight) / len(in_flight), 1) if in_flight else None,
        "inflight_p99": _p99(in_flight) if in_flight else None,
        "pool_memory_bytes": round(sum(pool_bytes) / len(pool_bytes)) if pool_bytes else None,
        "violations": sum(violations.values()),
        "cpu_ns_per_pkt": round(cpu_s * 1e9 / rx_packets, 1) if cpu_s is not None and rx_packets else None,
    }


@dataclass
class RunRecord:
    """Everything a report is built from, filled by the run that ran (a `Run` on one machine, the
    multi-host coordinator across machines) and read only by `build_report`: one record and one builder
    for both, so their reports cannot drift apart.

    A run on one machine fills `pages` from its page memories; the multi-host coordinator, whose hosts
    audit their own pages, fills `parts` with the hosts' own reports instead, and the fields only it
    has (`hosts_lost`, `control_refused`, `bad_control_messages`)."""

    topology: Topology
    final: Snapshot  # the final counters (of every host, for a multi-host run)
    elapsed: float  # seconds from START to the end of traffic (settled)
    first_packet_s: float | None = None  # from the run's creation to the first delivery
    pages: dict[str, HostPages] = field(default_factory=dict)  # host -> its pages at the end
    # Multi-host: host -> its own report, for every host that sent one (None: a run on this machine)
    parts: dict[str, dict[str, Any]] | None = None
    maps: dict[str, Any] = field(default_factory=dict)  # the programs' BPF maps
    live_audits: int = 0  # conservation audits taken while traffic ran
    audit_problems: list[str] = field(default_factory=list)  # what those found
    events: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)  # dead processes, how, last words
    processes: dict[str, int] = field(default_factory=dict)  # name -> pid
    stalled: list[str] = field(default_factory=list)  # "stalled pool shutdown" warnings
    dead: list[str] = field(default_factory=list)  # processes that died, by stats row
    hosts_lost: list[str] = field(default_factory=list)
    control_refused: int | None = None  # multi-host: control connections refused (CURVE)
    # Samples of the page tables taken while traffic ran (`PageSample`, every `SAMPLE_PERIOD`), summed
    # over this run's hosts; a multi-host run's come from its parts' reports instead.
    samples: list[PageSample] = field(default_factory=list)
    bad_control_messages: int | None = None  # multi-host: control messages refused
    # CPU time each process used while traffic ran (START to settled): process key -> (kind, seconds).
    cpu_s: dict[str, tuple[str, float]] = field(default_factory=dict)


def _host_sections(r: RunRecord) -> dict[str, Any]:
    """cpus, devices, pages, violations and maps of a run on this machine, from its page memories."""
    final = r.final
    cpus, devices, page_pools = [], [], []
    viol = {"foreign_cache_return": 0, "recycled_before_tx_completion": 0, "double_free": 0, "leaked": 0,
            "stale_generation": 0, "bad_descriptors": 0, "bad_messages": 0}
    pages = {"total": 0, "accounted": 0, "in_flight": 0, "allocated_hwm": 0, "clone_pages": 0,
             "clone_pages_freed": 0, "by_state": {},
             "problems": list(r.audit_problems), "audits": r.live_audits + len(r.pages),
             "samples": _samples_section(r.samples)}
    for hname, host in r.topology.hosts.items():
        hp = r.pages[hname]
        for c in range(host.cpus):
            row = final.rows[f"{hname}/cpu{c}"]
            pool = _pool_report(hp.pool_counters[c], hp.cached[c], hp.ring[c])
            if hp.policy == "adaptive" and hp.pool_ctl is not None:
                pool["watermark"] = int(hp.pool_ctl[c][P_WATERMARK])
            if hp.pool_ctl is not None:
                page_pools.append(pools.netlink_pool(hp.pool_counters[c], hp.pool_ctl[c], hp.page_size))
            cpus.append({
                "host": hname,
                "cpu": c,
                "page_pool": pool,
                "xdp": {a: row[f"xdp_{a}"] for a in ("aborted", "drop", "pass", "tx", "redirect")},
                "redirect_err": row["redirect_err"],
                "redirect_err_errno": {name: row[k] for k, name in REDIRECT_ERRNOS},
                "xdp_exception": row["xdp_exception"],
                **{k: row[k] for k in CPU_EXTRA},
                "cpumap": {k.removeprefix("cpumap_"): row[k] for k in CPU_CPUMAP},
            })
            for k in ("foreign_cache_return", "recycled_before_tx_completion", "double_free",
                      "stale_generation"):
                viol[k] += pool[k]
            viol["bad_descriptors"] += row["bad_descriptors"]
            viol["bad_messages"] += row["bad_messages"]
            pages["in_flight"] += pool["inflight"]
        for dname, dev in host.devices.items():
            row = final.rows[f"{hname}/{dname}"]
            devices.append({
                "host": hname, "name": dname, "ifindex": dev.ifindex, "profile": dev.profile, "mtu": dev.mtu,
                "xdp_features": list(dev.xdp_features),
                **{k: v for k, v in row.items() if k not in CONTROL},
            })
            viol["bad_descriptors"] += row["bad_descriptors"]
            viol["bad_messages"] += row["bad_messages"]
        audit = hp.audit
        pages["allocated_hwm"] += hp.allocated_hwm
        pages["clone_pages"] += hp.clones[0]
        pages["clone_pages_freed"] += hp.clones[1]
        pages["total"] += audit.total
        pages["accounted"] += audit.accounted
        for s, n in audit.by_state.items():
            pages["by_state"][s] = pages["by_state"].get(s, 0) + n
        pages["problems"] += [f"{hname}: {p}" for p in audit.problems]
        viol["leaked"] += audit.total - audit.by_state[PageState.FREE.name.lower()]
    for p in final.keys("traffic"):
        viol["bad_messages"] += final.rows[p]["bad_messages"]
    return {"cpus": cpus, "devices": devices, "page_pools": page_pools, "pages": pages, "violations": viol,
            "maps": dict(r.maps), "events": list(r.events), "dead_processes": sorted(r.dead),
            "failures": list(r.failures), "processes": dict(r.processes), "stalled_shutdown": list(r.stalled)}


def _merged_sections(r: RunRecord, parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The same sections for a multi-host run, merged from each surviving host's own report (their pages,
    pools and audits); the coordinator's own events, processes and so on come first."""
    cpus: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    pages: dict[str, Any] = {"total": 0, "accounted": 0, "in_flight": 0, "allocated_hwm": 0, "clone_pages": 0,
                             "clone_pages_freed": 0, "by_state": {}, "problems": list(r.audit_problems),
                             "audits": r.live_audits}
    viol: dict[str, int] = {}
    maps: dict[str, Any] = dict(r.maps)
    events = list(r.events)
    dead = list(r.dead)
    failures = list(r.failures)
    processes = dict(r.processes)
    stalled = list(r.stalled)
    pages["samples"] = _merge_samples([part["pages"].get("samples", {}) for part in parts.values()])
    page_pools: list[dict[str, int]] = []
    for hname, part in parts.items():
        cpus += part["cpus"]
        page_pools += part.get("page_pools", [])
        devices += part["devices"]
        p = part["pages"]
        for k in ("total", "accounted", "in_flight", "allocated_hwm", "clone_pages", "clone_pages_freed", "audits"):
            pages[k] += p.get(k, 0)
        for st, n in p["by_state"].items():
            pages["by_state"][st] = pages["by_state"].get(st, 0) + n
        pages["problems"] += p["problems"]
        for k, n in part["violations"].items():
            viol[k] = viol.get(k, 0) + n
        maps.update(part["maps"])
        events += [f"{hname}: {e}" for e in part["events"]]
        dead += part["dead_processes"]
        failures += [dict(f, host=hname) for f in part.get("failures", [])]
        processes.update(part.get("processes", {}))
        stalled += part["stalled_shutdown"]
    # Each host numbered its own pools from 1: numbered again in host order, unique across hosts.
    return {"cpus": cpus, "devices": devices, "page_pools": pools.renumbered(page_pools), "pages": pages,
            "violations": viol, "maps": maps, "events": events, "dead_processes": sorted(dead),
            "failures": failures, "processes": processes,
            "stalled_shutdown": stalled}


def build_report(r: RunRecord) -> dict[str, Any]:
    """The report (the ``--json`` document) of a run, from its record: the same keys, built the same way,
    whether one machine ran it or several hosts did (`RunRecord.parts`)."""
    sections = _host_sections(r) if r.parts is None else _merged_sections(r, r.parts)
    traffic = traffic_section(r.final)
    cpu_s = dict(r.cpu_s)
    for part in (r.parts or {}).values():
        # A multi-host run: each host measured its own processes (their keys name their hosts).
        for key, p in part.get("cpu_time_s", {}).get("by_process", {}).items():
            cpu_s[key] = (p["kind"], p["s"])
    cpu_time = cpu_time_section(cpu_s)
    if r.final.host_lost:
        traffic["lost_with_hosts"] = r.final.host_lost
    report = {
        **_headline(r.topology.name, r.final, traffic, r.elapsed, r.first_packet_s),
        "cpus": sections["cpus"],
        "devices": sections["devices"],
        "page_pools": sections["page_pools"],
        "pages": sections["pages"],
        "violations": sections["violations"],
        "traffic": traffic,
        "metrics": derive_metrics(
            pool_totals(sections["cpus"]), traffic["delivered"], r.final.total("cpu", "rx_packets"), r.elapsed,
            sections["pages"]["samples"]["in_flight"], sections["pages"]["samples"]["pool_bytes"],
            sections["violations"], cpu_s=cpu_time["cpu"] if cpu_s else None),
        "cpu_time_s": cpu_time,
        "maps": sections["maps"],
        "events": sections["events"],
        "dead_processes": sections["dead_processes"],
        "failures": sections["failures"],
        "processes": sections["processes"],
        "stalled_shutdown": sections["stalled_shutdown"],
        "hosts_lost": list(r.hosts_lost),
    }
    if r.control_refused is not None:
        link_refused = sum(r.final.rows[k]["link_refused"] for k in r.final.keys("device"))
        report["security"] = {"control_refused": r.control_refused, "link_refused": link_refused}
    if r.bad_control_messages is not None:
        report["bad_control_messages"] = r.bad_control_messages
    return report


def summary(r: dict[str, Any]) -> str:
    t = r["traffic"]
    v = r["violations"]
    out = [f"\nSummary of {r['topology']!r}: {r['elapsed_s']:.2f} s"]
    out.append(
        f"  traffic  generated {t['generated']:,}{'  cloned ' + format(t['cloned'], ',') if t.get('cloned') else ''}"
        f"  delivered {t['delivered']:,}  dropped {t['dropped']:,}  "
        f"consumed {t['consumed']:,}  corrupted {t['corrupted']:,}  unaccounted {t['unaccounted']:,}"
    )
    drops = ", ".join(f"{k} {n:,}" for k, n in t["drops"].items() if n)
    if drops:
        out.append(f"  drops    {drops}")
    if t.get("pacer_lag"):
        out.append(f"  pacer    {t['pacer_lag']:,} packets owed at the paced rate but not sent (pacer_lag: the "
                   f"generator fell behind by more than its backlog)")
    out.append(f"  rate     {r['rx_pps']:,} XDP rx pkt/s, {r['delivered_pps']:,} delivered pkt/s")
    for c in r["cpus"]:
        x = c["xdp"]
        # Passes that left packets in the RX ring because this CPU's XDP TX queues were full: only when
        # there were any (a TX side too slow for the RX side, or rings too small).
        waits = c.get("tx_ring_waits", 0)
        out.append(
            f"  {c['host']}/cpu{c['cpu']:<3} rx {c['rx_packets']:,}  drop {x['drop']:,}  pass {x['pass']:,}  "
            f"tx {x['tx']:,}  redirect {x['redirect']:,}  aborted {x['aborted']:,}  redirect_err "
            f"{c['redirect_err']:,}"
            + ("" if not c["redirect_err"] else " (" + ", ".join(
                f"{e} {n:,}" for e, n in c.get("redirect_err_errno", {}).items() if n) + ")")
            + f"  xdp_exception {c['xdp_exception']:,}"
            + (f"  tx_ring_waits {waits:,}" if waits else "")
            + "".join(f"  {k} {c[k]:,}" for k in ("xdpf_clone", "redirect_bcast_empty") if c.get(k))
        )
        if c.get("rx_frags_frames") or c.get("xdp_frags_released") or c.get("xmit_sg_drop"):
            # XDP multi-buffer: frames that came in with fragments (XDP_FLAGS_HAS_FRAGS), their fragment
            # buffers, those bpf_xdp_adjust_tail released, and redirects refused for want of ndo-xmit-sg.
            out.append(f"      multi-buffer frames {c['rx_frags_frames']:,}  frags {c['rx_frags']:,}  frags_released "
                       f"{c['xdp_frags_released']:,}  xmit_sg_drop {c['xmit_sg_drop']:,}")
        cm = c.get("cpumap", {})
        if any(cm.values()):
            # xdp-bench redirect-cpu's lines: what this CPU enqueued, and what its kthread did.
            out.append(f"      cpumap enqueue {cm['enqueue']:,}  drop {cm['enqueue_drop']:,}  bulks "
                       f"{cm['enqueue_bulks']:,} | kthread processed {cm['kthread_processed']:,}  drop "
                       f"{cm['kthread_drop']:,}  pass {cm['kthread_pass']:,}  redirect {cm['kthread_redirect']:,}"
                       f"  sched {cm['kthread_sched']:,}  gro_flush {cm['gro_flush']:,}")
        pp = c["page_pool"]
        # A pool no page ever went through (a cpumap target's: the frames it frees are other pools')
        # says so rather than ending the line after its name.
        moved = "  ".join(f"{k} {pp[k]:,}" for k in POOL_STATS if pp[k]) or "(no page allocated or returned)"
        out.append("      page_pool " + moved + (f"  watermark {pp['watermark']:,}" if "watermark" in pp else ""))
    for d in r["devices"]:
        out.append(
            f"  {d['host']}:{d['name']:<8} RX packets {d['rx_packets']:,} bytes {d['rx_bytes']:,} dropped "
            f"{d['rx_dropped']:,}" + (f" length_errors {d['rx_length_errors']:,}" if d.get("rx_length_errors") else "")
            + f" | TX packets {d['tx_packets']:,} bytes {d['tx_bytes']:,} completions "
            f"{d['tx_completions']:,} xdp_xmit {d['xdp_xmit']:,}"
            + (f" | rx_sg_frames {d['rx_sg_frames']:,} rx_sg_frags {d['rx_sg_frags']:,}"
               if d.get("rx_sg_frames") else "")
            + (f" tx_sg_frames {d['tx_sg_frames']:,}" if d.get("tx_sg_frames") else "")
        )
    p = r["pages"]
    out.append(f"  pages    total {p['total']:,}  accounted {p['accounted']:,}  in_flight {p['in_flight']:,}  "
               f"allocated_hwm {p.get('allocated_hwm', 0):,}"
               + (f"  clone_pages {p['clone_pages']:,} (freed {p['clone_pages_freed']:,})"
                  if p.get("clone_pages") else ""))
    m = r.get("metrics")
    if m:
        out.append("  metrics  " + "  ".join(f"{k} {'-' if m[k] is None else m[k]}" for k in METRICS))
    out.append("  violations " + "  ".join(f"{k} {n:,}" for k, n in v.items()))
    if r.get("hosts_lost"):
        out.append(f"  LOST     hosts {', '.join(r['hosts_lost'])}: their pages died with them; "
                   f"{t.get('lost_with_hosts', 0):,} packets lost with them (drops: fault.host_lost)")
    sec = r.get("security")
    if sec and (sec["control_refused"] or sec["link_refused"]):
        out.append(f"  security refused {sec['control_refused']:,} control and {sec['link_refused']:,} link "
                   "connection attempts without the cluster's CURVE key")
    for prob in p["problems"]:
        out.append(f"  AUDIT: {prob}")
    for f in r.get("failures", []):
        out.append(f"  FAILED   {f['process']} (pid {f['pid']}, {f['status']}): {f['last_words']}")
    return "\n".join(out)
