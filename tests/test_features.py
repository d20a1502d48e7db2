"""XDP feature flags per device (basic, redirect, ndo-xmit, ndo-xmit-sg, rx-sg): resolved from the topology,
shown in the report, deciding a redirect's fate; redirect errors counted by errno as xdp-bench's
redirect_err breakdown shows them; the veth profile, which advertises ndo-xmit only while the peer of
its pair has an XDP program, and the warning that says so."""

from __future__ import annotations

import io
import multiprocessing
import types

import numpy as np
import pytest
from fakes import Counters, FakeOutbox

from emu.datapath.napi import NapiCore, RxQueue
from emu.errors import BadInputError
from emu.mem.page import PageState
from emu.mem.pagepool import pool_of
from emu.net import wire
from emu.net.protocol import DEVICE_BIT, XDP_PACKET_HEADROOM, refill_batch
from emu.run.coordinator import Run, RunOptions
from emu.topology.file import validate_topology_text
from emu.topology.model import host_from_dict
from emu.xdp.context import XDP_REDIRECT

TOPO = """
name: t
hosts:
  h1:
    cpus: 1
    pages: 8192
    devices:
      eth0:
        ifindex: 2
        rx_ring_size: 64
{eth0_extra}
        xdp:
          program: "emu.programs:l2fwd"
          params: {{egress: {egress}}}
      eth1: {{ifindex: 3{eth1}}}
      veth0: {{ifindex: 4, profile: veth}}
      veth1:
        ifindex: 5
{veth1_xdp}
traffic:
  gen0: {{generate: {{pkt_size: 64, flows: 4}}}}
  sink0: {{}}
  sink1: {{}}
links:
  - endpoints: ["gen0", "h1:eth0"]
  - endpoints: ["h1:eth1", "sink0"]
  - endpoints: ["h1:veth0", "{veth0_peer}"]
"""
VETH1_XDP = '        xdp: {program: "emu.programs:xdp_pass"}'


def topo(egress: str = "eth1", eth1: str = "", eth0_extra: str = "", veth0_peer: str = "h1:veth1",
         veth1_xdp: str = VETH1_XDP) -> str:
    return TOPO.format(egress=egress, eth1=eth1, eth0_extra=eth0_extra, veth0_peer=veth0_peer,
                       veth1_xdp=veth1_xdp)


def devices(text: str) -> dict:
    return validate_topology_text(text, "t.yaml").hosts["h1"].devices


def test_features_are_resolved_per_device() -> None:
    d = devices(topo(eth1=", xdp_xmit: false"))
    assert d["eth0"].xdp_features == ("basic", "redirect", "ndo-xmit") and d["eth0"].xdp_xmit
    assert d["eth1"].xdp_features == ("basic", "redirect") and not d["eth1"].xdp_xmit
    # veth0's peer veth1 runs a program: it is a redirect target, with ndo-xmit-sg too.
    assert d["veth0"].profile == "veth" and d["veth0"].peer == "h1:veth1"
    assert d["veth0"].xdp_features == ("basic", "redirect", "ndo-xmit", "ndo-xmit-sg", "rx-sg")
    assert d["veth0"].xdp_xmit and d["eth1"].peer == "sink0"
    # Cabled to a traffic port (no program there), or to a device without one: no ndo-xmit.
    for text in (topo(veth0_peer="sink1", veth1_xdp=""), topo(veth1_xdp="")):
        v = devices(text)["veth0"]
        assert v.xdp_features == ("basic", "redirect", "rx-sg") and not v.xdp_xmit
    # An explicit list: ndo-xmit in it is xdp_xmit; the survives a trip to a host agent.
    d = devices(topo(eth1=", xdp_features: [basic, ndo-xmit, rx-sg]"))
    assert d["eth1"].xdp_features == ("basic", "ndo-xmit", "rx-sg") and d["eth1"].xdp_xmit
    host = validate_topology_text(topo(), "t.yaml").hosts["h1"]
    assert host_from_dict(host.to_dict()).devices == host.devices


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"eth1": ", xdp_features: [basic, teleport]"}, "unknown XDP feature 'teleport'"),
        ({"eth1": ", xdp_xmit: true, xdp_features: [basic]"}, "contradicts 'xdp_features'"),
        ({"eth1": ", xdp_features: basic"}, "must be a list of flags"),
        ({"eth0_extra": "        xdp_features: [redirect, ndo-xmit]"}, "lack 'basic'"),
        ({"eth1": ", profile: veth, xdp_xmit: true"}, "'xdp_xmit' is not for a veth"),
        ({"eth1": ", profile: tap"}, "'profile' must be 'nic' or 'veth'"),
    ],
)
def test_bad_feature_settings_are_refused(kw: dict, words: str) -> None:
    with pytest.raises(BadInputError) as e:
        validate_topology_text(topo(**kw), "t.yaml")
    assert "t.yaml:" in str(e.value) and words in str(e.value), str(e.value)


def program(ctx) -> int:
    """Redirect to the ifindex in the frame's first byte."""
    ctx.redirect_ifindex = ctx.data[0]
    return XDP_REDIRECT


def core_for(page_memory, text: str):
    host = validate_topology_text(text, "t.yaml").hosts["h1"]
    pm = page_memory(npages=1024, page_size=2048, ncpus=1)
    counters = Counters("cpu")
    ctx = types.SimpleNamespace(data=None, redirect_ifindex=-1)
    rxq = RxQueue("eth0", 2, 0, 64, program, ctx, None, refill_batch(64),
                  can_redirect="redirect" in host.devices["eth0"].xdp_features)
    warnings: list[str] = []
    out = FakeOutbox()
    core = NapiCore(host, 0, pm, pool_of(pm, 0, owner=True), [rxq], out, counters.array, counters.index,
                    lambda key, text: warnings.append(text))
    return core, pm, counters, warnings, out


def feed(core: NapiCore, pm, out: FakeOutbox, targets: list[int], lens: list[int] | None = None) -> np.ndarray:
    core.refill()
    core.post_flush()
    (_, _, _, posted), = [m for m in out.sent if m[1] == "post"]
    out.sent.clear()
    d = posted[: len(targets)].copy()
    lens = lens or [64] * len(targets)
    for k, t in enumerate(targets):
        p = int(d["page"][k])
        pm.data[p * pm.page_size + XDP_PACKET_HEADROOM] = t
        pm.len[p] = lens[k]
    d["len"] = lens
    core.dispatch(wire.pack_msg("rx", {"dev": "eth0", "q": 0}, d.tobytes()))
    core.poll_pass(got=1, refilling=False)
    return d["page"].astype(np.int64)


def test_redirect_errors_by_errno_and_the_veth_warning(page_memory) -> None:
    core, pm, c, warnings, out = core_for(page_memory, topo(veth0_peer="sink1", veth1_xdp=""))
    core.apply_offline(1 << (DEVICE_BIT + 1))  # eth1 (device 1) is gone
    ids = feed(core, pm, out, [9] * 3 + [3] * 4 + [4] * 5 + [5] * 6)
    # ifindex 9: no such device (-EINVAL); eth1 gone (-ENETDOWN); veth0 without ndo-xmit (-EOPNOTSUPP);
    # veth1 (a NIC by profile, uncabled here) takes them.
    assert (c["redirect_err"], c["redirect_err_einval"], c["redirect_err_enetdown"],
            c["redirect_err_eopnotsupp"]) == (12, 3, 4, 5)
    assert c["xdp_redirect"] == 18
    assert (pm.state[ids[:12]] == PageState.CACHE).all() and (pm.state[ids[12:]] == PageState.TX_QUEUED).all()
    text = "\n".join(warnings)
    assert "-EINVAL" in text and "-ENETDOWN" in text
    assert "veth0 is a veth, which advertises ndo-xmit only while the peer of its pair has an XDP program" in text
    assert "its peer sink1 is no device" in text


def test_a_redirect_longer_than_the_target_s_mtu_is_emsgsize(page_memory) -> None:
    """``xdp_ok_fwd_dev``: a frame longer than the target's mtu + 18 fails with -EMSGSIZE and is freed here;
    the others of the same bulk go, on the fast path (every frame to one target) and off it."""
    core, pm, c, warnings, out = core_for(page_memory, topo(eth1=", mtu: 1000"))
    ids = feed(core, pm, out, [3] * 4, lens=[1018, 1019, 64, 1400])
    assert (c["redirect_err"], c["redirect_err_emsgsize"], c["xdp_redirect"]) == (2, 2, 4)
    assert (pm.state[ids[[1, 3]]] == PageState.CACHE).all() and (pm.state[ids[[0, 2]]] == PageState.TX_QUEUED).all()
    assert any("redirect to eth1 of frames longer than its mtu 1000 allows (1018 bytes): -EMSGSIZE" in w
               for w in warnings)
    # Mixed targets (not the one-bulk fast path): the same rule.
    core, pm, c, warnings, out = core_for(page_memory, topo(eth1=", mtu: 1000"))
    ids = feed(core, pm, out, [3, 4, 3], lens=[1100, 1100, 100])
    assert (c["redirect_err_emsgsize"], c["redirect_err"]) == (1, 1)
    assert pm.state[ids[0]] == PageState.CACHE and (pm.state[ids[1:]] == PageState.TX_QUEUED).all()


def test_a_veth_whose_peer_device_has_no_program_says_where_to_attach_one(page_memory) -> None:
    core, pm, c, warnings, out = core_for(page_memory, topo(veth1_xdp=""))
    feed(core, pm, out, [4] * 2)
    assert c["redirect_err_eopnotsupp"] == 2
    assert any("attach one to h1:veth1 (xdp_pass will do)" in w for w in warnings)


def test_a_device_without_the_redirect_feature_drops_redirect_verdicts(page_memory) -> None:
    core, pm, c, warnings, out = core_for(page_memory, topo(eth0_extra="        xdp_features: [basic, ndo-xmit]"))
    ids = feed(core, pm, out, [3] * 7)
    assert c["xdp_redirect"] == 0 and c["xdp_aborted"] == 7 and c["xdp_exception"] == 7
    assert (pm.state[ids] == PageState.CACHE).all()
    assert any("lack 'redirect'" in w for w in warnings)


@pytest.mark.slow
def test_a_redirect_to_a_veth_counts_eopnotsupp_and_the_report_shows_features() -> None:
    text = """
name: veth
hosts:
  h1:
    cpus: 1
    pages: 4096
    devices:
      eth0:
        ifindex: 2
        xdp: {program: "emu.programs:l2fwd", params: {egress: veth0}}
      veth0: {ifindex: 3, profile: veth}
traffic:
  gen0: {generate: {pkt_size: 64, flows: 4}}
  sink0: {}
links:
  - endpoints: ["gen0", "h1:eth0"]
  - endpoints: ["h1:veth0", "sink0"]
"""
    out = io.StringIO()
    r = Run(validate_topology_text(text, "veth.yaml"), RunOptions(count=3_000, interval=0.5, out=out)).run()
    assert multiprocessing.active_children() == []
    t = r["traffic"]
    assert t["generated"] == 3_000 and t["unaccounted"] == 0 and t["dropped"] == 3_000
    (cpu,) = r["cpus"]
    assert cpu["redirect_err"] == 3_000
    assert cpu["redirect_err_errno"] == {"-EINVAL": 0, "-ENETDOWN": 0, "-EOPNOTSUPP": 3_000, "-ENOMEM": 0,
                                         "-EMSGSIZE": 0}
    dev = {d["name"]: d for d in r["devices"]}
    assert dev["veth0"]["profile"] == "veth" and dev["veth0"]["xdp_features"] == ["basic", "redirect", "rx-sg"]
    assert dev["eth0"]["xdp_features"] == ["basic", "redirect", "ndo-xmit"]
    assert all(n == 0 for n in r["violations"].values())
    assert "redirect_err 3,000 (-EOPNOTSUPP 3,000)" in out.getvalue()
