"""The topology schema, declared once: every key, its type, bounds, default, meaning and kernel counterpart.

Three things used to state the schema separately and drifted apart: the validator's literals
(`emu.topology.file`), the tables of ``topology/README.md`` and the limits the processes rely on (a u32
ifindex in a devmap, `emu.net.packets.SeqTracker.MAX_TRACKED`, the int64 words of `emu.mem.pagemem`).  This
module is the one statement of them:

* `SECTIONS` maps each section of a topology file (``top``, ``host``, ``pool``, ``device``, ``xdp``,
  ``link``, ``generate``) to its `Section`, an ordered list of `Key`s.  The validator takes every key
  list, bound and default from here; each bound says which consumer it protects.
* `CONSTRAINTS` lists the cross-field rules (pages against rings and caches, refill against cache size,
  devmap keys against ``max_entries``, ...), which the validator enforces with the same wording.
* `min_pages` is the page count a host needs (also used by the generated suite of valid topologies).
* `markdown` renders all of it, plus the params each bundled program declares (`emu.xdp.ParamSpec`), as
  the tables of ``topology/README.md``; ``python -m emu.topology.schema --markdown`` rewrites them between the
  README's ``<!-- schema:NAME -->`` markers and ``--check`` fails when the README is stale (a test runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emu.net.packets import MAX_FLOWS, MAX_PKT_SIZE, MIN_PKT_SIZE, SeqTracker
from emu.net.protocol import CPU_MASK, DEVICE_BIT, LINK_DOWN_BIT, XDP_PACKET_HEADROOM
from emu.topology.model import (
    DEV_MAP_BULK_SIZE,
    NAPI_POLL_WEIGHT,
    PP_ALLOC_CACHE_REFILL,
    PP_ALLOC_CACHE_SIZE,
    PP_DEFAULT_RING_SIZE,
    XDP_BULK_QUEUE_SIZE,
    HostConfig,
)

__all__ = [
    "CONSTRAINTS",
    "MAX_ALIAS_EXPANSION",
    "MAX_CPUS",
    "MAX_DEVICES",
    "MAX_IFINDEX",
    "MAX_PAGES",
    "MAX_PAGE_SIZE",
    "MIN_PAGE_SIZE",
    "REQUIRED",
    "SECTIONS",
    "Constraint",
    "Key",
    "Section",
    "int_keys",
    "markdown",
    "min_pages",
]

README = Path(__file__).resolve().parents[2] / "topology" / "README.md"

# -- the numbers the processes rely on -------------------------------------------------------------

# The offline mask (emu.net.protocol) has a bit for each CPU of a host and one for each device, below the
# link-down bit: a host with more would signal one process's death as another's.
MAX_CPUS = CPU_MASK.bit_length()  # 32
MAX_DEVICES = LINK_DOWN_BIT - DEVICE_BIT  # 30
# Linux's largest CONFIG_NR_CPUS; `cpu_affinity` entries are taken modulo the usable cores, so any value
# runs, but one that is not a plausible core id is a typo (and ints must stay within msgpack's 64 bits).
MAX_CPU_ID = 8191
MAX_PAGES = 1 << 20
MIN_PAGES = 256
MIN_PAGE_SIZE = 1024
MAX_PAGE_SIZE = 65536
MAX_QUEUES = 64
MIN_RING = 8
MAX_RING = 16384
MAX_BULK = 1024
MAX_POOL_SIZE = 16384  # page_pool_init(): a ptr_ring of at most 16384 entries (emu.mem.pagepool.PoolParams)
MAX_CACHE_SIZE = 65536
# A devmap slot is a u32 (emu.xdp.bpfmaps.DevMap) and so is the kernel's dev->ifindex.
MAX_IFINDEX = (1 << 32) - 1
MAX_TX_COMPLETION_US = 10_000_000
# The sink's bitmap of sequence numbers (emu.net.packets.SeqTracker) tracks at most this many packets.
MAX_COUNT = SeqTracker.MAX_TRACKED
# The pacer counts in integer nanoseconds; a billion packets a second is far beyond any emulated link
# and keeps the value a small int everywhere it travels (msgpack, JSON reports).
MAX_RATE_PPS = 10**9
MAX_BURST = 4096
# Aliases may add at most this many nodes to a document when expanded.  The largest sensible use, one
# device or host block shared by a few hundred copies, adds a few thousand nodes; 10,000 more nodes
# validate in milliseconds, while an "alias bomb" of 1 KB expanding to millions is refused before any
# expansion (the counting is by memoised subtree sizes, so refusing costs as little as accepting).
MAX_ALIAS_EXPANSION = 10_000


class _Required:
    """The default of a key that has none: it must be given."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a section.

    `kind` is how the validator reads the value (``int``, ``int_list``, ``bool``, ``choice``, ``mac``,
    ``name``, ``str``, ``mapping``, ``list``, ``duration``, ``percent``, ``rate``).  `lo`/`hi` are the
    static bounds of an int (of each entry for ``int_list``); a bound that depends on another key
    (``stack_cpu`` below ``cpus``) is in `hi_ref` and enforced as a cross-field constraint.  `default` is
    the value the validator uses when the key is absent (`REQUIRED` when it must be given; None for
    "null"), `default_doc` how the README says it when that is not the value itself.
    """

    name: str
    kind: str
    meaning: str
    default: Any = None
    lo: int | None = None
    hi: int | None = None
    hi_ref: str = ""
    type_doc: str = ""
    default_doc: str = ""
    kernel: str = ""
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def type_text(self) -> str:
        if self.type_doc:
            return self.type_doc
        if self.kind == "int":
            hi = self.hi_ref or (None if self.hi is None else str(self.hi))
            return f"int {self.lo}..{hi}" if hi is not None else f"int ≥ {self.lo}"
        if self.kind == "bool":
            return "bool"
        if self.kind == "choice":
            return " or ".join(f"`{c}`" for c in self.choices)
        return self.kind

    def default_text(self) -> str:
        if self.default_doc:
            return self.default_doc
        if self.required:
            return "*required*"
        if self.default is None:
            return "null"
        if isinstance(self.default, bool):
            return f"`{str(self.default).lower()}`"
        return f"`{self.default}`"


@dataclass(frozen=True, slots=True)
class Section:
    """The keys of one mapping of a topology file, in the order the README lists them."""

    name: str
    path: str  # how the README titles it, in path notation
    keys: tuple[Key, ...]
    kernel_column: bool = True
    key_prefix: str = ""  # shown before each key in the table ("generate.")

    def __getitem__(self, name: str) -> Key:
        for k in self.keys:
            if k.name == name:
                return k
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys)


@dataclass(frozen=True, slots=True)
class Constraint:
    """A rule between keys (or between a key and a process's limit) that the validator enforces."""

    name: str
    text: str


_NAME = "`[A-Za-z0-9_.-]+`"

TOP = Section("top", "Top level", (
    Key("name", "name", "Name of the topology.", REQUIRED, type_doc=f"string {_NAME}"),
    Key("hosts", "mapping", "Host names: `[A-Za-z0-9_-]+` (no `:`).", REQUIRED,
        type_doc="mapping name → host", default_doc="*required*, at least one"),
    Key("links", "list", "Wiring between endpoints.", None, type_doc="list of links",
        default_doc="`[]` (null ok)"),
    Key("traffic", "mapping", "Names: `[A-Za-z0-9_-]+`, must not clash with host names.", None,
        type_doc="mapping name → traffic port", default_doc="`{}` (null ok)"),
), kernel_column=False)

HOST = Section("host", "`hosts.<host>`", (
    Key("cpus", "int", "Number of emulated CPUs (one worker process each).", REQUIRED, 1, MAX_CPUS,
        kernel="`nr_cpu_ids`"),
    Key("cpu_affinity", "int_list",
        "Cores the CPU workers are pinned to: core `k` is the (k mod n)-th of the n cores this process may "
        "use. Null pins the run's CPU workers to consecutive cores, the first CPU worker to the first of "
        "them. Not checked against this machine's cores at validation time.",
        None, 0, MAX_CPU_ID, type_doc=f"list of ints 0..{MAX_CPU_ID}, one per CPU", kernel="`sched_setaffinity`"),
    Key("pages", "int", "Size of the host's page memory, in pages; at least `min_pages` (see Constraints).",
        8192, MIN_PAGES, MAX_PAGES, kernel="physical memory"),
    Key("page_size", "int", "Bytes per page.", 4096, MIN_PAGE_SIZE, MAX_PAGE_SIZE,
        type_doc=f"int, power of two {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}", kernel="`PAGE_SIZE`"),
    Key("napi_budget", "int", "Packets one NAPI poll may process.", NAPI_POLL_WEIGHT, 1, MAX_BULK,
        kernel="`NAPI_POLL_WEIGHT`"),
    Key("redirect_bulk", "int", "Frames queued per target before a redirect flush.", DEV_MAP_BULK_SIZE, 1,
        MAX_BULK, kernel="`DEV_MAP_BULK_SIZE`"),
    Key("tx_bulk", "int",
        "Pages of another CPU's pool returned per ring-lock round trip at TX completion (own pages are "
        "recycled directly, without a lock).", XDP_BULK_QUEUE_SIZE, 1, MAX_BULK,
        kernel="`XDP_BULK_QUEUE_SIZE` (`xdp_return_frame_bulk`)"),
    Key("stack_cpu", "int",
        "CPU where the emulated network stack frees skbs of passed packets; null = the CPU that received "
        "the packet.", None, 0, MAX_CPUS - 1, hi_ref="cpus-1", kernel="softirq / `skb_free` CPU"),
    Key("pool", "mapping", "Page-pool parameters, below.", None, type_doc="mapping",
        default_doc="kernel defaults (null ok)", kernel="`struct page_pool_params`"),
    Key("devices", "mapping", f"Device names {_NAME}.", REQUIRED, type_doc="mapping name → device",
        default_doc=f"*required*, 1 to {MAX_DEVICES} devices", kernel="`struct net_device`"),
))

POOL = Section("pool", "`hosts.<host>.pool`", (
    Key("cache_size", "int", "Per-CPU lockless alloc cache size.", PP_ALLOC_CACHE_SIZE, 1, MAX_CACHE_SIZE,
        kernel="`PP_ALLOC_CACHE_SIZE`"),
    Key("refill", "int", "Pages moved from the ring when the cache is empty.", PP_ALLOC_CACHE_REFILL, 1,
        MAX_CACHE_SIZE, hi_ref="`cache_size`", default_doc="`min(64, cache_size)`",
        kernel="`PP_ALLOC_CACHE_REFILL`"),
    Key("pool_size", "int", "Size of the recycle ring; `0` means 1024 like the kernel.", PP_DEFAULT_RING_SIZE,
        0, MAX_POOL_SIZE, kernel="`page_pool_params.pool_size` (`ptr_ring`)"),
    Key("recycle_limit", "int",
        "Hard limit on recyclable pages the pool keeps (cache + ring); `0` = no limit. A pool never keeps "
        f"more pages than its host has, so the bound is the largest `pages` ({MAX_PAGES}).",
        0, 0, MAX_PAGES, kernel="(emulator knob)"),
))

DEVICE = Section("device", "`hosts.<host>.devices.<dev>`", (
    Key("ifindex", "int", "Interface index (devmap values, `ctx.ingress_ifindex`); a u32, as in devmaps.",
        REQUIRED, 1, MAX_IFINDEX, type_doc=f"int 1..{MAX_IFINDEX}, unique within the host",
        kernel="`dev->ifindex`"),
    Key("mac", "mac", "Device MAC address (stored lower case); must be given when the ifindex is above "
        "65535 or the host is the 256th or later.", None, type_doc="string `xx:xx:xx:xx:xx:xx`",
        default_doc="`02:00:00:<host index>:<ifindex hi>:<ifindex lo>` (hex, lower case; host index is "
        "0-based in file order)", kernel="`dev->dev_addr`"),
    Key("rx_queues", "int", "Number of RX queues.", None, 1, MAX_QUEUES, default_doc="host `cpus`",
        kernel="`dev->real_num_rx_queues`"),
    Key("tx_queues", "int", "Number of XDP TX queues.", None, 1, MAX_QUEUES, default_doc="host `cpus`",
        kernel="XDP TX rings (one per CPU in most drivers)"),
    Key("rx_ring_size", "int", "Descriptors per RX ring.  Any size runs with any batch size: a device "
        "posts what fits and counts the rest of a link message as `rx_dropped`.", 1024, MIN_RING, MAX_RING,
        kernel="`ethtool -G rx`"),
    Key("tx_ring_size", "int",
        "Descriptors per TX ring.  A CPU with a TX queue of its own (`tx_queues` at least `cpus`) holds no "
        "more frames on it than this until their completions come back; past that it leaves packets in its "
        "RX ring (`tx_ring_waits`), so nothing is dropped for a device that is slow to run.", 1024, MIN_RING,
        MAX_RING, kernel="`ethtool -G tx`"),
    Key("rx_cpus", "int_list", "CPU servicing each RX queue's NAPI.", None, 0, MAX_CPUS - 1,
        type_doc="list of CPU ids 0..cpus-1, one per RX queue", default_doc="queue *q* → CPU *q* % cpus",
        kernel="IRQ affinity"),
    Key("xdp", "mapping", "Attached XDP program, below.", None, type_doc="mapping",
        default_doc="null (no program: every packet is passed to the stack, `XDP_PASS` semantics)",
        kernel="`bpf_prog` on `XDP_FLAGS_DRV_MODE`"),
    Key("xdp_xmit", "bool", "Device implements `ndo_xdp_xmit` and can be a redirect target.", True,
        kernel="`ndo_xdp_xmit`"),
    Key("redirect_fallback", "choice",
        "What a redirect to a device without `xdp_xmit` does: `drop` = today's kernel (`-EOPNOTSUPP`, "
        "counted `redirect_err`); `skb` = copy into an skb and transmit normally.", "drop",
        choices=("drop", "skb"), kernel="`xdp_do_redirect` error path"),
    Key("tx_completion_us", "int",
        "Delay between transmit and TX completion (when pages are returned). Completions still due when the "
        "device goes down are delivered when due: the pool's shutdown waits for them (\"stalled pool "
        "shutdown\").", 0, 0, MAX_TX_COMPLETION_US, kernel="TX completion IRQ"),
))

XDP = Section("xdp", "`hosts.<host>.devices.<dev>.xdp`", (
    Key("program", "str",
        "Python callable implementing the program. Imported and loaded during validation (its maps created "
        "in a scratch place, populated from `params`, its setup hook run for the device): what would fail "
        "at run time is reported with the line of the key at fault. Bundled programs: "
        "[below](#bundled-xdp-programs).", REQUIRED, type_doc="string `module:function`"),
    Key("params", "mapping",
        "Parameters passed to the program (scalars, lists, mappings). A program that declares its params "
        "(`xdp_program(params=...)`, every bundled one) gets them checked: unknown, missing and mistyped "
        "params are refused, a device param must name a device of the host. Params named after one of the "
        "program's maps populate it (`tx_port: {0: eth1}`). A program that declares none takes any params.",
        None, type_doc="mapping", default_doc="`{}` (null ok)"),
    Key("vectorised", "bool",
        "Let CPUs run the program's vectorised form (`fn.batch`, one call per NAPI poll over arrays, see "
        "`emu.xdp.XdpBatch`) when it has one; every bundled program but the `buggy_*` ones does, and it does "
        "exactly what the per-packet body does. `false` calls the per-packet body once per packet, like the "
        "kernel's `bpf_prog_run_xdp` (slower; for comparing, or for debugging a program's per-packet body). "
        "Programs without a vectorised form always run per packet.", True),
), kernel_column=False)

LINK = Section("link", "`links[]`", (
    Key("endpoints", "list",
        "Each endpoint is `host:device` or the name of a traffic port. Every endpoint must exist and may "
        "appear in at most one link; at least one end must be a host device.", REQUIRED,
        type_doc="list of exactly 2 distinct strings"),
    Key("delay", "duration",
        "Time a frame spends on the wire after it has been serialised. See [Link impairments](#link-impairments).",
        0, type_doc="duration: a number and `us`/`usec`, `ms`/`msec` or `s`/`sec` (`5ms`, `200us`, `1.5ms`, "
        "`0s`), whole µs, at most `10s`", default_doc="no delay"),
    Key("jitter", "duration",
        "Each message's delay varies uniformly in `delay` ± `jitter` (clamped at 0; `jitter` may exceed "
        "`delay`).", 0, type_doc="duration, as `delay`", default_doc="no jitter"),
    Key("loss", "percent", "Probability that a frame is lost on the wire, independently per frame.", 0.0,
        type_doc="percentage `0%`..`100%` (`0.1%`, `5%`); the `%` is required", default_doc="`0%`"),
    Key("rate", "rate",
        "Serialisation rate. `bps`/`kbps`/`mbps`/... are refused: tc reads them as *bytes* per second.", 0,
        type_doc="bit rate: a number and `bit`, `kbit`, `mbit`, `gbit` or `tbit` (×1000 steps, like tc: "
        "`100mbit`, `1gbit`, `64000bit`), > 0, at most `10tbit`", default_doc="unlimited"),
), kernel_column=False)

TRAFFIC = Section("traffic", "`traffic.<port>`", (
    Key("generate", "mapping", "What the port sends (below); absent: the port only receives.", None,
        type_doc="mapping", default_doc="absent (a sink)"),
), kernel_column=False)

GENERATE = Section("generate", "`traffic.<port>.generate`", (
    Key("count", "int", "Packets to send; `0` = until stopped. At most the sequence numbers a sink tracks "
        "(`emu.net.packets.SeqTracker.MAX_TRACKED`).", 0, 0, MAX_COUNT),
    Key("rate", "int", "Packets per second; `0` = as fast as possible.", 0, 0, MAX_RATE_PPS),
    Key("pkt_size", "int",
        f"Frame size in bytes (without FCS); must fit a page after `XDP_PACKET_HEADROOM` "
        f"({XDP_PACKET_HEADROOM}).", 64, MIN_PKT_SIZE, min(MAX_PKT_SIZE, MAX_PAGE_SIZE - XDP_PACKET_HEADROOM),
        hi_ref=f"`page_size` − {XDP_PACKET_HEADROOM} of the linked host and hosts cabled to it"),
    Key("flows", "int", "Distinct flows (spread over RX queues).", 16, 1, MAX_FLOWS),
    Key("burst", "int", "Packets sent back to back.", 64, 1, MAX_BURST),
    Key("src_mac", "mac", "Source MAC of generated frames.", None, type_doc="MAC string",
        default_doc="`02:00:00:ff:<n hi>:<n lo>`, *n* = 1 + the port's position in `traffic`"),
    Key("dst_mac", "mac", "Destination MAC of generated frames.", None, type_doc="MAC string",
        default_doc="MAC of the device the port is linked to"),
), kernel_column=False, key_prefix="generate.")

SECTIONS: dict[str, Section] = {s.name: s for s in (TOP, HOST, POOL, DEVICE, XDP, LINK, TRAFFIC, GENERATE)}


CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint("min_pages",
               "`pages` ≥ `min_pages` = Σ over devices of `rx_queues` × `rx_ring_size` + `cpus` × "
               "`pool.cache_size`: every RX ring full while every CPU's alloc cache is full "
               "(`emu.topology.schema.min_pages`). Fewer pages strand a queue that can never be refilled."),
    Constraint("refill", "`pool.refill` ≤ `pool.cache_size` (the pool moves `refill` pages into an empty cache)."),
    Constraint("stack_cpu", "`stack_cpu` and every `rx_cpus` entry name a CPU of the host (0..`cpus`-1); "
               "`rx_cpus` has one entry per RX queue, `cpu_affinity` one per CPU."),
    Constraint("ifindex", "`ifindex` is unique within a host; a device whose ifindex is above 65535 (or on the "
               "256th host or later) needs an explicit `mac`."),
    Constraint("pkt_size", f"`generate.pkt_size` ≤ `page_size` − {XDP_PACKET_HEADROOM} of the linked host and "
               "of every host cabled to it, directly or through other hosts (its frames may be forwarded "
               "there); a port with `generate` must be linked to a host device."),
    Constraint("links", "Link endpoints exist, each is used by at most one link, and a link has a host "
               "device at one end at least."),
    Constraint("params", "A program's params match what it declares (names, types, required ones); a device "
               "param names a device of the same host."),
    Constraint("maps", "A param named after a program map populates it: keys are integers below the map's "
               "`max_entries`, devmap values are device names of the host or ifindexes 1..2^32-1."),
    Constraint("rings", "Ring sizes against batch sizes (`napi_budget`, `redirect_bulk`, `tx_bulk`, a link "
               "message of up to 256 frames): any combination runs. A device posts into an RX ring what "
               "fits and counts the rest as `rx_dropped`; a CPU refills small rings as they drain."),
    Constraint("aliases", f"YAML aliases may add at most {MAX_ALIAS_EXPANSION:,} nodes to the document when "
               "expanded; past that the file is refused, naming the alias that expands the most. "
               "Recursive aliases and merge keys (`<<`) are refused."),
)


def min_pages(host: HostConfig) -> int:
    """The fewest pages `host` runs with: all its RX rings full while every CPU's alloc cache is full."""
    rings = sum(dev.rx_queues * dev.rx_ring_size for dev in host.devices.values())
    return rings + host.cpus * host.pool.cache_size


def int_keys() -> Iterable[tuple[Section, Key]]:
    """Every int key with its static bounds (what a generated test pushes just past)."""
    for section in SECTIONS.values():
        for key in section.keys:
            if key.kind in ("int", "int_list") and key.lo is not None and key.hi is not None:
                yield section, key


# -- the README's tables -----------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def section_table(section: Section) -> str:
    head = ["Key", "Type", "Default", "Meaning"] + (["Kernel counterpart"] if section.kernel_column else [])
    rows = [f"| {' | '.join(head)} |", "|" + "|".join("-----" for _ in head) + "|"]
    for k in section.keys:
        cells = [f"`{section.key_prefix}{k.name}`", k.type_text(), k.default_text(), k.meaning]
        if section.kernel_column:
            cells.append(k.kernel)
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows)


def constraints_list() -> str:
    return "\n".join(f"- **{c.name}**: {c.text}" for c in CONSTRAINTS)


def programs_table() -> str:
    """The bundled programs with the params and maps they declare (from `emu.programs`)."""
    import emu.programs as programs
    from emu.xdp.context import Program

    rows = ["| Program | Params | Maps | What it does |", "|-----|-----|-----|-----|"]
    for name in programs.__all__:
        prog = Program.from_callable(getattr(programs, name), f"emu.programs:{name}")
        if prog.params is None:
            params = "any (declares none)"
        elif not prog.params:
            params = "none"
        else:
            params = "<br>".join(f"`{p}`: {spec.describe()}" for p, spec in prog.params.items())
        maps = ", ".join(f"`{m}` ({s.type}, {s.max_entries})" for m, s in prog.maps.items()) or "none"
        doc = " ".join((prog.fn.__doc__ or "").split())
        rows.append(f"| `{name}` | {_cell(params)} | {_cell(maps)} | {_cell(doc)} |")
    return "\n".join(rows)


def markdown() -> dict[str, str]:
    """Every generated block of the README, by marker name."""
    blocks = {f"schema:{name}": section_table(s) for name, s in SECTIONS.items()}
    blocks["schema:constraints"] = constraints_list()
    blocks["schema:programs"] = programs_table()
    return blocks


_BLOCK_RE = re.compile(r"(<!-- (?P<name>schema:[a-z_]+) -->\n)(?P<body>.*?)(<!-- /(?P=name) -->)", re.S)


def render_readme(text: str, blocks: Mapping[str, str]) -> str:
    """`text` with every marked block replaced by its generated content; KeyError for a marker we do not
    generate, ValueError when a generated block has no marker."""
    seen: set[str] = set()

    def replace(m: re.Match[str]) -> str:
        name = m["name"]
        seen.add(name)
        return f"{m.group(1)}{blocks[name]}\n{m.group(4)}"

    out = _BLOCK_RE.sub(replace, text)
    missing = sorted(set(blocks) - seen)
    if missing:
        raise ValueError(f"no markers for {', '.join(missing)} in the README")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emu.topology.schema", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="rewrite the README's generated tables")
    parser.add_argument("--check", action="store_true", help="exit 1 when the README's tables are stale")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    new = render_readme(text, markdown())
    if args.check:
        if new != text:
            print(f"{args.readme}: the schema tables are stale; run python -m emu.topology.schema --markdown",
                  file=sys.stderr)
            return 1
        return 0
    if args.markdown:
        args.readme.write_text(new)
        return 0
    sys.stdout.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
