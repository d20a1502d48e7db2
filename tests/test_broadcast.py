"""devmap broadcast (BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS): every device of the map but the ingress one
gets the frame; each extra copy is a clone in a page from the page allocator (``xdpf_clone``), the
original goes to the last target.  So N targets cost one pool page and N-1 page-allocator pages, which
the counters and the strict audit show exactly; a map with only the ingress device sends nothing, and a
frame too large to clone is an -ENOMEM redirect error.  The C twin (emu/programs/bpf/xdp_broadcast.c, run
by the engine in both of its modes) takes the same path: the engine returns the verdict and a broadcast
code per packet, the CPU worker's one broadcast path does the rest."""

from __future__ import annotations

import io
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from fakes import Counters, FakeOutbox

from emu.datapath.napi import NapiCore, RxQueue
from emu.ebpf.maps import ObjDevMap, ObjMaps
from emu.ebpf.obj import BPF_MAP_TYPE_DEVMAP_HASH, MapDef
from emu.mem.page import ORDER0_OWNER, PageState
from emu.mem.pagepool import C, audit, pool_of, tx_dma_start
from emu.net import wire
from emu.net.protocol import XDP_PACKET_HEADROOM, refill_batch
from emu.run.coordinator import Run, RunOptions
from emu.topology.file import load_topology, validate_topology_text
from emu.xdp.bpfmaps import BPF_F_BROADCAST, BPF_F_EXCLUDE_INGRESS, REDIRECT_BROADCAST, MapSet, populate
from emu.xdp.context import XDP_ABORTED, XDP_PASS, XDP_REDIRECT, XdpBatch, XdpContext, load_program
from emu.xdp.runtime import create_object_maps, program_for
from tests.ebpf_build import bundled

ROOT = Path(__file__).resolve().parent.parent
RX_RING = 64
IFX = {"eth0": 2, "eth1": 3, "eth2": 4, "eth3": 5}

HOST = """
name: t
hosts:
  h1:
    cpus: 1
    page_size: {page_size}
    pages: 8192
    devices:
      eth0:
        ifindex: 2
        rx_ring_size: {ring}
        xdp_xmit: {eth0_xmit}
        xdp: {xdp}
      eth1: {{ifindex: 3, xdp_xmit: true{mtu1}}}
      eth2: {{ifindex: 4, xdp_xmit: {eth2_xmit}{mtu}}}
      eth3: {{ifindex: 5, xdp_xmit: true{mtu}}}
"""


class Bcast:
    """One CPU polling eth0, which runs xdp_broadcast over the devmap `tx_ports`: the Python program
    (`kind` "py") or its C twin in the engine's mode `kind` ("jit", "interp"; EMU_EBPF_ENGINE is set)."""

    def __init__(self, page_memory, run_prefix: str, tx_ports: str, exclude: bool = True,
                 page_size: int = 2048, npages: int = 1024, eth0_xmit: bool = False, eth2_xmit: bool = True,
                 kind: str = "py", mtu: int | None = None, eth1_mtu: int | None = None) -> None:
        if kind == "py":
            xdp = (f'{{program: "emu.programs:xdp_broadcast", params: {{tx_ports: {tx_ports}, '
                   f"exclude_ingress: {'true' if exclude else 'false'}}}}}")
        else:
            obj = bundled() / "xdp_broadcast.o"
            xdp = (f'{{object: "{obj}", program: xdp_broadcast, maps: {{tx_ports: {tx_ports}}}, '
                   f"globals: {{exclude_ingress: {int(exclude)}}}}}")
        topo = validate_topology_text(HOST.format(page_size=page_size, ring=RX_RING, xdp=xdp,
                                                  eth0_xmit=str(eth0_xmit).lower(),
                                                  eth2_xmit=str(eth2_xmit).lower(),
                                                  mtu="" if mtu is None else f", mtu: {mtu}",
                                                  mtu1="" if (eth1_mtu or mtu) is None else
                                                  f", mtu: {eth1_mtu or mtu}"), "t.yaml")
        host = topo.hosts["h1"]
        self.pm = pm = page_memory(npages=npages, page_size=page_size, ncpus=1)
        dev = host.devices["eth0"]
        if kind == "py":
            prog = load_program("emu.programs:xdp_broadcast")
            self.ms: MapSet | ObjMaps = MapSet.create(f"{run_prefix}-maps", prog.maps, 1, 0)
            populate(self.ms, prog.initial_maps(dev.xdp.params), IFX.__getitem__)
            maps = self.ms.maps
        else:  # as a run attaches an object: the coordinator's maps, a CPU worker's program and devmaps
            self.ms = create_object_maps(f"{run_prefix}-maps", dev, host)
            prog, maps = program_for(dev, f"{run_prefix}-maps", 1, 0)  # type: ignore[assignment]
        ctx = prog.new_context(2, 0, 0, dev.xdp.params, maps, IFX)
        rxq = RxQueue("eth0", 2, 0, RX_RING, prog.fn, ctx, prog.batch, refill_batch(RX_RING))
        self.counts = Counters("cpu")
        self.out = FakeOutbox()
        self.core = NapiCore(host, 0, pm, pool_of(pm, 0, owner=True), [rxq], self.out, self.counts.array,
                             self.counts.index, lambda key, text: None)

    def close(self) -> None:
        self.ms.unlink()
        self.ms.close()

    def receive(self, n: int, length: int | list[int] = 64) -> tuple[np.ndarray, list[bytes]]:
        """`n` frames into eth0's ring, of `length` bytes (one for all, or one each)."""
        core, pm = self.core, self.pm
        core.refill()
        core.post_flush()
        (_, _, _, posted), = self.out.take("post")
        d = posted[:n].copy()
        lengths = [length] * n if isinstance(length, int) else length
        frames = []
        for k, size in enumerate(lengths):
            f = bytes([k % 251]) * size
            p = int(d["page"][k])
            start = p * pm.page_size + XDP_PACKET_HEADROOM
            pm.data[start : start + size] = np.frombuffer(f, np.uint8)
            pm.len[p] = size
            frames.append(f)
        d["len"] = lengths
        core.dispatch(wire.pack_msg("rx", {"dev": "eth0", "q": 0}, d.tobytes()))
        return d["page"].astype(np.int64), frames

    def frame_of(self, page: int) -> bytes:
        pm = self.pm
        start = page * pm.page_size + int(pm.off[page])
        return bytes(pm.data[start : start + int(pm.len[page])])

    def complete(self, xmit: list[tuple]) -> None:
        """Play the devices: put every transmitted frame on the wire, then complete it to the CPU."""
        for to, _, hdr, d in xmit:
            tx_dma_start(self.pm, d["page"])
            self.core.dispatch(wire.pack_msg("txc", {"dev": to, "txq": hdr["txq"]}, d.tobytes()))


@pytest.fixture(params=["py", "jit", "interp"])
def bcast(request, page_memory, run_prefix, monkeypatch):
    """Bcast for the Python program and for its C twin in each engine mode."""
    made: list[Bcast] = []
    if request.param != "py":
        monkeypatch.setenv("EMU_EBPF_ENGINE", request.param)

    def make(*args, **kw) -> Bcast:
        b = Bcast(page_memory, f"{run_prefix}-{len(made)}", *args, kind=request.param, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def test_three_targets_one_pool_page_and_two_page_allocator_pages(bcast) -> None:
    b = bcast("{0: eth0, 1: eth1, 2: eth2, 3: eth3}")
    pm = b.pm
    ids, frames = b.receive(10)
    free_before = pm.free_count
    hold_before = int(pm.pool_counters[0, C["hold_cnt"]])
    assert b.core.poll_pass(got=1, refilling=False) == 10
    assert b.counts["xdp_redirect"] == 10 and b.counts["xdpf_clone"] == 20 and b.counts["redirect_err"] == 0
    xmit = {to: (hdr, d) for to, _, hdr, d in b.out.take("xmit")}
    assert sorted(xmit) == ["eth1", "eth2", "eth3"]  # eth0, the ingress device, is excluded
    # The last target gets the frames themselves; the others a clone each, in page-allocator pages.
    assert xmit["eth3"][1]["page"].tolist() == ids.tolist()
    clones = np.concatenate([xmit["eth1"][1]["page"], xmit["eth2"][1]["page"]]).astype(np.int64)
    assert len(np.unique(clones)) == 20 and not np.isin(clones, ids).any()
    assert (pm.owner[clones] == ORDER0_OWNER).all() and (pm.refcnt[clones] == 1).all()
    assert (pm.state[clones] == PageState.TX_QUEUED).all()
    for dev in ("eth1", "eth2"):
        assert [b.frame_of(int(p)) for p in xmit[dev][1]["page"]] == frames
    assert pm.free_count == free_before - 20  # straight from the page allocator...
    assert int(pm.pool_counters[0, C["hold_cnt"]]) == hold_before  # ...not from the pool
    assert int(pm.header[13]) == 20 and audit(pm, strict=True).problems == []
    # TX completion: the clones go back to the page allocator, the originals to the pool's cache.
    cached = int(pm.pool_counters[0, C["recycle_cached"]])
    b.complete([(to, None, hdr, d) for to, (hdr, d) in xmit.items()])
    # This CPU's own completions wait for its next NAPI poll (txc_release: deferred), which reaps them.
    b.core.reap_tx()
    assert b.counts["tx_completions"] == 30 and b.counts["remote_returns"] == 0
    assert (pm.state[clones] == PageState.FREE).all() and pm.free_count == free_before
    assert (pm.state[ids] == PageState.CACHE).all()
    assert int(pm.pool_counters[0, C["recycle_cached"]]) == cached + 10
    assert int(pm.pool_counters[0, C["recycle_ring"]]) == 0 and int(pm.pool_counters[0, C["double_free"]]) == 0
    a = audit(pm, strict=True)
    assert a.problems == [] and a.by_state["tx_queued"] == a.by_state["tx_inflight"] == 0


def test_a_map_of_the_ingress_device_only_sends_nothing(bcast) -> None:
    b = bcast("{0: eth0}")
    ids, _ = b.receive(12)
    b.core.poll_pass(got=1, refilling=False)
    # The kernel's dev_map_enqueue_multi: no destination, the frame is freed and the redirect succeeded.
    assert b.counts["xdp_redirect"] == 12 and b.counts["redirect_bcast_empty"] == 12
    assert b.counts["redirect_err"] == 0 and b.counts["xdpf_clone"] == 0 and b.out.take("xmit") == []
    assert (b.pm.state[ids] == PageState.CACHE).all()


def test_without_exclude_ingress_the_ingress_device_gets_one_too(bcast) -> None:
    b = bcast("{0: eth0, 1: eth1}", exclude=False, eth0_xmit=True)
    ids, _ = b.receive(5)
    b.core.poll_pass(got=1, refilling=False)
    xmit = {to: d for to, _, _, d in b.out.take("xmit")}
    assert sorted(xmit) == ["eth0", "eth1"] and b.counts["xdpf_clone"] == 5
    assert xmit["eth1"]["page"].tolist() == ids.tolist()  # the last in map order: the originals


def test_devices_without_ndo_xdp_xmit_are_skipped(bcast) -> None:
    b = bcast("{1: eth1, 2: eth2, 3: eth3}", eth2_xmit=False)
    b.receive(4)
    b.core.poll_pass(got=1, refilling=False)
    assert sorted(to for to, *_ in b.out.take("xmit")) == ["eth1", "eth3"] and b.counts["xdpf_clone"] == 4


def test_a_frame_larger_than_a_page_cannot_be_cloned(bcast) -> None:
    b = bcast("{1: eth1, 2: eth2}", page_size=8192, mtu=4000)
    ids, _ = b.receive(3, length=4000)  # at offset 256: it ends past the kernel's 4,096-byte page
    b.core.poll_pass(got=1, refilling=False)
    assert b.counts["redirect_err"] == 3 and b.counts["xdpf_clone"] == 0 and b.out.take("xmit") == []
    assert (b.pm.state[ids] == PageState.CACHE).all() and audit(b.pm, strict=True).problems == []
    # One target needs no clone: the frame itself goes.
    one = bcast("{1: eth1}", page_size=8192, mtu=4000)
    ids, _ = one.receive(3, length=4000)
    one.core.poll_pass(got=1, refilling=False)
    assert one.counts["redirect_err"] == 0 and [to for to, *_ in one.out.take("xmit")] == ["eth1"]


def test_a_target_whose_mtu_a_frame_exceeds_is_skipped_for_that_frame(bcast) -> None:
    """is_valid_dst's xdp_ok_fwd_dev, frame by frame: eth1 (mtu 1000) gets the short frames only, eth2
    and eth3 (mtu 3000) every frame; no error, every page home after the completions."""
    b = bcast("{1: eth1, 2: eth2, 3: eth3}", page_size=4096, mtu=3000, eth1_mtu=1000)
    b.receive(7, length=[600, 2000, 600, 2000, 600, 2000, 600])
    b.core.poll_pass(got=1, refilling=False)
    assert b.counts["redirect_err"] == 0 and b.counts["redirect_bcast_empty"] == 0
    assert b.counts["xdpf_clone"] == 4 * 2 + 3 * 1
    xmit = b.out.take("xmit")
    got = {}
    for to, _, _, d in xmit:
        got.setdefault(to, []).extend(int(b.pm.len[p]) for p in d["page"])
    assert sorted(got["eth1"]) == [600] * 4
    assert sorted(got["eth2"]) == sorted(got["eth3"]) == [600] * 4 + [2000] * 3
    b.complete(xmit)
    b.core.reap_tx()
    a = audit(b.pm, strict=True)
    assert a.problems == [] and int(b.pm.header[13]) == 11  # the clones the page allocator gave out
    assert a.by_state["tx_queued"] == a.by_state["tx_inflight"] == 0
    # A frame too long for every target: nothing to send, as for a map without targets.
    none = bcast("{1: eth1}", page_size=4096, mtu=1000)
    ids, _ = none.receive(2, length=2000)
    none.core.poll_pass(got=1, refilling=False)
    assert none.counts["redirect_bcast_empty"] == 2 and none.out.take("xmit") == []
    assert (none.pm.state[ids] == PageState.CACHE).all()


def test_no_page_left_to_clone_into_is_enomem_and_loses_nothing(bcast) -> None:
    b = bcast("{1: eth1, 2: eth2, 3: eth3}", npages=80)
    ids, _ = b.receive(40)
    # 80 pages: the pool took 64 for eth0's ring, 16 are left; 40 frames need 80 clones.
    b.core.poll_pass(got=1, refilling=False)
    assert b.counts["redirect_err"] == 40 and b.counts["xdpf_clone"] == 0 and b.out.take("xmit") == []
    assert (b.pm.state[ids] == PageState.CACHE).all()
    assert audit(b.pm, strict=True).problems == [] and int(b.pm.header[13]) == 0


def test_broadcast_flags_per_packet_and_vectorised(run_prefix) -> None:
    prog = load_program("emu.programs:xdp_broadcast")
    ms = MapSet.create(f"{run_prefix}-m", prog.maps, 1)
    try:
        tx = ms.maps["tx_ports"]
        ctx = XdpContext(2, 0, 0, maps=ms.maps)
        flags = BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS
        assert ctx.redirect_map(tx, 7, flags) == XDP_REDIRECT and ctx.redirect_ifindex == tx.bcast_base | 1
        assert ctx.redirect_map(tx, 0, BPF_F_BROADCAST) == XDP_REDIRECT and ctx.redirect_ifindex == tx.bcast_base
        assert ctx.redirect_map(tx, 0, flags | 1 << 5) == XDP_ABORTED  # an unknown flag
        # BPF_F_EXCLUDE_INGRESS without BPF_F_BROADCAST: a plain lookup, its miss the low bits' action
        assert ctx.redirect_map(tx, 0, BPF_F_EXCLUDE_INGRESS | XDP_PASS) == XDP_PASS
        tx[0] = 5
        assert ctx.redirect_map(tx, 0, BPF_F_EXCLUDE_INGRESS) == XDP_REDIRECT and ctx.redirect_ifindex == 5
        # ...and the same in the vectorised form
        batch = XdpBatch(np.zeros((3, 64), np.uint8), np.arange(3), np.zeros(3, np.int64), np.full(3, 60, np.int64))
        assert batch.redirect_map(tx, np.array([0, 1, 0]), flags=BPF_F_EXCLUDE_INGRESS | XDP_PASS).tolist() == \
            [XDP_REDIRECT, XDP_PASS, XDP_REDIRECT]
        assert batch.redirect_map(tx, 0, flags=flags | 1 << 5).tolist() == [XDP_ABORTED] * 3
    finally:
        ms.unlink()
        ms.close()


@pytest.mark.parametrize("mode", ["jit", "interp"])
@pytest.mark.parametrize("exclude", [True, False])
def test_the_engine_returns_redirect_and_a_broadcast_code(mode: str, exclude: bool) -> None:
    """The kernel's __bpf_xdp_redirect_map with BPF_F_BROADCAST: XDP_REDIRECT whatever the map holds (it
    is empty here), the target the map's broadcast code, its low bit BPF_F_EXCLUDE_INGRESS."""
    from emu.ebpf.elf import load_object
    from emu.ebpf.engine import Engine

    obj = load_object(bundled() / "xdp_broadcast.o", {"exclude_ingress": int(exclude)})
    with Engine(obj, engine=mode) as eng:
        out = eng.run("xdp_broadcast", [bytes(60), bytes(14), b""])
        (tx,) = eng.maps.devmaps().values()
    assert tx.name == "tx_ports" and tx.bcast_base == REDIRECT_BROADCAST | obj.map_index("tx_ports") << 16
    assert out == [(XDP_REDIRECT, f, tx.bcast_base | exclude) for f in (bytes(60), bytes(14), b"")]


def test_an_object_devmap_hash_lists_its_devices_in_bucket_order(run_prefix) -> None:
    """dev_map_enqueue_multi walks a devmap_hash bucket by bucket (key & (n_buckets - 1), n_buckets the
    max_entries rounded up to a power of two); a deleted device is gone from the next broadcast."""
    dh = MapDef("dh", BPF_MAP_TYPE_DEVMAP_HASH, 4, 4, 6)
    with ObjMaps.create(f"{run_prefix}-dh", [dh], 1) as om:
        try:
            for key, ifx in ((9, 30), (3, 31), (0, 32), (7, 33)):  # 8 buckets: 9 is in bucket 1
                om.update("dh", key, ifx)
            view = om.devmaps()["dh"]
            assert isinstance(view, ObjDevMap) and view.ifindexes == [32, 30, 31, 33]
            om.delete("dh", 3)
            assert view.ifindexes == [32, 30, 33]
        finally:
            om.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["broadcast", "broadcast-obj"])
def test_broadcast_topology_floods_three_sinks_and_accounts_for_every_page(name: str) -> None:
    if name == "broadcast-obj":
        bundled()  # the C twin's object, built where it is not yet
    topo = load_topology(ROOT / "topology" / f"{name}.yaml")
    r = Run(topo, RunOptions(count=20_000, interval=0.5, out=io.StringIO())).run()
    assert multiprocessing.active_children() == []
    assert all(n == 0 for n in r["violations"].values()), r["violations"]
    t = r["traffic"]
    assert t["generated"] == 20_000 and t["unaccounted"] == 0 and t["corrupted"] == 0 and t["duplicates"] == 0
    # Every packet reached all three sinks: two clones and the frame itself (the topology leaves the page
    # allocator enough pages for every clone, and the TX rings hold back RX rather than drop).
    assert t["dropped"] == 0, t["drops"]
    assert t["cloned"] == 40_000 and t["delivered"] == 60_000
    assert {k: v["verified"] for k, v in t["ports"].items() if k.startswith("sink")} == {
        "sink1": 20_000, "sink2": 20_000, "sink3": 20_000}
    assert sum(c["xdpf_clone"] for c in r["cpus"]) == 40_000
    p = r["pages"]
    assert p["clone_pages"] == p["clone_pages_freed"] == 40_000
    assert p["total"] == p["accounted"] == p["by_state"]["free"] and not p["problems"], p
    for c in r["cpus"]:
        pp = c["page_pool"]
        assert pp["hold_cnt"] == pp["release_cnt"]
    eth = {d["name"]: d for d in r["devices"]}
    assert [eth[n]["xdp_xmit"] for n in ("eth1", "eth2", "eth3")] == [20_000] * 3
    assert [eth[n]["tx_completions"] for n in ("eth1", "eth2", "eth3")] == [20_000] * 3
