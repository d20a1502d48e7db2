"""cpumap (BPF_MAP_TYPE_CPUMAP): the map's entries and ptr_ring, the redirecting CPU's bulk and enqueue
drops, the target CPU's kthread (second program, skbs, GRO flushes) and where each page goes home: freed
on another CPU, it returns to its pool through the pool's ring, never its cache.  Unit tests drive two
NAPI cores over one page memory; an end-to-end run of the bundled topology checks the same accounting
exactly with real processes."""

from __future__ import annotations

import errno
import io
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from fakes import Counters, FakeOutbox

from emu.datapath.napi import NapiCore, RxQueue
from emu.errors import BadInputError
from emu.mem.page import DESC_DTYPE, PageState
from emu.mem.pagepool import C, audit, pool_of
from emu.net import wire
from emu.net.packets import UDP_OFF
from emu.net.protocol import CPUMAP, XDP_PACKET_HEADROOM, refill_batch
from emu.run.coordinator import Run, RunOptions
from emu.topology.file import load_topology, validate_topology_text
from emu.xdp.bpfmaps import REDIRECT_CPUMAP, CpuMap, MapError, MapSet, populate
from emu.xdp.context import XDP_REDIRECT, XdpBatch, XdpContext, load_program

ROOT = Path(__file__).resolve().parent.parent
RX_RING = 64

HOST = """
name: t
hosts:
  h1:
    cpus: 2
    devices:
      eth0:
        ifindex: 2
        rx_ring_size: {ring}
        rx_queues: 1
        rx_cpus: [0]
        xdp:
          program: "emu.programs:redirect_cpu"
          params:
            cpu_map: {cpu_map}
"""


class Pair:
    """CPU 0 (polls eth0, runs redirect_cpu) and CPU 1, each a NAPI core over one page memory, sharing
    the program's map set as two workers would."""

    def __init__(self, page_memory, run_prefix: str, cpu_map: str, ring: int = RX_RING) -> None:
        topo = validate_topology_text(HOST.format(ring=ring, cpu_map=cpu_map), "t.yaml")
        self.host = host = topo.hosts["h1"]
        self.pm = pm = page_memory(npages=max(1024, 4 * ring), page_size=512, ncpus=2)
        prog = load_program("emu.programs:redirect_cpu")
        dev = host.devices["eth0"]
        self.sets = [MapSet.create(f"{run_prefix}-maps", prog.maps, 2, 0)]
        populate(self.sets[0], prog.initial_maps(dev.xdp.params), {"eth0": 2}.__getitem__)
        self.sets.append(MapSet.attach(f"{run_prefix}-maps", prog.maps, 2, 1))
        self.cores: list[NapiCore] = []
        self.outs: list[FakeOutbox] = []
        self.counts: list[Counters] = []
        for cpu in (0, 1):
            maps = self.sets[cpu].maps
            cm = maps["cpu_map"]
            assert isinstance(cm, CpuMap)
            rxqs = []
            if cpu == 0:
                ctx = prog.new_context(2, 0, 0, dev.xdp.params, maps, {"eth0": 2})
                rxqs = [RxQueue("eth0", 2, 0, ring, prog.fn, ctx, prog.batch, refill_batch(ring))]
            counters = Counters("cpu")
            out = FakeOutbox()
            core = NapiCore(host, cpu, pm, pool_of(pm, cpu, owner=True), rxqs, out, counters.array,
                            counters.index, lambda key, text: None,
                            {("eth0", (cm.redirect_base - REDIRECT_CPUMAP) >> 16): cm})
            self.cores.append(core)
            self.outs.append(out)
            self.counts.append(counters)
        self.cpu_map = self.sets[0].maps["cpu_map"]
        self.avail: np.ndarray | None = None  # buffers posted to eth0 that no frame has filled yet

    def close(self) -> None:
        self.sets[0].unlink()
        for ms in self.sets:
            ms.close()

    def receive(self, sports: list[int]) -> np.ndarray:
        """CPU 0 refills eth0's ring; the "device" completes one frame per source port into it."""
        core, out, pm = self.cores[0], self.outs[0], self.pm
        core.refill()
        core.post_flush()
        for _, _, _, posted in out.take("post"):
            self.avail = posted if self.avail is None else np.concatenate([self.avail, posted])
        assert self.avail is not None
        d, self.avail = self.avail[: len(sports)].copy(), self.avail[len(sports) :]
        for k, sport in enumerate(sports):
            f = bytearray(64)
            f[UDP_OFF : UDP_OFF + 2] = sport.to_bytes(2, "big")
            p = int(d["page"][k])
            start = p * pm.page_size + XDP_PACKET_HEADROOM
            pm.data[start : start + 64] = np.frombuffer(bytes(f), np.uint8)
            pm.len[p] = 64
        d["len"] = 64
        core.dispatch(wire.pack_msg("rx", {"dev": "eth0", "q": 0}, d.tobytes()))
        return d["page"].astype(np.int64)

    def deliver(self) -> int:
        """Carry CPU 0's cpumap messages to CPU 1; returns the frames carried."""
        n = 0
        for to, kind, hdr, d in self.outs[0].take(CPUMAP):
            assert to == 1
            self.cores[1].dispatch(wire.pack_msg(kind, hdr, d.tobytes()))
            n += len(d)
        return n

    def pool(self, cpu: int, name: str) -> int:
        return int(self.pm.pool_counters[cpu, C[name]])


@pytest.fixture
def pair(page_memory, run_prefix):
    made: list[Pair] = []

    def make(cpu_map: str, ring: int = RX_RING) -> Pair:
        p = Pair(page_memory, run_prefix, cpu_map, ring)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_frames_go_to_the_target_kthread_and_home_through_the_owners_ring(pair) -> None:
    p = pair("{1: 16}")
    ids = p.receive(list(range(24)))
    c0, c1 = p.counts
    assert p.cores[0].poll_pass(got=1, refilling=False) == 24
    # 24 frames in CPU 0's bulk for CPU 1 (3 bulks of 8): 16 fit the ptr_ring, 8 are enqueue drops,
    # freed at once on CPU 0, its own pool's pages: straight into its cache.
    assert c0["xdp_redirect"] == 24 and c0["cpumap_enqueue"] == 16 and c0["cpumap_enqueue_drop"] == 8
    assert c0["cpumap_enqueue_bulks"] == 3
    assert (p.pm.state[ids[16:]] == PageState.CACHE).all() and p.pool(0, "recycle_cached") == 8
    # The 16 are CPU 1's now (held by it, still XDP frames), in its ring until its kthread takes them.
    assert (p.pm.state[ids[:16]] == PageState.XDP).all() and (p.pm.holder[ids[:16]] == 1).all()
    assert p.cpu_map.queued(1) == 16
    assert p.deliver() == 16
    assert p.cores[1].poll_pass(got=1, refilling=True) == 16
    assert p.cpu_map.queued(1) == 0
    assert {k: c1[k] for k in ("cpumap_kthread_processed", "cpumap_kthread_pass", "cpumap_kthread_drop",
                               "stack_rx", "cpumap_kthread_sched", "cpumap_gro_flush", "remote_returns",
                               "rx_packets")} == {
        "cpumap_kthread_processed": 16, "cpumap_kthread_pass": 16, "cpumap_kthread_drop": 0, "stack_rx": 16,
        "cpumap_kthread_sched": 1, "cpumap_gro_flush": 1, "remote_returns": 16, "rx_packets": 0}
    # Freed on CPU 1: home to CPU 0's pool through its ring, never its cache; CPU 1's pool is untouched.
    assert (p.pm.state[ids[:16]] == PageState.RING).all() and (p.pm.owner[ids[:16]] == 0).all()
    assert p.pool(0, "recycle_ring") == 16 and p.pool(0, "recycle_cached") == 8
    assert p.pool(1, "hold_cnt") == 0 and p.pool(1, "recycle_ring") == 0
    assert audit(p.pm, strict=True).problems == []


def test_a_second_program_drops_on_the_target(pair) -> None:
    p = pair('{1: {qsize: 64, program: "emu.programs:cpumap_drop"}}')
    ids = p.receive([7] * 20)
    p.cores[0].poll_pass(got=1, refilling=False)
    assert p.deliver() == 20
    p.cores[1].poll_pass(got=1, refilling=False)
    c1 = p.counts[1]
    assert c1["cpumap_kthread_processed"] == 20 and c1["cpumap_kthread_drop"] == 20
    assert c1["cpumap_kthread_pass"] == 0 and c1["stack_rx"] == 0 and c1["cpumap_gro_flush"] == 0
    assert (p.pm.state[ids] == PageState.RING).all() and p.pool(0, "recycle_ring") == 20
    assert audit(p.pm, strict=True).problems == []


def test_gro_flushes_every_64_skbs_and_when_the_ring_empties(pair) -> None:
    p = pair("{1: 1024}")
    p.receive([1] * 40)
    p.cores[0].poll_pass(got=1, refilling=True)
    p.deliver()
    p.receive([1] * 50)
    p.cores[0].poll_pass(got=1, refilling=True)
    p.deliver()
    p.cores[1].poll_pass(got=2, refilling=False)
    c1 = p.counts[1]
    # 90 skbs in one stretch: a flush at 64, and one for the 26 left when the ring ran empty.
    assert c1["cpumap_kthread_pass"] == 90 and c1["cpumap_gro_flush"] == 2 and c1["cpumap_kthread_sched"] == 1
    assert p.pool(0, "recycle_ring") == 90


def test_a_kthread_on_the_owning_cpu_frees_through_the_ring_once_napi_completed(pair) -> None:
    p = pair("{0: 64}")
    ids = p.receive([3] * 10)
    p.cores[0].poll_pass(got=1, refilling=False)
    c0 = p.counts[0]
    # Produced at the end of the pass (xdp_do_flush); the kthread's share of the CPU takes them in the next.
    assert c0["cpumap_kthread_processed"] == 0 and p.cpu_map.queued(0) == 10
    assert p.cores[0].poll_pass(got=0, refilling=False) == 10
    # The poll that took 10 of a budget of 64 completed the NAPI (list_owner -1): the kthread frees with
    # BH disabled, but page_pool_napi_local finds the pool's NAPI on no CPU's poll list, so its own
    # pool's pages go through the ring, as any other CPU's would (and are no remote returns).
    assert p.outs[0].take(CPUMAP) == []
    assert c0["cpumap_enqueue"] == 10 and c0["cpumap_kthread_pass"] == 10 and c0["remote_returns"] == 0
    assert c0["cpumap_kthread_sched"] == 1
    assert (p.pm.state[ids] == PageState.RING).all()
    assert p.pool(0, "recycle_ring") == 10 and p.pool(0, "recycle_cached") == 0


def test_a_kthread_sharing_the_cpu_with_a_busy_napi_gets_a_round_per_softirq(pair) -> None:
    p = pair("{0: 1024}", ring=512)
    first = p.receive([3] * 40)
    core, c0 = p.cores[0], p.counts[0]
    core.poll_pass(got=1, refilling=False)
    assert p.cpu_map.queued(0) == 40 and c0["cpumap_kthread_processed"] == 0
    later = p.receive([3] * 400)
    # 400 packets, polls of 64: after the fifth (320 >= netdev_budget 300) the NAPI still has 80 to poll,
    # so it is on the poll list when the kthread's round (8 frames) runs in its local_bh_enable: those 8
    # go to the cache.  After the seventh poll (16) NAPI completes; the kthread then takes the other 32
    # with the CPU to itself, through the ring.  The 400 reach the kthread's ring at the flush.
    assert core.poll_pass(got=1, refilling=False) == 400 + 40
    assert c0["polls"] == 1 + 7 and c0["cpumap_kthread_processed"] == 40
    assert c0["cpumap_kthread_pass"] == 40 and c0["cpumap_kthread_sched"] == 1 and c0["remote_returns"] == 0
    assert (p.pm.state[first[:8]] == PageState.CACHE).all()
    assert (p.pm.state[first[8:]] == PageState.RING).all()
    assert p.pool(0, "recycle_cached") == 8 and p.pool(0, "recycle_ring") == 32
    assert p.cpu_map.queued(0) == 400 and c0["cpumap_enqueue"] == 440
    # No more RX: the next pass is the kthread's alone, a pass's worth (1,024) at most: all 400, ring.
    assert core.poll_pass(got=0, refilling=False) == 400
    assert c0["cpumap_kthread_processed"] == 440 and c0["cpumap_kthread_sched"] == 2
    assert (p.pm.state[later] == PageState.RING).all() and p.pool(0, "recycle_ring") == 432
    assert p.pool(0, "recycle_cached") == 8 and p.cpu_map.queued(0) == 0


def test_shutdown_frees_what_the_kthread_did_not_take(pair) -> None:
    p = pair("{1: 64}")
    ids = p.receive([5] * 12)
    p.cores[0].poll_pass(got=1, refilling=False)
    p.deliver()
    p.cores[1].shutdown()
    assert p.cpu_map.queued(1) == 0
    assert (p.pm.state[ids] == PageState.RING).all()
    p.cores[0].shutdown()
    a = audit(p.pm, strict=True)
    assert a.problems == []
    # Every page is back in the allocator but eth0's posted buffers (the device hands them back at
    # ndo_stop, which this test does not play).
    assert a.by_state["rx_posted"] == RX_RING - 12 and a.by_state["free"] == p.pm.npages - (RX_RING - 12)


def test_redirect_map_on_a_cpumap_per_packet_and_vectorised(run_prefix) -> None:
    prog = load_program("emu.programs:redirect_cpu")
    ms = MapSet.create(f"{run_prefix}-m", prog.maps, 4)
    try:
        cm = ms.maps["cpu_map"]
        assert isinstance(cm, CpuMap)
        cm.update(2, 128)
        ctx = XdpContext(2, 0, 0, maps=ms.maps)
        assert ctx.redirect_map(cm, 2) == XDP_REDIRECT and ctx.redirect_ifindex == cm.redirect_base + 2
        assert cm.redirect_base >= REDIRECT_CPUMAP
        ctx.redirect_ifindex = -1
        assert ctx.redirect_map(cm, 1, 1) == 1 and ctx.redirect_ifindex == -1  # no entry: flags' action
        assert ctx.redirect_map(cm, 99) == 0
        mem = np.zeros((4, 64), np.uint8)
        pkts = XdpBatch(mem, np.arange(4), np.zeros(4, np.int64), np.full(4, 60, np.int64))
        v = pkts.redirect_map(cm, np.array([2, 1, 2, 40]), flags=1)
        assert v.tolist() == [XDP_REDIRECT, 1, XDP_REDIRECT, 1]
        assert pkts.redirect_ifindex.tolist() == [cm.redirect_base + 2, -1, cm.redirect_base + 2, -1]
        assert cm.ring_produce(2, 100) == 100 and cm.ring_produce(2, 100) == 28  # qsize 128
        cm.ring_consumed(2, 50)
        assert cm.queued(2) == 78 and cm.ring_produce(2, 100) == 50
        assert ms.snapshot()["cpu_map"]["entries"] == {"2": {"qsize": 128, "program": None, "queued": 128}}
    finally:
        ms.unlink()
        ms.close()


@pytest.mark.parametrize(
    ("value", "err", "words"),
    [
        (0, errno.EINVAL, "qsize 0"),
        (16385, errno.EOVERFLOW, "16384"),
        ({"qsize": 8, "program": "emu.programs:xdp_drop"}, errno.EINVAL, "declares maps"),
        ({"qsize": 8, "program": "emu.programs:nope"}, errno.EINVAL, "no attribute"),
        ({"qsize": 8, "prog": "x"}, errno.EINVAL, "unknown fields"),
    ],
)
def test_cpumap_update_refuses_what_the_kernel_refuses(run_prefix, value, err, words) -> None:
    prog = load_program("emu.programs:redirect_cpu")
    ms = MapSet.create(f"{run_prefix}-m", prog.maps, 2)
    try:
        cm = ms.maps["cpu_map"]
        with pytest.raises(MapError) as e:
            cm.update(1, value)
        assert e.value.errno == err and words in str(e.value)
        with pytest.raises(MapError) as e:
            cm.update(2, 64)  # the host has CPUs 0 and 1
        assert e.value.errno == errno.ENODEV and "no CPU 2" in str(e.value)
        with pytest.raises(MapError) as e:
            cm.update(32, 64)
        assert e.value.errno == errno.E2BIG
    finally:
        ms.unlink()
        ms.close()


@pytest.mark.parametrize(
    ("cpu_map", "line", "words"),
    [
        ("{1: 64, 5: 64}", 15, "key 5: the host has no CPU 5"),
        ("{1: 0}", 15, "qsize 0"),
        ("{}", 14, "needs at least one entry"),
        # a string is no qsize; it was taken for a device name ("no device 'eth1' on host ...")
        ("{1: eth1}", 15, "CPU 1's entry: qsize 'eth1' is not a frame count"),
    ],
)
def test_topology_refuses_a_bad_cpumap_entry(cpu_map: str, line: int, words: str) -> None:
    with pytest.raises(BadInputError) as e:
        validate_topology_text(HOST.format(ring=64, cpu_map=cpu_map), "t.yaml")
    assert f"t.yaml:{line}:" in str(e.value) and words in str(e.value), str(e.value)


@pytest.mark.slow
def test_redirect_cpu_topology_accounts_for_every_page() -> None:
    topo = load_topology(ROOT / "topology" / "redirect-cpu.yaml")
    out = io.StringIO()
    r = Run(topo, RunOptions(count=20_000, interval=0.5, out=out)).run()
    assert multiprocessing.active_children() == []
    v = r["violations"]
    assert all(n == 0 for n in v.values()), v
    t = r["traffic"]
    assert t["generated"] == 20_000 and t["unaccounted"] == 0 and t["delivered"] == 0
    p = r["pages"]
    assert p["total"] == p["accounted"] and p["in_flight"] == 0 and not p["problems"], p
    cpu0, cpu1, cpu2 = r["cpus"]
    m0, m1, m2 = (c["cpumap"] for c in r["cpus"])
    # CPU 0 received everything and redirected it to the cpumap: each frame produced or dropped there.
    assert cpu0["rx_packets"] == cpu0["xdp"]["redirect"] == 20_000
    assert m0["enqueue"] + m0["enqueue_drop"] == 20_000 and m0["enqueue_bulks"] >= 20_000 // 8
    # The kthreads took every produced frame: CPU 1's passed them to the stack, CPU 2's program dropped.
    assert m1["kthread_processed"] + m2["kthread_processed"] == m0["enqueue"]
    assert m1["kthread_pass"] == m1["kthread_processed"] == cpu1["stack_rx"] == t["consumed"]
    assert m2["kthread_drop"] == m2["kthread_processed"] and cpu2["stack_rx"] == 0
    assert t["dropped"] == m0["enqueue_drop"] + m2["kthread_drop"]
    assert m1["kthread_processed"] > 0 and m2["kthread_processed"] > 0  # 64 flows: both CPUs get some
    # Every page is CPU 0's; those the kthreads freed went home through CPU 0's ring, never its cache:
    # its ring took exactly them, the buffers still posted when eth0 went down (ndo_stop hands them back
    # in process context: through the ring too) and whatever overflowed its cache.
    pp0 = cpu0["page_pool"]
    posted_at_stop = cpu0["rx_posted"] - cpu0["rx_packets"]
    assert pp0["recycle_ring"] + pp0["recycle_ring_full"] == \
        m0["enqueue"] + posted_at_stop + pp0["recycle_cache_full"], (pp0, m0, posted_at_stop)
    for c in (cpu1, cpu2):
        assert c["page_pool"]["hold_cnt"] == 0 and c["page_pool"]["recycle_cached"] == 0
    assert pp0["hold_cnt"] == pp0["release_cnt"]
    assert r["maps"]["h1:eth0"]["cpu_map"]["entries"]["1"] == {"qsize": 2048, "program": None, "queued": 0}
    # The summary's pool rows of the kthread-only CPUs say their pools moved nothing (the line ended
    # after "page_pool").
    lines = out.getvalue().splitlines()
    rows = [lines[i + 2] for i, t in enumerate(lines) if t.startswith(("  h1/cpu1 ", "  h1/cpu2 ")) and " rx " in t]
    assert rows == ["      page_pool (no page allocated or returned)"] * 2, rows


def test_a_forged_cpumap_message_frees_nothing(pair) -> None:
    """Frames the target was never handed (still CPU 0's XDP buffers, or stale) are refused and counted;
    the ring is not thrown off."""
    p = pair("{1: 64}")
    ids = p.receive([1] * 4)
    d = np.zeros(4, dtype=DESC_DTYPE)
    d["page"] = ids
    d["gen"] = p.pm.gen[ids]
    d["len"] = 64
    # CPU 0 received them (XDP, held by CPU 0) and has not polled yet: a message to CPU 1 naming them.
    ordinal = (p.cpu_map.redirect_base - REDIRECT_CPUMAP) >> 16
    p.cores[1].dispatch(wire.pack_msg(CPUMAP, {"cpu": 0, "dev": "eth0", "map": ordinal}, d.tobytes()))
    assert p.counts[1]["bad_descriptors"] == 4 and p.cores[1].kq == []
    assert p.cores[1].poll_pass(got=1, refilling=False) == 0
    assert (p.pm.state[ids] == PageState.XDP).all() and (p.pm.holder[ids] == 0).all()
    # CPU 0 then redirects them for real: all four fit the ring (it was not thrown off) and arrive.
    p.cores[0].poll_pass(got=1, refilling=False)
    assert p.counts[0]["cpumap_enqueue"] == 4 and p.deliver() == 4
    p.cores[1].poll_pass(got=1, refilling=False)
    assert p.counts[1]["cpumap_kthread_pass"] == 4 and (p.pm.state[ids] == PageState.RING).all()
