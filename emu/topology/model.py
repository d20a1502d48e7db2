"""Topology files: what an emulated network looks like, validated before anything starts.

A topology file is a small YAML document in the spirit of containerlab: it names the emulated *hosts*
(each a group of processes sharing one page memory and one set of per-CPU page pools), the *devices*
of every host with their queues, rings and XDP program, the *traffic ports* that generate or sink
packets, and the *links* that wire device and traffic-port endpoints together.  ``topology/README.md``
documents every key and its kernel counterpart.

Everything is checked once, before anything starts, with a ``file:line: message`` diagnostic, because the
alternative is an emulator that starts a dozen processes, allocates shared memory and then dies on a typo
in a worker that has no idea which line of which file was wrong.  The reading and checking is
`emu.topology.file` (`load_topology`, `validate_topology_text`), which builds these dataclasses: this module
does not import it, so that processes which only receive a topology never load PyYAML.

The result is a tree of frozen dataclasses (`Topology` at the root).  `Topology.to_dict` turns it into
plain JSON/msgpack-able data (``emu validate --json``, and the configuration a host process receives);
`topology_from_dict` rebuilds the dataclasses from that.

XDP programs are named ``"module:function"`` and are imported while validating (`resolve_program`), so a
topology that validates can be run.  This executes the named modules' code: topology files are as
trusted as the Python code they name.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from emu.errors import FileLineError
from emu.net.protocol import XDP_PACKET_HEADROOM

__all__ = [
    "DEV_MAP_BULK_SIZE",
    "ETH_DATA_LEN",
    "ETH_HLEN",
    "ETH_MIN_MTU",
    "MAX_LINK_DELAY_US",
    "MAX_LINK_RATE_BPS",
    "MAX_MTU",
    "MAX_SKB_FRAGS",
    "NAPI_POLL_WEIGHT",
    "PP_ALLOC_CACHE_REFILL",
    "PP_ALLOC_CACHE_SIZE",
    "PP_DEFAULT_RING_SIZE",
    "SKB_SHARED_INFO",
    "VLAN_HLEN",
    "XDP_BULK_QUEUE_SIZE",
    "CaptureConfig",
    "DeviceConfig",
    "Endpoint",
    "ExpectConfig",
    "GeneratorConfig",
    "HostConfig",
    "LinkConfig",
    "LinkImpairment",
    "PoolConfig",
    "ReplayConfig",
    "Topology",
    "TopologyError",
    "TrafficPort",
    "XdpConfig",
    "frame_room",
    "host_from_dict",
    "max_frame",
    "max_linear_mtu",
    "max_sg_mtu",
    "resolve_program",
    "sg_buffers",
    "topology_from_dict",
]

# Kernel constants that the defaults mirror (include/net/page_pool/types.h, include/linux/netdevice.h,
# kernel/bpf/devmap.c, include/net/xdp.h); XDP_PACKET_HEADROOM, which processes agree on, is
# `emu.net.protocol`'s.
PP_ALLOC_CACHE_SIZE = 128
PP_ALLOC_CACHE_REFILL = 64
PP_DEFAULT_RING_SIZE = 1024  # page_pool_init(): a pool_size of 0 gets a 1024-entry ptr_ring
NAPI_POLL_WEIGHT = 64
DEV_MAP_BULK_SIZE = 16
XDP_BULK_QUEUE_SIZE = 16
# A device's MTU (include/uapi/linux/if_ether.h): the default, the least any device takes, and the largest
# the emulator's devices take (a 9000-byte jumbo MTU, what NICs commonly advertise and data centres use).
ETH_DATA_LEN = 1500
ETH_MIN_MTU = 68
MAX_MTU = 9000
# The link-layer bytes a frame carries beyond its MTU: the Ethernet header and one VLAN tag (no FCS: the
# emulator's frames have none), as a NIC's max frame size and ``is_skb_forwardable`` allow.
ETH_HLEN = 14
VLAN_HLEN = 4
# SKB_DATA_ALIGN(sizeof(struct skb_shared_info)) on x86-64: the tailroom a driver reserves at the end of
# every RX buffer, so that an skb (or an xdp_buff's fragment list) can be built around the frame in place.
SKB_SHARED_INFO = 320

# Link impairment limits (emulator choices; tc-netem itself allows more).
MAX_LINK_DELAY_US = 10_000_000  # 10 s for `delay` and `jitter`
MAX_LINK_RATE_BPS = 10 * 10**12  # 10 tbit


class TopologyError(FileLineError):
    """A topology file is invalid; ``str()`` is ``"file:line: message"`` (line is 1-based).

    A `BadInputError` (exit status 2: nothing was started), and still a ``ValueError`` for the callers
    that catch that."""


# --------------------------------------------------------------------------------------------------
# The configuration tree


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Per-CPU page-pool parameters of one host (struct page_pool_params + the alloc cache)."""

    cache_size: int = PP_ALLOC_CACHE_SIZE
    refill: int = PP_ALLOC_CACHE_REFILL
    pool_size: int = PP_DEFAULT_RING_SIZE
    recycle_limit: int = 0
    policy: str = "fixed"  # `emu.mem.pagepool.POOL_POLICIES`
    frag_size: int = 0  # RX buffers are fragments of this many bytes (page_pool_alloc_frag); 0 = whole pages


@dataclass(frozen=True, slots=True)
class XdpConfig:
    """The XDP program attached to a device: ``"module:function"``, its free-form parameters, and whether
    CPUs may run its vectorised form (`emu.xdp.XdpBatch`) when it has one."""

    program: str
    params: dict[str, Any] = field(default_factory=dict)
    vectorised: bool = True
    # An eBPF object instead of a Python program (issue 17): its absolute path, `program` the function
    # name ("" when the object has one XDP program), map entries and global variables to set before load.
    object: str | None = None
    maps: dict[str, Any] = field(default_factory=dict)
    globals: dict[str, Any] = field(default_factory=dict)


# The kernel's XDP feature flags a device advertises (include/uapi/linux/netdev.h, netlink's xdp-features),
# in the order netlink lists them; ``xsk-zerocopy`` is left out (no AF_XDP here).
XDP_FEATURES = ("basic", "redirect", "ndo-xmit", "ndo-xmit-sg", "rx-sg")
DEVICE_PROFILES = ("nic", "veth")


def frame_room(buf_size: int) -> int:
    """The bytes of a received frame one RX buffer of `buf_size` bytes (a page, or a ``pool.frag_size``
    fragment of one) holds: less ``XDP_PACKET_HEADROOM`` in front and the ``skb_shared_info`` tailroom
    behind (``SKB_WITH_OVERHEAD(PAGE_SIZE - XDP_PACKET_HEADROOM)``)."""
    return buf_size - XDP_PACKET_HEADROOM - SKB_SHARED_INFO


def max_frame(mtu: int) -> int:
    """The longest frame (without FCS) a device of MTU `mtu` sends or takes: the MTU plus the Ethernet
    header and one VLAN tag."""
    return mtu + ETH_HLEN + VLAN_HLEN


def max_linear_mtu(buf_size: int) -> int:
    """The largest MTU whose frames fit one RX buffer of `buf_size` bytes (`frame_room`), as mlx5's
    ``mlx5e_xdp_max_mtu`` and veth's ``max_mtu`` compute it: beyond it a frame needs XDP multi-buffer."""
    return frame_room(buf_size) - ETH_HLEN - VLAN_HLEN


MAX_SKB_FRAGS = 17  # a multi-buffer frame's fragment buffers at most (its head buffer is one more)


def sg_buffers(frame_len: int, buf_size: int) -> int:
    """The RX buffers of `buf_size` bytes a frame of `frame_len` bytes takes on a device with ``rx-sg``:
    ``frame_room`` bytes in each (the head and every fragment alike)."""
    room = frame_room(buf_size)
    return max(1, -(-frame_len // room))


def max_sg_mtu(buf_size: int) -> int:
    """The largest MTU an ``rx-sg`` device takes: its frames fit 1 + MAX_SKB_FRAGS buffers (at most the
    emulator's `MAX_MTU`)."""
    return min(MAX_MTU, (1 + MAX_SKB_FRAGS) * frame_room(buf_size) - ETH_HLEN - VLAN_HLEN)


def xdp_features_of(profile: str, xdp_xmit: bool, peer_has_xdp: bool = False) -> tuple[str, ...]:
    """The flags a device of `profile` advertises: a NIC's ``basic``, ``redirect`` and, with `xdp_xmit`,
    ``ndo-xmit``; a veth's ``basic``, ``redirect``, ``rx-sg``, and ``ndo-xmit`` and ``ndo-xmit-sg`` only
    while the peer of the pair has an XDP program (``veth_set_xdp_features``)."""
    if profile == "veth":
        flags = {"basic", "redirect", "rx-sg"} | ({"ndo-xmit", "ndo-xmit-sg"} if peer_has_xdp else set())
    else:
        flags = {"basic", "redirect"} | ({"ndo-xmit"} if xdp_xmit else set())
    return tuple(f for f in XDP_FEATURES if f in flags)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """One network device of a host, with every default already resolved."""

    name: str
    ifindex: int
    mac: str
    rx_queues: int
    tx_queues: int
    rx_ring_size: int
    tx_ring_size: int
    rx_cpus: tuple[int, ...]
    xdp: XdpConfig | None
    xdp_xmit: bool
    redirect_fallback: Literal["drop", "skb"]
    tx_completion_us: int
    line: int = 0
    # The kernel's XDP feature flags (netlink ``dev-get xdp-features``), resolved: `XDP_FEATURES` names,
    # in that order; ``ndo-xmit`` in them is `xdp_xmit`.  `profile` is the driver the device behaves like
    # (``veth``: ``ndo-xmit`` only while the peer of the pair has an XDP program); `peer` names the far end
    # of its cable (a device ``host:dev`` or a traffic port), for the messages that explain a veth's rule.
    xdp_features: tuple[str, ...] = ("basic", "redirect", "ndo-xmit")
    profile: Literal["nic", "veth"] = "nic"
    peer: str = ""
    # CPU handling each TX queue's completions (its TX IRQ affinity); () = queue q -> CPU q % cpus.
    tx_cpus: tuple[int, ...] = ()
    # ``dev->mtu``: the largest L3 payload the device sends and receives; a frame is at most
    # `max_frame` (mtu) bytes on its wire.
    mtu: int = ETH_DATA_LEN

    def tx_cpu(self, txq: int, cpus: int) -> int:
        """The CPU that handles TX queue `txq`'s completions on a host of `cpus` CPUs."""
        return self.tx_cpus[txq] if self.tx_cpus else txq % cpus


@dataclass(frozen=True, slots=True)
class HostConfig:
    """One emulated host: its CPUs, page memory, page-pool parameters and devices."""

    name: str
    index: int
    cpus: int
    cpu_affinity: tuple[int, ...] | None
    pages: int
    page_size: int
    napi_budget: int
    redirect_bulk: int
    tx_bulk: int
    stack_cpu: int | None
    pool: PoolConfig
    devices: dict[str, DeviceConfig]
    line: int = 0
    # `placement`: (swarm node attribute, value) pairs for `emu deploy --engine swarm`
    placement: tuple[tuple[str, str], ...] = ()
    # When a CPU recycles its own pages that TX completions bring back: "deferred" (its NAPI polls reap
    # them before each refill) or "immediate" (the whole batch as it arrives).
    txc_release: str = "deferred"

    @property
    def buf_size(self) -> int:
        """Bytes of one RX buffer: a fragment of `pool.frag_size`, else a whole page."""
        return self.pool.frag_size or self.page_size

    @property
    def multibuf(self) -> bool:
        """Some device of the host receives XDP multi-buffer frames: it has ``rx-sg`` and an MTU beyond one
        buffer.  The page memory is laid out for it (``H_MULTIBUF``); other hosts pay nothing for it."""
        room = frame_room(self.buf_size)
        return any("rx-sg" in d.xdp_features and max_frame(d.mtu) > room for d in self.devices.values())

    def device_by_ifindex(self, ifindex: int) -> DeviceConfig | None:
        """The device with this ifindex, or None (what a devmap lookup of a stale ifindex finds)."""
        for dev in self.devices.values():
            if dev.ifindex == ifindex:
                return dev
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for this host alone (what a host process is sent); see `host_from_dict`."""
        return {
            "name": self.name,
            "index": self.index,
            "cpus": self.cpus,
            "cpu_affinity": None if self.cpu_affinity is None else list(self.cpu_affinity),
            "pages": self.pages,
            "page_size": self.page_size,
            "napi_budget": self.napi_budget,
            "redirect_bulk": self.redirect_bulk,
            "tx_bulk": self.tx_bulk,
            "stack_cpu": self.stack_cpu,
            "placement": [list(p) for p in self.placement],
            "txc_release": self.txc_release,
            "pool": {
                "cache_size": self.pool.cache_size,
                "refill": self.pool.refill,
                "pool_size": self.pool.pool_size,
                "recycle_limit": self.pool.recycle_limit,
                "policy": self.pool.policy,
                "frag_size": self.pool.frag_size,
            },
            "devices": {name: _device_to_dict(dev) for name, dev in self.devices.items()},
            "line": self.line,
        }


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of a link: a host's device (``h1:eth0``) or a traffic port (``gen0``)."""

    kind: Literal["device", "traffic"]
    host: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.host}:{self.name}" if self.kind == "device" else self.name

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``"h1:eth0"`` -> a device endpoint, ``"gen0"`` -> a traffic endpoint (no existence check)."""
        host, sep, name = text.partition(":")
        if sep:
            return cls("device", host, name)
        return cls("traffic", None, text)


@dataclass(frozen=True, slots=True)
class LinkImpairment:
    """What a link does to the frames on it, like tc-netem on both ends of a veth pair.

    Each end applies it to what *it* sends (`emu.net.netem.LinkShaper`).  The default impairs nothing.
    """

    delay_us: int = 0
    jitter_us: int = 0
    loss: float = 0.0  # probability 0..1 that a frame is lost (the file says it in percent)
    rate_bps: int = 0  # bits per second; 0 = unlimited

    @property
    def active(self) -> bool:
        """Whether anything is impaired at all (False: senders keep their fast path)."""
        return bool(self.delay_us or self.jitter_us or self.loss or self.rate_bps)

    def to_dict(self) -> dict[str, Any]:
        return {"delay_us": self.delay_us, "jitter_us": self.jitter_us, "loss": self.loss, "rate_bps": self.rate_bps}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> LinkImpairment:
        """The inverse of `to_dict`; None (a dict from before impairments existed) = no impairment."""
        if d is None:
            return cls()
        return cls(int(d["delay_us"]), int(d["jitter_us"]), float(d["loss"]), int(d["rate_bps"]))


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """A point-to-point wire between two endpoints, and its impairments (none by default)."""

    a: Endpoint
    b: Endpoint
    line: int = 0
    impair: LinkImpairment = LinkImpairment()


@dataclass(frozen=True, slots=True)
class GeneratorConfig:
    """What a traffic port sends; both MACs are resolved (never None)."""

    count: int
    rate: int
    pkt_size: int
    flows: int
    burst: int
    src_mac: str
    dst_mac: str
    # The port's number in its topology (0-based, in file order): frames carry it, so that a sink hearing
    # several generators counts each one's sequence numbers apart (emu.net.packets).
    port_id: int = 0
    # `generate.schedule`: phases of (rate in pps, length in us), run once in order; empty = constant
    # `rate`.  A rate of 0 in a phase is idle (not "unlimited" as `rate: 0` is).
    schedule: tuple[tuple[int, int], ...] = ()
    # `pkt_size: imix` or a list of [size, weight]: the frame sizes and their weights (`pkt_size` is then
    # the largest, which is what must fit the pages); empty = every frame `pkt_size` bytes.
    imix: tuple[tuple[int, int], ...] = ()

    def ends(self, count: int | None = None) -> bool:
        """Whether this generator stops by itself: it has a count (`count` overrides its own) or a
        schedule, which ends after its last phase; a count of 0 without a schedule runs until stopped."""
        return bool(count if count is not None else self.count) or bool(self.schedule)


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """``traffic.<port>.replay``: a capture file the port sends instead of generating (`emu.net.replay`).

    `pcap` is an absolute path (the file gives it relative to itself); `max_frame` is the longest frame
    the devices on the way take (the smallest MTU of the hosts it may reach, plus its link-layer header)."""

    pcap: str
    loop: int = 1  # passes over the file; 0 = until stopped
    timing: str = "original"  # "original" (the file's timestamps) or "rate"
    rate: int = 0  # pps with timing "rate"; 0 = as fast as possible
    burst: int = 64
    dst_mac: str | None = None
    src_mac: str | None = None
    max_frame: int = 0
    port_id: int = 0

    def ends(self, count: int | None = None) -> bool:
        """Whether the replay stops by itself: a loop count, or `count` frames (``--count``)."""
        return bool(self.loop) or bool(count)


@dataclass(frozen=True, slots=True)
class ExpectConfig:
    """``traffic.<port>.expect``: the golden capture a sink's frames are compared with at the end."""

    pcap: str  # absolute path
    ordered: bool = False


@dataclass(frozen=True, slots=True)
class TrafficPort:
    """A packet source and/or sink outside the emulated hosts; without `generate` it only receives."""

    name: str
    generate: GeneratorConfig | None
    line: int = 0
    replay: ReplayConfig | None = None
    expect: ExpectConfig | None = None


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """``capture`` (or ``emu run --capture``): devices whose frames are written to pcapng files, as xdpdump
    writes them (`emu.run.capture`): ``(host, device, exit)``, where `exit` adds the frame after the XDP
    program, with its verdict, to the frames at XDP entry and the frames transmitted."""

    devices: tuple[tuple[str, str, bool], ...]
    dir: str  # absolute; DIR/<host>-<device>.pcapng
    snaplen: int = 262144  # xdpdump's default

    def to_dict(self) -> dict[str, Any]:
        return {"devices": [list(d) for d in self.devices], "dir": self.dir, "snaplen": self.snaplen}

    @staticmethod
    def parse_device(text: str, hosts: Mapping[str, HostConfig]) -> tuple[str, str, bool]:
        """``"h1:eth0"`` or ``"h1:eth0@exit"`` -> (host, device, exit); ValueError naming what is wrong."""
        spec, at, point = text.partition("@")
        if at and point != "exit":
            raise ValueError(f"capture '{text}': the only capture point to add is '@exit' (entry and "
                             "transmitted frames are always captured)")
        host, colon, dev = spec.partition(":")
        if not colon:
            raise ValueError(f"capture '{text}': expected host:device (and '@exit' for XDP exit)")
        if host not in hosts:
            raise ValueError(f"capture '{text}': no host '{host}'")
        if dev not in hosts[host].devices:
            raise ValueError(f"capture '{text}': host '{host}' has no device '{dev}'")
        return host, dev, bool(at)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CaptureConfig:
        return cls(tuple((str(h), str(n), bool(x)) for h, n, x in d["devices"]), d["dir"], int(d["snaplen"]))


@dataclass(frozen=True, slots=True)
class Topology:
    """A validated topology file."""

    name: str
    path: str
    hosts: dict[str, HostConfig]
    links: tuple[LinkConfig, ...]
    traffic: dict[str, TrafficPort]
    capture: CaptureConfig | None = None

    def peer_of(self, endpoint: Endpoint) -> Endpoint | None:
        """The endpoint at the other end of `endpoint`'s link, or None when it is not linked."""
        for link in self.links:
            if link.a == endpoint:
                return link.b
            if link.b == endpoint:
                return link.a
        return None

    def link_of(self, endpoint: Endpoint | str) -> LinkConfig | None:
        """The link `endpoint` (an `Endpoint` or its text, ``"h1:eth0"``) is on, or None when it is not linked."""
        if isinstance(endpoint, str):
            endpoint = Endpoint.parse(endpoint)
        for link in self.links:
            if link.a == endpoint or link.b == endpoint:
                return link
        return None

    def device_of(self, endpoint: Endpoint) -> DeviceConfig:
        """The device a device endpoint names; KeyError for traffic endpoints and unknown names."""
        if endpoint.kind != "device" or endpoint.host is None:
            raise KeyError(str(endpoint))
        return self.hosts[endpoint.host].devices[endpoint.name]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/msgpack-able data; `topology_from_dict` is the inverse."""
        return {
            "name": self.name,
            "path": self.path,
            "hosts": {name: host.to_dict() for name, host in self.hosts.items()},
            "links": [
                {"a": str(link.a), "b": str(link.b), "line": link.line, "impair": link.impair.to_dict()}
                for link in self.links
            ],
            "traffic": {
                name: {
                    "name": port.name,
                    "generate": None
                    if port.generate is None
                    else {
                        "count": port.generate.count,
                        "rate": port.generate.rate,
                        "pkt_size": port.generate.pkt_size,
                        "flows": port.generate.flows,
                        "burst": port.generate.burst,
                        "src_mac": port.generate.src_mac,
                        "dst_mac": port.generate.dst_mac,
                        "port_id": port.generate.port_id,
                        "schedule": [list(phase) for phase in port.generate.schedule],
                        "imix": [list(m) for m in port.generate.imix],
                    },
                    "line": port.line,
                    "replay": None if port.replay is None else dataclasses.asdict(port.replay),
                    "expect": None if port.expect is None else dataclasses.asdict(port.expect),
                }
                for name, port in self.traffic.items()
            },
            "capture": None if self.capture is None else self.capture.to_dict(),
        }


def _device_to_dict(dev: DeviceConfig) -> dict[str, Any]:
    return {
        "name": dev.name,
        "ifindex": dev.ifindex,
        "mac": dev.mac,
        "rx_queues": dev.rx_queues,
        "tx_queues": dev.tx_queues,
        "rx_ring_size": dev.rx_ring_size,
        "tx_ring_size": dev.tx_ring_size,
        "rx_cpus": list(dev.rx_cpus),
        # Deep copy: callers may mutate the dict (e.g. before sending it) without reaching into the
        # frozen configuration through a shared params dict.
        "xdp": None
        if dev.xdp is None
        else {"program": dev.xdp.program, "params": copy.deepcopy(dev.xdp.params),
              "vectorised": dev.xdp.vectorised, "object": dev.xdp.object, "maps": copy.deepcopy(dev.xdp.maps),
              "globals": copy.deepcopy(dev.xdp.globals)},
        "xdp_xmit": dev.xdp_xmit,
        "redirect_fallback": dev.redirect_fallback,
        "tx_completion_us": dev.tx_completion_us,
        "line": dev.line,
        "xdp_features": list(dev.xdp_features),
        "profile": dev.profile,
        "peer": dev.peer,
        "tx_cpus": list(dev.tx_cpus),
        "mtu": dev.mtu,
    }


def host_from_dict(d: Mapping[str, Any]) -> HostConfig:
    """Rebuild a `HostConfig` from `HostConfig.to_dict` output (trusted input: not re-validated)."""
    devices = {}
    for name, dd in d["devices"].items():
        xdp = dd["xdp"]
        devices[name] = DeviceConfig(
            name=dd["name"],
            ifindex=dd["ifindex"],
            mac=dd["mac"],
            rx_queues=dd["rx_queues"],
            tx_queues=dd["tx_queues"],
            rx_ring_size=dd["rx_ring_size"],
            tx_ring_size=dd["tx_ring_size"],
            rx_cpus=tuple(dd["rx_cpus"]),
            xdp=None
            if xdp is None
            else XdpConfig(xdp["program"], copy.deepcopy(dict(xdp["params"])), xdp.get("vectorised", True),
                           xdp.get("object"), copy.deepcopy(dict(xdp.get("maps") or {})),
                           copy.deepcopy(dict(xdp.get("globals") or {}))),
            xdp_xmit=dd["xdp_xmit"],
            redirect_fallback=dd["redirect_fallback"],
            tx_completion_us=dd["tx_completion_us"],
            line=dd["line"],
            xdp_features=tuple(dd["xdp_features"]),
            profile=dd["profile"],
            peer=dd["peer"],
            tx_cpus=tuple(dd["tx_cpus"]),
            mtu=dd["mtu"],
        )
    pool = d["pool"]
    return HostConfig(
        name=d["name"],
        index=d["index"],
        cpus=d["cpus"],
        cpu_affinity=None if d["cpu_affinity"] is None else tuple(d["cpu_affinity"]),
        pages=d["pages"],
        page_size=d["page_size"],
        napi_budget=d["napi_budget"],
        redirect_bulk=d["redirect_bulk"],
        tx_bulk=d["tx_bulk"],
        stack_cpu=d["stack_cpu"],
        placement=tuple((str(k), str(v)) for k, v in d["placement"]),
        txc_release=d["txc_release"],
        pool=PoolConfig(pool["cache_size"], pool["refill"], pool["pool_size"], pool["recycle_limit"],
                        pool["policy"], pool["frag_size"]),
        devices=devices,
        line=d["line"],
    )


def topology_from_dict(d: Mapping[str, Any]) -> Topology:
    """Rebuild a `Topology` from `Topology.to_dict` output (trusted input: not re-validated)."""
    traffic = {}
    for name, td in d["traffic"].items():
        g = td["generate"]
        gen = None
        if g is not None:
            gen = GeneratorConfig(
                g["count"], g["rate"], g["pkt_size"], g["flows"], g["burst"], g["src_mac"], g["dst_mac"],
                g.get("port_id", 0), tuple((int(r), int(us)) for r, us in g.get("schedule", ())),
                tuple((int(sz), int(w)) for sz, w in g.get("imix", ())),
            )
        rp, ex = td.get("replay"), td.get("expect")
        traffic[name] = TrafficPort(td["name"], gen, td["line"], None if rp is None else ReplayConfig(**rp),
                                    None if ex is None else ExpectConfig(**ex))
    return Topology(
        name=d["name"],
        path=d["path"],
        hosts={name: host_from_dict(hd) for name, hd in d["hosts"].items()},
        links=tuple(
            LinkConfig(
                Endpoint.parse(ld["a"]),
                Endpoint.parse(ld["b"]),
                ld["line"],
                LinkImpairment.from_dict(ld.get("impair")),
            )
            for ld in d["links"]
        ),
        traffic=traffic,
        capture=None if d.get("capture") is None else CaptureConfig.from_dict(d["capture"]),
    )


# --------------------------------------------------------------------------------------------------
# XDP program resolution

_DOTTED_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


def resolve_program(spec: str) -> Callable[..., Any]:
    """Import ``"module:function"`` and return the callable; ValueError says precisely what failed."""
    what = f"xdp program '{spec}'"
    if not isinstance(spec, str):
        raise ValueError(f"xdp program {spec!r}: must be a string 'module:function'")
    module_name, sep, attr_path = spec.partition(":")
    if not sep:
        raise ValueError(f"{what}: expected 'module:function' (no ':' in it)")
    if not _DOTTED_RE.match(module_name):
        raise ValueError(f"{what}: '{module_name}' is not a valid module name")
    if not _DOTTED_RE.match(attr_path):
        raise ValueError(f"{what}: '{attr_path}' is not a valid function name")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Distinguish "the named module does not exist" from "it exists but imports something missing".
        if e.name is not None and (e.name == module_name or module_name.startswith(e.name + ".")):
            raise ValueError(
                f"{what}: cannot import module '{module_name}' (no module named '{e.name}'; a module of "
                f"your own must be importable by emu and its workers: put its directory on PYTHONPATH)"
            ) from e
        raise ValueError(f"{what}: importing module '{module_name}' raised ModuleNotFoundError: {e}") from e
    except (Exception, SystemExit) as e:
        # Anything a module does at import time is the program author's bug; SystemExit included so
        # a stray sys.exit() in a program module cannot end the validator silently.
        raise ValueError(f"{what}: importing module '{module_name}' raised {type(e).__name__}: {e}") from e
    owner = f"module '{module_name}'"
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ValueError(f"{what}: {owner} has no attribute '{part}'") from e
        except Exception as e:  # a module-level __getattr__ or a property may raise anything
            raise ValueError(f"{what}: getting '{part}' from {owner} raised {type(e).__name__}: {e}") from e
        owner = f"'{part}'"
    if not callable(obj):
        kind = type(obj).__name__
        raise ValueError(f"{what}: '{module_name}.{attr_path}' is not callable (it is a {kind})")
    return obj
