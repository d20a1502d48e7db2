"""Unit tests for emu.topology: bundled files, round-trips and one test per kind of malformed file."""

from __future__ import annotations

import importlib.util
import json
import pickle
import textwrap
from pathlib import Path

import msgpack
import pytest

import emu.topology.model as topology_mod
from emu.topology.file import load_topology, validate_topology_text
from emu.topology.model import (
    DeviceConfig,
    Endpoint,
    GeneratorConfig,
    LinkImpairment,
    PoolConfig,
    Topology,
    TopologyError,
    XdpConfig,
    max_linear_mtu,
    resolve_program,
    topology_from_dict,
)

TOPOLOGY_DIR = Path(__file__).resolve().parent.parent / "topology"
BUNDLED = ("xdp-drop", "xdp-tx", "l2fwd", "redirect-fallback")
RAISING_MODULE = "ppemu_test_raises_on_import"

# A valid topology the malformed cases below are variations of (line numbers are 1-based).
GOOD = """\
name: t
hosts:
  h1:
    cpus: 2
    devices:
      eth0:
        ifindex: 2
        xdp:
          program: "os.path:join"
          params: {egress: eth1, list: [1, 2], map: {a: b}}
      eth1:
        ifindex: 3
traffic:
  gen0:
    generate: {}
  sink0: {}
links:
  - endpoints: [gen0, "h1:eth0"]
  - endpoints: ["h1:eth1", sink0]
"""


def _text(s: str) -> str:
    return textwrap.dedent(s).lstrip("\n")


def _bad(text: str, line: int, fragment: str) -> None:
    with pytest.raises(TopologyError) as info:
        validate_topology_text(_text(text), "bad.yaml")
    err = info.value
    assert str(err).startswith(f"bad.yaml:{line}: "), str(err)
    assert fragment in str(err), str(err)
    assert err.line == line and err.file == "bad.yaml"


# --------------------------------------------------------------------------------------------------
# Bundled topologies


def _programs_available() -> bool:
    try:
        return importlib.util.find_spec("emu.programs") is not None
    except ImportError:
        return False


@pytest.fixture
def stub_resolver(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Accept any program name (recording it): checks the bundled files' schema without emu.programs."""
    seen: list[str] = []

    def fake(spec: str) -> object:
        seen.append(spec)
        return print

    monkeypatch.setattr(topology_mod, "resolve_program", fake)
    return seen


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_schema_valid(name: str, stub_resolver: list[str]) -> None:
    topo = load_topology(TOPOLOGY_DIR / f"{name}.yaml")
    assert topo.name == name
    assert list(topo.hosts) == ["h1"]
    assert all(spec.startswith("emu.programs:") for spec in stub_resolver)
    assert topology_from_dict(json.loads(json.dumps(topo.to_dict()))) == topo


@pytest.mark.skipif(not _programs_available(), reason="emu.programs is not written yet (not importable)")
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_with_real_programs(name: str) -> None:
    topo = load_topology(TOPOLOGY_DIR / f"{name}.yaml")
    for host in topo.hosts.values():
        for dev in host.devices.values():
            if dev.xdp is not None:
                assert callable(resolve_program(dev.xdp.program))


def test_bundled_fields(stub_resolver: list[str]) -> None:
    drop = load_topology(TOPOLOGY_DIR / "xdp-drop.yaml")
    h1 = drop.hosts["h1"]
    assert h1.cpus == 1 and h1.devices["eth0"].ifindex == 2
    assert h1.devices["eth0"].xdp == XdpConfig("emu.programs:xdp_drop", {})
    gen = drop.traffic["gen0"].generate
    assert gen is not None and gen.pkt_size == 64 and gen.count == 0
    assert gen.dst_mac == h1.devices["eth0"].mac
    assert drop.peer_of(Endpoint.parse("gen0")) == Endpoint("device", "h1", "eth0")

    tx = load_topology(TOPOLOGY_DIR / "xdp-tx.yaml")
    assert tx.hosts["h1"].devices["eth0"].xdp.program == "emu.programs:xdp_tx"  # type: ignore[union-attr]
    assert str(tx.peer_of(Endpoint.parse("t0"))) == "h1:eth0"

    l2 = load_topology(TOPOLOGY_DIR / "l2fwd.yaml")
    h1 = l2.hosts["h1"]
    eth0, eth1 = h1.devices["eth0"], h1.devices["eth1"]
    assert h1.cpus == 2 and eth0.rx_queues == 2 and eth0.rx_cpus == (0, 1)
    assert eth0.xdp == XdpConfig("emu.programs:l2fwd", {"egress": "eth1"})
    assert eth1.ifindex == 3 and eth1.xdp_xmit and eth1.xdp is None
    assert h1.device_by_ifindex(3) is eth1 and h1.device_by_ifindex(99) is None
    gen = l2.traffic["gen0"].generate
    assert gen is not None and (gen.flows, gen.burst) == (64, 64)
    assert l2.traffic["sink0"].generate is None
    assert str(l2.peer_of(Endpoint.parse("h1:eth1"))) == "sink0"

    fb = load_topology(TOPOLOGY_DIR / "redirect-fallback.yaml")
    eth1 = fb.hosts["h1"].devices["eth1"]
    assert eth1.xdp_xmit is False and eth1.redirect_fallback == "skb"


# --------------------------------------------------------------------------------------------------
# Valid files: defaults, helpers, round-trips


def test_defaults_and_derived_values() -> None:
    topo = validate_topology_text(GOOD, "good.yaml")
    assert topo.path == "good.yaml"
    h1 = topo.hosts["h1"]
    assert (h1.index, h1.pages, h1.page_size, h1.napi_budget, h1.redirect_bulk, h1.tx_bulk) == (
        0,
        8192,
        4096,
        64,
        16,
        16,
    )
    assert h1.stack_cpu is None and h1.cpu_affinity is None and h1.line == 3
    assert h1.pool == PoolConfig(128, 64, 1024, 0)
    eth0 = h1.devices["eth0"]
    assert eth0 == DeviceConfig(
        name="eth0",
        ifindex=2,
        mac="02:00:00:00:00:02",
        rx_queues=2,
        tx_queues=2,
        rx_ring_size=1024,
        tx_ring_size=1024,
        rx_cpus=(0, 1),
        xdp=XdpConfig("os.path:join", {"egress": "eth1", "list": [1, 2], "map": {"a": "b"}}),
        xdp_xmit=True,
        redirect_fallback="drop",
        tx_completion_us=0,
        line=6,
        xdp_features=("basic", "redirect", "ndo-xmit"),
        profile="nic",
        peer="gen0",  # the far end of its cable
        tx_cpus=(0, 1),
    )
    assert h1.txc_release == "deferred"
    # tx_cpus, like rx_cpus: one CPU of the host per TX queue.
    for bad, why in (("[0, 2]", "between 0 and 1"), ("[0]", "2 entries")):
        with pytest.raises(TopologyError, match=f"tx_cpus.*{why}"):
            validate_topology_text(GOOD.replace("ifindex: 2\n", f"ifindex: 2\n        tx_cpus: {bad}\n"),
                                   "t.yaml")
    assert topo.traffic["gen0"].generate == GeneratorConfig(
        count=0, rate=0, pkt_size=64, flows=16, burst=64, src_mac="02:00:00:ff:00:01", dst_mac=eth0.mac
    )
    assert [(str(link.a), str(link.b), link.line) for link in topo.links] == [
        ("gen0", "h1:eth0", 18),
        ("h1:eth1", "sink0", 19),
    ]
    assert all(link.impair == LinkImpairment() and not link.impair.active for link in topo.links)
    assert topo.link_of(Endpoint.parse("h1:eth0")) is topo.links[0] and topo.link_of("sink0") is topo.links[1]
    assert topo.device_of(Endpoint.parse("h1:eth1")).ifindex == 3


def test_explicit_values() -> None:
    text = """
        name: full.topo-1
        hosts:
          h1:
            cpus: 4
            cpu_affinity: [3, 2, 1, 0]
            pages: 4352  # emu.topology.schema.min_pages: 3 x 8 + 4 x 1024 RX descriptors + 4 x 32 cached pages
            page_size: 2048
            napi_budget: 8
            redirect_bulk: 4
            tx_bulk: 2
            stack_cpu: 3
            pool: {cache_size: 32, pool_size: 0, recycle_limit: 100}
            devices:
              eth0.10:
                ifindex: 70000
                mac: "02:AA:bb:00:00:01"
                rx_queues: 3
                tx_queues: 1
                rx_ring_size: 8
                tx_ring_size: 16384
                rx_cpus: [3, 3, 0]
                xdp: null
                xdp_xmit: no
                redirect_fallback: skb
                tx_completion_us: 1000000
              eth1:
                ifindex: 0x10
                mac: 12:34:56:00:01:02
        traffic:
          g:
            generate:
              {count: 5, rate: 1000, pkt_size: 1472, flows: 65536, burst: 4096, dst_mac: "02:00:00:00:00:09"}
        links:
          - endpoints: ["h1:eth0.10", g]
    """
    topo = validate_topology_text(_text(text), "f.yaml")
    h1 = topo.hosts["h1"]
    assert h1.cpu_affinity == (3, 2, 1, 0) and h1.stack_cpu == 3 and h1.page_size == 2048
    # refill defaults to min(64, cache_size); pool_size 0 means the kernel's 1024.
    assert h1.pool == PoolConfig(cache_size=32, refill=32, pool_size=1024, recycle_limit=100)
    dev = h1.devices["eth0.10"]
    assert dev.mac == "02:aa:bb:00:00:01" and dev.rx_cpus == (3, 3, 0) and dev.xdp is None
    assert dev.xdp_xmit is False and dev.redirect_fallback == "skb" and dev.tx_completion_us == 1_000_000
    # An unquoted MAC that YAML 1.1 reads as a sexagesimal integer is still taken as written.
    assert h1.devices["eth1"].mac == "12:34:56:00:01:02" and h1.devices["eth1"].ifindex == 16
    gen = topo.traffic["g"].generate
    assert gen is not None and gen.pkt_size == 1472 and gen.dst_mac == "02:00:00:00:00:09"
    assert topology_from_dict(topo.to_dict()) == topo


def test_round_trip_json_and_msgpack() -> None:
    topo = validate_topology_text(GOOD, "good.yaml")
    d = topo.to_dict()
    assert topology_from_dict(json.loads(json.dumps(d))) == topo
    assert topology_from_dict(msgpack.unpackb(msgpack.packb(d))) == topo
    # to_dict hands out copies: mutating them leaves the frozen configuration alone.
    d["hosts"]["h1"]["devices"]["eth0"]["xdp"]["params"]["egress"] = "changed"
    assert topo.hosts["h1"].devices["eth0"].xdp.params["egress"] == "eth1"  # type: ignore[union-attr]
    host = topo.hosts["h1"]
    assert topology_mod.host_from_dict(json.loads(json.dumps(host.to_dict()))) == host


def test_endpoint_and_peer_helpers() -> None:
    topo = validate_topology_text(GOOD, "good.yaml")
    ep = Endpoint.parse("h1:eth0")
    assert ep == Endpoint("device", "h1", "eth0") and str(ep) == "h1:eth0"
    assert Endpoint.parse("gen0") == Endpoint("traffic", None, "gen0")
    assert topo.peer_of(ep) == Endpoint.parse("gen0")
    assert topo.peer_of(Endpoint.parse("sink0")) == Endpoint.parse("h1:eth1")
    assert topo.peer_of(Endpoint.parse("h1:nope")) is None
    with pytest.raises(KeyError):
        topo.device_of(Endpoint.parse("gen0"))


def test_minimal_and_empty_optional_sections() -> None:
    text = """
        name: m
        hosts:
          h1:
            cpus: 1
            pool:
            devices:
              eth0: {ifindex: 1}
        links:
        traffic:
    """
    topo = validate_topology_text(_text(text), "m.yaml")
    assert isinstance(topo, Topology) and topo.links == () and topo.traffic == {}
    assert topo.hosts["h1"].pool == PoolConfig()


def test_load_topology_reports_path_as_given(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("name: x\nhosts: {}\n")
    with pytest.raises(TopologyError) as info:
        load_topology(str(path))
    assert str(info.value) == f"{path}:2: 'hosts' must define at least one host"


def test_load_topology_rejects_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(b"name: x\n# \xff\n")
    with pytest.raises(TopologyError, match=r":2: not valid UTF-8"):
        load_topology(path)


def test_topology_error_is_value_error_and_picklable() -> None:
    err = TopologyError("f.yaml", 7, "boom")
    assert isinstance(err, ValueError) and str(err) == "f.yaml:7: boom"
    again = pickle.loads(pickle.dumps(err))
    assert (again.file, again.line, again.message, str(again)) == ("f.yaml", 7, "boom", "f.yaml:7: boom")


# --------------------------------------------------------------------------------------------------
# resolve_program


@pytest.fixture
def raising_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / f"{RAISING_MODULE}.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return RAISING_MODULE


def test_resolve_program_ok() -> None:
    import os.path

    assert resolve_program("os.path:join") is os.path.join
    assert resolve_program("os.path:join.__call__") is not None  # dotted attribute paths are allowed


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("os.path.join", "expected 'module:function' (no ':' in it)"),
        ("os path:join", "'os path' is not a valid module name"),
        ("os.path:", "'' is not a valid function name"),
        ("ppemu_no_such_module:f", "cannot import module 'ppemu_no_such_module'"),
        ("os.path:nope", "module 'os.path' has no attribute 'nope'"),
        ("os:sep", "'os.sep' is not callable (it is a str)"),
    ],
)
def test_resolve_program_errors(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        resolve_program(spec)
    assert str(info.value).startswith(f"xdp program '{spec}': ")
    assert fragment in str(info.value)


def test_resolve_program_module_raising(raising_module: str) -> None:
    with pytest.raises(ValueError, match=r"raised RuntimeError: broken on purpose"):
        resolve_program(f"{raising_module}:f")


# --------------------------------------------------------------------------------------------------
# Malformed topologies: (id, text, line, message fragment)

BAD: list[tuple[str, str, int, str]] = [
    (
        "yaml-syntax",
        """
        name: t
        hosts:
          h1: [1, 2
        """,
        4,
        "YAML syntax error: ",
    ),
    (
        "yaml-bad-indent",
        """
        name: t
        hosts:
          h1:
            cpus: 1
           devices: {}
        """,
        5,
        "YAML syntax error: ",
    ),
    ("empty-file", "# nothing here\n", 1, "the topology file is empty"),
    (
        "two-documents",
        "name: a\n---\nname: b\n",
        2,
        "expected a single document in the stream, but found another document",
    ),
    (
        "top-level-not-mapping",
        """
        - name: t
        """,
        1,
        "the topology must be a mapping, not a list",
    ),
    (
        "duplicate-top-key",
        """
        name: t
        hosts: {}
        name: u
        """,
        3,
        "duplicate key 'name' (first defined at line 1)",
    ),
    (
        "duplicate-device-key",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 2
                ifindex: 3
        """,
        8,
        "duplicate key 'ifindex' (first defined at line 7)",
    ),
    (
        "duplicate-host",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        """,
        4,
        "duplicate key 'h1' (first defined at line 3)",
    ),
    (
        "merge-key",
        """
        name: t
        base: &b {cpus: 1}
        hosts:
          h1:
            <<: *b
        """,
        5,
        "merge keys ('<<') are not supported",
    ),
    (
        "unknown-top-key",
        """
        name: t
        nodes: {}
        """,
        2,
        "unknown top-level key 'nodes' (expected one of: name, hosts, links, traffic, capture)",
    ),
    (
        "missing-name",
        """
        # header
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        """,
        2,
        "missing required key 'name'",
    ),
    (
        "bad-topology-name",
        """
        name: "my topo"
        hosts: {}
        """,
        1,
        "invalid 'name' 'my topo'",
    ),
    (
        "missing-hosts",
        """
        name: t
        """,
        1,
        "missing required key 'hosts'",
    ),
    (
        "empty-hosts",
        """
        name: t
        hosts: {}
        """,
        2,
        "'hosts' must define at least one host",
    ),
    (
        "hosts-is-list",
        """
        name: t
        hosts:
          - h1
        """,
        3,
        "'hosts' must be a mapping, not a list",
    ),
    (
        "host-name-with-colon",
        """
        name: t
        hosts:
          "h:1": {cpus: 1, devices: {eth0: {ifindex: 1}}}
        """,
        3,
        "invalid host name 'h:1'",
    ),
    (
        "unknown-host-key",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            cpu: 2
            devices: {eth0: {ifindex: 1}}
        """,
        5,
        "h1: unknown key 'cpu' (expected one of: cpus, cpu_affinity,",
    ),
    (
        "missing-cpus",
        """
        name: t
        hosts:
          h1:
            devices: {eth0: {ifindex: 1}}
        """,
        3,
        "h1: missing required key 'cpus'",
    ),
    (
        "cpus-str",
        """
        name: t
        hosts:
          h1:
            cpus: two
            devices: {eth0: {ifindex: 1}}
        """,
        4,
        "'cpus' must be an integer, not 'two'",
    ),
    (
        "cpus-bool",
        """
        name: t
        hosts:
          h1:
            cpus: true
            devices: {eth0: {ifindex: 1}}
        """,
        4,
        "'cpus' must be an integer, not the boolean 'true'",
    ),
    (
        "cpus-quoted-number",
        """
        name: t
        hosts:
          h1:
            cpus: "2"
            devices: {eth0: {ifindex: 1}}
        """,
        4,
        "'cpus' must be an integer, not the string '2'",
    ),
    (
        "cpus-float",
        """
        name: t
        hosts:
          h1:
            cpus: 1.5
            devices: {eth0: {ifindex: 1}}
        """,
        4,
        "'cpus' must be an integer, not '1.5'",
    ),
    (
        "cpus-out-of-range",
        """
        name: t
        hosts:
          h1:
            cpus: 33
            devices: {eth0: {ifindex: 1}}
        """,
        4,
        "h1: 'cpus' must be between 1 and 32, not 33",
    ),
    (
        "pages-too-small",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            pages: 255
            devices: {eth0: {ifindex: 1}}
        """,
        5,
        "'pages' must be between 256 and 1048576, not 255",
    ),
    (
        "page-size-not-power-of-two",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            page_size: 3000
            devices: {eth0: {ifindex: 1}}
        """,
        5,
        "'page_size' must be a power of two between 1024 and 65536, not 3000",
    ),
    (
        "napi-budget-zero",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            napi_budget: 0
            devices: {eth0: {ifindex: 1}}
        """,
        5,
        "'napi_budget' must be between 1 and 1024, not 0",
    ),
    (
        "cpu-affinity-wrong-length",
        """
        name: t
        hosts:
          h1:
            cpus: 2
            cpu_affinity: [0]
            devices: {eth0: {ifindex: 1}}
        """,
        5,
        "'cpu_affinity' must have 2 entries (one per CPU), not 1",
    ),
    (
        "cpu-affinity-negative",
        """
        name: t
        hosts:
          h1:
            cpus: 2
            cpu_affinity:
              - 0
              - -1
            devices: {eth0: {ifindex: 1}}
        """,
        7,
        "'cpu_affinity' entries must be between 0 and 8191, not -1",
    ),
    (
        "cpu-affinity-mapping",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            cpu_affinity: {a: 1}
            devices: {eth0: {ifindex: 1}}
        """,
        5,
        "'cpu_affinity' must be a list of integers, not a mapping",
    ),
    (
        "stack-cpu-out-of-range",
        """
        name: t
        hosts:
          h1:
            cpus: 2
            stack_cpu: 2
            devices: {eth0: {ifindex: 1}}
        """,
        5,
        "'stack_cpu' must be between 0 and 1 (host 'h1' has 2 cpus), not 2",
    ),
    (
        "unknown-pool-key",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            pool:
              cache_size: 128
              size: 10
            devices: {eth0: {ifindex: 1}}
        """,
        7,
        "h1: pool: unknown key 'size' (expected one of: cache_size, refill, pool_size, recycle_limit, policy, "
        "frag_size)",
    ),
    (
        "refill-greater-than-cache",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            pool:
              cache_size: 32
              refill: 33
            devices: {eth0: {ifindex: 1}}
        """,
        7,
        "'refill' (33) must not exceed 'cache_size' (32)",
    ),
    (
        "pool-size-too-large",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            pool: {pool_size: 16385}
            devices: {eth0: {ifindex: 1}}
        """,
        5,
        "'pool_size' must be between 0 and 16384, not 16385",
    ),
    (
        "pool-is-list",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            pool: [1]
            devices: {eth0: {ifindex: 1}}
        """,
        5,
        "h1: 'pool' must be a mapping, not a list",
    ),
    (
        "missing-devices",
        """
        name: t
        hosts:
          h1:
            cpus: 1
        """,
        3,
        "h1: missing required key 'devices'",
    ),
    (
        "empty-devices",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices: {}
        """,
        5,
        "h1: 'devices' must define at least one device",
    ),
    (
        "unknown-device-key",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                rx_queus: 2
        """,
        8,
        "h1:eth0: unknown key 'rx_queus' (expected one of: ifindex, mac,",
    ),
    (
        "missing-ifindex",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                rx_queues: 1
        """,
        6,
        "h1:eth0: missing required key 'ifindex'",
    ),
    (
        "ifindex-zero",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0: {ifindex: 0}
        """,
        6,
        "'ifindex' must be between 1 and 4294967295, not 0",
    ),
    (
        "duplicate-ifindex",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 3
              eth1:
                ifindex: 3
        """,
        9,
        "duplicate ifindex 3 on host 'h1' (also used by 'eth0' at line 7)",
    ),
    (
        "bad-mac",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                mac: "02:00:00:00:01"
        """,
        8,
        "'mac' is not a MAC address like 02:00:00:00:01:02: '02:00:00:00:01'",
    ),
    (
        "device-is-list",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0: [1]
        """,
        6,
        "bad.yaml:6: device 'h1:eth0' must be a mapping, not a list",
    ),
    (
        "bad-device-name",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              "eth 0": {ifindex: 1}
        """,
        6,
        "invalid device name 'eth 0'",
    ),
    (
        "rx-queues-out-of-range",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0: {ifindex: 1, rx_queues: 65}
        """,
        6,
        "'rx_queues' must be between 1 and 64, not 65",
    ),
    (
        "ring-size-too-small",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                tx_ring_size: 4
        """,
        8,
        "'tx_ring_size' must be between 8 and 16384, not 4",
    ),
    (
        "rx-cpus-wrong-length",
        """
        name: t
        hosts:
          h1:
            cpus: 2
            devices:
              eth0:
                ifindex: 1
                rx_queues: 2
                rx_cpus: [0]
        """,
        9,
        "'rx_cpus' must have 2 entries (one per RX queue), not 1",
    ),
    (
        "rx-cpus-out-of-range",
        """
        name: t
        hosts:
          h1:
            cpus: 2
            devices:
              eth0:
                ifindex: 1
                rx_queues: 2
                rx_cpus: [0, 2]
        """,
        9,
        "'rx_cpus' entries must be between 0 and 1, not 2",
    ),
    (
        "xdp-xmit-int",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                xdp_xmit: 1
        """,
        8,
        "'xdp_xmit' must be true or false, not '1'",
    ),
    (
        "bad-redirect-fallback",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                redirect_fallback: copy
        """,
        8,
        "'redirect_fallback' must be 'drop' or 'skb', not 'copy'",
    ),
    (
        "tx-completion-too-large",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0: {ifindex: 1, tx_completion_us: 10000001}
        """,
        6,
        "'tx_completion_us' must be between 0 and 10000000, not 10000001",
    ),
    (
        "xdp-missing-program",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                xdp:
                  params: {}
        """,
        8,
        "h1:eth0: xdp: missing required key 'program'",
    ),
    (
        "xdp-unknown-key",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                xdp: {program: "os.path:join", param: {}}
        """,
        8,
        "h1:eth0: xdp: unknown key 'param'",
    ),
    (
        "program-without-colon",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                xdp:
                  program: os.path.join
        """,
        9,
        "h1:eth0: xdp program 'os.path.join': expected 'module:function'",
    ),
    (
        "program-unimportable",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                xdp:
                  program: "ppemu_no_such_module:prog"
        """,
        9,
        "cannot import module 'ppemu_no_such_module'",
    ),
    (
        "program-missing-attribute",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                xdp:
                  program: "os.path:nope"
        """,
        9,
        "xdp program 'os.path:nope': module 'os.path' has no attribute 'nope'",
    ),
    (
        "program-not-callable",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                xdp:
                  program: "os:sep"
        """,
        9,
        "'os.sep' is not callable",
    ),
    (
        "program-module-raises",
        f"""
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                xdp:
                  program: "{RAISING_MODULE}:prog"
        """,
        9,
        f"importing module '{RAISING_MODULE}' raised RuntimeError: broken on purpose",
    ),
    (
        "program-not-a-string",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                xdp: {program: [a]}
        """,
        8,
        "'program' must be a string, not a list",
    ),
    (
        "params-is-list",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                xdp:
                  program: "os.path:join"
                  params: [egress, eth1]
        """,
        10,
        "'params' must be a mapping, not a list",
    ),
    (
        "params-recursive-alias",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices:
              eth0:
                ifindex: 1
                xdp:
                  program: "os.path:join"
                  params: &p {self: *p}
        """,
        10,
        "recursive YAML alias",
    ),
    (
        "links-is-mapping",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        links: {a: b}
        """,
        4,
        "'links' must be a list, not a mapping",
    ),
    (
        "link-one-endpoint",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        links:
          - endpoints: ["h1:eth0"]
        """,
        5,
        "links[0]: a link needs exactly 2 endpoints, not 1",
    ),
    (
        "link-three-endpoints",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}, eth1: {ifindex: 2}, eth2: {ifindex: 3}}}
        links:
          - endpoints:
              - "h1:eth0"
              - "h1:eth1"
              - "h1:eth2"
        """,
        6,
        "a link needs exactly 2 endpoints, not 3",
    ),
    (
        "link-unknown-key",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}, eth1: {ifindex: 2}}}
        links:
          - endpoints: ["h1:eth0", "h1:eth1"]
            mtu: 1500
        """,
        6,
        "links[0]: unknown key 'mtu' (expected one of: endpoints, delay, jitter, loss, rate)",
    ),
    (
        "link-missing-endpoints",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        links:
          - {}
        """,
        5,
        "links[0]: missing required key 'endpoints'",
    ),
    (
        "self-link",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        links:
          - endpoints: ["h1:eth0", "h1:eth0"]
        """,
        5,
        "link connects 'h1:eth0' to itself",
    ),
    (
        "endpoint-unknown-host",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        links:
          - endpoints:
              - "h1:eth0"
              - "h9:eth0"
        """,
        7,
        "link endpoint 'h9:eth0': no host 'h9'",
    ),
    (
        "endpoint-unknown-device",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        links:
          - endpoints: ["h1:eth0", "h1:eth9"]
        """,
        5,
        "link endpoint 'h1:eth9': host 'h1' has no device 'eth9'",
    ),
    (
        "endpoint-unknown-traffic-port",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        links:
          - endpoints: ["h1:eth0", gen9]
        """,
        5,
        "link endpoint 'gen9': no traffic port 'gen9'",
    ),
    (
        "endpoint-not-a-string",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        links:
          - endpoints: ["h1:eth0", {a: 1}]
        """,
        5,
        "an endpoint must be a string 'host:device' or a traffic port, not a mapping",
    ),
    (
        "device-endpoint-used-twice",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}, eth1: {ifindex: 2}, eth2: {ifindex: 3}}}
        links:
          - endpoints: ["h1:eth0", "h1:eth1"]
          - endpoints:
              - "h1:eth2"
              - "h1:eth0"
        """,
        8,
        "endpoint 'h1:eth0' is already used by the link at line 5",
    ),
    (
        "traffic-endpoint-used-twice",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}, eth1: {ifindex: 2}}}
        traffic:
          sink0: {}
        links:
          - endpoints: ["h1:eth0", sink0]
          - endpoints: ["h1:eth1", sink0]
        """,
        8,
        "endpoint 'sink0' is already used by the link at line 7",
    ),
    (
        "traffic-to-traffic-link",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        traffic:
          a: {}
          b: {}
        links:
          - endpoints: [a, b]
        """,
        8,
        "connects two traffic ports",
    ),
    (
        "traffic-name-clashes-with-host",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        traffic:
          h1: {}
        """,
        5,
        "traffic port 'h1' has the same name as host 'h1' (line 3)",
    ),
    (
        "traffic-unknown-key",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        traffic:
          gen0:
            generator: {}
        """,
        6,
        "gen0: unknown key 'generator' (expected one of: generate, replay, expect); did you mean 'generate'?",
    ),
    (
        "generate-unknown-key",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        traffic:
          gen0:
            generate:
              size: 64
        """,
        7,
        "gen0: generate: unknown key 'size'",
    ),
    (
        "generate-null",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        traffic:
          gen0:
            generate:
        """,
        6,
        "'generate' is null; use 'generate: {}' for defaults",
    ),
    (
        "generator-not-linked",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        traffic:
          gen0:
            generate: {count: 10}
        """,
        5,
        "traffic port 'gen0' generates packets but is not linked to a device",
    ),
    (
        "pkt-size-too-small",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        traffic:
          gen0:
            generate:
              pkt_size: 59
        links:
          - endpoints: [gen0, "h1:eth0"]
        """,
        7,
        "'pkt_size' must be between 62 and 65280, not 59",
    ),
    (
        "pkt-size-too-large-for-page",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            page_size: 1024
            devices: {eth0: {ifindex: 1}}
        traffic:
          gen0:
            generate:
              pkt_size: 449
        links:
          - endpoints: [gen0, "h1:eth0"]
        """,
        10,
        "'pkt_size' 449 is longer than h1:eth0 takes: max 448 = its mtu 430 + 18",
    ),
    (
        "mtu-too-large-for-page",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            page_size: 2048
            devices: {eth0: {ifindex: 1, mtu: 1500}}
        """,
        6,
        "h1:eth0: 'mtu' 1500 is more than the device can take: its largest frame (1518 bytes) does not fit one "
        "2048-byte RX buffer (1472 bytes after 256 of headroom and 320 of skb_shared_info tailroom), "
        "so max_mtu is 1454",
    ),
    (
        "mtu-below-min",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            devices: {eth0: {ifindex: 1, mtu: 67}}
        """,
        5,
        "'mtu' must be between 68 and 9000, not 67",
    ),
    (
        "pkt-size-over-mtu",
        """
        name: t
        hosts:
          h1:
            cpus: 1
            page_size: 4096
            devices: {eth0: {ifindex: 1, mtu: 1000}}
        traffic:
          gen0:
            generate:
              pkt_size: 1019
        links:
          - endpoints: [gen0, "h1:eth0"]
        """,
        10,
        "'pkt_size' 1019 is longer than h1:eth0 takes: max 1018 = its mtu 1000 + 18",
    ),
    (
        "generate-flows-bool",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        traffic:
          gen0:
            generate: {flows: false}
        """,
        6,
        "'flows' must be an integer, not the boolean 'false'",
    ),
    (
        "generate-bad-src-mac",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {eth0: {ifindex: 1}}}
        traffic:
          gen0:
            generate:
              src_mac: "02-00-00-00-00-01"
        """,
        7,
        "'src_mac' is not a MAC address like 02:00:00:00:01:02: '02-00-00-00-00-01'",
    ),
    (
        "boolean-mapping-key",
        """
        name: t
        hosts:
          h1: {cpus: 1, devices: {on: {ifindex: 1}}}
        """,
        3,
        "mapping keys must be strings, not the boolean 'on'",
    ),
]


@pytest.mark.usefixtures("raising_module")
@pytest.mark.parametrize(("text", "line", "fragment"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_malformed(text: str, line: int, fragment: str, reliability) -> None:
    _bad(text, line, fragment)
    reliability("malformed topology", inputs=1)


def test_alias_bomb_is_checked_quickly() -> None:
    # Each level doubles the expanded size (2**40 leaves); the checks must visit each node only once.
    levels = ["a0: &a0 [x, x]"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 40)]
    text = "\n".join(levels) + "\nname: t\n"
    with pytest.raises(TopologyError, match=r":40: YAML aliases expand the document by [0-9,]+ nodes"):
        validate_topology_text(text, "bomb.yaml")


def test_yaml_control_character() -> None:
    with pytest.raises(TopologyError, match=r"^c\.yaml:2: YAML syntax error: "):
        validate_topology_text("name: t\nhosts: \x01\n", "c.yaml")


def test_malformed_case_ids_unique() -> None:
    ids = [c[0] for c in BAD]
    assert len(ids) == len(set(ids)) >= 30


def test_a_host_has_no_more_devices_than_the_offline_mask_has_bits() -> None:
    devices = "\n".join(f"      eth{i}: {{ifindex: {i + 1}, rx_ring_size: 8}}" for i in range(31))
    text = f"name: t\nhosts:\n  h1:\n    cpus: 1\n    devices:\n{devices}\n"
    with pytest.raises(TopologyError, match=r"t.yaml:6: h1: 'devices' defines 31 devices; a host has at most 30"):
        validate_topology_text(text, "t.yaml")
    kept = "\n".join(devices.splitlines()[:30])
    assert len(validate_topology_text(f"name: t\nhosts:\n  h1:\n    cpus: 1\n    devices:\n{kept}\n",
                                      "t.yaml").hosts["h1"].devices) == 30


def test_pkt_size_fits_every_host_its_frames_can_be_cabled_to() -> None:
    """A frame forwarded to a host with smaller pages would not fit its buffers: refused at validation."""
    text = textwrap.dedent("""\
        name: t
        hosts:
          h1:
            cpus: 1
            pages: 4096
            devices:
              eth0: {ifindex: 1, rx_ring_size: 256, xdp: {program: "emu.programs:l2fwd", params: {egress: eth1}}}
              eth1: {ifindex: 2, rx_ring_size: 256}
          h2:
            cpus: 1
            pages: 2048
            page_size: 1024
            devices:
              eth0: {ifindex: 1, rx_ring_size: 256}
        traffic:
          gen0:
            generate: {pkt_size: PKT, count: 100}
        links:
          - endpoints: [gen0, "h1:eth0"]
          - endpoints: ["h1:eth1", "h2:eth0"]
        """)
    with pytest.raises(TopologyError, match=r"t.yaml:17: .*'pkt_size' 449 is longer than h2:eth0, cabled to the "
                                            r"linked host 'h1', takes: max 448 = its mtu 430 \+ 18"):
        validate_topology_text(text.replace("PKT", "449"), "t.yaml")
    assert validate_topology_text(text.replace("PKT", "448"), "t.yaml").traffic["gen0"].generate.pkt_size == 448


def test_mtu_defaults_to_1500_or_what_one_buffer_of_the_page_holds() -> None:
    """``mtu``: 1500 unless the page is too small for it (then its ``max_mtu``); the largest a page takes is
    ``page_size`` - 256 - 320 - 18, and it survives the trip through ``to_dict`` (what host processes get)."""
    def topo(page_size: int, mtu: str = "") -> Topology:
        dev = "{ifindex: 1" + (f", mtu: {mtu}" if mtu else "") + "}"
        return validate_topology_text(f"name: t\nhosts:\n  h1:\n    cpus: 1\n    page_size: {page_size}\n"
                                      f"    devices: {{eth0: {dev}}}\n", "t.yaml")
    assert topo(4096).hosts["h1"].devices["eth0"].mtu == 1500
    assert topo(2048).hosts["h1"].devices["eth0"].mtu == 1454 == max_linear_mtu(2048)
    t = topo(4096, "3502")
    assert t.hosts["h1"].devices["eth0"].mtu == 3502
    assert topology_from_dict(t.to_dict()).hosts["h1"].devices["eth0"].mtu == 3502
    assert topo(16384, "9000").hosts["h1"].devices["eth0"].mtu == 9000
    with pytest.raises(TopologyError, match=r"t.yaml:6: h1:eth0: 'mtu' 3503 is more than the device can take.*"
                                            r"so max_mtu is 3502"):
        topo(4096, "3503")
