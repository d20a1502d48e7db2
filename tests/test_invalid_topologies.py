"""Generated invalid topologies: a drawn valid topology with exactly one thing made wrong is refused.

The strategy draws a small valid topology (one host, two devices, a bundled program, a generator and a
sink) written out in block style so that every key has a line of its own, then breaks exactly one thing:
an int just past a bound that `emu.topology.schema` declares (so a changed bound is tested automatically), a value
of the wrong type, an unknown key, a dangling name (link endpoint, egress device, devmap value, rx_cpus
entry), fewer pages than `emu.topology.schema.min_pages`, an MTU beyond one RX buffer without ``rx-sg`` or
with a program that does not support frags (XDP multi-buffer), or an alias bomb.  ``emu validate`` must exit 2 with one
``FILE:LINE: message`` line naming the line of the offending key or value, no traceback, and nothing
started: no process, no shared-memory segment.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import ROOT, descendants_of, segments_of
from test_schema import L2FWD

from emu.cli import main
from emu.topology import schema
from emu.topology.file import validate_topology_text

PROGRAMS = ("xdp_drop", "xdp_tx", "l2fwd", "l2fwd_cost", "l2fwd_map", "l2fwd_filter")


@dataclass
class Doc:
    """Topology text as lines, each tagged with the (section, key) it sets, so a mutation knows its line."""

    lines: list[str] = field(default_factory=list)
    tags: dict[tuple[str, str], int] = field(default_factory=dict)  # (section, key) -> 0-based index

    def add(self, text: str, tag: tuple[str, str] | None = None) -> None:
        if tag is not None:
            self.tags[tag] = len(self.lines)
        self.lines.append(text)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def set_value(self, tag: tuple[str, str], value: str) -> int:
        """Replace the value of the tagged ``key: value`` line; returns its 1-based line number."""
        i = self.tags[tag]
        key, _, _ = self.lines[i].partition(":")
        self.lines[i] = f"{key}: {value}"
        return i + 1


@st.composite
def valid_docs(draw: st.DrawFn) -> Doc:
    cpus = draw(st.integers(1, 4))
    dev = {
        name: {
            "rx_queues": draw(st.integers(1, 4)),
            "tx_queues": draw(st.integers(1, 4)),
            "rx_ring_size": draw(st.sampled_from([8, 64, 256, 1024])),
            "tx_ring_size": draw(st.sampled_from([8, 64, 256, 1024])),
        }
        for name in ("eth0", "eth1")
    }
    cache = draw(st.sampled_from([16, 64, 128]))
    need = sum(d["rx_queues"] * d["rx_ring_size"] for d in dev.values()) + cpus * cache
    pages = max(schema.HOST["pages"].lo or 0, need) + draw(st.integers(0, 64))
    program = draw(st.sampled_from(PROGRAMS))
    d = Doc()
    d.add("name: t", ("top", "name"))
    d.add("hosts:")
    d.add("  h1:")
    d.add(f"    cpus: {cpus}", ("host", "cpus"))
    d.add(f"    cpu_affinity: [{', '.join(str(c) for c in range(cpus))}]", ("host", "cpu_affinity"))
    d.add(f"    pages: {pages}", ("host", "pages"))
    d.add("    page_size: 4096", ("host", "page_size"))
    d.add(f"    napi_budget: {draw(st.sampled_from([8, 64, 256]))}", ("host", "napi_budget"))
    d.add(f"    redirect_bulk: {draw(st.integers(1, 64))}", ("host", "redirect_bulk"))
    d.add(f"    tx_bulk: {draw(st.integers(1, 64))}", ("host", "tx_bulk"))
    d.add(f"    stack_cpu: {draw(st.integers(0, cpus - 1))}", ("host", "stack_cpu"))
    d.add("    pool:", ("host", "pool"))
    d.add(f"      cache_size: {cache}", ("pool", "cache_size"))
    d.add(f"      refill: {draw(st.integers(1, cache))}", ("pool", "refill"))
    d.add(f"      pool_size: {draw(st.sampled_from([0, 64, 1024]))}", ("pool", "pool_size"))
    d.add(f"      recycle_limit: {draw(st.sampled_from([0, 100]))}", ("pool", "recycle_limit"))
    # A fragment of the whole page is the page itself: frames up to 1,500 bytes still fit every buffer.
    d.add(f"      frag_size: {draw(st.sampled_from([0, 4096]))}", ("pool", "frag_size"))
    d.add("    devices:")
    for i, (name, dd) in enumerate(dev.items()):
        d.add(f"      {name}:", (name, ""))
        d.add(f"        ifindex: {i + 2}", (name, "ifindex"))
        for key in ("rx_queues", "tx_queues", "rx_ring_size", "tx_ring_size"):
            d.add(f"        {key}: {dd[key]}", (name, key))
        rx_cpus = ", ".join(str(q % cpus) for q in range(dd["rx_queues"]))
        d.add(f"        rx_cpus: [{rx_cpus}]", (name, "rx_cpus"))
        tx_cpus = ", ".join(str(q % cpus) for q in range(dd["tx_queues"]))
        d.add(f"        tx_cpus: [{tx_cpus}]", (name, "tx_cpus"))
        d.add("        xdp_xmit: true", (name, "xdp_xmit"))
        d.add(f"        tx_completion_us: {draw(st.sampled_from([0, 100]))}", (name, "tx_completion_us"))
        d.add(f"        mtu: {draw(st.sampled_from([1500, 3000]))}", (name, "mtu"))
        if name == "eth0":
            d.add("        xdp:", ("xdp", ""))
            d.add(f'          program: "emu.programs:{program}"', ("xdp", "program"))
            d.add("          vectorised: true", ("xdp", "vectorised"))
            if program in ("l2fwd", "l2fwd_cost", "l2fwd_filter"):
                d.add("          params:", ("xdp", "params"))
                d.add("            egress: eth1", ("params", "egress"))
            elif program == "l2fwd_map":
                d.add("          params:", ("xdp", "params"))
                d.add("            tx_port:", ("params", "tx_port"))
                d.add("              0: eth1", ("tx_port", "0"))
            else:
                d.add("          params: {}", ("xdp", "params"))
    d.add("traffic:")
    d.add("  gen0:")
    d.add("    generate:")
    d.add(f"      count: {draw(st.integers(1, 10_000))}", ("generate", "count"))
    d.add(f"      rate: {draw(st.sampled_from([0, 1000]))}", ("generate", "rate"))
    d.add(f"      pkt_size: {draw(st.sampled_from([62, 64, 1500]))}", ("generate", "pkt_size"))
    d.add(f"      flows: {draw(st.integers(1, 64))}", ("generate", "flows"))
    d.add(f"      burst: {draw(st.integers(1, 64))}", ("generate", "burst"))
    d.add("  sink0: {}")
    d.add("links:")
    d.add('  - endpoints: [gen0, "h1:eth0"]', ("link", "0"))
    d.add('  - endpoints: ["h1:eth1", sink0]', ("link", "1"))
    return d


# Keys whose value is a list of ints (a bound case breaks the first entry).
LIST_KEYS = ("cpu_affinity", "rx_cpus", "tx_cpus")
# Which tag of the drawn document holds each int key the schema bounds (every device key on eth0).
_SECTION_TAG = {"host": "host", "pool": "pool", "device": "eth0", "generate": "generate"}


def _bound_cases() -> list[tuple[str, str, int]]:
    """(tag section, key, value just past a bound) for every int key with static bounds in `emu.topology.schema`."""
    cases = []
    for section, key in schema.int_keys():
        assert key.lo is not None and key.hi is not None
        if section.name in ("replay", "capture"):
            continue  # a replay needs a capture file beside the topology: tests/test_pcap.py bounds its keys
        tag = _SECTION_TAG[section.name]
        cases += [(tag, key.name, key.lo - 1), (tag, key.name, key.hi + 1)]
    return cases


BOUND_CASES = _bound_cases()


@st.composite
def invalid_docs(draw: st.DrawFn) -> tuple[str, int, str]:
    """(text, line the message must name, what was broken) for a drawn valid topology broken once."""
    d = draw(valid_docs())
    assert validate_topology_text(d.text(), "base.yaml")  # the base is valid: only the mutation is wrong
    kind = draw(st.sampled_from(["bound", "type", "unknown_key", "dangling", "pages", "sg", "aliases"]))
    if kind == "bound":
        sect, key, value = draw(st.sampled_from(BOUND_CASES))
        if key in LIST_KEYS:
            # A list: make its first entry the one past the bound.
            i = d.tags[(sect, key)]
            head, _, rest = d.lines[i].partition("[")
            _, sep, others = rest.rstrip("]").partition(",")
            d.lines[i] = f"{head}[{value}{sep}{others}]"
            return d.text(), i + 1, f"{key} entry {value}"
        line = d.set_value((sect, key), str(value))
        return d.text(), line, f"{key}: {value}"
    if kind == "type":
        tag = draw(st.sampled_from(sorted(t for t, i in d.tags.items() if t[1] and t[0] in _SECTION_TAG.values()
                                          and not d.lines[i].endswith(":"))))
        if tag[1] in ("xdp_xmit", "vectorised"):
            bad = draw(st.sampled_from(["3", '"yes"', "[true]"]))
        elif tag[1] in LIST_KEYS:  # lists of ints, which may be null
            bad = draw(st.sampled_from(['"7"', "true", "1.5", "{a: 1}", "[x]"]))
        else:
            nullable = tag[1] == "stack_cpu"
            bad = draw(st.sampled_from(['"7"', "true", "[1]", "1.5", "{a: 1}"] + ([] if nullable else ["null"])))
        line = d.set_value(tag, bad)
        return d.text(), line, f"{tag[1]}: {bad}"
    if kind == "unknown_key":
        # Not after a line that opens a block (the key would split it) nor inside a map's entries.
        tag = draw(st.sampled_from(sorted(t for t, i in d.tags.items()
                                          if t[0] not in ("tx_port", "link") and not d.lines[i].endswith(":"))))
        i = d.tags[tag]
        indent = len(d.lines[i]) - len(d.lines[i].lstrip())
        d.lines.insert(i + 1, " " * indent + "no_such_key_zz: 1")
        return d.text(), i + 2, f"unknown key after {tag}"
    if kind == "dangling":
        choices = [("link", "0"), ("link", "1"), ("eth0", "rx_cpus"), ("eth0", "tx_cpus")]
        choices += [t for t in (("params", "egress"), ("tx_port", "0")) if t in d.tags]
        tag = draw(st.sampled_from(choices))
        i = d.tags[tag]
        if tag[0] == "link":
            d.lines[i] = d.lines[i].replace('"h1:eth', '"h1:eth9').replace("gen0", "nosuchport") \
                if draw(st.booleans()) else d.lines[i].replace('"h1:eth', '"h9:eth')
        elif tag in (("eth0", "rx_cpus"), ("eth0", "tx_cpus")):
            cpus = int(d.lines[d.tags[("host", "cpus")]].split(":")[1])
            head, _, rest = d.lines[i].partition("[")
            d.lines[i] = f"{head}[{cpus}{rest[1:]}" if rest[0].isdigit() else d.lines[i]
        else:
            d.lines[i] = d.lines[i].replace("eth1", "eth9")
        return d.text(), i + 1, f"dangling {tag}"
    if kind == "pages":
        # Grow eth0's RX ring so the pages no longer cover rings and caches (emu.topology.schema.min_pages).
        i = d.tags[("eth0", "rx_ring_size")]
        d.lines[i] = f"        rx_ring_size: {schema.DEVICE['rx_ring_size'].hi}"
        return d.text(), d.tags[("host", "pages")] + 1, "pages below min_pages"
    if kind == "sg":
        # XDP multi-buffer's rules: an MTU beyond one RX buffer (3,502 with 4 KiB pages) needs rx-sg, and a
        # program on such a device must support frags (eth0's, unless it is xdp_tx, which does).
        dev = draw(st.sampled_from(["eth0", "eth1"]))
        line = d.set_value((dev, "mtu"), str(draw(st.sampled_from([3503, 9000]))))
        program = d.lines[d.tags[("xdp", "program")]].split(":")[-1].strip('"')
        if dev == "eth0" and program != "xdp_tx" and draw(st.booleans()):
            d.lines.insert(line, "        xdp_features: [basic, redirect, ndo-xmit, rx-sg]")
            return d.text(), line, f"rx-sg with {program}, not a frags program"
        return d.text(), line, "mtu beyond one buffer without rx-sg"
    levels = draw(st.integers(15, 24))  # 2**15 leaves is already past MAX_ALIAS_EXPANSION
    d.add("x-bomb-0: &b0 [x, x]")
    for k in range(1, levels):
        d.add(f"x-bomb-{k}: &b{k} [*b{k - 1}, *b{k - 1}]")
    return d.text(), len(d.lines), f"alias bomb of {levels} levels"


def _started_processes() -> set[int]:
    """Our live descendants but Python's shared-memory resource tracker (one per interpreter, started by the
    first segment any test creates, validation's scratch maps included) which is not a run's process."""
    out = set()
    for pid in descendants_of(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            out.add(pid)
    return out


def _validate_in_process(path: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["validate", path])
    return status, err.getvalue()


def _assert_refused(status: int, stderr: str, path: str, line: int, what: str) -> None:
    lines = stderr.splitlines()
    assert status == 2, (what, status, stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, (what, stderr)
    # The CLI may prefix its one line with "emu: "; what follows is FILE:LINE: message.
    message = lines[0].removeprefix("emu: ")
    assert message.startswith(f"{path}:{line}: "), (what, line, message)


@settings(max_examples=200, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(invalid_docs())
def test_one_thing_wrong_is_refused_with_its_line(case: tuple[str, int, str]) -> None:
    text, line, what = case
    before = _started_processes()  # earlier tests of this worker may have left a fork server
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bad.yaml")
        Path(path).write_text(text)
        status, stderr = _validate_in_process(path)
    _assert_refused(status, stderr, path, line, what)
    assert segments_of(os.getpid()) == [], "validation left a shared-memory segment"
    assert _started_processes() <= before, "validation started a process"


def test_every_bound_is_pushed_past() -> None:
    """The bound cases cover both ends of every bounded int key the schema declares, in every section."""
    keys = {(s.name, k.name) for s, k in schema.int_keys() if s.name not in ("replay", "capture")}  # tests/test_pcap.py
    assert {"pages", "ifindex", "count", "recycle_limit", "rx_ring_size", "cache_size"} <= {k for _, k in keys}
    assert len(BOUND_CASES) == 2 * len(keys)


@settings(max_examples=20, deadline=None)
@given(valid_docs())
def test_every_bound_case_has_its_line(d: Doc) -> None:
    """Each key a bound case pushes past its bound has a line in every drawn document (found by a random
    seed: ``tx_cpus``, bounded by the schema, was missing, so its case raised KeyError in the strategy)."""
    assert {(sect, key) for sect, key, _ in BOUND_CASES} <= set(d.tags)


def test_mutations_of_the_bundled_topologies_are_refused(tmp_path: Path) -> None:
    """Each bundled file with an unknown key added before each top-level key is refused at that line, and
    with its pages one below `emu.topology.schema.min_pages` at the line of its pages."""
    from emu.topology.file import load_topology

    # The copies live in a topology/ next to a link to the checkout's emu/, so that a bundled file's object
    # path (relative to the file: ../emu/programs/bpf/X.o) still resolves.
    (tmp_path / "topology").mkdir()
    (tmp_path / "emu").symlink_to(ROOT / "emu")
    for f in sorted((ROOT / "topology").glob("*.yaml")):
        lines = f.read_text().splitlines()
        bad = tmp_path / "topology" / f.name
        for i, text in enumerate(lines):
            if not text or text.startswith(("#", " ", "-")) or ":" not in text:
                continue
            bad.write_text("\n".join([*lines[:i], "no_such_key_zz: 1", *lines[i:]]) + "\n")
            status, stderr = _validate_in_process(str(bad))
            _assert_refused(status, stderr, str(bad), i + 1, f"{f.name} before line {i + 1}")
        host = next(iter(load_topology(f).hosts.values()))
        at = next((i for i, t in enumerate(lines) if t.strip().startswith("pages:")), None)
        if at is not None and schema.min_pages(host) > 256:  # the files that set pages on their first host
            lines[at] = lines[at].split(":")[0] + f": {schema.min_pages(host) - 1}"
            bad.write_text("\n".join(lines) + "\n")
            _assert_refused(*_validate_in_process(str(bad)), str(bad), at + 1, f"{f.name} pages")


@pytest.mark.parametrize("case", [
    ("    pages: 8192\n", "    pages: 255\n", 5),
    ("            egress: eth1\n", "            egress: eth9\n", 13),
    ("        ifindex: 2\n", "        ifindex: 4294967296\n", 9),
    ("{count: 10}", "{count: 8589934592}", 17),
])
def test_refused_by_a_real_emu_validate_process(tmp_path: Path, case: tuple[str, str, int]) -> None:
    old, new, line = case
    text = L2FWD.replace(old, new)
    assert text != L2FWD
    validate_topology_text(L2FWD, "real.yaml")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    before = _started_processes()
    proc = subprocess.Popen([sys.executable, "-m", "emu.cli", "validate", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    _assert_refused(proc.returncode, err, str(path), line, new)
    assert out == ""
    assert segments_of(proc.pid) == [] and _started_processes() <= before
