"""Reading topology files: the YAML, checked line by line against the schema of `emu.topology`.

To be able to point at lines, the file is read with `yaml.compose` (a node tree where every node carries
its start mark) instead of `yaml.safe_load`; the values are then interpreted by hand against the schema
declared in `emu.topology.schema` (every key list, bound and default comes from there).  Composing also keeps
duplicate mapping keys, which `safe_load` would silently collapse to the last one, so they can be
reported, and lets aliases be counted before anything expands them (`emu.topology.schema.MAX_ALIAS_EXPANSION`).
Every problem is a `TopologyError` with ``file:line: message``.

Programs are loaded the way a run loads them (`emu.xdp.runtime`): their declared params are checked,
their maps created in a scratch place and populated from the params, their setup hooks run, so that a
topology that validates does not fail later on a program, a map or a param.

This is its own module so that only the processes that read files load PyYAML: workers receive their
configuration as the dataclasses of `emu.topology` and never need it (it is a megabyte of each one's
memory).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from emu.errors import BadInputError
from emu.mem.shm import new_run_prefix
from emu.net.packets import MAX_PKT_SIZE, MAX_PORT, MIN_PKT_SIZE
from emu.net.pcap import PcapError, read_frames
from emu.net.protocol import XDP_PACKET_HEADROOM
from emu.topology import schema
from emu.topology.model import (
    DEVICE_PROFILES,
    ETH_MIN_MTU,
    MAX_LINK_DELAY_US,
    MAX_LINK_RATE_BPS,
    MAX_SKB_FRAGS,
    PP_ALLOC_CACHE_REFILL,
    SKB_SHARED_INFO,
    XDP_FEATURES,
    CaptureConfig,
    DeviceConfig,
    Endpoint,
    ExpectConfig,
    GeneratorConfig,
    HostConfig,
    LinkConfig,
    LinkImpairment,
    PoolConfig,
    ReplayConfig,
    Topology,
    TopologyError,
    TrafficPort,
    XdpConfig,
    frame_room,
    max_frame,
    max_linear_mtu,
    max_sg_mtu,
    sg_buffers,
    xdp_features_of,
)
from emu.topology.schema import (
    MAX_ALIAS_EXPANSION,
    MAX_DEVICES,
    MAX_PHASE_US,
    MAX_PHASES,
    MAX_RATE_PPS,
    MIN_FRAG_SIZE,
    SECTIONS,
    Key,
)
from emu.xdp.bpfmaps import MapError, populate
from emu.xdp.context import Program, load_program
from emu.xdp.runtime import ifindex_resolver, scratch_maps

__all__ = ["load_topology", "validate_topology_text"]

# `pkt_size: imix`: the classic simple IMIX, 7:4:1 of 64, 570 and 1518 bytes (without FCS).
IMIX = ((64, 7), (570, 4), (1518, 1))
MAX_IMIX_SIZES = 64

_TAG_NULL = "tag:yaml.org,2002:null"
_TAG_BOOL = "tag:yaml.org,2002:bool"
_TAG_INT = "tag:yaml.org,2002:int"
_TAG_FLOAT = "tag:yaml.org,2002:float"
_TAG_STR = "tag:yaml.org,2002:str"
_TAG_MERGE = "tag:yaml.org,2002:merge"

_TOPOLOGY_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
_DEVICE_NAME_RE = _TOPOLOGY_NAME_RE
# Hosts and traffic ports share one namespace (link endpoints) and must not contain ':', which
# separates host from device in an endpoint.
_HOST_NAME_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}\Z")

TOP, HOST, POOL, DEVICE, XDP, LINK, TRAFFIC, GENERATE = (
    SECTIONS[n] for n in ("top", "host", "pool", "device", "xdp", "link", "traffic", "generate")
)


class _Loader(yaml.SafeLoader):
    """The safe loader, noting where each alias is used: the composed tree shares an alias's target node,
    so without this an alias bomb could only be blamed on its anchor, not on the alias that detonates it."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.alias_uses: list[tuple[yaml.Mark, str, Node]] = []

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            if node is not None:
                self.alias_uses.append((event.start_mark, event.anchor, node))
            return node
        return super().compose_node(parent, index)


def load_topology(path: str | os.PathLike[str]) -> Topology:
    """Read and fully validate a topology file; TopologyError (``file:line: message``) if it is invalid.

    OSError from reading the file propagates unchanged: a missing file has no line to point at.
    """
    filename = os.fspath(path)
    with open(filename, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TopologyError(filename, line, f"not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    return validate_topology_text(text, filename)


def validate_topology_text(text: str, filename: str) -> Topology:
    """Validate topology YAML given as a string; `filename` is only used in messages and `Topology.path`."""
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader checks for unprintable characters here
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        raise _yaml_error(filename, e, "YAML syntax error") from None
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        message = f"YAML syntax error: {e.reason} (character {e.character!r})"
        raise TopologyError(filename, line, message) from None
    finally:
        if loader is not None:
            loader.dispose()
    assert loader is not None
    if root is None:
        raise TopologyError(filename, 1, "the topology file is empty")
    return _Validator(filename, loader.alias_uses).topology(root)


def _yaml_error(filename: str, e: yaml.MarkedYAMLError, label: str) -> TopologyError:
    mark = e.problem_mark or e.context_mark
    line = mark.line + 1 if mark is not None else 1
    message = f"{label}: {e.problem or e.context or 'invalid YAML'}"
    if e.context and e.problem and e.problem.startswith("but "):
        # The composer's messages are one sentence split in two ("expected a single document in the
        # stream" / "but found another document"); keep the order so it still reads as one.
        message = f"{label}: {e.context}, {e.problem}"
    elif e.context and e.problem:
        where = f" started at line {e.context_mark.line + 1}" if e.context_mark is not None else ""
        message += f" ({e.context}{where})"
    return TopologyError(filename, line, message)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _describe(node: Node) -> str:
    """How a wrong value is quoted in messages: by kind for collections, verbatim for scalars."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    value = str(node.value)
    if len(value) > 60:
        value = value[:57] + "..."
    if node.tag == _TAG_NULL:
        return "null"
    if node.tag == _TAG_BOOL:
        return f"the boolean '{value}'"
    if node.tag == _TAG_STR and node.style in ("'", '"'):
        return f"the string '{value}'"
    return f"'{value}'"


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


# -- tc-style quantities (link impairments) ------------------------------------------------------------
# Each parser takes the text as written and returns the value in the dataclass's unit, or raises
# ValueError with the end of a sentence that the caller starts with ``KEY 'TEXT'``.  Units are matched
# case-insensitively, as tc does.  Decimal keeps "1.1ms" exactly 1100 us (a float would not).

_QUANTITY_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z%/]*)\Z")
_TIME_UNITS = {
    **dict.fromkeys(("us", "usec", "usecs"), 1),
    **dict.fromkeys(("ms", "msec", "msecs"), 1000),
    **dict.fromkeys(("s", "sec", "secs"), 1_000_000),
}
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
# tc reads these as *bytes* per second; refused, because "100mbps" is nearly always meant as bits.
_BYTE_RATE_UNITS = {"bps": 1, "kbps": 10**3, "mbps": 10**6, "gbps": 10**9, "tbps": 10**12}


def _split_quantity(text: str, form: str) -> tuple[Decimal, str]:
    m = _QUANTITY_RE.match(text.strip())
    if m is None:
        if text.strip().startswith("-"):
            raise ValueError("must not be negative")
        raise ValueError(f"is not {form}")
    return Decimal(m["num"]), m["unit"].lower()


def _whole(value: Decimal, unit: str, maximum: int, maximum_text: str) -> int:
    """A scaled quantity as an int of `unit`s: refused when it is not whole or past `maximum`."""
    if value != value.to_integral_value():
        raise ValueError(f"is not a whole number of {unit}")
    if value > maximum:
        raise ValueError(f"is more than the maximum of {maximum_text}")
    return int(value)


def _parse_duration_us(text: str, max_us: int = MAX_LINK_DELAY_US) -> int:
    number, unit = _split_quantity(text, "a duration such as 5ms, 200us or 1.5s")
    if not unit:
        raise ValueError("needs a unit: us, ms or s")
    if unit not in _TIME_UNITS:
        raise ValueError(f"has an unknown unit '{unit}': use us, ms or s (or usec, msec, sec)")
    return _whole(number * _TIME_UNITS[unit], "microseconds", max_us, f"{max_us // 1_000_000}s")


def _parse_phase_us(text: str) -> int:
    us = _parse_duration_us(text, MAX_PHASE_US)
    if us == 0:
        raise ValueError("must be longer than 0 (leave the phase out instead)")
    return us


_PKT_RATE_UNITS = {"pps": 1, "kpps": 10**3, "mpps": 10**6}


def _parse_pkt_rate(text: str) -> int:
    """A generator phase's rate: a plain integer (packets per second) or a number with pps/kpps/Mpps."""
    number, unit = _split_quantity(text, "a packet rate such as 200kpps, 1.5Mpps or 5000")
    if unit and unit not in _PKT_RATE_UNITS:
        raise ValueError(f"has an unknown unit '{unit}': use pps, kpps or Mpps (or none: packets per second)")
    pps = number * _PKT_RATE_UNITS.get(unit, 1)
    return _whole(pps, "packets per second", MAX_RATE_PPS, f"{MAX_RATE_PPS:,} packets per second")


def _parse_percent(text: str) -> float:
    number, unit = _split_quantity(text, "a percentage such as 0.1% or 5%")
    if not unit:
        raise ValueError("needs a '%': write a percentage such as 0.1% or 5%")
    if unit != "%":
        raise ValueError("is not a percentage such as 0.1% or 5%")
    if number > 100:
        raise ValueError("must be between 0% and 100%")
    return float(number / 100)


def _parse_bit_rate(text: str) -> int:
    number, unit = _split_quantity(text, "a bit rate such as 100mbit, 1gbit or 64000bit")
    units = "bit, kbit, mbit, gbit or tbit"
    if not unit:
        raise ValueError(f"needs a unit: {units}")
    if unit in _BYTE_RATE_UNITS:
        bits = number * _BYTE_RATE_UNITS[unit] * 8
        suffix = unit[:-3] + "bit"
        in_bits = format((bits / _RATE_UNITS[suffix]).normalize(), "f") + suffix
        raise ValueError(
            f"is in bytes per second ('{unit}' means BYTES/s in tc); "
            f"write the rate in bits: '{in_bits}' (units: {units})"
        )
    if unit not in _RATE_UNITS:
        raise ValueError(f"has an unknown unit '{unit}': use {units}")
    bps = number * _RATE_UNITS[unit]
    if bps == 0:
        raise ValueError("must be more than 0 (leave 'rate' out for an unlimited link)")
    return _whole(bps, "bits per second", MAX_LINK_RATE_BPS, f"{MAX_LINK_RATE_BPS // 10**12}tbit")


@dataclass(frozen=True, slots=True)
class _Quantity:
    form: str  # how a wrong-typed value is told what is expected
    parse: Callable[[str], Any]
    zero: Any  # the value when the key is absent


_DURATION = _Quantity("a duration such as 5ms, 200us or 1.5s", _parse_duration_us, 0)
_PERCENT = _Quantity("a percentage such as 0.1% or 5%", _parse_percent, 0.0)
_BIT_RATE = _Quantity("a bit rate such as 100mbit, 1gbit or 64000bit", _parse_bit_rate, 0)
_PHASE_FOR = _Quantity("a duration such as 500ms or 2s", _parse_phase_us, None)
_PKT_RATE = _Quantity("a packet rate such as 200kpps, 1.5Mpps or 5000", _parse_pkt_rate, None)


class _Fields:
    """A mapping node of the schema: string keys only, unknown keys rejected, typed accessors."""

    def __init__(
        self,
        v: _Validator,
        node: Node,
        *,
        what: str,
        where: str,
        owner_line: int,
        allowed: tuple[str, ...] | None,
        null_is_empty: bool = False,
    ) -> None:
        self.v = v
        self.where = where
        self.pfx = _prefix(where)
        self.owner_line = owner_line
        self.node = node
        self.items: dict[str, tuple[ScalarNode, Node]] = {}
        if null_is_empty and isinstance(node, ScalarNode) and node.tag == _TAG_NULL:
            return
        if not isinstance(node, MappingNode):
            v.fail(node, f"{what} must be a mapping, not {_describe(node)}")
        for key_node, value_node in node.value:
            key = v.key_text(key_node, where)
            if allowed is not None and key not in allowed:
                scope = "unknown key" if where else "unknown top-level key"
                msg = f"{self.pfx}{scope} '{key}' (expected one of: {', '.join(allowed)})"
                close = difflib.get_close_matches(key, allowed, n=1)
                if close:
                    msg += f"; did you mean '{close[0]}'?"
                v.fail(key_node, msg)
            self.items[key] = (key_node, value_node)

    def get(self, key: str) -> Node | None:
        item = self.items.get(key)
        return None if item is None else item[1]

    def given(self, key: str) -> Node | None:
        """The value node, or None when the key is absent or explicitly null."""
        node = self.get(key)
        if node is None or (isinstance(node, ScalarNode) and node.tag == _TAG_NULL):
            return None
        return node

    def require(self, key: str) -> Node:
        node = self.get(key)
        if node is None:
            self.v.fail(self.owner_line, f"{self.pfx}missing required key '{key}'")
        return node

    def int(
        self,
        key: str,
        lo: int,
        hi: int | None,
        default: int | None = None,
        *,
        required: bool = False,
        nullable: bool = False,
        hint: str = "",
    ) -> Any:
        node = self.require(key) if required else self.get(key)
        if node is None or (nullable and node.tag == _TAG_NULL):
            return default
        value = self.v.int_value(node, f"'{key}'", self.pfx)
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            self.v.fail(node, f"{self.pfx}'{key}' must be {bound}{hint}, not {value}")
        return value

    def schema_int(
        self, key: Key, default: Any = None, *, hi: int | None = None, hint: str = "", nullable: bool = False
    ) -> Any:
        """The int `key` (an `emu.topology.schema.Key`) with its declared bounds and default; `default` stands in for
        a default that depends on other keys, `hi` for an upper bound that does (``cpus - 1``)."""
        return self.int(
            key.name,
            key.lo if key.lo is not None else 0,
            key.hi if hi is None else hi,
            key.default if default is None and not key.required else default,
            required=key.required,
            nullable=nullable,
            hint=hint,
        )

    def bool(self, key: str, default: bool) -> bool:
        node = self.get(key)
        if node is None:
            return default
        if not isinstance(node, ScalarNode) or node.tag != _TAG_BOOL:
            self.v.fail(node, f"{self.pfx}'{key}' must be true or false, not {_describe(node)}")
        return bool(self.v.construct(node))

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        node = self.get(key)
        if node is None:
            return default
        text = self.v.str_value(node, key, self.pfx)
        if text not in choices:
            options = " or ".join(f"'{c}'" for c in choices)
            self.v.fail(node, f"{self.pfx}'{key}' must be {options}, not '{text}'")
        return text

    def mac(self, key: str) -> str | None:
        node = self.given(key)
        if node is None:
            return None
        # An unquoted MAC such as 12:34:56:00:01:02 is a YAML 1.1 sexagesimal *integer*; its source text is
        # still the MAC the user wrote, so take the raw text of any plain scalar rather than demand quotes.
        if not isinstance(node, ScalarNode) or node.tag not in (_TAG_STR, _TAG_INT):
            self.v.fail(node, f"{self.pfx}'{key}' must be a MAC address string, not {_describe(node)}")
        text = str(node.value)
        if not _MAC_RE.match(text):
            self.v.fail(node, f"{self.pfx}'{key}' is not a MAC address like 02:00:00:00:01:02: '{text}'")
        return text.lower()

    def int_list(
        self, key: str, lo: int, hi: int | None, length: int, length_what: str
    ) -> tuple[int, ...] | None:
        node = self.given(key)
        if node is None:
            return None
        if not isinstance(node, SequenceNode):
            self.v.fail(node, f"{self.pfx}'{key}' must be a list of integers, not {_describe(node)}")
        values = []
        for item in node.value:
            value = self.v.int_value(item, f"'{key}' entry {len(values)}", self.pfx)
            if value < lo or (hi is not None and value > hi):
                bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
                self.v.fail(item, f"{self.pfx}'{key}' entries must be {bound}, not {value}")
            values.append(value)
        if len(values) != length:
            self.v.fail(
                node,
                f"{self.pfx}'{key}' must have {length} entries (one per {length_what}), not {len(values)}",
            )
        return tuple(values)

    def quantity(self, key: str, q: _Quantity) -> Any:
        """A tc-style number with a unit (``5ms``, ``0.1%``, ``100mbit``), or ``q.zero`` when absent.

        Plain YAML numbers are parsed from their source text too, so that they are told they need a unit.
        """
        node = self.get(key)
        if node is None:
            return q.zero
        if not isinstance(node, ScalarNode) or node.tag not in (_TAG_STR, _TAG_INT, _TAG_FLOAT):
            self.v.fail(node, f"{self.pfx}'{key}' must be {q.form}, not {_describe(node)}")
        text = str(node.value)
        try:
            return q.parse(text)
        except ValueError as e:
            self.v.fail(node, f"{self.pfx}{key} '{text}' {e}")


# A traffic port's key node, and its `generate` mapping with the values read from it (None: a sink).
_PortNodes = tuple[Node, "tuple[_Fields, dict[str, Any]] | None"]


@dataclass(frozen=True, slots=True)
class _XdpNodes:
    """Where a device's `xdp` mapping said what, for messages about its program, params and maps."""

    line: int  # of the `xdp` key
    program: Node
    prog: Program  # the program, loaded once (`check_program` uses it once the host is known)
    params_line: int | None  # of the `params` key, None when there is none
    params: dict[str, tuple[Node, Node]]  # key -> (key node, value node)



def resolve_peers(hosts: dict[str, HostConfig], links: list[LinkConfig]) -> None:
    """Name each cabled device's peer, and give a veth the XDP features its peer decides: ``ndo-xmit``
    (``xdp_xmit``) only while the far end of its cable is a device with an XDP program."""
    for link in links:
        for me, other in ((link.a, link.b), (link.b, link.a)):
            if me.kind != "device" or me.host not in hosts:
                continue
            devices = hosts[me.host].devices
            dev = devices.get(me.name)
            if dev is None:
                continue
            peer_dev = hosts[other.host].devices.get(other.name) if other.kind == "device" and \
                other.host in hosts else None
            changes: dict[str, Any] = {"peer": str(other)}
            if dev.profile == "veth":
                features = xdp_features_of("veth", False, peer_dev is not None and peer_dev.xdp is not None)
                changes.update(xdp_features=features, xdp_xmit="ndo-xmit" in features)
            devices[me.name] = dataclasses.replace(dev, **changes)

class _Validator:
    def __init__(self, filename: str, alias_uses: list[tuple[yaml.Mark, str, Node]]) -> None:
        self.file = filename
        self.alias_uses = alias_uses
        self.xdp_nodes: dict[str, _XdpNodes] = {}  # by "host:device"
        self.object_nodes: dict[str, _Fields] = {}  # by "host:device", for eBPF objects
        # A port's `replay` (its fields and values, resolved once the links are known) and `expect`.
        self.replays: dict[str, tuple[_Fields, dict[str, Any]]] = {}
        self.expects: dict[str, ExpectConfig] = {}

    # -- primitives ---------------------------------------------------------------------------------

    def fail(self, at: Node | int, message: str) -> NoReturn:
        raise TopologyError(self.file, at if isinstance(at, int) else _line(at), message)

    def construct(self, node: Node) -> Any:
        # A fresh constructor per value: SafeConstructor caches constructed nodes and keeps state.
        try:
            return SafeConstructor().construct_object(node, deep=True)
        except ConstructorError as e:
            raise _yaml_error(self.file, e, "YAML error") from None

    def key_text(self, key_node: Node, where: str) -> str:
        if not isinstance(key_node, ScalarNode):
            self.fail(key_node, f"{_prefix(where)}mapping keys must be strings, not {_describe(key_node)}")
        if key_node.tag in (_TAG_NULL, _TAG_BOOL):
            # YAML 1.1 reads an unquoted yes/no/on/off key as a boolean; quoting it is the fix.
            self.fail(key_node, f"{_prefix(where)}mapping keys must be strings, not {_describe(key_node)}")
        return str(key_node.value)

    def int_value(self, node: Node, label: str, pfx: str) -> int:
        if not isinstance(node, ScalarNode) or node.tag != _TAG_INT:
            self.fail(node, f"{pfx}{label} must be an integer, not {_describe(node)}")
        value = self.construct(node)
        # bool is an int subclass; the tag check above already excludes YAML booleans, this keeps it so.
        assert isinstance(value, int) and not isinstance(value, bool)
        return value

    def str_value(self, node: Node, key: str, pfx: str) -> str:
        if not isinstance(node, ScalarNode) or node.tag != _TAG_STR:
            self.fail(node, f"{pfx}'{key}' must be a string, not {_describe(node)}")
        return str(node.value)

    def name(self, node: Node, what: str, pfx: str, pattern: re.Pattern[str], allowed: str) -> str:
        # Names are taken verbatim from the source: a host called 01 is "01", not the integer 1.
        if not isinstance(node, ScalarNode) or node.tag not in (_TAG_STR, _TAG_INT, _TAG_FLOAT):
            self.fail(node, f"{pfx}{what} must be a string, not {_describe(node)}")
        text = str(node.value)
        if not pattern.match(text):
            self.fail(node, f"{pfx}invalid {what} '{text}' (allowed characters: {allowed})")
        return text

    def check_tree(self, root: Node) -> None:
        """Reject what compose lets through and a dict would hide: duplicate keys, merge keys, cycles."""
        seen: set[int] = set()
        stack: list[Node] = [root]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                # An alias shares its anchor's node; checking it once is enough and stops cycles and
                # "billion laughs" alias bombs from being walked exponentially.
                continue
            seen.add(id(node))
            if isinstance(node, SequenceNode):
                stack.extend(reversed(node.value))
            elif isinstance(node, MappingNode):
                first: dict[tuple[str, Any], Node] = {}
                for key_node, value_node in node.value:
                    if isinstance(key_node, ScalarNode) and key_node.tag == _TAG_MERGE:
                        self.fail(key_node, "YAML merge keys ('<<') are not supported in topology files")
                    if not isinstance(key_node, ScalarNode):
                        self.fail(key_node, f"mapping keys must be strings, not {_describe(key_node)}")
                    ident = self._key_identity(key_node)
                    if ident in first:
                        self.fail(
                            key_node,
                            f"duplicate key '{key_node.value}' (first defined at line {_line(first[ident])})",
                        )
                    first[ident] = key_node
                    stack.append(value_node)
        anchor = _find_cycle(root)
        if anchor is not None:
            self.fail(anchor, "recursive YAML alias: an alias refers to the anchor it is inside of")
        self.check_alias_expansion(root)

    def check_alias_expansion(self, root: Node) -> None:
        """Refuse a document whose aliases expand it by more than `MAX_ALIAS_EXPANSION` nodes, counted
        without expanding anything: each node's expanded size is memoised once (the tree is acyclic here)."""
        if not self.alias_uses:
            return
        sizes = _expanded_sizes(root)
        added = sizes[id(root)] - len(sizes)  # expanded nodes minus distinct nodes: what aliases add
        if added <= MAX_ALIAS_EXPANSION:
            return
        mark, anchor, node = max(self.alias_uses, key=lambda use: sizes.get(id(use[2]), 0))
        self.fail(
            mark.line + 1,
            f"YAML aliases expand the document by {added:,} nodes, more than the limit of "
            f"{MAX_ALIAS_EXPANSION:,}; the alias '*{anchor}' here alone expands to {sizes[id(node)]:,} nodes "
            f"(write the values out, or share less)",
        )

    def _key_identity(self, key_node: ScalarNode) -> tuple[str, Any]:
        # Keys are equal when YAML says so (0x10 and 16 are the same int key), not when their text is.
        try:
            value = SafeConstructor().construct_object(key_node)
            hash(value)
        except (ConstructorError, TypeError):
            value = key_node.value
        return (key_node.tag, value)

    # -- the schema ---------------------------------------------------------------------------------

    def topology(self, root: Node) -> Topology:
        self.check_tree(root)
        top = _Fields(self, root, what="the topology", where="", owner_line=_line(root), allowed=TOP.names)
        name = self.name(top.require("name"), "'name'", "", _TOPOLOGY_NAME_RE, "A-Z a-z 0-9 _ . -")
        hosts = self.hosts(top)
        traffic_nodes = self.traffic(top, hosts)
        links = self.links(top, hosts, traffic_nodes)
        resolve_peers(hosts, links)
        traffic = self.generators(traffic_nodes, hosts, links)
        return Topology(name=name, path=self.file, hosts=hosts, links=tuple(links), traffic=traffic,
                        capture=self.capture(top, hosts))

    def capture(self, top: _Fields, hosts: dict[str, HostConfig]) -> CaptureConfig | None:
        """The ``capture`` mapping: devices to write pcapng files of (`emu.run.capture`)."""
        node = top.given("capture")
        if node is None:
            return None
        section = SECTIONS["capture"]
        f = _Fields(self, node, what="'capture'", where="capture", owner_line=_line(top.items["capture"][0]),
                    allowed=section.names)
        dev_node = f.require("devices")
        if not isinstance(dev_node, SequenceNode) or not dev_node.value:
            self.fail(dev_node, f"capture: 'devices' must be a non-empty list of 'host:device' strings, not "
                      f"{_describe(dev_node)}")
        devices: list[tuple[str, str, bool]] = []
        for item in dev_node.value:
            text = self.str_value(item, "devices", f.pfx)
            try:
                dev = CaptureConfig.parse_device(text, hosts)
            except ValueError as e:
                self.fail(item, f"capture: {e}")
            if any(d[:2] == dev[:2] for d in devices):
                self.fail(item, f"capture: '{text}' is listed twice")
            devices.append(dev)
        dir_node = f.given("dir")
        text = "." if dir_node is None else self.str_value(dir_node, "dir", f.pfx)
        where = os.path.join(os.path.dirname(os.path.abspath(self.file)), text)
        if os.path.exists(where) and not os.path.isdir(where):
            self.fail(dir_node if dir_node is not None else node, f"capture: 'dir' {where} is not a directory")
        return CaptureConfig(tuple(devices), os.path.normpath(where), f.schema_int(section["snaplen"]))

    def hosts(self, top: _Fields) -> dict[str, HostConfig]:
        node = top.require("hosts")
        mapping = _Fields(self, node, what="'hosts'", where="", owner_line=_line(node), allowed=None)
        if not mapping.items:
            self.fail(node, "'hosts' must define at least one host")
        hosts: dict[str, HostConfig] = {}
        for index, (key_node, value_node) in enumerate(mapping.items.values()):
            name = self.name(key_node, "host name", "", _HOST_NAME_RE, "A-Z a-z 0-9 _ -")
            hosts[name] = self.host(name, index, key_node, value_node)
        return hosts

    def host(self, name: str, index: int, key_node: Node, node: Node) -> HostConfig:
        f = _Fields(
            self, node, what=f"host '{name}'", where=name, owner_line=_line(key_node), allowed=HOST.names
        )
        cpus = f.schema_int(HOST["cpus"])
        affinity = f.int_list("cpu_affinity", HOST["cpu_affinity"].lo or 0, HOST["cpu_affinity"].hi, cpus, "CPU")
        pages = f.schema_int(HOST["pages"])
        page_size_node = f.get("page_size")
        page_size = f.schema_int(HOST["page_size"])
        if page_size & (page_size - 1):
            assert page_size_node is not None
            lo, hi = HOST["page_size"].lo, HOST["page_size"].hi
            self.fail(
                page_size_node, f"{name}: 'page_size' must be a power of two between {lo} and {hi}, not {page_size}"
            )
        napi_budget = f.schema_int(HOST["napi_budget"])
        redirect_bulk = f.schema_int(HOST["redirect_bulk"])
        tx_bulk = f.schema_int(HOST["tx_bulk"])
        stack_cpu = f.schema_int(
            HOST["stack_cpu"], hi=cpus - 1, nullable=True, hint=f" (host '{name}' has {cpus} cpus)"
        )
        release = HOST["txc_release"]
        txc_release = f.choice(release.name, release.choices, release.default)
        pool = self.pool(name, f, page_size)
        # A device's RX buffer is a page or, with fragments, a fragment of one: that bounds its MTU.
        devices = self.devices(name, index, cpus, pool.frag_size or page_size, f)
        placement = self.placement(name, f)
        host = HostConfig(
            name=name,
            index=index,
            cpus=cpus,
            cpu_affinity=affinity,
            pages=pages,
            page_size=page_size,
            napi_budget=napi_budget,
            redirect_bulk=redirect_bulk,
            tx_bulk=tx_bulk,
            stack_cpu=stack_cpu,
            txc_release=txc_release,
            pool=pool,
            devices=devices,
            line=_line(key_node),
            placement=placement,
        )
        self.check_pages(host, f)
        for dev in devices.values():
            if dev.xdp is not None:
                self.check_program(host, dev)
        return host

    def placement(self, host: str, hf: _Fields) -> tuple[tuple[str, str], ...]:
        """`placement`: swarm node attributes (`schema.PLACEMENT_ATTRIBUTES`, ``node.labels.X``,
        ``engine.labels.X``) and the string each must equal."""
        node = hf.given("placement")
        if node is None:
            return ()
        f = _Fields(self, node, what=f"host '{host}' 'placement'", where=host, owner_line=_line(node), allowed=None)
        out = []
        for key, (key_node, value_node) in f.items.items():
            label = any(key.startswith(p) and len(key) > len(p) for p in schema.PLACEMENT_LABELS)
            if not (label or key in schema.PLACEMENT_ATTRIBUTES):
                self.fail(key_node, f"{host}: 'placement' key {key!r} is no swarm node attribute (expected "
                          f"node.labels.NAME, engine.labels.NAME or one of {', '.join(schema.PLACEMENT_ATTRIBUTES)})")
            value = self.construct(value_node)
            if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
                self.fail(value_node, f"{host}: 'placement' {key} must be a non-empty string, not {value!r}")
            out.append((key, str(value)))
        return tuple(out)

    def check_pages(self, host: HostConfig, f: _Fields) -> None:
        """`pages` against rings and caches (`emu.topology.schema.min_pages`): a host with fewer strands a queue."""
        need = schema.min_pages(host)
        if host.pages >= need:
            return
        rings = " + ".join(f"{d.name} {d.rx_queues} x {d.rx_ring_size}" for d in host.devices.values())
        why = (f"RX rings ({rings}) + {host.cpus} cpus x pool.cache_size {host.pool.cache_size}: every RX ring "
               f"full while every CPU's alloc cache is full")
        node = f.get("pages")
        what = f"'pages' {host.pages} is" if node is not None else f"the default 'pages' ({host.pages}) is"
        self.fail(
            node if node is not None else host.line,
            f"{host.name}: {what} fewer than the {need} pages the host needs ({why}); raise 'pages' to at "
            f"least {need}, or shrink rx_ring_size, rx_queues or pool.cache_size",
        )

    def pool(self, host: str, hf: _Fields, page_size: int) -> PoolConfig:
        node = hf.get("pool")
        if node is None:
            return PoolConfig()
        key_line = _line(hf.items["pool"][0])
        f = _Fields(
            self,
            node,
            what=f"{host}: 'pool'",
            where=f"{host}: pool",
            owner_line=key_line,
            allowed=POOL.names,
            null_is_empty=True,
        )
        cache_size = f.schema_int(POOL["cache_size"])
        refill_node = f.get("refill")
        # A small cache with the kernel's refill of 64 would be an error nobody asked for; cap the default.
        refill = f.schema_int(POOL["refill"], min(PP_ALLOC_CACHE_REFILL, cache_size))
        if refill > cache_size:
            assert refill_node is not None
            self.fail(refill_node, f"{f.pfx}'refill' ({refill}) must not exceed 'cache_size' ({cache_size})")
        pool_size = f.schema_int(POOL["pool_size"]) or PoolConfig().pool_size
        recycle_limit = f.schema_int(POOL["recycle_limit"])
        key = POOL["policy"]
        policy = f.choice(key.name, key.choices, key.default)
        if policy == "adaptive" and recycle_limit:
            node = f.get("policy")
            assert node is not None
            self.fail(node, f"{f.pfx}'policy: adaptive' sets its own limit (the watermark): "
                                       f"'recycle_limit' must be 0, not {recycle_limit}")
        frag_size = f.schema_int(POOL["frag_size"])
        if frag_size:
            node = f.get("frag_size")
            assert node is not None
            if frag_size < MIN_FRAG_SIZE or frag_size & (frag_size - 1) or frag_size > page_size:
                self.fail(node, f"{f.pfx}'frag_size' must be 0 or a power of two between {MIN_FRAG_SIZE} (the "
                                f"least buffer that takes a frame of the least MTU, {ETH_MIN_MTU}) and "
                                f"'page_size' ({page_size}), not {frag_size}")
            if frag_size == page_size:
                frag_size = 0  # one fragment per page: the page itself
        return PoolConfig(cache_size, refill, pool_size, recycle_limit, policy, frag_size)

    def devices(self, host: str, host_index: int, cpus: int, page_size: int, hf: _Fields) -> dict[str, DeviceConfig]:
        node = hf.require("devices")
        f = _Fields(
            self,
            node,
            what=f"{host}: 'devices'",
            where=host,
            owner_line=_line(hf.items["devices"][0]),
            allowed=None,
        )
        if not f.items:
            self.fail(node, f"{host}: 'devices' must define at least one device")
        if len(f.items) > MAX_DEVICES:
            self.fail(node, f"{host}: 'devices' defines {len(f.items)} devices; a host has at most {MAX_DEVICES}")
        devices: dict[str, DeviceConfig] = {}
        ifindex_owner: dict[int, tuple[str, int]] = {}
        for key_node, value_node in f.items.values():
            name = self.name(key_node, "device name", f"{host}: ", _DEVICE_NAME_RE, "A-Z a-z 0-9 _ . -")
            dev, ifindex_node = self.device(host, host_index, cpus, page_size, name, key_node, value_node)
            if dev.ifindex in ifindex_owner:
                other, other_line = ifindex_owner[dev.ifindex]
                also = f"(also used by '{other}' at line {other_line})"
                self.fail(ifindex_node, f"duplicate ifindex {dev.ifindex} on host '{host}' {also}")
            ifindex_owner[dev.ifindex] = (name, _line(ifindex_node))
            devices[name] = dev
        return devices

    def device(
        self, host: str, host_index: int, cpus: int, page_size: int, name: str, key_node: Node, node: Node
    ) -> tuple[DeviceConfig, Node]:
        where = f"{host}:{name}"
        f = _Fields(
            self,
            node,
            what=f"device '{where}'",
            where=where,
            owner_line=_line(key_node),
            allowed=DEVICE.names,
        )
        ifindex = f.schema_int(DEVICE["ifindex"])
        mac = f.mac("mac")
        if mac is None:
            if host_index > 0xFE or ifindex > 0xFFFF:
                # 0xff in the host byte is reserved for traffic ports' derived source MACs.
                why = f"host index {host_index}, ifindex {ifindex}"
                self.fail(f.require("ifindex"), f"{where}: cannot derive a MAC address ({why}); set 'mac'")
            mac = f"02:00:00:{host_index:02x}:{ifindex >> 8:02x}:{ifindex & 0xFF:02x}"
        rx_queues = f.schema_int(DEVICE["rx_queues"], cpus)
        tx_queues = f.schema_int(DEVICE["tx_queues"], cpus)
        rx_ring_size = f.schema_int(DEVICE["rx_ring_size"])
        tx_ring_size = f.schema_int(DEVICE["tx_ring_size"])
        rx_cpus = f.int_list("rx_cpus", DEVICE["rx_cpus"].lo or 0, cpus - 1, rx_queues, "RX queue")
        if rx_cpus is None:
            rx_cpus = tuple(q % cpus for q in range(rx_queues))
        tx_cpus = f.int_list("tx_cpus", DEVICE["tx_cpus"].lo or 0, cpus - 1, tx_queues, "TX queue")
        if tx_cpus is None:
            tx_cpus = tuple(t % cpus for t in range(tx_queues))
        xdp = self.xdp(where, f)
        xdp_xmit = f.bool("xdp_xmit", DEVICE["xdp_xmit"].default)
        profile = f.choice("profile", DEVICE_PROFILES, DEVICE["profile"].default)
        features = xdp_features_of(profile, xdp_xmit)
        flags_node = f.given("xdp_features")
        if profile == "veth":
            for key in ("xdp_xmit", "xdp_features"):
                if f.given(key) is not None:
                    self.fail(f.given(key), f"{where}: '{key}' is not for a veth: a veth advertises ndo-xmit "
                                            "(is a redirect target) exactly while the peer of its pair, the "
                                            "far end of its cable, has an XDP program")
        elif flags_node is not None:
            if not isinstance(flags_node, SequenceNode):
                self.fail(flags_node, f"{where}: 'xdp_features' must be a list of flags, not "
                                      f"{_describe(flags_node)}")
            given = []
            for item in flags_node.value:
                flag = self.str_value(item, "xdp_features entry", f"{where}: ")
                if flag not in XDP_FEATURES:
                    self.fail(item, f"{where}: unknown XDP feature '{flag}' (the kernel's: "
                                    f"{', '.join(XDP_FEATURES)})")
                given.append(flag)
            features = tuple(x for x in XDP_FEATURES if x in given)
            if f.given("xdp_xmit") is not None and xdp_xmit != ("ndo-xmit" in features):
                self.fail(flags_node, f"{where}: 'xdp_xmit: {str(xdp_xmit).lower()}' contradicts 'xdp_features' "
                                      f"({'with' if 'ndo-xmit' in features else 'without'} ndo-xmit)")
            xdp_xmit = "ndo-xmit" in features
        if xdp is not None and "basic" not in features:
            self.fail(flags_node if flags_node is not None else key_node,
                      f"{where}: cannot attach an XDP program: the device's XDP features lack 'basic' "
                      "(the kernel refuses native XDP on it)")
        mtu = self.mtu(where, page_size, f, features, xdp, rx_ring_size, tx_ring_size)
        fallback = DEVICE["redirect_fallback"]
        redirect_fallback = f.choice(fallback.name, fallback.choices, fallback.default)
        tx_completion_us = f.schema_int(DEVICE["tx_completion_us"])
        dev = DeviceConfig(
            name=name,
            ifindex=ifindex,
            mac=mac,
            rx_queues=rx_queues,
            tx_queues=tx_queues,
            rx_ring_size=rx_ring_size,
            tx_ring_size=tx_ring_size,
            rx_cpus=rx_cpus,
            xdp=xdp,
            xdp_xmit=xdp_xmit,
            redirect_fallback=redirect_fallback,  # type: ignore[arg-type]
            tx_completion_us=tx_completion_us,
            line=_line(key_node),
            xdp_features=features,
            profile=profile,  # type: ignore[arg-type]
            tx_cpus=tx_cpus,
            mtu=mtu,
        )
        return dev, f.require("ifindex")

    def mtu(self, where: str, buf_size: int, f: _Fields, features: tuple[str, ...] = (),
            xdp: XdpConfig | None = None, rx_ring_size: int = 0, tx_ring_size: int = 0) -> int:
        """``mtu``: at most the largest MTU whose frames fit one RX buffer of the host (`max_linear_mtu`; a
        buffer is a page, or a ``pool.frag_size`` fragment of one), as a driver refuses ``ip link set mtu``
        above its ``max_mtu``; beyond it only with XDP multi-buffer: the device has ``rx-sg`` (it scatters a
        frame over 1 + up to MAX_SKB_FRAGS buffers, `max_sg_mtu`), an RX ring with that many buffers, and
        a TX ring with a descriptor for each of them when such frames can reach it (a program's XDP_TX, or
        a redirect with ``ndo-xmit-sg``: a frame takes one per buffer, and a driver drops a frame its ring
        can never hold: i40e's ``i40e_xmit_xdp_ring`` finds fewer than 1 + nr_frags descriptors unused, so
        every one of its largest frames would go), and no XDP program or one that supports frags (mlx5's
        "too big for an XDP program not aware of multi buffer"; an eBPF object's is checked with the
        object, `check_object`).  Absent, 1500 or the
        one-buffer limit when smaller."""
        key = DEVICE["mtu"]
        limit = max_linear_mtu(buf_size)
        node = f.get("mtu")
        room = (f"one {buf_size}-byte RX buffer ({frame_room(buf_size)} bytes after {XDP_PACKET_HEADROOM} of "
                f"headroom and {SKB_SHARED_INFO} of skb_shared_info tailroom)")
        if node is None:
            return min(key.default, limit)
        mtu: int = f.schema_int(key)
        if mtu <= limit:
            return mtu
        if "rx-sg" not in features:
            self.fail(node, f"{where}: 'mtu' {mtu} is more than the device can take: its largest frame "
                            f"({max_frame(mtu)} bytes) does not fit {room}, so max_mtu is {limit}; a larger "
                            "MTU needs XDP multi-buffer: give the device 'rx-sg' in 'xdp_features' (and, if it "
                            "has a program, one that supports frags: xdp.frags, or @xdp_program(frags=True)), "
                            "or raise the host's 'page_size' (or 'pool.frag_size'), or lower 'mtu'")
        sg_limit = max_sg_mtu(buf_size)
        if mtu > sg_limit:
            self.fail(node, f"{where}: 'mtu' {mtu} is more than the device can take even with rx-sg: its largest "
                            f"frame ({max_frame(mtu)} bytes) does not fit 1 + {MAX_SKB_FRAGS} RX buffers of "
                            f"{frame_room(buf_size)} bytes, so max_mtu is {sg_limit}: raise the host's "
                            "'page_size' (or 'pool.frag_size') or lower 'mtu'")
        need = sg_buffers(max_frame(mtu), buf_size)
        if rx_ring_size and rx_ring_size < need:
            self.fail(f.get("rx_ring_size") or node, f"{where}: 'rx_ring_size' {rx_ring_size} is too small for "
                      f"mtu {mtu} with rx-sg: its largest frame takes {need} RX buffers of {buf_size} bytes")
        # Such frames reach its TX ring by XDP_TX (it has a program) or by redirect (ndo-xmit-sg).
        if tx_ring_size and tx_ring_size < need and (xdp is not None or "ndo-xmit-sg" in features):
            self.fail(f.get("tx_ring_size") or node, f"{where}: 'tx_ring_size' {tx_ring_size} is too small for "
                      f"mtu {mtu} with rx-sg: its largest frame takes {need} buffers of {buf_size} bytes, a TX "
                      f"descriptor each, so a frame it sends (XDP_TX, or a redirect with ndo-xmit-sg) could never "
                      f"fit the ring and every one would be dropped: make 'tx_ring_size' at least {need}")
        if xdp is not None and xdp.object is None:
            prog = load_program(xdp.program)
            if not prog.frags:
                self.fail(node, f"{where}: 'mtu' {mtu} > {limit}, too big for an XDP program not aware of "
                                f"multi buffer ({xdp.program}; as mlx5 refuses it): a frame takes up to {need} "
                                "RX buffers; declare the program @xdp_program(..., frags=True) (SEC(\"xdp.frags\") "
                                "for an eBPF object), or raise the host's 'page_size' (or 'pool.frag_size')")
        return mtu

    def xdp(self, where: str, df: _Fields) -> XdpConfig | None:
        node = df.given("xdp")
        if node is None:
            return None
        key_line = _line(df.items["xdp"][0])
        f = _Fields(
            self, node, what=f"{where}: 'xdp'", where=f"{where}: xdp", owner_line=key_line, allowed=XDP.names
        )
        if f.given("object") is not None:
            return self.xdp_object(where, f, key_line)
        for key in ("maps", "globals"):
            if f.given(key) is not None:
                self.fail(f.items[key][0], f"{f.pfx}'{key}' is for an eBPF 'object' (a Python program's maps are "
                                           f"populated from its params)")
        program_node = f.require("program")
        program = self.str_value(program_node, "program", f.pfx)
        try:
            prog = load_program(program)  # imported and wrapped now, so that the messages follow file order
        except (ValueError, TypeError) as e:
            self.fail(program_node, f"{where}: {e}")
        params: dict[str, Any] = {}
        param_nodes: dict[str, tuple[Node, Node]] = {}
        params_node = f.given("params")
        if params_node is not None:
            if not isinstance(params_node, MappingNode):
                self.fail(params_node, f"{f.pfx}'params' must be a mapping, not {_describe(params_node)}")
            for key_node, value_node in params_node.value:
                key = self.key_text(key_node, f"{where}: xdp: params")
                params[key] = self.plain_value(value_node, f"{where}: xdp: params: '{key}'")
                param_nodes[key] = (key_node, value_node)
        params_key = f.items.get("params")
        self.xdp_nodes[where] = _XdpNodes(
            key_line, program_node, prog, None if params_key is None else _line(params_key[0]), param_nodes
        )
        return XdpConfig(program, params, f.bool("vectorised", XDP["vectorised"].default))

    def xdp_object(self, where: str, f: _Fields, key_line: int) -> XdpConfig:
        """``xdp: {object: PATH.o, program: NAME, maps: {...}, globals: {...}}``: read here, loaded (and its maps
        populated in a scratch place) by `check_object` once the host's devices are known."""
        if f.given("params") is not None:
            self.fail(f.items["params"][0], f"{f.pfx}'params' is for a Python program; an object takes 'maps' "
                                            f"and 'globals'")
        object_node = f.require("object")
        rel = self.str_value(object_node, "object", f.pfx)
        path = Path(rel) if os.path.isabs(rel) else Path(self.file).resolve().parent / rel
        if not path.is_file():
            self.fail(object_node, f"{f.pfx}object '{rel}': no such file ({path})")
        program_node = f.given("program")
        program = "" if program_node is None else self.str_value(program_node, "program", f.pfx)
        parts: dict[str, Any] = {}
        for key in ("maps", "globals"):
            node = f.given(key)
            if node is not None and not isinstance(node, MappingNode):
                self.fail(node, f"{f.pfx}'{key}' must be a mapping, not {_describe(node)}")
            parts[key] = {} if node is None else self.plain_value(node, f"{where}: xdp: {key}")
        self.object_nodes[where] = f
        return XdpConfig(program, {}, f.bool("vectorised", XDP["vectorised"].default), str(path),
                         parts["maps"], parts["globals"])

    def check_object(self, host: HostConfig, dev: DeviceConfig) -> None:
        """Load `dev`'s eBPF object as a run would (globals set, the program chosen and decoded by the engine,
        the maps created in a scratch place and populated); errors point at the key at fault."""
        from emu.ebpf.engine import CpuEngine
        from emu.ebpf.maps import ObjMaps
        from emu.ebpf.obj import BPF_F_XDP_HAS_FRAGS
        from emu.xdp.runtime import load_xdp_object

        assert dev.xdp is not None
        where = f"{host.name}:{dev.name}"
        f = self.object_nodes[where]
        pfx = f"{where}: xdp: "
        object_node = f.items["object"][1]
        try:
            obj, pname = load_xdp_object(dev, host)
        except BadInputError as e:
            text = str(e)
            at = f.items["globals"][1] if "globals" in f.items and "global" in text else object_node
            if "program" in f.items and "no program" in text:
                at = f.items["program"][1]
            self.fail(at, f"{pfx}{text}")
        limit = max_linear_mtu(host.buf_size)
        if dev.mtu > limit:
            # Only reached with rx-sg (`mtu`): the program must be an xdp.frags one.
            pdef = obj.programs.get(pname)
            if pdef is not None and not pdef.flags & BPF_F_XDP_HAS_FRAGS:
                self.fail(object_node, f"{pfx}mtu {dev.mtu} > {limit}, too big for an XDP program not aware of "
                                       f"multi buffer: {pname} is in section '{pdef.section}', not an xdp.frags one "
                                       "(BPF_F_XDP_HAS_FRAGS)")
        try:
            om = ObjMaps.create(f"{new_run_prefix()}-scratch", obj.maps, host.cpus)
        except BadInputError as e:
            self.fail(object_node, f"{pfx}{obj.path}: {e}")
        try:
            om.programs = list(obj.programs)
            try:
                CpuEngine(obj, om, 0)
            except BadInputError as e:
                self.fail(object_node, f"{pfx}{e}")
            maps_node = f.given("maps")
            if maps_node is None:
                return
            ifindex_of = ifindex_resolver(host)
            for mk_node, mv_node in maps_node.value:
                mname = str(mk_node.value)
                if mname not in om.index:
                    self.fail(mk_node, f"{pfx}maps: no map '{mname}' in {obj.path.name} (maps: "
                                       f"{', '.join(om.index) or 'none'})")
                if not isinstance(mv_node, MappingNode):
                    self.fail(mv_node, f"{pfx}maps: '{mname}' must be a mapping of key to value, not "
                                       f"{_describe(mv_node)}")
                entries = dev.xdp.maps[mname]
                for k_node, v_node in mv_node.value:
                    k = str(k_node.value)
                    try:
                        om.populate({mname: {k: entries[k]}}, ifindex_of)
                    except (BadInputError, ValueError, KeyError) as e:
                        text = str(e) if not isinstance(e, KeyError) or isinstance(e, MapError) else e.args[0]
                        at = k_node if " key " in text else v_node
                        self.fail(at, f"{pfx}maps: '{mname}': {text}")
        finally:
            om.unlink()
            om.close()

    def check_program(self, host: HostConfig, dev: DeviceConfig) -> None:
        """Load `dev`'s program as a run would: its declared params, its maps (created in a scratch place
        and populated from the params) and its setup hook on a context of this device."""
        assert dev.xdp is not None
        if dev.xdp.object is not None:
            self.check_object(host, dev)
            return
        where = f"{host.name}:{dev.name}"
        nodes = self.xdp_nodes[where]
        pfx = f"{where}: xdp: params"
        prog = nodes.prog
        params = dev.xdp.params
        if prog.params is not None:
            self.check_declared_params(prog, params, nodes, host, pfx)
        params_at = nodes.params_line or _line(nodes.program)
        with scratch_maps(prog, host.cpus) as ms:
            if ms is not None:
                ifindex_of = ifindex_resolver(host)
                for name, entries in prog.initial_maps(params).items():
                    value_node = nodes.params[name][1]
                    if not isinstance(value_node, MappingNode):
                        self.fail(value_node, f"{pfx}: '{name}' populates map '{name}': it must be a mapping "
                                              f"of key to value, not {_describe(value_node)}")
                    for k_node, v_node in value_node.value:
                        k = str(k_node.value)
                        try:
                            populate(ms, {name: {k: entries[k]}}, ifindex_of)
                        except (ValueError, KeyError, TypeError, OverflowError) as e:
                            # A message about the key (out of range, not an integer) points at the key,
                            # anything else (an unknown device, a value that is no ifindex) at the value.
                            text = str(e) if isinstance(e, MapError) or not isinstance(e, KeyError) else e.args[0]
                            at = k_node if f" key {k}" in text or f" key {k!r}" in text else v_node
                            self.fail(at, f"{pfx}: '{name}' populates map '{name}': {text}")
            ifindexes = {name: d.ifindex for name, d in host.devices.items()}
            maps = {} if ms is None else dict(ms.maps)
            try:
                prog.new_context(dev.ifindex, 0, dev.rx_cpus[0], params, maps, ifindexes)
            except (Exception, SystemExit) as e:  # the setup hook is the program's code: anything may come
                self.fail(params_at, f"{where}: xdp program '{dev.xdp.program}' refuses its params: setup "
                                     f"raised {type(e).__name__}: {e}")

    def check_declared_params(
        self, prog: Program, params: dict[str, Any], nodes: _XdpNodes, host: HostConfig, pfx: str
    ) -> None:
        """Params against what `prog` declares: no unknown ones, every required one, each of its type."""
        assert prog.params is not None
        known = sorted(set(prog.params) | set(prog.maps))
        for key, (key_node, _) in nodes.params.items():
            if key in prog.maps:
                continue  # a map-named param: populated (and checked) with the scratch maps
            spec = prog.params.get(key)
            if spec is None:
                takes = f"params: {', '.join(sorted(prog.params)) or 'none'}"
                if prog.maps:
                    takes += f"; map params: {', '.join(sorted(prog.maps))}"
                msg = f"{pfx}: unknown param '{key}' for {prog.name} ({takes})"
                close = difflib.get_close_matches(key, known, n=1)
                self.fail(key_node, msg + (f"; did you mean '{close[0]}'?" if close else ""))
            why = spec.check(params[key], host.devices)
            if why is not None:
                self.fail(nodes.params[key][1], f"{pfx}: '{key}' {why}")
        for key, spec in prog.params.items():
            if spec.required and key not in params:
                at = nodes.params_line or nodes.line
                self.fail(at, f"{pfx}: missing required param '{key}' of {prog.name} ({spec.describe()})")

    def plain_value(self, node: Node, where: str) -> Any:
        """A free-form parameter value, restricted to what JSON and msgpack can carry."""
        if isinstance(node, SequenceNode):
            return [self.plain_value(item, where) for item in node.value]
        if isinstance(node, MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self.key_text(key_node, where)
                out[key] = self.plain_value(value_node, f"{where}: '{key}'")
            return out
        if node.tag not in (_TAG_NULL, _TAG_BOOL, _TAG_INT, _TAG_FLOAT, _TAG_STR):
            self.fail(node, f"{where}: unsupported value {_describe(node)} (tag {node.tag})")
        value = self.construct(node)
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(node, f"{where}: non-finite number {_describe(node)} is not allowed")
        return value

    def traffic(self, top: _Fields, hosts: dict[str, HostConfig]) -> dict[str, _PortNodes]:
        """Traffic-port names and their `generate` mappings; resolved after the links are known."""
        node = top.get("traffic")
        if node is None:
            return {}
        mapping = _Fields(
            self,
            node,
            what="'traffic'",
            where="",
            owner_line=_line(top.items["traffic"][0]),
            allowed=None,
            null_is_empty=True,
        )
        if len(mapping.items) > MAX_PORT + 1:
            # Frames carry their generator's number in 16 bits (emu.net.packets.PORT_SHIFT).
            self.fail(node, f"'traffic' defines {len(mapping.items):,} ports; a topology has at most {MAX_PORT + 1:,}")
        ports: dict[str, _PortNodes] = {}
        for key_node, value_node in mapping.items.values():
            name = self.name(key_node, "traffic port name", "", _HOST_NAME_RE, "A-Z a-z 0-9 _ -")
            if name in hosts:
                self.fail(
                    key_node,
                    f"traffic port '{name}' has the same name as host '{name}' (line {hosts[name].line})",
                )
            f = _Fields(
                self,
                value_node,
                what=f"traffic port '{name}'",
                where=name,
                owner_line=_line(key_node),
                allowed=TRAFFIC.names,
                null_is_empty=True,
            )
            gen_node = f.get("generate")
            gen: tuple[_Fields, dict[str, Any]] | None = None
            if gen_node is not None:
                if isinstance(gen_node, ScalarNode) and gen_node.tag == _TAG_NULL:
                    # `generate:` alone could mean "defaults" or "no generator"; make the author say which.
                    hint = "use 'generate: {}' for defaults or remove it"
                    self.fail(gen_node, f"{name}: 'generate' is null; {hint}")
                gen_fields = _Fields(
                    self,
                    gen_node,
                    what=f"{name}: 'generate'",
                    where=f"{name}: generate",
                    owner_line=_line(f.items["generate"][0]),
                    allowed=GENERATE.names,
                )
                # Types and the host-independent ranges are checked now, in file order; the page that
                # bounds pkt_size once the links are known (`generators`).
                gen = (gen_fields, self.generator_values(gen_fields))
            replay_node = f.given("replay")
            if replay_node is not None:
                if gen is not None:
                    self.fail(f.items["replay"][0], f"{name}: 'replay' and 'generate' are mutually exclusive: "
                              "a port sends a capture file or frames of its own, not both")
                rf = _Fields(self, replay_node, what=f"{name}: 'replay'", where=f"{name}: replay",
                             owner_line=_line(f.items["replay"][0]), allowed=SECTIONS["replay"].names)
                self.replays[name] = (rf, self.replay_values(rf))
            expect_node = f.given("expect")
            if expect_node is not None:
                ef = _Fields(self, expect_node, what=f"{name}: 'expect'", where=f"{name}: expect",
                             owner_line=_line(f.items["expect"][0]), allowed=SECTIONS["expect"].names)
                self.expects[name] = ExpectConfig(self.capture_file(ef), ef.bool("ordered", False))
            ports[name] = (key_node, gen)
        return ports

    def capture_file(self, f: _Fields) -> str:
        """The `pcap` key of `f`: a capture file relative to the topology file, read now so that a missing
        or malformed one is refused before anything starts; its absolute path."""
        node = f.require("pcap")
        text = self.str_value(node, "pcap", f.pfx)
        path = os.path.join(os.path.dirname(os.path.abspath(self.file)), text)
        try:
            frames = read_frames(path)
        except PcapError as e:
            self.fail(node, f"{f.pfx}'pcap': {e}")
        if not len(frames):
            self.fail(node, f"{f.pfx}'pcap': {path}: holds no frames")
        return path

    def replay_values(self, f: _Fields) -> dict[str, Any]:
        """``replay``'s values but the ones that depend on the hosts (`max_frame`)."""
        pcap = self.capture_file(f)
        timing = f.choice("timing", SECTIONS["replay"]["timing"].choices, "original")
        rate = f.quantity("rate", _PKT_RATE) or 0
        if rate and timing != "rate":
            self.fail(f.items["rate"][0], f"{f.pfx}'rate' needs 'timing: rate' (with 'original' the file's "
                      "timestamps pace the frames)")
        dst = src = None
        rw = f.given("rewrite")
        if rw is not None:
            rwf = _Fields(self, rw, what=f"{f.where}: 'rewrite'", where=f"{f.where}: rewrite",
                          owner_line=_line(f.items["rewrite"][0]), allowed=("dst_mac", "src_mac"))
            dst, src = rwf.mac("dst_mac"), rwf.mac("src_mac")
        return {"pcap": pcap, "loop": f.schema_int(SECTIONS["replay"]["loop"]), "timing": timing, "rate": rate,
                "dst_mac": dst, "src_mac": src}

    def pkt_sizes(self, f: _Fields) -> tuple[int, tuple[tuple[int, int], ...]]:
        """``pkt_size``: (the frame size, or the largest of an imix; the imix, or ())."""
        key = GENERATE["pkt_size"]
        node = f.get("pkt_size")
        if isinstance(node, ScalarNode) and node.tag == _TAG_STR and node.value == "imix":
            return max(s for s, _ in IMIX), IMIX
        if not isinstance(node, SequenceNode):
            return f.schema_int(key), ()
        hi = key.hi if key.hi is not None else MAX_PKT_SIZE
        if not 1 <= len(node.value) <= MAX_IMIX_SIZES:
            self.fail(node, f"{f.pfx}'pkt_size' as a mix needs 1 to {MAX_IMIX_SIZES} [size, weight] pairs, "
                      f"not {len(node.value)}")
        mix = []
        for k, item in enumerate(node.value):
            if not isinstance(item, SequenceNode) or len(item.value) != 2:
                self.fail(item, f"{f.pfx}'pkt_size' entry {k} must be a pair [size, weight], not {_describe(item)}")
            size = self.int_value(item.value[0], f"'pkt_size' entry {k} size", f.pfx)
            weight = self.int_value(item.value[1], f"'pkt_size' entry {k} weight", f.pfx)
            if not MIN_PKT_SIZE <= size <= hi:
                self.fail(item.value[0], f"{f.pfx}'pkt_size' entry {k}: size must be between {MIN_PKT_SIZE} "
                          f"and {hi}, not {size}")
            if not 1 <= weight <= 1_000_000:
                self.fail(item.value[1], f"{f.pfx}'pkt_size' entry {k}: weight must be between 1 and "
                          f"1000000, not {weight}")
            mix.append((size, weight))
        return max(s for s, _ in mix), tuple(mix)

    def links(
        self, top: _Fields, hosts: dict[str, HostConfig], traffic: dict[str, _PortNodes]
    ) -> list[LinkConfig]:
        node = top.given("links")
        if node is None:
            return []
        if not isinstance(node, SequenceNode):
            self.fail(node, f"'links' must be a list, not {_describe(node)}")
        links: list[LinkConfig] = []
        used: dict[Endpoint, int] = {}
        for i, item in enumerate(node.value):
            where = f"links[{i}]"
            f = _Fields(self, item, what=where, where=where, owner_line=_line(item), allowed=LINK.names)
            ep_node = f.require("endpoints")
            if not isinstance(ep_node, SequenceNode):
                self.fail(
                    ep_node, f"{where}: 'endpoints' must be a list of two endpoints, not {_describe(ep_node)}"
                )
            if len(ep_node.value) != 2:
                self.fail(ep_node, f"{where}: a link needs exactly 2 endpoints, not {len(ep_node.value)}")
            eps = [self.endpoint(n, where, hosts, traffic) for n in ep_node.value]
            a, b = eps
            if a == b:
                self.fail(ep_node.value[1], f"{where}: link connects '{a}' to itself")
            if a.kind == "traffic" and b.kind == "traffic":
                self.fail(
                    ep_node,
                    f"{where}: link '{a}' -- '{b}' connects two traffic ports; one end must be a host device",
                )
            for ep, ep_item in zip(eps, ep_node.value, strict=True):
                if ep in used:
                    self.fail(
                        ep_item, f"{where}: endpoint '{ep}' is already used by the link at line {used[ep]}"
                    )
            for ep in eps:
                used[ep] = _line(item)
            impair = LinkImpairment(
                delay_us=f.quantity("delay", _DURATION),
                jitter_us=f.quantity("jitter", _DURATION),
                loss=f.quantity("loss", _PERCENT),
                rate_bps=f.quantity("rate", _BIT_RATE),
            )
            links.append(LinkConfig(a, b, _line(item), impair))
        return links

    def endpoint(
        self,
        node: Node,
        where: str,
        hosts: dict[str, HostConfig],
        traffic: dict[str, _PortNodes],
    ) -> Endpoint:
        if not isinstance(node, ScalarNode) or node.tag not in (_TAG_STR, _TAG_INT):
            expected = "a string 'host:device' or a traffic port"
            self.fail(node, f"{where}: an endpoint must be {expected}, not {_describe(node)}")
        text = str(node.value)
        ep = Endpoint.parse(text)
        if ep.kind == "device":
            assert ep.host is not None
            if ep.host not in hosts:
                self.fail(node, f"link endpoint '{text}': no host '{ep.host}'")
            if ep.name not in hosts[ep.host].devices:
                self.fail(node, f"link endpoint '{text}': host '{ep.host}' has no device '{ep.name}'")
        elif text not in traffic:
            hint = f" (did you mean '{text}:<device>'?)" if text in hosts else ""
            self.fail(node, f"link endpoint '{text}': no traffic port '{text}'{hint}")
        return ep

    def check_pkt_fits(self, f: _Fields, pkt_size: int, narrowest: tuple[HostConfig, DeviceConfig],
                       linked: HostConfig) -> None:
        """`pkt_size` against the smallest MTU its frames may reach (`narrowest`: that device and its host,
        `linked` the host the port is cabled to)."""
        host, dev = narrowest
        limit = max_frame(dev.mtu)
        if pkt_size > limit:
            node = f.get("pkt_size")
            assert node is not None
            whose = f"{host.name}:{dev.name}" + ("" if host is linked else f", cabled to the linked host "
                                                                           f"'{linked.name}',")
            self.fail(
                node,
                f"{f.pfx}'pkt_size' {pkt_size} is longer than {whose} takes: max {limit} = its mtu {dev.mtu} + "
                f"{limit - dev.mtu} (Ethernet header and a VLAN tag); raise that device's 'mtu'",
            )

    def generator_values(self, f: _Fields) -> dict[str, Any]:
        """The generator's values, checked against every bound that does not depend on the hosts."""
        pkt_size, imix = self.pkt_sizes(f)
        schedule = self.schedule(f)
        if schedule and f.given("rate") is not None:
            self.fail(f.items["rate"][0], f"{f.pfx}'rate' and 'schedule' are mutually exclusive: the schedule "
                      "gives each phase its rate")
        return {
            "count": f.schema_int(GENERATE["count"]),
            "rate": f.schema_int(GENERATE["rate"]),
            "schedule": schedule,
            "pkt_size": pkt_size,
            "flows": f.schema_int(GENERATE["flows"]),
            "burst": f.schema_int(GENERATE["burst"]),
            "src_mac": f.mac("src_mac"),
            "dst_mac": f.mac("dst_mac"),
            "imix": imix,
        }

    def schedule(self, f: _Fields) -> tuple[tuple[int, int], ...]:
        """``generate.schedule``: (rate in pps, length in us) per phase; () when absent."""
        node = f.given("schedule")
        if node is None:
            return ()
        if not isinstance(node, SequenceNode):
            self.fail(node, f"{f.pfx}'schedule' must be a list of phases {{rate: R, for: D}}, not {_describe(node)}")
        if not 1 <= len(node.value) <= MAX_PHASES:
            self.fail(node, f"{f.pfx}'schedule' must have 1 to {MAX_PHASES} phases, not {len(node.value)}")
        phases = []
        for i, item in enumerate(node.value):
            where = f"{f.where}: schedule[{i}]"
            phase = _Fields(self, item, what=where, where=where, owner_line=_line(item), allowed=("rate", "for"))
            phase.require("rate")
            phase.require("for")
            phases.append((phase.quantity("rate", _PKT_RATE), phase.quantity("for", _PHASE_FOR)))
        return tuple(phases)

    def generators(
        self,
        ports: dict[str, _PortNodes],
        hosts: dict[str, HostConfig],
        links: Iterable[LinkConfig],
    ) -> dict[str, TrafficPort]:
        peers: dict[str, Endpoint] = {}
        for link in links:
            for ep, other in ((link.a, link.b), (link.b, link.a)):
                if ep.kind == "traffic":
                    peers[ep.name] = other
        traffic: dict[str, TrafficPort] = {}
        for index, (name, (key_node, read)) in enumerate(ports.items()):
            gen = replay = None
            rv = self.replays[name][1] if name in self.replays else None
            if read is not None or rv is not None:
                peer = peers.get(name)
                if peer is None:
                    what = "generates packets" if read is not None else "replays a capture"
                    self.fail(key_node, f"traffic port '{name}' {what} but is not linked to a device")
                assert peer.host is not None
                host = hosts[peer.host]
                # Its frames may be forwarded over cables to any host connected to this one, and a frame
                # longer than a device's MTU allows is not a frame that device can take: the smallest MTU
                # on the way bounds pkt_size (and the frames a replay keeps).
                narrowest = _narrowest(peer.host, links, hosts)
                if read is not None:
                    gen_fields, values = read[0], dict(read[1])
                    self.check_pkt_fits(gen_fields, values["pkt_size"], narrowest, host)
                    if values["src_mac"] is None:
                        values["src_mac"] = f"02:00:00:ff:{(index + 1) >> 8:02x}:{(index + 1) & 0xFF:02x}"
                    if values["dst_mac"] is None:
                        values["dst_mac"] = host.devices[peer.name].mac
                    gen = GeneratorConfig(**values, port_id=index)
                if rv is not None:
                    replay = ReplayConfig(**rv, max_frame=max_frame(narrowest[1].mtu), port_id=index)
            traffic[name] = TrafficPort(name, gen, _line(key_node), replay, self.expects.get(name))
        return traffic


def _cabled_hosts(start: str, links: Iterable[LinkConfig], hosts: dict[str, HostConfig]) -> list[HostConfig]:
    """`start` and every host a frame can reach from it over links between hosts' devices."""
    adjacent: dict[str, set[str]] = {}
    for link in links:
        if link.a.host is not None and link.b.host is not None and link.a.host != link.b.host:
            adjacent.setdefault(link.a.host, set()).add(link.b.host)
            adjacent.setdefault(link.b.host, set()).add(link.a.host)
    seen, todo = {start}, [start]
    while todo:
        for other in adjacent.get(todo.pop(), ()):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return [hosts[h] for h in hosts if h in seen]


def _narrowest(start: str, links: Iterable[LinkConfig], hosts: dict[str, HostConfig]) -> tuple[HostConfig,
                                                                                               DeviceConfig]:
    """The device of smallest MTU (and its host) among those of `start` and every host cabled to it: the
    longest frame a traffic port cabled to `start` may send is what that device takes."""
    return min(((h, d) for h in _cabled_hosts(start, links, hosts) for d in h.devices.values()),
               key=lambda hd: (hd[1].mtu, hd[0].index, hd[1].ifindex))


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _expanded_sizes(root: Node) -> dict[int, int]:
    """id(node) -> how many nodes the subtree of `node` has once every alias is expanded, for every node
    reachable from the acyclic `root`; computed bottom-up, each distinct node once."""
    sizes: dict[int, int] = {}
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: a deeply nested document must not hit the recursion limit
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        kids = _children(node)
        if children_done:
            sizes[id(node)] = 1 + sum(sizes[id(k)] for k in kids)
        else:
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in sizes)
    return sizes


def _find_cycle(root: Node) -> Node | None:
    """The anchored node an alias inside it refers to (``&a [*a]``), or None when there is no cycle."""
    on_path: set[int] = set()
    done: set[int] = set()
    children = _children
    # Iterative DFS: a deeply nested document must not hit Python's recursion limit.
    stack: list[tuple[Node, Iterator[Node]]] = [(root, iter(children(root)))]
    on_path.add(id(root))
    while stack:
        node, it = stack[-1]
        child = next(it, None)
        if child is None:
            stack.pop()
            on_path.discard(id(node))
            done.add(id(node))
            continue
        if id(child) in on_path:
            return child
        if id(child) not in done:
            on_path.add(id(child))
            stack.append((child, iter(children(child))))
    return None
