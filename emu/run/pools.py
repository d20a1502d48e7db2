"""The netlink view of a run's page pools: what ``ynl --family netdev --dump page-pool-get`` and
``--dump page-pool-stats-get`` would show for them, in the report (``page_pools``) and live (``emu pools``).

One dict per pool, with the attribute names of the kernel's ``Documentation/netlink/specs/netdev.yaml``:
``page-pool-get``'s ``id``, ``ifindex``, ``napi-id``, ``inflight``, ``inflight-mem`` and ``detach-time``,
and ``page-pool-stats-get``'s eleven counters (``alloc-fast`` ... ``recycle-released-refcnt``) merged
into the same dict (``page-pool-stats-get`` itself nests ``id`` and ``ifindex`` under ``info``; merged,
they would only repeat).  An attribute the kernel leaves out is left out, never given as 0 or null.

How the emulator's per-CPU pool maps onto the kernel's per-RX-queue pool:

* ``id``: a stable small integer per run, 1-based in host, then CPU order (the kernel's ids come from a
  cyclic allocator starting at 1).  A multi-host run's merged report numbers its hosts' pools again in
  host order, so its ids are unique across hosts.
* ``ifindex``: the kernel reports the one netdev a pool was created for.  An emulated CPU's pool serves
  every RX queue that CPU's NAPI polls, possibly of several devices; we report the first such device's
  ifindex in topology order, a single integer as the kernel's ``u32``, so that scripts written for
  ``ynl`` read it unchanged (a list would break them).  A CPU that services no RX queue has a pool the
  kernel would not list at all (only pools created for a netdev are visible); we list it without
  ``ifindex``, as the kernel shows a pool whose netdev went away, so that the list matches the
  report's ``cpus`` one to one.
* ``napi-id``: the NAPI instance of that same first RX queue.  Each (device, RX queue) of a host is a
  NAPI instance numbered in topology order from `MIN_NAPI_ID` (the kernel keeps the ids up to
  ``NR_CPUS`` for ``sender_cpu``: 8193 is the first NAPI id of a distribution kernel, ``NR_CPUS=8192``).
  Like ``ifindex`` it is per host, as each host is its own machine.  Absent once the pool is detached:
  ``page_pool_destroy`` clears ``pool->p.napi``.  (A pool destroyed with nothing in flight is no longer
  listed live; the report, a record of the run, shows it with the NAPI it had.)
* ``inflight``: ``hold_cnt - release_cnt``, the kernel's ``page_pool_inflight`` (pages in the pool's own
  cache and ring count, as in the kernel); ``release_cnt`` is read first, as the kernel reads it, so
  that a live read never goes negative.  ``inflight-mem``: ``inflight`` x the host's page size.
* ``detach-time``: the second of ``CLOCK_BOOTTIME`` (the clock the spec names) at which the CPU worker
  destroyed its pool (``page_pool_destroy``, at EXIT; or the coordinator, for a dead CPU's pool) while
  pages were still out; absent otherwise.

Which pools are listed live follows the kernel too: a pool appears once its CPU worker has claimed it
(the driver created it) and stays until it is destroyed with nothing in flight; a pool destroyed with
pages still out stays listed, detached, with its in-flight count, until they return (what the kernel's
``page_pool_check`` selftest expects).  The report lists every pool, whatever its state at the end.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from emu.mem.pagemem import PageMemory
from emu.mem.pagepool import P_DESTROYED, P_DETACH_TIME, P_ID, P_IFINDEX, P_NAPI_ID, P_OWNER_PID, POOL_STATS, C
from emu.mem.shm import PREFIX, SHM_DIR, pid_alive
from emu.topology.model import HostConfig

MIN_NAPI_ID = 8193
# The kernel's counter names: the pool's `page_pool_stats` fields with hyphens (netdev.yaml).
NETLINK_STATS = {name: name.replace("_", "-") for name in POOL_STATS}
_STATS_SEGMENT = re.compile(rf"^({PREFIX}-(\d+)-[0-9a-f]+)-stats$")


@dataclass(frozen=True, slots=True)
class PoolIdentity:
    """A pool's netlink identity: its id, and the ifindex and NAPI id it serves (0: none)."""

    id: int
    ifindex: int
    napi_id: int


def pool_identities(hosts: Iterable[HostConfig]) -> dict[tuple[str, int], PoolIdentity]:
    """``(host, cpu) -> PoolIdentity`` for every CPU of `hosts` (a run's, in topology order)."""
    out: dict[tuple[str, int], PoolIdentity] = {}
    for host in hosts:
        first: dict[int, tuple[int, int]] = {}  # cpu -> (ifindex, napi id) of the first RX queue it polls
        napi = MIN_NAPI_ID
        for dev in host.devices.values():
            for cpu in dev.rx_cpus:
                first.setdefault(cpu, (dev.ifindex, napi))
                napi += 1
        for cpu in range(host.cpus):
            ifindex, napi_id = first.get(cpu, (0, 0))
            out[(host.name, cpu)] = PoolIdentity(len(out) + 1, ifindex, napi_id)
    return out


def netlink_pool(counters: np.ndarray, ctl: np.ndarray, page_size: int) -> dict[str, int]:
    """One pool as ``ynl`` shows it, from its counters row (`POOL_COUNTERS`) and control words."""
    release = int(counters[C["release_cnt"]])  # first: see the module's docstring
    inflight = int(counters[C["hold_cnt"]]) - release
    d: dict[str, int] = {"id": int(ctl[P_ID])}
    if ctl[P_IFINDEX]:
        d["ifindex"] = int(ctl[P_IFINDEX])
    if ctl[P_NAPI_ID] and not ctl[P_DETACH_TIME]:
        d["napi-id"] = int(ctl[P_NAPI_ID])
    d["inflight"] = inflight
    d["inflight-mem"] = inflight * page_size
    if ctl[P_DETACH_TIME]:
        d["detach-time"] = int(ctl[P_DETACH_TIME])
    for name, nl in NETLINK_STATS.items():
        d[nl] = int(counters[C[name]])
    return d


def listed(ctl: np.ndarray, inflight: int) -> bool:
    """Whether the kernel would list the pool now: created (claimed by its worker) and not destroyed,
    or destroyed with pages still in flight (detached)."""
    if not ctl[P_ID]:
        return False
    return inflight > 0 or (bool(ctl[P_OWNER_PID]) and not ctl[P_DESTROYED])


def renumbered(pools: Iterable[dict[str, int]]) -> list[dict[str, int]]:
    """Copies of `pools` with ids 1, 2, ... in order (a multi-host report's, unique across its hosts)."""
    return [{**p, "id": i} for i, p in enumerate(pools, 1)]


# -- runs in progress on this machine ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiveRun:
    """A run in progress on this machine: its segment prefix, the pid that created it, its hosts."""

    prefix: str
    pid: int
    hosts: tuple[str, ...]


def find_runs() -> list[LiveRun]:
    """The runs in progress on this machine, from their shared-memory segments: a ``<prefix>-stats``
    whose creating pid lives, and one page memory (``<prefix>-<host>-meta`` and ``-data``) per host."""
    try:
        names = set(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return []
    runs = []
    for name in sorted(names):
        m = _STATS_SEGMENT.match(name)
        if m is None or not pid_alive(int(m.group(2))):
            continue
        prefix = m.group(1)
        hosts = tuple(sorted(
            n[len(prefix) + 1 : -len("-meta")] for n in names
            if n.startswith(prefix + "-") and n.endswith("-meta")
            and n[: -len("-meta")] + "-data" in names
        ))
        runs.append(LiveRun(prefix, int(m.group(2)), hosts))
    return runs


def live_pools(run: LiveRun) -> list[tuple[str, dict[str, int]]]:
    """``(host/cpuN, pool)`` for every pool of `run` the kernel would list now, by id.  Read without
    locks from the run's page memories (attached, never written): each word is read whole, and
    `netlink_pool` reads ``release_cnt`` before ``hold_cnt``."""
    found = []
    for host in run.hosts:
        try:
            pm = PageMemory.attach(f"{run.prefix}-{host}")
        except (OSError, ValueError):
            # Gone since the listing (the run ended), or a segment of another kind whose name ends in
            # -meta (a map of a device named "meta"): not a page memory.
            continue
        try:
            for cpu in range(pm.ncpus):
                ctl = pm.pool_ctl[cpu].copy()
                pool = netlink_pool(pm.pool_counters[cpu], ctl, pm.page_size)
                if listed(ctl, pool["inflight"]):
                    found.append((f"{host}/cpu{cpu}", pool))
        finally:
            pm.close()
    return sorted(found, key=lambda hp: hp[1]["id"])


def select_runs(runs: list[LiveRun], which: str | None) -> list[LiveRun]:
    """The runs `which` names (the pid of its ``emu run``/``emu host``, or its prefix); all if None."""
    if which is None:
        return runs
    return [r for r in runs if which in (str(r.pid), r.prefix)]


def dump_text(run: LiveRun, pools: list[tuple[str, dict[str, int]]]) -> str:
    """``ynl``'s text form of a dump (its pretty-printed list of dicts, keys sorted), under a comment
    line naming the run and which emulated CPU each pool id is."""
    import pprint

    which = ", ".join(f"{p['id']} {where}" for where, p in pools) or "none listed"
    return f"# run {run.prefix} (pid {run.pid}), pools: {which}\n" + pprint.pformat([p for _, p in pools])
