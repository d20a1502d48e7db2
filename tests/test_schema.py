"""emu.topology.schema: the README agrees with it, and every case of issue 15 is refused at validation with its line."""

from __future__ import annotations

import os
import re
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from procs import segments_of

import emu.net.packets
from emu.errors import BadInputError
from emu.topology import schema
from emu.topology.file import validate_topology_text
from emu.topology.model import TopologyError
from emu.xdp.context import ParamSpec, Program, xdp_program

BASE = """\
name: t
hosts:
  h1:
    cpus: 2
    pages: 8192
    pool: {recycle_limit: 0}
    devices:
      eth0:
        ifindex: 2
        xdp:
          program: "emu.programs:l2fwd_map"
          params:
            tx_port: {0: eth1}
      eth1:
        ifindex: 3
traffic:
  gen0: {generate: {count: 10}}
  sink0: {}
links:
  - endpoints: [gen0, "h1:eth0"]
  - endpoints: ["h1:eth1", sink0]
"""


def refused(text: str, line: int, fragment: str) -> TopologyError:
    with pytest.raises(TopologyError) as info:
        validate_topology_text(text, "t.yaml")
    assert info.value.line == line and fragment in info.value.message, str(info.value)
    assert segments_of(os.getpid()) == []  # the scratch maps are gone, refused or not
    return info.value


def test_readme_tables_are_what_the_schema_generates() -> None:
    text = schema.README.read_text()
    assert schema.render_readme(text, schema.markdown()) == text, "run: python -m emu.topology.schema --markdown"
    assert schema.main(["--check"]) == 0


def test_render_replaces_every_block_and_refuses_missing_markers() -> None:
    blocks = {"schema:a": "new"}
    assert schema.render_readme("x\n<!-- schema:a -->\nold\n<!-- /schema:a -->\n", blocks) == (
        "x\n<!-- schema:a -->\nnew\n<!-- /schema:a -->\n"
    )
    with pytest.raises(ValueError, match="schema:a"):
        schema.render_readme("no markers", blocks)


def test_validator_keys_are_the_schemas() -> None:
    # Every key the schema declares is accepted where it says, and every other key is refused.
    for section, key in (("host", "tx_bulk"), ("pool", "recycle_limit"), ("device", "tx_completion_us")):
        assert key in schema.SECTIONS[section].names
    refused(BASE.replace("    cpus: 2", "    cpus: 2\n    cpuss: 2"), 5, "did you mean 'cpus'")


def test_min_pages_counts_rings_and_caches() -> None:
    topo = validate_topology_text(BASE, "t.yaml")
    host = topo.hosts["h1"]
    assert schema.min_pages(host) == 2 * 2 * 1024 + 2 * 128
    e = refused(BASE.replace("pages: 8192", "pages: 4351"), 5, "fewer than the 4352 pages the host needs")
    assert "h1" in e.message and "raise 'pages' to at least 4352" in e.message
    validate_topology_text(BASE.replace("pages: 8192", "pages: 4352"), "t.yaml")
    # Without a pages key the default is blamed on the host's line.
    refused(BASE.replace("    pages: 8192\n", "").replace("cpus: 2", "cpus: 4"), 3, "the default 'pages' (8192)")


def test_topology_error_is_bad_input_and_value_error() -> None:
    e = TopologyError("f", 1, "m")
    assert isinstance(e, BadInputError) and isinstance(e, ValueError) and e.exit_status == 2


# -- the cases of issue 15 -----------------------------------------------------------------------------


def test_devmap_entry_naming_a_missing_device() -> None:
    refused(BASE.replace("{0: eth1}", "{0: eth9}"), 13, "no device 'eth9' on host 'h1'")


def test_devmap_key_past_max_entries() -> None:
    text = BASE.replace("tx_port: {0: eth1}", "tx_port:\n              64: eth1")
    refused(text, 14, "key 64 out of range 0..63")


def test_devmap_ifindex_past_u32() -> None:
    text = BASE.replace("tx_port: {0: eth1}", "tx_port:\n              0:\n                4294967296")
    refused(text, 15, "4294967296 is not an ifindex")


def test_map_param_that_is_not_a_mapping() -> None:
    refused(BASE.replace("{0: eth1}", "[eth1]"), 13, "must be a mapping of key to value, not a list")


def test_recycle_limit_past_what_a_pool_can_keep() -> None:
    refused(BASE.replace("recycle_limit: 0", "recycle_limit: 18446744073709551616"), 6,
            f"'recycle_limit' must be between 0 and {schema.MAX_PAGES}")


def test_count_past_what_a_sink_tracks() -> None:
    refused(BASE.replace("count: 10", "count: 8589934592"), 17,
            f"'count' must be between 0 and {emu.net.packets.SeqTracker.MAX_TRACKED}")


def test_ifindex_past_u32() -> None:
    refused(BASE.replace("ifindex: 3", "ifindex: 4294967296"), 15, "'ifindex' must be between 1 and 4294967295")


L2FWD = BASE.replace('"emu.programs:l2fwd_map"', '"emu.programs:l2fwd"').replace("tx_port: {0: eth1}", "egress: eth1")


def test_l2fwd_egress_naming_a_missing_device() -> None:
    refused(L2FWD.replace("egress: eth1", "egress: eth9"), 13, "'egress' names no device of this host: 'eth9'")


def test_declared_params_unknown_missing_and_mistyped() -> None:
    refused(L2FWD.replace("egress: eth1", "egress: eth1\n            burst: 3"), 14, "unknown param 'burst'")
    refused(L2FWD.replace("egress: eth1", "egres: eth1"), 13, "did you mean 'egress'?")
    refused(L2FWD.replace("egress: eth1", "{}"), 12, "missing required param 'egress'")
    refused(L2FWD.replace("egress: eth1", "egress: 3"), 13, "'egress' must be a device name, not 3")
    filt = L2FWD.replace("l2fwd", "l2fwd_filter")
    refused(filt.replace("egress: eth1", "egress: eth1\n            deny_ports: [53, x]"), 14, "list of integers")
    validate_topology_text(filt.replace("egress: eth1", "egress: eth1\n            deny_ports: [53]"), "t.yaml")


@pytest.fixture
def program_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a program module importable as `name`; removed from sys.modules afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def write(name: str, body: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
        names.append(name)
        return name

    yield write
    for n in names:
        sys.modules.pop(n, None)


def test_program_whose_maps_are_not_mapspecs(program_module) -> None:
    mod = program_module("ppemu_test_badmaps", """
        def prog(ctx):
            return 1
        prog.maps = {"m": "not a MapSpec"}
    """)
    text = L2FWD.replace('"emu.programs:l2fwd"', f'"{mod}:prog"')
    refused(text, 11, "'maps' must map names to emu.xdp.bpfmaps.MapSpec")


def test_undeclared_program_takes_any_params_but_its_setup_hook_runs(program_module) -> None:
    mod = program_module("ppemu_test_setup", """
        def _setup(ctx):
            ctx.ifindex_of(ctx.params["port"])
        def prog(ctx):
            return 1
        prog.setup = _setup
    """)
    text = L2FWD.replace('"emu.programs:l2fwd"', f'"{mod}:prog"').replace("egress: eth1", "{port: eth1, x: [1]}")
    validate_topology_text(text, "t.yaml")
    refused(text.replace("port: eth1", "port: eth7"), 12, "setup raised ValueError: no device 'eth7'")


def _alias_levels(n: int) -> list[str]:
    """Param lines of `n` anchors, each a list of two aliases of the one before: 2**n leaves."""
    pad = " " * 14
    return [f"{pad}l0: &l0 [x, x]"] + [f"{pad}l{i}: &l{i} [*l{i - 1}, *l{i - 1}]" for i in range(1, n)]


def test_alias_bomb_in_params_is_refused_quickly() -> None:
    # 22 levels of doubling: 2**22 leaves from well under 1 KB of aliases.
    levels = _alias_levels(22)
    text = L2FWD.replace('"emu.programs:l2fwd"', '"os.path:join"').replace(
        "egress: eth1", "bomb:\n" + "\n".join(levels))
    assert len("\n".join(levels)) < 1024
    start = time.perf_counter()
    e = refused(text, 13 + 22, "YAML aliases expand the document by")
    assert time.perf_counter() - start < 1.0
    assert "'*l20'" in e.message and f"{schema.MAX_ALIAS_EXPANSION:,}" in e.message


def test_aliases_below_the_limit_still_work() -> None:
    text = BASE.replace("      eth1:\n        ifindex: 3", "      eth1: &dev\n        ifindex: 3").replace(
        "    pool: {recycle_limit: 0}", "    pool: {recycle_limit: 0}")
    validate_topology_text(text, "t.yaml")
    levels = _alias_levels(11)
    text = L2FWD.replace('"emu.programs:l2fwd"', '"os.path:join"').replace("egress: eth1", "b:\n" + "\n".join(levels))
    topo = validate_topology_text(text, "t.yaml")  # 2**11 leaves: below MAX_ALIAS_EXPANSION
    assert topo.hosts["h1"].devices["eth0"].xdp is not None


# -- the programs' declarations ------------------------------------------------------------------------


def test_every_bundled_program_but_the_buggy_ones_declares_its_params() -> None:
    import emu.programs as programs

    for name in programs.__all__:
        prog = Program.from_callable(getattr(programs, name))
        assert (prog.params is None) == name.startswith("buggy_"), name


def test_param_spec_checks() -> None:
    devices = {"eth0": 1}
    assert ParamSpec("device", "d").check("eth0", devices) is None
    assert "names no device" in (ParamSpec("device", "d").check("eth1", devices) or "")
    assert ParamSpec("int", "n", lo=0, hi=3).check(3, devices) is None
    assert "between 0 and 3" in (ParamSpec("int", "n", lo=0, hi=3).check(4, devices) or "")
    assert "an integer" in (ParamSpec("int", "n").check(True, devices) or "")
    assert ParamSpec("str_list", "s").check(["a"], devices) is None
    assert "a list" in (ParamSpec("str_list", "s").check("a", devices) or "")
    assert "number" in (ParamSpec("float", "f").check("1", devices) or "")
    assert ParamSpec("bool", "b").check(False, devices) is None
    with pytest.raises(ValueError, match="param type"):
        ParamSpec("dict", "x")

    @xdp_program(params={"n": "not a spec"})  # type: ignore[dict-item]
    def prog(ctx):
        return 1

    with pytest.raises(TypeError, match="ParamSpec"):
        Program.from_callable(prog)


def test_packets_docstring_lists_the_payload_header_fields_in_order() -> None:
    doc = emu.net.packets.__doc__ or ""
    m = re.search(r"magic u32 .*? \| port u16 : seq u48 \| flow u16 \| frame length u16 \|", doc)
    assert m is not None, doc
    dt = emu.net.packets.PAYLOAD_HDR_DTYPE
    assert dt.names == ("magic", "seq", "flow", "len")
    assert [dt[n].itemsize * 8 for n in dt.names] == [32, 64, 16, 16] and dt.itemsize == 16
    assert np.dtype(dt).isalignedstruct is False
    assert emu.net.packets.PORT_SHIFT == 48 and emu.net.packets.MAX_PORT == 0xFFFF  # the u64 word: port u16 : seq u48


# -- generate.schedule -------------------------------------------------------------------------------

SCHEDULED = BASE.replace("  gen0: {generate: {count: 10}}", """\
  gen0:
    generate:
      count: 10
      schedule:
        - {rate: 200kpps, for: 2s}
        - {rate: 0, for: 1s}
        - {rate: 1.5Mpps, for: 500ms}
        - {rate: 5000, for: 250us}""")


def test_schedule_is_parsed_with_units_and_survives_the_round_trip() -> None:
    import json

    from emu.topology.model import topology_from_dict

    topo = validate_topology_text(SCHEDULED, "t.yaml")
    gen = topo.traffic["gen0"].generate
    assert gen is not None and gen.rate == 0
    assert gen.schedule == ((200_000, 2_000_000), (0, 1_000_000), (1_500_000, 500_000), (5000, 250))
    assert topology_from_dict(json.loads(json.dumps(topo.to_dict()))) == topo
    plain = validate_topology_text(BASE, "t.yaml").traffic["gen0"].generate
    assert plain is not None and plain.schedule == ()


@pytest.mark.parametrize(
    ("old", "new", "line", "fragment"),
    [
        ("      count: 10\n", "      count: 10\n      rate: 1000\n", 20,
         "gen0: generate: 'rate' and 'schedule' are mutually exclusive"),
        ("{rate: 200kpps, for: 2s}", "{rate: 200kbps, for: 2s}", 21,
         "gen0: generate: schedule[0]: rate '200kbps' has an unknown unit 'kbps': use pps, kpps or Mpps"),
        ("{rate: 200kpps, for: 2s}", "{rate: 0.5pps, for: 2s}", 21, "is not a whole number of packets"),
        ("{rate: 200kpps, for: 2s}", "{rate: 2000Mpps, for: 2s}", 21, "more than the maximum"),
        ("{rate: 200kpps, for: 2s}", "{rate: -5, for: 2s}", 21, "must not be negative"),
        ("{rate: 0, for: 1s}", "{rate: 0, for: 0s}", 22, "schedule[1]: for '0s' must be longer than 0"),
        ("{rate: 0, for: 1s}", "{rate: 0, for: 1}", 22, "for '1' needs a unit: us, ms or s"),
        ("{rate: 0, for: 1s}", "{rate: 0, for: 2h}", 22, "unknown unit 'h'"),
        ("{rate: 0, for: 1s}", "{rate: 0, for: 3601s}", 22, "more than the maximum of 3600s"),
        ("{rate: 0, for: 1s}", "{rate: 0}", 22, "schedule[1]: missing required key 'for'"),
        ("{rate: 0, for: 1s}", "{rate: 0, for: 1s, burst: 4}", 22, "unknown key 'burst' (expected one of: rate, for)"),
        ("{rate: 0, for: 1s}", "[0, 1s]", 22, "schedule[1] must be a mapping, not a list"),
    ],
)
def test_bad_schedules_are_refused_at_their_line(old: str, new: str, line: int, fragment: str) -> None:
    assert old in SCHEDULED
    refused(SCHEDULED.replace(old, new, 1), line, fragment)


@pytest.mark.parametrize(("value", "fragment"), [("[]", "1 to 1000 phases, not 0"),
                                                 ("200kpps", "must be a list of phases")])
def test_schedule_that_is_no_list_of_phases_is_refused(value: str, fragment: str) -> None:
    text = BASE.replace("  gen0: {generate: {count: 10}}", f"  gen0: {{generate: {{schedule: {value}}}}}")
    refused(text, 17, fragment)


def test_pool_policy_unknown() -> None:
    e = refused(BASE.replace("pool: {recycle_limit: 0}", "pool: {recycle_limit: 0, policy: lifo}"), 6,
                "h1: pool: 'policy' must be 'fixed' or 'adaptive', not 'lifo'")
    assert str(e).startswith("t.yaml:6:"), str(e)


def test_pool_policy_adaptive_with_a_recycle_limit() -> None:
    e = refused(BASE.replace("pool: {recycle_limit: 0}", "pool: {recycle_limit: 100, policy: adaptive}"), 6,
                "'policy: adaptive' sets its own limit (the watermark): 'recycle_limit' must be 0, not 100")
    assert str(e).startswith("t.yaml:6:"), str(e)


def test_pool_policy_adaptive_accepted_and_kept() -> None:
    from emu.run.coordinator import pool_params
    from emu.topology.model import topology_from_dict

    topo = validate_topology_text(BASE.replace("pool: {recycle_limit: 0}", "pool: {policy: adaptive}"), "t.yaml")
    assert topo.hosts["h1"].pool.policy == "adaptive"
    assert topology_from_dict(topo.to_dict()).hosts["h1"].pool.policy == "adaptive"
    assert pool_params(topo.hosts["h1"]).policy == "adaptive"
    fixed = validate_topology_text(BASE, "t.yaml")
    assert fixed.hosts["h1"].pool.policy == "fixed" and pool_params(fixed.hosts["h1"]).policy == "fixed"
