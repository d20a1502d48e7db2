"""Generated VALID topologies: every one the schema accepts runs on its own to the end and accounts for
every packet and every page.

A hypothesis strategy (`topologies`) draws topology files from the schema of ``topology/README.md``:
one to three hosts of 1..8 CPUs, 1..3 devices each with 1..8 RX/TX queues, rings from the smallest
allowed (8) up, biased towards small and odd sizes, pages from the least the validator allows
(`min_pages`) upwards, page sizes (some split into fragments: ``pool.frag_size``), page-pool parameters,
NAPI budget and bulk sizes, the bundled XDP programs with valid params (or none), links from traffic
ports to devices and between devices of different hosts (some impaired), generators with small counts,
and sinks.  One topology in four is XDP multi-buffer throughout: every device has ``rx-sg`` (some
``ndo-xmit-sg``), an MTU beyond one RX buffer (up to 9000), RX and TX rings holding its largest frame and a
frags program (or none), so that generators' frames of up to the smallest MTU span buffers.  Each is validated with
`emu.topology.validate_topology_text`, then run with ``emu run FILE --json F -q`` in its own process
group, and must end by itself with ``generated == delivered + dropped + consumed``, nothing
unaccounted, nothing corrupted, every page home and no violation (`test_emulation.assert_clean`).  A
run still going after `RUN_DEADLINE` seconds is interrupted, then killed, and the test fails with the
topology's text; nothing here asserts how long anything takes.

Tiers:

* CI (``-m slow``, the default): `CI_EXAMPLES` examples, ``derandomize=True``, so every CI run draws
  the same topologies.
* More, random examples: set ``EMU_GENERATED_EXAMPLES``, e.g.::

      EMU_GENERATED_EXAMPLES=300 .venv/bin/python -m pytest -q tests/test_generated_topologies.py -k generated

  Failing examples are kept in hypothesis' database (``.hypothesis/``) and replayed first next time;
  each one found so far is an explicit regression test below.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import ROOT, descendants_of, segments_of
from test_emulation import assert_clean

from emu.mem.shm import sweep_stale, unlink_prefix
from emu.net.packets import MIN_PKT_SIZE
from emu.topology.file import validate_topology_text
from emu.topology.model import max_frame, max_linear_mtu, max_sg_mtu, sg_buffers
from emu.topology.schema import SECTIONS
from emu.topology.schema import min_pages as schema_min_pages

CI_EXAMPLES = 30
EXAMPLES = int(os.environ.get("EMU_GENERATED_EXAMPLES", "0") or 0)
RUN_DEADLINE = 120.0  # seconds before a run that has not ended is declared hung
# Each host's page memory stays below this (pages x page_size), so that examples run side by side.
HOST_BYTES = 64 << 20
PAGE_SIZES = (1024, 2048, 4096, 8192, 16384)
PROGRAMS = ("xdp_drop", "xdp_pass", "xdp_tx", "l2fwd", "l2fwd_map")
# The programs that support XDP multi-buffer (frags=True): the only ones a device whose MTU needs more
# than one RX buffer may run.
SG_PROGRAMS = ("xdp_pass", "xdp_tx", "l2fwd_frags")
SG_MTU_MAX = 9000


def min_pages(host: Any) -> int:
    """The fewest pages the validator accepts for `host` (anything with ``cpus``, ``pool.cache_size``
    and ``devices`` of ``rx_queues`` and ``rx_ring_size``, like `emu.topology.HostConfig`): the schema's
    `emu.topology.schema.min_pages`, and never below the least ``pages`` the schema allows at all."""
    return max(SECTIONS["host"]["pages"].lo, schema_min_pages(host))


# -- the strategy ----------------------------------------------------------------------------------

def _small_or_any(lo: int, hi: int, usual: int | None = None) -> st.SearchStrategy[int]:
    """An int in lo..hi, biased towards the ends and small values (where limits hide)."""
    parts = [st.sampled_from(sorted({lo, hi})), st.integers(lo, min(hi, lo + 8)), st.integers(lo, hi)]
    if usual is not None:
        parts.insert(0, st.just(usual))
    return st.one_of(*parts)


def _ring(hi: int) -> st.SearchStrategy[int]:
    """A ring size: the smallest allowed, small and odd sizes, sizes around the link batch (256), any."""
    odd = [n for n in (8, 9, 13, 16, 31, 63, 64, 65, 100, 127, 128, 255, 256, 257, 511, 1024) if n <= hi]
    return st.one_of(st.sampled_from(odd), st.integers(8, min(hi, 300)), st.integers(8, hi))


@st.composite
def _host(draw: st.DrawFn, name: str, sg: bool = False) -> SimpleNamespace:
    """A host; `sg`: every device takes XDP multi-buffer frames (``rx-sg``, an MTU beyond one RX buffer,
    RX and TX rings holding its largest frame, a frags program or none) where the host's buffers are small
    enough for that to mean anything."""
    cpus = draw(st.one_of(st.integers(1, 4), st.integers(1, 8)))
    ndev = draw(st.integers(1, 3))
    devices: dict[str, SimpleNamespace] = {}
    for k in range(ndev):
        rxq = draw(st.one_of(st.integers(1, 4), st.integers(1, 8)))
        txq = draw(st.one_of(st.integers(1, 4), st.integers(1, 8)))
        # Rings large enough to matter, small enough that every host's memory stays bounded.
        hi = max(8, 12288 // (rxq * ndev))
        devices[f"eth{k}"] = SimpleNamespace(
            ifindex=k + 2, rx_queues=rxq, tx_queues=txq, rx_ring_size=draw(_ring(hi)),
            tx_ring_size=draw(_ring(4096)),
            rx_cpus=draw(st.none() | st.lists(st.integers(0, cpus - 1), min_size=rxq, max_size=rxq)),
            tx_cpus=draw(st.none() | st.lists(st.integers(0, cpus - 1), min_size=txq, max_size=txq)),
            xdp_xmit=draw(st.sampled_from([True, True, True, False])),
            redirect_fallback=draw(st.sampled_from(["drop", "skb"])),
            tx_completion_us=draw(st.one_of(st.just(0), st.integers(0, 2000))),
            program=draw(st.sampled_from([None, *PROGRAMS])),
            vectorised=draw(st.booleans()),
        )
    for dev in devices.values():
        dev.egress = draw(st.sampled_from(sorted(devices)))
    cache = draw(_small_or_any(1, 512, usual=128))
    pool = SimpleNamespace(
        cache_size=cache,
        refill=draw(st.none() | _small_or_any(1, cache)),
        pool_size=draw(st.one_of(st.just(0), st.integers(1, 64), st.integers(0, 4096))),
        recycle_limit=draw(st.one_of(st.just(0), st.integers(1, 256), st.integers(0, 100_000))),
    )
    host = SimpleNamespace(name=name, cpus=cpus, pool=pool, devices=devices,
                           napi_budget=draw(_small_or_any(1, 1024, usual=64)),
                           redirect_bulk=draw(_small_or_any(1, 1024, usual=16)),
                           tx_bulk=draw(_small_or_any(1, 1024, usual=16)),
                           stack_cpu=draw(st.none() | st.integers(0, cpus - 1)),
                           txc_release=draw(st.sampled_from([None, "deferred", "immediate"])))
    # Fragments per page (pool.frag_size = page_size / split, page_pool_alloc_frag): kept to buffers of
    # 1,024 bytes or more, so that an RX buffer still takes an MTU (68 .. its max_mtu).
    split = draw(st.sampled_from([1, 1, 1, 2, 4]))

    def least_for(ps: int) -> int:
        host.page_size = ps
        host.buf_size = ps // split if ps // split >= 1024 else ps
        return min_pages(host)

    sizes = [ps for ps in PAGE_SIZES if not sg or max_linear_mtu(ps // split) < SG_MTU_MAX]
    fits = [ps for ps in sizes if least_for(ps) * ps <= HOST_BYTES] or [1024]
    least = least_for(draw(st.sampled_from(fits)))
    # The MTU: the default (1500, or what one RX buffer takes) or any a buffer takes.
    most = min(9000, max_linear_mtu(host.buf_size))
    for dev in devices.values():
        dev.mtu = draw(st.none() | st.sampled_from([68, most]) | st.integers(68, most))
        dev.features = None
    linear = max_linear_mtu(host.buf_size)
    if sg and linear < SG_MTU_MAX:
        top = min(SG_MTU_MAX, max_sg_mtu(host.buf_size))
        for dev in devices.values():
            dev.mtu = draw(st.sampled_from([linear + 1, top]) | st.integers(linear + 1, top))
            dev.features = ["basic", "redirect", *(["ndo-xmit"] if dev.xdp_xmit else []),
                            *(["ndo-xmit-sg"] if dev.xdp_xmit and draw(st.booleans()) else []), "rx-sg"]
            # Both rings take the largest frame's buffers (an RX descriptor, and a TX one, each).
            dev.rx_ring_size = max(dev.rx_ring_size, sg_buffers(max_frame(dev.mtu), host.buf_size))
            dev.tx_ring_size = max(dev.tx_ring_size, sg_buffers(max_frame(dev.mtu), host.buf_size))
            dev.program = draw(st.sampled_from([None, *SG_PROGRAMS]))
        least = min_pages(host)
    extra = draw(st.one_of(st.just(0), st.integers(0, 64), st.integers(0, 8192)))
    host.pages = min(max(least, least + extra if (least + extra) * host.page_size <= HOST_BYTES else least),
                     1048576)
    return host


def _output(hosts: dict[str, SimpleNamespace], ep: str) -> str | None:
    """The device a frame received on device `ep` leaves through (None: it ends there: dropped,
    consumed by the stack)."""
    h, d = ep.split(":")
    dev = hosts[h].devices[d]
    if dev.program == "xdp_tx":
        return ep
    if dev.program in ("l2fwd", "l2fwd_map", "l2fwd_frags"):
        return f"{h}:{dev.egress}"
    return None


def _break_loops(hosts: dict[str, SimpleNamespace], peer: dict[str, str]) -> None:
    """Frames must leave the network: a chain of devices forwarding into each other in a circle would
    carry them forever (as a real L2 loop does), so one device of each circle drops instead."""
    for start in [f"{h}:{d}" for h, host in hosts.items() for d in host.devices]:
        seen: list[str] = []
        ep: str | None = start
        while ep is not None and ":" in ep:
            if ep in seen:
                h, d = ep.split(":")
                dev = hosts[h].devices[d]
                dev.program = "xdp_drop" if dev.features is None else "xdp_pass"  # (a frags program)
                break
            seen.append(ep)
            out = _output(hosts, ep)
            ep = peer.get(out) if out is not None else None


def _device_yaml(dev: SimpleNamespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ifindex": dev.ifindex, "rx_queues": dev.rx_queues, "tx_queues": dev.tx_queues,
        "rx_ring_size": dev.rx_ring_size, "tx_ring_size": dev.tx_ring_size, "xdp_xmit": dev.xdp_xmit,
        "redirect_fallback": dev.redirect_fallback, "tx_completion_us": dev.tx_completion_us,
    }
    if dev.mtu is not None:
        out["mtu"] = dev.mtu
    if dev.features is not None:
        out["xdp_features"] = dev.features
    if dev.rx_cpus is not None:
        out["rx_cpus"] = dev.rx_cpus
    if dev.tx_cpus is not None:
        out["tx_cpus"] = dev.tx_cpus
    if dev.program is not None:
        xdp: dict[str, Any] = {"program": f"emu.programs:{dev.program}", "vectorised": dev.vectorised}
        if dev.program in ("l2fwd", "l2fwd_frags"):
            xdp["params"] = {"egress": dev.egress}
        elif dev.program == "l2fwd_map":
            xdp["params"] = {"tx_port": {0: dev.egress}}
        out["xdp"] = xdp
    return out


@st.composite
def topologies(draw: st.DrawFn) -> str:
    """The text of a valid topology file (see the module docstring)."""
    nhosts = draw(st.sampled_from([1, 1, 1, 2, 2, 3]))
    # XDP multi-buffer everywhere (one device without it would bound every generator's frames to one buffer).
    sg = draw(st.sampled_from([False, False, False, True]))
    hosts = {f"h{k + 1}": draw(_host(f"h{k + 1}", sg)) for k in range(nhosts)}
    endpoints = draw(st.permutations([f"{h}:{d}" for h, host in hosts.items() for d in host.devices]))
    ngen = draw(st.integers(1, min(2, len(endpoints))))
    # Frames may cross to any host: they must fit the smallest MTU of all (a device's default is 1500 or
    # what one RX buffer takes; the schema bounds a generator's frames by the hosts it is cabled to only).
    max_pkt = max_frame(min(min(1500, max_linear_mtu(h.buf_size)) if d.mtu is None else d.mtu
                            for h in hosts.values() for d in h.devices.values()))
    traffic: dict[str, Any] = {}
    links: list[dict[str, Any]] = []
    peer: dict[str, str] = {}

    def cable(a: str, b: str) -> None:
        link: dict[str, Any] = {"endpoints": [a, b]}
        if draw(st.integers(0, 5)) == 0:
            imp = draw(st.fixed_dictionaries({}, optional={
                "delay": st.integers(0, 2000).map(lambda us: f"{us}us"),
                "jitter": st.integers(0, 500).map(lambda us: f"{us}us"),
                "loss": st.sampled_from(["0%", "0.1%", "1%", "5%"]),
                "rate": st.sampled_from(["100mbit", "1gbit", "10gbit"]),
            }))
            link.update(imp)
        links.append(link)
        peer[a], peer[b] = b, a

    for k, ep in enumerate(endpoints[:ngen]):
        traffic[f"gen{k}"] = {"generate": {
            "count": draw(st.one_of(st.integers(50, 500), st.integers(50, 3000))),
            "pkt_size": draw(st.one_of(st.just(64), st.just(max_pkt), st.integers(MIN_PKT_SIZE, max_pkt))),
            "flows": draw(st.one_of(st.just(16), st.integers(1, 64), st.integers(1, 65536))),
            "burst": draw(st.one_of(st.just(64), st.integers(1, 300), st.integers(1, 4096))),
            "rate": draw(st.one_of(st.just(0), st.just(0), st.integers(20_000, 1_000_000))),
        }}
        cable(f"gen{k}", ep)
    rest = list(endpoints[ngen:])
    nsink = 0
    while rest:
        ep = rest.pop(0)
        what = draw(st.sampled_from(["none", "sink", "sink", "cable", "cable"]))
        others = [x for x in rest if x.split(":")[0] != ep.split(":")[0]]
        if what == "cable" and others:
            other = draw(st.sampled_from(others))
            rest.remove(other)
            cable(ep, other)
        elif what != "none":
            traffic[f"sink{nsink}"] = {}
            cable(ep, f"sink{nsink}")
            nsink += 1
    _break_loops(hosts, peer)
    doc: dict[str, Any] = {"name": "generated", "hosts": {}, "traffic": traffic, "links": links}
    for h, host in hosts.items():
        pool: dict[str, Any] = {"cache_size": host.pool.cache_size, "pool_size": host.pool.pool_size,
                                "recycle_limit": host.pool.recycle_limit}
        if host.pool.refill is not None:
            pool["refill"] = host.pool.refill
        if host.buf_size != host.page_size:
            pool["frag_size"] = host.buf_size
        spec: dict[str, Any] = {
            "cpus": host.cpus, "pages": host.pages, "page_size": host.page_size, "napi_budget": host.napi_budget,
            "redirect_bulk": host.redirect_bulk, "tx_bulk": host.tx_bulk, "pool": pool,
            "devices": {d: _device_yaml(dev) for d, dev in host.devices.items()},
        }
        if host.stack_cpu is not None:
            spec["stack_cpu"] = host.stack_cpu
        if host.txc_release is not None:
            spec["txc_release"] = host.txc_release
        doc["hosts"][h] = spec
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)


# -- running one ------------------------------------------------------------------------------------

# Runs a topology whose host `h` gets `pages` pages whatever the file says: a host with fewer pages
# than its rings need (which the validator refuses) must still never hang the data path.
UNDERSIZED = """
import dataclasses, json, sys
from emu.run.coordinator import Run, RunOptions
from emu.topology.file import load_topology
path, out, host, pages = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
topo = load_topology(path)
topo = dataclasses.replace(topo, hosts={**topo.hosts, host: dataclasses.replace(topo.hosts[host], pages=pages)})
report = Run(topo, RunOptions(quiet=True)).run()
with open(out, "w") as f:
    json.dump(report, f)
"""


def run_topology(text: str, tmp: Path, argv: list[str] | None = None) -> dict:
    """Run the topology `text` in its own process group (by default ``emu run FILE --json F -q``) and
    return its report; fail, with the topology, if it has not ended after `RUN_DEADLINE` seconds."""
    path = tmp / "topo.yaml"
    path.write_text(text)
    out = tmp / "report.json"
    out.unlink(missing_ok=True)
    cmd = argv or [sys.executable, "-m", "emu.cli", "run", str(path), "--json", str(out), "-q"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=RUN_DEADLINE)
    except subprocess.TimeoutExpired:
        # Interrupt it (an orderly teardown that still reports), then kill whatever is left.
        p.send_signal(signal.SIGINT)
        try:
            stdout, stderr = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            stdout, stderr = p.communicate()
        sweep_stale()
        report = out.read_text() if out.exists() else "(no report)"
        pytest.fail(f"the run did not end within {RUN_DEADLINE:.0f} s\n--- topology ---\n{text}\n"
                    f"--- stderr ---\n{stderr[-3000:]}\n--- report ---\n{report[:6000]}")
    left = segments_of(p.pid)
    for name in left:
        unlink_prefix(name)
    assert left == [] and descendants_of(p.pid) == []
    assert out.exists(), f"no report (exit {p.returncode})\n--- topology ---\n{text}\n--- stderr ---\n{stderr}"
    report = json.loads(out.read_text())
    try:
        assert_clean(report)
        assert p.returncode == 0, (p.returncode, stderr[-3000:])
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- topology ---\n{text}\n--- stdout ---\n{stdout[-3000:]}"
                             f"\n--- stderr ---\n{stderr[-3000:]}") from exc
    return report


def _settings() -> settings:
    if EXAMPLES:
        return settings(max_examples=EXAMPLES, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    return settings(max_examples=CI_EXAMPLES, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=topologies())
def test_the_strategy_draws_valid_topologies(text: str) -> None:
    """Every drawn topology is one the validator accepts, with pages the validator's least."""
    topo = validate_topology_text(text, "generated.yaml")
    for host in topo.hosts.values():
        assert host.pages >= min_pages(host)
    assert any(p.generate is not None and p.generate.count for p in topo.traffic.values())


@pytest.mark.slow
@_settings()
@given(text=topologies())
def test_generated_topologies_run_and_account_for_everything(text: str, tmp_path_factory) -> None:
    validate_topology_text(text, "generated.yaml")
    run_topology(text, tmp_path_factory.mktemp("gen"))


# -- the reported cases, and what generation found --------------------------------------------------

TOPO = ROOT / "topology"


def _l2fwd(rx_ring: int | None = None) -> str:
    text = (TOPO / "l2fwd.yaml").read_text()
    if rx_ring is not None:
        assert text.count("rx_ring_size: 4096") == 2
        text = text.replace("rx_ring_size: 4096", f"rx_ring_size: {rx_ring}", 1)
    return text


def _count(text: str, n: int) -> str:
    assert "generate:\n" in text
    return text.replace("generate:\n", f"generate:\n      count: {n}\n", 1)


@pytest.mark.slow
@pytest.mark.parametrize("ring", [8, 9, 63, 128, 255])
def test_l2fwd_with_an_rx_ring_smaller_than_a_link_batch_forwards_everything(ring: int, tmp_path: Path) -> None:
    """``rx_ring_size: 128`` (or 8) on topology/l2fwd.yaml's eth0: a link message (256 frames) never
    fits the ring at once; what does not fit waits in the RX FIFO with the link paused, and every frame
    is forwarded.  (Before: eth0 took no frame at all and the run never ended; rings under 64 were not
    even refilled.)"""
    r = run_topology(_count(_l2fwd(ring), 3000), tmp_path)
    t = r["traffic"]
    eth0 = r["devices"][0]
    assert t["generated"] == 3000
    assert t["delivered"] + eth0["rx_dropped"] == 3000, t
    assert eth0["rx_completed"] == t["delivered"] > 0
    assert eth0["tx_flow_control_xoff"] > 0  # a 256-frame message never fit: the link was paused


XDP_DROP_2CPU = """
name: drop2
hosts:
  h1:
    cpus: 2
    pages: {pages}
    devices:
      eth0:
        ifindex: 2
        rx_ring_size: 256
        rx_queues: 2
        xdp: {{program: "emu.programs:xdp_drop"}}
traffic:
  gen0: {{generate: {{count: 5000, flows: 64}}}}
links:
  - endpoints: [gen0, "h1:eth0"]
"""


@pytest.mark.slow
def test_xdp_drop_on_two_cpus_with_too_few_pages_ends_and_accounts(tmp_path: Path) -> None:
    """The report: xdp_drop on 2 CPUs with 2 RX rings of 256 and 512 pages received 256 frames and
    stopped.  The validator now wants 2 x 256 + 2 x 128 pages; a host given fewer anyway (here by
    bypassing validation) leaves a queue without buffers, whose frames are dropped after the pause,
    never a hang, and every packet is accounted for."""
    text = XDP_DROP_2CPU.format(pages=2 * 256 + 2 * 128)
    validate_topology_text(text, "drop2.yaml")
    r = run_topology(text, tmp_path, [sys.executable, "-c", UNDERSIZED, str(tmp_path / "topo.yaml"),
                                      str(tmp_path / "report.json"), "h1", "512"])
    t = r["traffic"]
    assert t["generated"] == 5000
    assert t["dropped"] == 5000 == sum(c["xdp"]["drop"] for c in r["cpus"]) + r["devices"][0]["rx_dropped"]


@pytest.mark.slow
def test_xdp_drop_on_two_cpus_with_the_least_pages_drops_everything_at_xdp(tmp_path: Path) -> None:
    r = run_topology(XDP_DROP_2CPU.format(pages=2 * 256 + 2 * 128), tmp_path)
    assert r["traffic"]["dropped"] == 5000


L2FWD_4CPU = """
name: l2fwd4
hosts:
  h1:
    cpus: 4
    devices:
      eth0:
        ifindex: 2
        rx_ring_size: 256
        tx_ring_size: 64
        xdp: {program: "emu.programs:l2fwd", params: {egress: eth1}}
      eth1: {ifindex: 3, rx_ring_size: 256, tx_ring_size: 64}
traffic:
  gen0: {generate: {count: 5000, flows: 64}}
  sink0: {}
links:
  - endpoints: [gen0, "h1:eth0"]
  - endpoints: ["h1:eth1", sink0]
"""


@pytest.mark.slow
def test_l2fwd_on_four_cpus_with_tx_rings_of_64_forwards_everything(tmp_path: Path) -> None:
    """The report: l2fwd on 4 CPUs with RX rings of 256 and TX rings of 64 never finished."""
    r = run_topology(L2FWD_4CPU, tmp_path)
    assert r["traffic"]["delivered"] == 5000, r["traffic"]


@pytest.mark.slow
@pytest.mark.parametrize("ring", [8, 16, 32, 63])
def test_rx_rings_smaller_than_a_refill_batch_are_refilled(ring: int, tmp_path: Path) -> None:
    """A CPU refilled a ring only once it was short of 64 buffers: rings under 64 were never filled,
    and their device never received.  Now a ring is refilled once it is short of half of it (at most 64)."""
    text = (TOPO / "xdp-drop.yaml").read_text().replace("rx_ring_size: 4096", f"rx_ring_size: {ring}")
    assert f"rx_ring_size: {ring}" in text
    r = run_topology(_count(text, 2000), tmp_path)
    assert sum(c["xdp"]["drop"] for c in r["cpus"]) > 0
    assert r["traffic"]["dropped"] == 2000


ONE_CPU = """
name: one
hosts:
  h1:
    cpus: 1
    pages: {pages}
    devices:
      eth0:
        ifindex: 2
        rx_ring_size: {ring}
        tx_ring_size: 256
        tx_completion_us: {completion_us}
        xdp: {{program: "emu.programs:{prog}"}}
traffic:
  gen0: {{generate: {{count: {count}}}}}
links:
  - endpoints: [gen0, "h1:eth0"]
"""


@pytest.mark.slow
def test_a_ring_the_pages_cannot_fill_still_receives_everything(tmp_path: Path) -> None:
    """A ring of 1,024 on a host of 256 pages (fewer than the validator wants; given anyway): the queue
    may never hold a link message's worth of buffers, yet every frame is received as buffers come back."""
    text = ONE_CPU.format(pages=1024 + 128, ring=1024, completion_us=0, prog="xdp_drop", count=3000)
    validate_topology_text(text, "one.yaml")
    r = run_topology(text, tmp_path, [sys.executable, "-c", UNDERSIZED, str(tmp_path / "topo.yaml"),
                                      str(tmp_path / "report.json"), "h1", "256"])
    assert r["traffic"]["dropped"] == 3000 == r["cpus"][0]["xdp"]["drop"] + r["devices"][0]["rx_dropped"]
    assert r["cpus"][0]["xdp"]["drop"] > 0


@pytest.mark.slow
def test_a_queue_without_buffers_drops_after_the_pause(tmp_path: Path) -> None:
    """Every page of the host is in flight for 3 s (XDP_TX, tx_completion_us: 3 s): the RX queue gets no
    buffer for longer than the pause (1 s), so the frames waiting for one are dropped as rx_dropped and
    the link resumes; the run ends on its own with every packet accounted for."""
    text = ONE_CPU.format(pages=256, ring=64, completion_us=3_000_000, prog="xdp_tx", count=2000)
    r = run_topology(text, tmp_path)
    t, eth0 = r["traffic"], r["devices"][0]
    assert eth0["rx_dropped"] > 0 and t["delivered"] > 0, (t, eth0)
    assert t["delivered"] + eth0["rx_dropped"] == 2000 == t["generated"]
    assert eth0["tx_flow_control_xoff"] > 0


IDLE_BIG_RING = """
name: idlering
hosts:
  h1:
    cpus: 1
    pages: 2048
    devices:
      eth0: {ifindex: 2, rx_ring_size: 256, xdp: {program: "emu.programs:xdp_drop"}}
  h2:
    cpus: 1
    pages: 12000
    page_size: 1024
    pool: {cache_size: 1}
    devices:
      eth0: {ifindex: 2, rx_ring_size: 5697}
  h3:
    cpus: 1
    pages: 2048
    devices:
      eth0: {ifindex: 2, rx_ring_size: 256}
traffic:
  gen0: {generate: {count: 200}}
links:
  - endpoints: [gen0, "h1:eth0"]
"""


@pytest.mark.slow
def test_a_large_ring_still_being_filled_at_down_comes_home(tmp_path: Path) -> None:
    """Found by generation: a 3-host topology whose h2 has an RX ring of 5,697 and a pool cache of 1 ended,
    one run in four (two in three with the other core loaded), with that ring `leaked`: h2's CPU was
    still filling it in a pass begun before DOWN when the coordinator saw every page home and sent
    EXIT.  The teardown now also waits for every CPU to acknowledge DOWN (tests/test_teardown.py has
    the deterministic version)."""
    r = run_topology(IDLE_BIG_RING, tmp_path)
    assert r["traffic"]["dropped"] == 200
