"""Frames crafted for the pcap tests and the bundled replay example (``topology/pcap/``).

Every kind of frame a replay has to carry unchanged through the emulator: IPv4/UDP, TCP with options,
802.1Q VLAN, QinQ (802.1ad outer tag), IPv6 with extension headers, IPv4 fragments, ARP (shorter than
Ethernet's 60-byte minimum, as captured on a host), a jumbo frame that fits a 4 KiB page, one that fits
no page (counted ``replay_oversize``) and a runt (counted ``replay_runt``).  Built with dpkt where it has
the header, with struct where a header is simpler to write out.

``python tests/pcap_frames.py`` rewrites the bundled example's files; a test checks they are what this
module makes.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import dpkt

SRC = bytes.fromhex("020000aa0001")
DST = bytes.fromhex("020000000002")  # h1:eth0 of topology/replay.yaml
TS0 = 1_700_000_000_000_000_000
EXAMPLE = Path(__file__).resolve().parents[1] / "topology" / "pcap"


def _eth(ethertype: int, payload: bytes, dst: bytes = DST, src: bytes = SRC) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def _ip4(p: int, data: bytes, src: str = "10.0.0.1", dst: str = "10.0.0.2", **kw) -> bytes:
    ip = dpkt.ip.IP(src=bytes(map(int, src.split("."))), dst=bytes(map(int, dst.split("."))), p=p, ttl=64,
                    data=data, **kw)
    return bytes(ip)


def udp4(payload: bytes = b"hello", sport: int = 1234, dport: int = 5678) -> bytes:
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    udp.ulen = len(udp)
    return _eth(0x0800, _ip4(dpkt.ip.IP_PROTO_UDP, bytes(udp)))


def tcp_options() -> bytes:
    """A SYN with MSS, SACK-permitted, timestamps and window scale, as Linux sends it."""
    opts = (struct.pack("!BBH", 2, 4, 1460) + struct.pack("!BB", 4, 2)
            + struct.pack("!BBII", 8, 10, 123456, 0) + struct.pack("!BBBB", 1, 3, 3, 7))
    tcp = dpkt.tcp.TCP(sport=40000, dport=80, seq=1, flags=dpkt.tcp.TH_SYN, win=64240, opts=opts,
                       off=(20 + len(opts)) // 4)
    return _eth(0x0800, _ip4(dpkt.ip.IP_PROTO_TCP, bytes(tcp)))


def vlan(vid: int = 100) -> bytes:
    inner = udp4(b"vlan")[12:]  # ethertype + IPv4
    return _eth(0x8100, struct.pack("!H", vid) + inner)


def qinq(outer: int = 10, inner_vid: int = 20) -> bytes:
    icmp = dpkt.icmp.ICMP(type=8, code=0, data=dpkt.icmp.ICMP.Echo(id=1, seq=1, data=b"qinq"))
    ip = _ip4(dpkt.ip.IP_PROTO_ICMP, bytes(icmp))
    return _eth(0x88A8, struct.pack("!HH", outer, 0x8100) + struct.pack("!HH", inner_vid, 0x0800) + ip)


def ipv6_ext() -> bytes:
    """IPv6 with a hop-by-hop header (router alert), a destination-options header, then UDP."""
    src = bytes.fromhex("fd000000000000000000000000000001")
    dst = bytes.fromhex("fd000000000000000000000000000002")
    data = b"ipv6"
    pseudo = src + dst + struct.pack("!IxxxB", 8 + len(data), 17) + struct.pack("!HHHH", 40001, 40002, 12, 0) + data
    udp = struct.pack("!HHHH", 40001, 40002, 8 + len(data), dpkt.in_cksum(pseudo)) + data
    dstopt = struct.pack("!BB", 17, 0) + bytes([1, 4, 0, 0, 0, 0])  # next UDP, PadN
    hbh = struct.pack("!BB", 60, 0) + bytes([5, 2, 0, 0, 1, 0])  # next dest-opts, router alert
    payload = hbh + dstopt + udp
    hdr = struct.pack("!IHBB", 6 << 28, len(payload), 0, 64)  # next header: hop-by-hop (0)
    return _eth(0x86DD, hdr + src + dst + payload)


def fragments() -> list[bytes]:
    """A 1200-byte UDP datagram in two IPv4 fragments (MF on the first, offset on the second)."""
    udp = dpkt.udp.UDP(sport=7, dport=7, data=bytes(range(256)) * 4 + bytes(1192 - 1024))
    udp.ulen = len(udp)
    raw = bytes(udp)
    first, second = raw[:800], raw[800:]
    f1 = _ip4(dpkt.ip.IP_PROTO_UDP, first, id=0x1234, mf=1)
    f2 = _ip4(dpkt.ip.IP_PROTO_UDP, second, id=0x1234, offset=800 // 8)
    return [_eth(0x0800, f1), _eth(0x0800, f2)]


def arp() -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + SRC + bytes([10, 0, 0, 1]) + bytes(6) + bytes([10, 0, 0, 2])
    return _eth(0x0806, body, dst=b"\xff" * 6)


def jumbo(size: int) -> bytes:
    return udp4(bytes(k & 0xFF for k in range(size - 42)))


def runt() -> bytes:
    return DST + b"\x02\x00"  # 8 bytes: not even an Ethernet header


def sample_frames() -> list[bytes]:
    """The bundled example's input, in order (one of each kind above)."""
    return [udp4(), tcp_options(), vlan(), qinq(), ipv6_ext(), *fragments(), arp(), jumbo(3000),
            jumbo(9000), runt()]


def swap_macs(frame: bytes) -> bytes:
    return frame[6:12] + frame[0:6] + frame[12:]


def expected_l2fwd(frames: list[bytes], max_frame: int) -> list[bytes]:
    """What ``emu.programs:l2fwd`` sends on: every frame that fits, with its MACs swapped."""
    return [swap_macs(f) for f in frames if 14 <= len(f) <= max_frame]


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from emu.net.pcap import write_pcap

    frames = sample_frames()
    EXAMPLE.mkdir(exist_ok=True)
    write_pcap(EXAMPLE / "l2fwd-in.pcap", frames, [TS0 + k * 1_000_000 for k in range(len(frames))])
    out = expected_l2fwd(frames, 4096 - 256)
    write_pcap(EXAMPLE / "l2fwd-expected.pcap", out, [TS0 + k * 1_000_000 for k in range(len(out))])


if __name__ == "__main__":
    main()
