"""Packet capture files: reading pcap and pcapng, writing pcap, and writing pcapng the way xdpdump does.

Reading (`read_frames`) accepts the classic libpcap format (microsecond or nanosecond magic, either byte
order) and pcapng (any number of sections and interfaces; Enhanced, Simple and obsolete Packet Blocks;
every other block skipped, as Wireshark does), and returns the frames with their timestamps in
nanoseconds.  Only Ethernet (``LINKTYPE_ETHERNET`` = ``DLT_EN10MB`` = 1) is accepted: everything the
emulator does starts at an Ethernet header.  A file that is not a capture, is truncated, carries another
link type, or holds a frame that was cut by the capture's snap length (it cannot be replayed as it was on
the wire) raises `PcapError`, a `BadInputError` naming the file and the frame (1-based, as Wireshark's
``frame.number``) or the byte offset of the block at fault.

The reader is written here rather than taken from dpkt (which the tests use to cross-check it) because
refusing a bad file well needs what a general reader does not say: which frame, which byte, and why it
cannot be replayed.

Writing: `write_pcap` (the classic format, microsecond timestamps, what test fixtures and golden files
use) and `PcapngWriter`, which writes what xdpdump's ``xpcapng`` writes: a Section Header Block, one
Interface Description Block per capture interface (``if_name``, ``if_description``, ``if_tsresol`` = 9,
i.e. nanoseconds, ``if_hardware``), and one Enhanced Packet Block per frame with the options
``epb_flags`` (direction), ``epb_dropcount``, ``epb_packetid``, ``epb_queue``, ``epb_verdict`` (type 2,
eBPF XDP, then the verdict as a 64-bit integer) and an ``opt_comment`` (the CPU and, for a redirect, the
target: pcapng has no option for either).  Wireshark/tshark show them as ``frame.interface_name``,
``frame.packet_flags_direction``, ``frame.drop_count``, ``frame.packet_id``, ``frame.queue``,
``frame.verdict.ebpf_xdp`` and ``frame.comment``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from emu.errors import BadInputError

__all__ = ["LINKTYPE_ETHERNET", "PcapError", "PcapFrames", "PcapngWriter", "read_frames", "write_pcap"]

LINKTYPE_ETHERNET = 1  # DLT_EN10MB
_LINKTYPE_NAMES = {0: "NULL (BSD loopback)", 101: "RAW (IP)", 105: "IEEE 802.11", 113: "LINUX_SLL (cooked)",
                   127: "IEEE 802.11 radiotap", 228: "IPV4", 229: "IPV6", 276: "LINUX_SLL2 (cooked v2)"}

_PCAP_MAGIC_US = 0xA1B2C3D4
_PCAP_MAGIC_NS = 0xA1B23C4D
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_BOM = 0x1A2B3C4D
_IDB, _PB_OBSOLETE, _SPB, _EPB = 1, 2, 3, 6
# Options (pcapng spec, and xdp-tools' lib/util/xpcapng.c, which xdpdump writes with).
OPT_END, OPT_COMMENT = 0, 1
IF_NAME, IF_DESCRIPTION, IF_TSRESOL, IF_HARDWARE = 2, 3, 9, 15
EPB_FLAGS, EPB_DROPCOUNT, EPB_PACKETID, EPB_QUEUE, EPB_VERDICT = 2, 4, 5, 6, 7
EPB_FLAG_INBOUND, EPB_FLAG_OUTBOUND = 1, 2
VERDICT_TYPE_EBPF_XDP = 2
# A frame bigger than this is not a frame of any link the emulator has (jumbo frames are ~9 KB); a
# header that claims more is a corrupt file, not a reason to allocate gigabytes.
MAX_FRAME = 1 << 18


class PcapError(BadInputError):
    """A capture file that cannot be read or replayed; the message names the file and the frame."""


@dataclass(frozen=True, slots=True)
class PcapFrames:
    """The frames of a capture file, in file order, with their timestamps (ns since the epoch)."""

    path: str
    frames: list[bytes]
    ts_ns: list[int]

    def __len__(self) -> int:
        return len(self.frames)


def _linktype_name(lt: int) -> str:
    return f"{lt} ({_LINKTYPE_NAMES[lt]})" if lt in _LINKTYPE_NAMES else str(lt)


def read_frames(path: str | os.PathLike[str], allow_cut: bool = False) -> PcapFrames:
    """Every frame of the pcap or pcapng file `path` (see the module docstring); `PcapError` otherwise.
    `allow_cut`: keep frames cut by the snap length (reading a capture back, not replaying it)."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise PcapError(f"{name}: is a directory, not a capture file") from None
    except FileNotFoundError:
        raise PcapError(f"{name}: no such capture file") from None
    except OSError as e:
        raise PcapError(f"{name}: cannot read: {e.strerror or e}") from None
    if len(data) < 4:
        raise PcapError(f"{name}: not a pcap or pcapng file ({len(data)} bytes, too short for a header)")
    magic_le = struct.unpack_from("<I", data)[0]
    if magic_le == _PCAPNG_SHB:
        return _read_pcapng(name, data, allow_cut)
    for order in "<>":
        magic = struct.unpack_from(order + "I", data)[0]
        if magic in (_PCAP_MAGIC_US, _PCAP_MAGIC_NS):
            return _read_pcap(name, data, order, magic == _PCAP_MAGIC_NS, allow_cut)
    raise PcapError(f"{name}: not a pcap or pcapng file (magic 0x{magic_le:08x})")


def _read_pcap(name: str, data: bytes, order: str, nano: bool, allow_cut: bool) -> PcapFrames:
    if len(data) < 24:
        raise PcapError(f"{name}: truncated pcap header ({len(data)} of 24 bytes)")
    _, _, _, _, _, _snaplen, network = struct.unpack_from(order + "IHHiIII", data)
    linktype = network & 0x0FFFFFFF  # the upper bits carry the FCS length (pcap-linktype(7))
    if linktype != LINKTYPE_ETHERNET:
        raise PcapError(f"{name}: link type {_linktype_name(linktype)} is not Ethernet "
                        f"(LINKTYPE_ETHERNET, DLT_EN10MB = 1): only Ethernet frames can be replayed")
    frames: list[bytes] = []
    ts: list[int] = []
    pos = 24
    rec = struct.Struct(order + "IIII")
    scale = 1 if nano else 1000
    while pos < len(data):
        n = len(frames) + 1
        if pos + 16 > len(data):
            raise PcapError(f"{name}: frame {n}: truncated record header at byte {pos} "
                            f"({len(data) - pos} of 16 bytes)")
        sec, frac, incl, orig = rec.unpack_from(data, pos)
        if incl > MAX_FRAME:
            raise PcapError(f"{name}: frame {n}: record at byte {pos} claims {incl:,} bytes (corrupt file?)")
        if pos + 16 + incl > len(data):
            raise PcapError(f"{name}: frame {n}: truncated: {incl} bytes announced, "
                            f"{len(data) - pos - 16} left in the file")
        if incl < orig and not allow_cut:
            raise PcapError(f"{name}: frame {n}: captured {incl} of its {orig} bytes (snap length): a cut "
                            "frame cannot be replayed")
        frames.append(data[pos + 16 : pos + 16 + incl])
        ts.append(sec * 1_000_000_000 + frac * scale)
        pos += 16 + incl
    return PcapFrames(name, frames, ts)


@dataclass(slots=True)
class _Iface:
    linktype: int
    tsresol_ns: tuple[int, int]  # (multiplier, divisor) that turn a timestamp unit into ns


def _tsresol(b: int) -> tuple[int, int]:
    """``if_tsresol``: 10^-b (or 2^-b with the top bit) seconds per unit, as (mul, div) to nanoseconds."""
    if b & 0x80:
        return 1_000_000_000, 1 << (b & 0x7F)
    exp = b
    return (10 ** (9 - exp), 1) if exp <= 9 else (1, 10 ** (exp - 9))


def _options(data: bytes, pos: int, end: int, order: str) -> Iterable[tuple[int, bytes]]:
    while pos + 4 <= end:
        code, length = struct.unpack_from(order + "HH", data, pos)
        if code == OPT_END:
            return
        yield code, data[pos + 4 : pos + 4 + length]
        pos += 4 + ((length + 3) & ~3)


def _read_pcapng(name: str, data: bytes, allow_cut: bool) -> PcapFrames:
    frames: list[bytes] = []
    ts: list[int] = []
    ifaces: list[_Iface] = []
    order = "<"
    pos = 0
    while pos < len(data):
        n = len(frames) + 1
        if pos + 12 > len(data):
            raise PcapError(f"{name}: frame {n}: truncated block header at byte {pos}")
        btype = struct.unpack_from("<I", data, pos)[0]
        if btype == _PCAPNG_SHB:
            bom = struct.unpack_from("<I", data, pos + 8)[0]
            if bom == _PCAPNG_BOM:
                order = "<"
            elif bom == 0x4D3C2B1A:
                order = ">"
            else:
                raise PcapError(f"{name}: section header at byte {pos} has a bad byte-order magic 0x{bom:08x}")
            ifaces = []  # interface ids are per section
        btype, blen = struct.unpack_from(order + "II", data, pos)
        if blen < 12 or blen % 4:
            raise PcapError(f"{name}: frame {n}: block at byte {pos} has a bad length {blen}")
        if pos + blen > len(data):
            raise PcapError(f"{name}: frame {n}: truncated block at byte {pos} ({blen} bytes announced, "
                            f"{len(data) - pos} left in the file)")
        body, end = pos + 8, pos + blen - 4
        if btype == _IDB:
            linktype = struct.unpack_from(order + "H", data, body)[0]
            res = (1000, 1)  # microseconds unless if_tsresol says otherwise
            for code, val in _options(data, body + 8, end, order):
                if code == IF_TSRESOL and val:
                    res = _tsresol(val[0])
            ifaces.append(_Iface(linktype, res))
        elif btype in (_EPB, _PB_OBSOLETE, _SPB):
            if btype == _SPB:
                ifid, hdr = 0, 4
                orig = struct.unpack_from(order + "I", data, body)[0]
                incl = min(orig, end - body - hdr)
                stamp = 0
            else:
                if btype == _EPB:
                    ifid, hi, lo, incl, orig = struct.unpack_from(order + "IIIII", data, body)
                else:
                    ifid, _drops, hi, lo, incl, orig = struct.unpack_from(order + "HHIIII", data, body)
                hdr = 20
                stamp = hi << 32 | lo
            if ifid >= len(ifaces):
                raise PcapError(f"{name}: frame {n}: interface {ifid} was never described (no such IDB)")
            iface = ifaces[ifid]
            if iface.linktype != LINKTYPE_ETHERNET:
                raise PcapError(f"{name}: frame {n}: interface {ifid} has link type "
                                f"{_linktype_name(iface.linktype)}, not Ethernet (LINKTYPE_ETHERNET, DLT_EN10MB"
                                " = 1): only Ethernet frames can be replayed")
            if incl > MAX_FRAME or body + hdr + incl > end:
                raise PcapError(f"{name}: frame {n}: block at byte {pos} claims {incl:,} bytes of data, "
                                "more than it holds")
            if incl < orig and not allow_cut:
                raise PcapError(f"{name}: frame {n}: captured {incl} of its {orig} bytes (snap length): a cut "
                                "frame cannot be replayed")
            frames.append(data[body + hdr : body + hdr + incl])
            mul, div = iface.tsresol_ns
            ts.append(stamp * mul // div)
        pos += blen
    return PcapFrames(name, frames, ts)


def write_pcap(path: str | os.PathLike[str], frames: Sequence[bytes], ts_ns: Sequence[int] | None = None) -> None:
    """Write `frames` as a classic pcap file (Ethernet, microsecond timestamps; 1 ms apart by default)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", _PCAP_MAGIC_US, 2, 4, 0, 0, MAX_FRAME, LINKTYPE_ETHERNET))
        for k, frame in enumerate(frames):
            t = ts_ns[k] if ts_ns is not None else 1_700_000_000_000_000_000 + k * 1_000_000
            f.write(struct.pack("<IIII", t // 1_000_000_000, t % 1_000_000_000 // 1000, len(frame), len(frame)))
            f.write(frame)


def _opt(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) % 4)


_END = struct.pack("<HH", OPT_END, 0)


def _block(btype: int, body: bytes) -> bytes:
    blen = 12 + len(body)
    return struct.pack("<II", btype, blen) + body + struct.pack("<I", blen)


class PcapngWriter:
    """A pcapng file written as xdpdump writes one (see the module docstring); little-endian."""

    def __init__(self, f: BinaryIO, application: str = "pagepool-emu") -> None:
        self.f = f
        shb = struct.pack("<IHHq", _PCAPNG_BOM, 1, 0, -1) + _opt(4, application.encode()) + _END
        f.write(_block(_PCAPNG_SHB, shb))
        self.interfaces = 0

    def add_interface(self, name: str, snaplen: int, description: str = "", hardware: str = "") -> int:
        """One Interface Description Block (Ethernet, nanosecond timestamps); returns its interface id."""
        opts = _opt(IF_NAME, name.encode())
        if description:
            opts += _opt(IF_DESCRIPTION, description.encode())
        opts += _opt(IF_TSRESOL, bytes([9]))
        if hardware:
            opts += _opt(IF_HARDWARE, hardware.encode())
        self.f.write(_block(_IDB, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, snaplen) + opts + _END))
        self.interfaces += 1
        return self.interfaces - 1

    def packet(self, ifid: int, ts_ns: int, data: bytes, orig_len: int, *, flags: int = 0,
               queue: int | None = None, packetid: int | None = None, dropcount: int = 0,
               verdict: int | None = None, comment: str = "") -> None:
        """One Enhanced Packet Block: `data` is what was captured (at most the snap length) of a frame of
        `orig_len` bytes."""
        opts = b""
        if flags:
            opts += _opt(EPB_FLAGS, struct.pack("<I", flags))
        if dropcount:
            opts += _opt(EPB_DROPCOUNT, struct.pack("<Q", dropcount))
        if packetid is not None:
            opts += _opt(EPB_PACKETID, struct.pack("<Q", packetid))
        if queue is not None:
            opts += _opt(EPB_QUEUE, struct.pack("<I", queue))
        if verdict is not None:
            opts += _opt(EPB_VERDICT, struct.pack("<Bq", VERDICT_TYPE_EBPF_XDP, verdict))
        if comment:
            opts += _opt(OPT_COMMENT, comment.encode())
        body = (struct.pack("<IIIII", ifid, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data), orig_len)
                + data + bytes(-len(data) % 4) + opts + _END)
        self.f.write(_block(_EPB, body))
