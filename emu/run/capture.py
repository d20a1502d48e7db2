"""A run's packet capture: the capture rings of its workers drained into one pcapng file per captured
device, as xdpdump writes them, or printed one line per frame as xdpdump prints them without ``-w``.

`CaptureSession` creates one capture ring (`emu.datapath.capture`) per producing process of this
machine's part of the run: every CPU worker that services an RX queue of a captured device (frames at XDP
entry, and at XDP exit with ``@exit``) and the captured device itself (frames it transmits).  A thread of
the coordinator drains the rings every `DRAIN_PERIOD` and writes ``DIR/<host>-<device>.pcapng``:

* one Interface Description Block per device, queue and capture point, named as xdpdump names its
  interfaces (``eth0:l2fwd()@fentry`` with ``:rxq0`` appended; ``eth0:l2fwd()@fexit:rxq0``;
  ``eth0:tx:txq0``), its description saying host, device, ifindex, queue and point;
* one Enhanced Packet Block per frame: ``epb_flags`` inbound (entry, exit) or outbound (tx),
  ``epb_queue``, ``epb_packetid`` (per device, counting the frames at entry as xdpdump counts them; an
  exit carries its entry's id when both are captured), ``epb_verdict`` (XDP exit only: type eBPF XDP,
  the action), ``epb_dropcount`` (frames the ring had no room for just before this one) and a comment
  with the CPU and, for XDP_REDIRECT, the target ifindex and device.

Records from different processes reach the writer out of time order; the writer holds them for
`MERGE_WINDOW` and writes them sorted, so each file's timestamps never go backwards (a record later than
the window, which only a badly starved process produces, is written with the last timestamp written).
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from struct import error as struct_error
from typing import IO, Any

from emu.datapath.capture import CAPTURE_RING_BYTES, ENTRY, EXIT, TX, Record, decode_record
from emu.errors import BadInputError
from emu.net.pcap import EPB_FLAG_INBOUND, EPB_FLAG_OUTBOUND, PcapngWriter
from emu.net.shmring import MsgRing
from emu.topology.model import Topology

__all__ = ["VERDICT_NAMES", "CaptureSession", "summary_line"]

DRAIN_PERIOD = 0.02
MERGE_WINDOW_NS = 200_000_000
VERDICT_NAMES = ("XDP_ABORTED", "XDP_DROP", "XDP_PASS", "XDP_TX", "XDP_REDIRECT")


@dataclass
class _DeviceFile:
    """One captured device's file and its interfaces: (point, queue) -> interface id."""

    host: str
    dev: str
    ifindex: int
    path: str
    f: IO[bytes] | None
    writer: PcapngWriter | None
    ifids: dict[tuple[int, int], int] = field(default_factory=dict)
    names: dict[tuple[int, int], str] = field(default_factory=dict)
    packets: int = 0
    entry_ids: int = 0  # packet ids given at XDP entry
    last_ts: int = 0
    pending_drops: int = 0
    exit: bool = False  # XDP exit captured too
    prog: str = ""  # the XDP program's function name
    ids: dict[tuple, int] = field(default_factory=dict)  # (producer, record, frame) at entry -> packet id


def _prog_name(program: str | None) -> str:
    return (program or "xdp_pass").rpartition(":")[2]


def summary_line(ts_ns: int, prog: str, point: int, verdict: int, target: int, queue: int, ifindex: int,
                 cpu: int, length: int, packet_id: int, frame: bytes, target_name: str = "") -> str:
    """One frame as xdpdump prints it without ``-w`` (``l2fwd()@entry``, ``l2fwd()@exit[XDP_REDIRECT]``;
    ``tx`` for a transmitted frame), then a tcpdump-style decode of its headers."""
    where = {ENTRY: f"{prog}()@entry", EXIT: f"{prog}()@exit[{_verdict(verdict)}]", TX: "tx"}[point]
    q = "tx queue" if point == TX else "rx queue"
    line = (f"{ts_ns // 1_000_000_000}.{ts_ns % 1_000_000_000:09d}: {where}: packet size {length} bytes on "
            f"if_index {ifindex}, {q} {queue}, cpu {cpu}, id {packet_id}")
    if point == EXIT and verdict == 4 and target >= 0:
        line += f", redirect to if_index {target}" + (f" ({target_name})" if target_name else "")
    return f"{line}: {decode(frame)}"


def _verdict(v: int) -> str:
    return VERDICT_NAMES[v] if 0 <= v < len(VERDICT_NAMES) else f"verdict {v}"


def decode(frame: bytes) -> str:
    """A tcpdump-like one-line decode (MACs, VLAN tags, then IPv4/IPv6/ARP and ports)."""
    import dpkt

    if len(frame) < 14:
        return f"runt of {len(frame)} bytes"
    out = f"{frame[6:12].hex(':')} > {frame[0:6].hex(':')}"
    try:
        eth = dpkt.ethernet.Ethernet(frame)
    except (dpkt.UnpackError, struct_error):
        return out + f", length {len(frame)}"
    tags = getattr(eth, "vlan_tags", None) or []
    for t in tags:
        out += f", vlan {t.id}"
    ip = eth.data
    if isinstance(ip, dpkt.ip.IP):
        src, dst = ".".join(map(str, ip.src)), ".".join(map(str, ip.dst))
        l4 = ip.data
        frag = ip.mf or ip.offset
        if frag:
            return out + f", IPv4 {src} > {dst}: frag id {ip.id} offset {ip.offset * 8}{' MF' if ip.mf else ''}"
        if isinstance(l4, (dpkt.udp.UDP, dpkt.tcp.TCP)):
            kind = "UDP" if isinstance(l4, dpkt.udp.UDP) else "TCP"
            return out + f", IPv4 {src}.{l4.sport} > {dst}.{l4.dport}: {kind}, length {len(frame)}"
        return out + f", IPv4 {src} > {dst}: proto {ip.p}, length {len(frame)}"
    if isinstance(ip, dpkt.ip6.IP6):
        import ipaddress

        return (out + f", IPv6 {ipaddress.IPv6Address(ip.src)} > {ipaddress.IPv6Address(ip.dst)}: next header "
                f"{ip.nxt}, length {len(frame)}")
    if isinstance(ip, dpkt.arp.ARP):
        return out + f", ARP, length {len(frame)}"
    return out + f", ethertype 0x{eth.type:04x}, length {len(frame)}"


class CaptureSession:
    """The capture of one machine's part of a run (the hosts of `topo`), see the module docstring.

    `printer`: instead of files, print each frame's `summary_line` (``emu capture``)."""

    def __init__(self, topo: Topology, prefix: str, printer: Callable[[str], None] | None = None) -> None:
        assert topo.capture is not None
        self.topo = topo
        self.cfg = topo.capture
        self.prefix = prefix
        self.printer = printer
        self.rings: dict[str, MsgRing] = {}  # producer key ("h1/cpu0", "h1/eth0") -> ring
        self.producers: dict[str, dict[str, dict[str, Any]]] = {}  # producer key -> captured devices
        self.files: dict[int, dict[int, _DeviceFile]] = {}  # host index -> ifindex -> file
        self.heap: list[tuple[int, int, int, str, Record]] = []  # (ts, seq, host index, producer, record)
        self.seq = itertools.count()
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.printer_broken = False

    # -- set-up ---------------------------------------------------------------------------------------

    def devices(self) -> list[tuple[str, str, bool]]:
        """The captured devices of this machine's hosts."""
        return [d for d in self.cfg.devices if d[0] in self.topo.hosts]

    def prepare(self) -> None:
        """Create the rings and the files (before the workers start: they attach their rings)."""
        if self.printer is None:
            try:
                os.makedirs(self.cfg.dir, exist_ok=True)
            except OSError as e:
                raise BadInputError(f"capture dir {self.cfg.dir}: {e.strerror or e}") from None
        for host, dev, exit_ in self.devices():
            hcfg = self.topo.hosts[host]
            dcfg = hcfg.devices[dev]
            tap = {"ifindex": dcfg.ifindex, "exit": exit_, "snaplen": self.cfg.snaplen}
            for cpu in sorted(set(dcfg.rx_cpus)):
                self.producers.setdefault(f"{host}/cpu{cpu}", {})[dev] = tap
            self.producers.setdefault(f"{host}/{dev}", {})[dev] = tap
            self.files.setdefault(hcfg.index, {})[dcfg.ifindex] = self._open(host, dev, exit_)
        for key in self.producers:
            name = f"{self.prefix}-cap-{key.replace('/', '-')}"
            self.rings[key] = MsgRing.create(name, CAPTURE_RING_BYTES)

    def _open(self, host: str, dev: str, exit_: bool) -> _DeviceFile:
        dcfg = self.topo.hosts[host].devices[dev]
        path = os.path.join(self.cfg.dir, f"{host}-{dev}.pcapng")
        prog = _prog_name(dcfg.xdp.program if dcfg.xdp else None)
        df = _DeviceFile(host, dev, dcfg.ifindex, path, None, None, exit=exit_, prog=prog)
        points = [(ENTRY, q) for q in range(dcfg.rx_queues)]
        points += [(EXIT, q) for q in range(dcfg.rx_queues) if exit_]
        points += [(TX, q) for q in range(dcfg.tx_queues)]
        for point, q in points:
            name = {ENTRY: f"{dev}:{prog}()@fentry:rxq{q}", EXIT: f"{dev}:{prog}()@fexit:rxq{q}",
                    TX: f"{dev}:tx:txq{q}"}[point]
            df.names[(point, q)] = name
        if self.printer is not None:
            return df
        try:
            df.f = open(path, "wb")
        except OSError as e:
            raise BadInputError(f"capture file {path}: {e.strerror or e}") from None
        df.writer = PcapngWriter(df.f)
        for (point, q), name in df.names.items():
            what = {ENTRY: f"rx queue {q}, XDP entry", EXIT: f"rx queue {q}, XDP exit",
                    TX: f"tx queue {q}, transmitted"}[point]
            desc = f"{host}:{dev} ifindex {dcfg.ifindex}, {what}"
            df.ifids[(point, q)] = df.writer.add_interface(name, self.cfg.snaplen, desc, "pagepool-emu")
        return df

    def options_for(self, key: str) -> dict[str, Any] | None:
        """What worker `key` (``h1/cpu0``, ``h1/eth0``) needs to capture (`CaptureTap.from_options`)."""
        if key not in self.producers:
            return None
        return {"ring": self.rings[key].seg.name, "devices": self.producers[key]}

    # -- draining ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="capture-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            while not self.stop.wait(DRAIN_PERIOD):
                self.drain(time.time_ns() - MERGE_WINDOW_NS)
        except Exception as e:  # a full disk, say: the rings fill and count drops; the run says why
            self.errors.append(f"the capture writer stopped: {type(e).__name__}: {e}")

    def drain(self, upto: int | None) -> None:
        """Take every record from the rings; write what is older than `upto` (None: everything)."""
        with self.lock:
            for key, ring in self.rings.items():
                host = self.topo.hosts[key.split("/")[0]].index
                while True:
                    msg = ring.get()
                    if msg is None:
                        break
                    try:
                        r = decode_record(msg)
                    except ValueError as e:
                        self.errors.append(f"{key}: {e}")
                        continue
                    if len(r.recs):
                        # One heap entry per record (its frames share a timestamp), written in order.
                        heapq.heappush(self.heap, (int(r.recs["ts"][0]), next(self.seq), host, key, r))
            while self.heap and (upto is None or self.heap[0][0] <= upto):
                ts, _, host, key, r = heapq.heappop(self.heap)
                files = self.files.get(host, {})
                cols = [r.recs[n].tolist() for n in ("ifindex", "point", "queue", "verdict", "target", "cpu", "len")]
                for k, (ifindex, point, q, verdict, target, cpu, length) in enumerate(zip(*cols, strict=True)):
                    df = files.get(ifindex)
                    if df is None:
                        continue
                    # Which frame of which record it is: an exit names its batch's entry record, so it gets
                    # the packet id its entry got.
                    self._write(df, ts, point, q, verdict, target, cpu, length, r.drops if k == 0 else 0,
                                r.frames[k], (key, r.seq, k), (key, r.ref, k))

    def _write(self, df: _DeviceFile, ts: int, point: int, q: int, verdict: int, target: int, cpu: int, length: int,
               drops: int, frame: bytes, me: tuple, ref: tuple) -> None:
        ts = max(ts, df.last_ts)
        df.last_ts = ts
        df.pending_drops += drops
        # Packet ids as xdpdump gives them: one per frame at XDP entry, the same one at its exit.
        if point == ENTRY:
            df.entry_ids += 1
            pid = df.entry_ids
            if df.exit:
                df.ids[me] = pid
        elif point == EXIT and ref in df.ids:
            pid = df.ids.pop(ref)
        else:
            df.entry_ids += 1
            pid = df.entry_ids
        df.packets += 1
        if self.printer is not None:
            if not self.printer_broken:
                tname = self._target_name(df.host, target)
                line = summary_line(ts, df.prog, point, verdict, target, q, df.ifindex, cpu, length, pid, frame,
                                    tname)
                try:
                    self.printer(line)
                except OSError as e:  # the reader went away (`| head`): keep running, print no more
                    self.printer_broken = True
                    self.errors.append(f"stopped printing: {e.strerror or e}")
            return
        assert df.writer is not None
        comment = f"cpu {cpu}" if point != TX else ""
        if point == EXIT and verdict == 4 and target >= 0:
            tname = self._target_name(df.host, target)
            comment += f", redirect to ifindex {target}" + (f" ({tname})" if tname else "")
        df.writer.packet(df.ifids.get((point, q), 0), ts, frame, length,
                         flags=EPB_FLAG_OUTBOUND if point == TX else EPB_FLAG_INBOUND, queue=q, packetid=pid,
                         dropcount=df.pending_drops, verdict=verdict if point == EXIT else None, comment=comment)
        df.pending_drops = 0

    def _target_name(self, host: str, ifindex: int) -> str:
        dev = self.topo.hosts[host].device_by_ifindex(ifindex)
        return "" if dev is None else dev.name

    # -- the end ----------------------------------------------------------------------------------

    def close(self) -> list[dict[str, Any]]:
        """Stop the writer, write what is left, close the files and remove the rings; what was written."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
            self.thread = None
        try:
            self.drain(None)
        except Exception as e:
            self.errors.append(f"the capture writer failed at the end: {type(e).__name__}: {e}")
        out = []
        for per_host in self.files.values():
            for df in per_host.values():
                if df.f is not None:
                    df.f.close()
                    df.f = None
                producers = [k for k, devs in self.producers.items()
                             if k.split("/")[0] == df.host and df.dev in devs]
                out.append({"device": f"{df.host}:{df.dev}", "file": None if self.printer else df.path,
                            "packets": df.packets, "producers": producers})
        for ring in self.rings.values():
            ring.unlink()
            ring.close()
        self.rings = {}
        return out
