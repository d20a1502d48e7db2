"""The device's NIC core (`emu.datapath.nic.NicCore`) driven without a process: fake CPU channels, a fake
wire and link ingress, a clock the test moves, and a real page memory whose pages the test allocates and
posts as a CPU would.  Each test runs in milliseconds."""

from __future__ import annotations

import collections

import numpy as np
from fakes import Counters, one_cpu_host

from emu.datapath.nic import NicCore
from emu.mem.page import DESC_DTYPE, PageState
from emu.mem.pagepool import page_pool_dev_alloc_pages, pool_of, xdp_prepare_buff, xdp_xmit_queue
from emu.net import wire
from emu.net.protocol import LINK_DOWN_BIT, XDP_PACKET_HEADROOM, device_code, transit_code

PAUSE_MS = 1000


class FakeCpus:
    def __init__(self) -> None:
        self.sent: list[tuple[int, str, dict, np.ndarray]] = []

    def send(self, cpu, kind, header, descs) -> None:
        self.sent.append((cpu, kind, dict(header), descs.copy()))

    def take(self, kind: str) -> list[tuple]:
        out = [m for m in self.sent if m[1] == kind]
        self.sent = [m for m in self.sent if m[1] != kind]
        return out


class FakeWire:
    connected = True

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.up = True  # the carrier, as the test sets it

    def connect(self, sock, carrier=None) -> None:
        self.sock, self.watch = sock, carrier

    def carrier(self) -> bool:
        return self.up

    def busy(self) -> bool:
        return False

    def send(self, frames) -> int:
        self.frames += frames.to_list()
        return 0

    def cut(self) -> int:
        return 0


class FakeLink:
    def __init__(self) -> None:
        self.msgs: collections.deque[bytes] = collections.deque()

    def take(self) -> bytes | None:
        return self.msgs.popleft() if self.msgs else None


class Clock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns


def make_nic(page_memory, rx_ring: int = 64, tx_ring: int = 128, completion_us: int = 0, xdp_xmit: bool = True,
             mtu: int = 1500, page_size: int = 512, sg: bool = False):
    xmit = str(xdp_xmit).lower()
    feats = ", xdp_features: [basic, redirect, ndo-xmit, ndo-xmit-sg, rx-sg]" if sg else ""
    cfg = one_cpu_host(f"""
        eth0: {{ifindex: 2, rx_ring_size: {rx_ring}, tx_ring_size: {tx_ring}, tx_completion_us: {completion_us},
                xdp_xmit: {xmit}, mtu: {mtu}{feats}}}
    """, page_size=page_size if page_size >= 2048 else None).devices["eth0"]
    pm = page_memory(npages=1024, page_size=page_size, ncpus=1, multibuf=sg)
    counters = Counters("device")
    cpus, tx, link, clock = FakeCpus(), FakeWire(), FakeLink(), Clock()
    nic = NicCore(cfg, 1, pm, cpus, tx, link, counters.array, counters.index, lambda key, text: None,
                  pause_ms=PAUSE_MS, clock=clock)
    nic.count = counters.__getitem__  # type: ignore[attr-defined]
    return nic, pm, cpus, tx, link, clock


def descs_of(pm, ids: np.ndarray) -> np.ndarray:
    d = np.zeros(len(ids), dtype=DESC_DTYPE)
    d["page"], d["gen"], d["off"], d["len"], d["owner"] = ids, pm.gen[ids], pm.off[ids], pm.len[ids], 0
    return d


def post(nic: NicCore, pm, n: int) -> np.ndarray:
    """Play CPU 0: allocate `n` RX buffers and post them to queue 0."""
    ids = page_pool_dev_alloc_pages(pool_of(pm, 0, owner=True), n, device_code(0))
    nic.dispatch(wire.pack_msg("post", {"q": 0, "cpu": 0}, descs_of(pm, ids).tobytes()))
    return ids


def frames(n: int, size: int = 64, start: int = 0) -> list[bytes]:
    return [bytes([(start + k) % 256]) * size for k in range(n)]


def test_dma_writes_the_frames_at_the_headroom(page_memory) -> None:
    nic, pm, cpus, _, link, _ = make_nic(page_memory)
    ids = post(nic, pm, 64)
    fs = frames(10, 100)
    link.msgs.append(wire.pack_frames(fs))
    assert nic.receive() == 10
    (cpu, _kind, hdr, d), = cpus.take("rx")
    assert (cpu, hdr) == (0, {"dev": "eth0", "q": 0})
    assert d["page"].tolist() == ids[:10].tolist() and (d["len"] == 100).all()
    ps = pm.page_size
    for p, f in zip(d["page"].tolist(), fs, strict=True):
        assert bytes(pm.data[p * ps + XDP_PACKET_HEADROOM : p * ps + XDP_PACKET_HEADROOM + 100]) == f
    assert (pm.len[ids[:10]] == 100).all() and (pm.holder[ids[:10]] == transit_code(0, 0)).all()
    assert nic.count("rx_packets") == 10 and nic.count("rx_completed") == 10 and nic.nposted == [54]


def test_a_small_ring_takes_a_larger_message_through_the_fifo(page_memory) -> None:
    nic, pm, cpus, _, link, clock = make_nic(page_memory, rx_ring=16)
    post(nic, pm, 16)
    link.msgs.append(wire.pack_frames(frames(40)))
    link.msgs.append(wire.pack_frames(frames(5, start=40)))
    assert nic.receive() == 16
    assert nic.fifo == 24 and nic.paused_since == clock.ns
    # Paused: no link message is taken while frames wait, and nothing is dropped before pause_ms.
    clock.ns += PAUSE_MS * 1_000_000 // 2
    assert nic.receive() == 0 and len(link.msgs) == 1 and nic.count("rx_dropped") == 0
    # Buffers posted since take the oldest waiting frames, in order.
    cpus.take("rx")
    post(nic, pm, 16)
    assert nic.receive() == 16 and nic.fifo == 8
    (_, _, _, d), = cpus.take("rx")
    ps = pm.page_size
    firsts = [int(pm.data[p * ps + XDP_PACKET_HEADROOM]) for p in d["page"].tolist()]
    assert firsts == list(range(16, 32))
    # No buffer for pause_ms since the last progress: the waiting frames are dropped, the link resumes.
    clock.ns += PAUSE_MS * 1_000_000 - 1
    assert nic.receive() == 0 and nic.count("rx_dropped") == 0
    clock.ns += 1
    nic.receive()
    assert nic.count("rx_dropped") == 8 and nic.fifo == 0 and nic.paused_since == 0


def test_frames_longer_than_the_mtu_allows_are_dropped_on_arrival(page_memory) -> None:
    """A frame longer than mtu + 18 is dropped by the MAC, alone (``rx_length_errors``, no buffer used); the
    frames of the same link message around it are received.  An all-too-long message takes no buffer."""
    nic, pm, cpus, _, link, _ = make_nic(page_memory, mtu=1000, page_size=2048)
    ids = post(nic, pm, 64)
    fs = [bytes([1]) * 1018, bytes([2]) * 1019, bytes([3]) * 64, bytes([4]) * 1500]
    link.msgs.append(wire.pack_frames(fs))
    assert nic.receive() == 2
    (_, _, _, d), = cpus.take("rx")
    assert d["page"].tolist() == ids[:2].tolist() and d["len"].tolist() == [1018, 64]
    ps = pm.page_size
    assert bytes(pm.data[ids[0] * ps + XDP_PACKET_HEADROOM : ids[0] * ps + XDP_PACKET_HEADROOM + 1018]) == fs[0]
    assert nic.count("rx_length_errors") == 2 and nic.count("rx_packets") == 2 and nic.count("bad_messages") == 0
    more = post(nic, pm, 2)  # a full ring again: the next message is taken at once
    link.msgs.append(wire.pack_frames([bytes(2000)] * 3))
    assert nic.receive() == 0 and nic.count("rx_length_errors") == 5 and nic.nposted == [64]
    assert not cpus.take("rx") and not link.msgs
    # Every page is where it should be: 2 completed to the CPU, the others still posted.
    assert (pm.state[more] == PageState.RX_POSTED).all()
    assert (pm.state[ids[:2]] == PageState.RX_POSTED).all() and (pm.holder[ids[:2]] == transit_code(0, 0)).all()


def test_transmit_gathers_the_frames_and_completes_after_tx_completion_us(page_memory) -> None:
    nic, pm, cpus, tx, _, clock = make_nic(page_memory, completion_us=50)
    ids = post(nic, pm, 64)[:8]
    fs = frames(8, 80)
    nic.rx.msgs.append(wire.pack_frames(fs))
    nic.receive()
    (_, _, _, d), = cpus.take("rx")
    xdp_prepare_buff(pm, ids, 0)  # play the CPU: the frames go to XDP_TX
    xdp_xmit_queue(pm, ids, device_code(0))
    nic.dispatch(wire.pack_msg("xmit", {"txq": 0, "cpu": 0, "kind": "tx"}, d.tobytes()))
    assert nic.count("xdp_tx") == 8 and nic.txqs[0].nqueued == 8
    assert nic.transmit() == 8
    assert tx.frames == fs and nic.count("tx_packets") == 8
    assert (pm.state[ids] == PageState.TX_INFLIGHT).all()
    clock.ns += 49_999
    assert nic.complete() == 0 and nic.next_completion_ns() == clock.ns + 1
    clock.ns += 1
    assert nic.complete() == 8
    (cpu, _, hdr, done), = cpus.take("txc")
    assert (cpu, hdr) == (0, {"dev": "eth0", "txq": 0}) and done["page"].tolist() == ids.tolist()
    assert nic.count("tx_completions") == 8 and nic.next_completion_ns() is None


def test_a_full_tx_ring_refuses_the_excess(page_memory) -> None:
    nic, pm, cpus, _, _, _ = make_nic(page_memory, tx_ring=8, completion_us=1000)
    ids = page_pool_dev_alloc_pages(pool_of(pm, 0, owner=True), 10, device_code(0))
    xdp_xmit_queue(pm, ids, device_code(0))
    nic.dispatch(wire.pack_msg("xmit", {"txq": 0, "cpu": 0, "kind": "redirect"}, descs_of(pm, ids).tobytes()))
    (_cpu, _, hdr, refused), = cpus.take("txdrop")
    assert hdr == {"dev": "eth0", "kind": "redirect"} and refused["page"].tolist() == ids[8:].tolist()
    assert nic.count("xmit_full") == 2 and nic.count("xdp_xmit") == 8


def test_redirect_descriptors_to_a_device_without_xdp_xmit(page_memory) -> None:
    nic, pm, cpus, _, _, _ = make_nic(page_memory, xdp_xmit=False)
    ids = page_pool_dev_alloc_pages(pool_of(pm, 0, owner=True), 3, device_code(0))
    xdp_xmit_queue(pm, ids, device_code(0))
    nic.dispatch(wire.pack_msg("xmit", {"txq": 0, "cpu": 0, "kind": "redirect"}, descs_of(pm, ids).tobytes()))
    assert nic.count("bad_messages") == 1 and len(cpus.take("txdrop")) == 1 and nic.txqs[0].nqueued == 0


def test_bad_posts_are_refused(page_memory) -> None:
    nic, pm, _, _, _, _ = make_nic(page_memory)
    ids = page_pool_dev_alloc_pages(pool_of(pm, 0, owner=True), 4, device_code(0))
    d = descs_of(pm, ids)
    d["gen"][0] += 1  # stale
    d["page"][1] = pm.npages + 5  # out of range
    nic.dispatch(wire.pack_msg("post", {"q": 0, "cpu": 0}, d.tobytes()))
    assert nic.count("bad_descriptors") == 2 and nic.nposted == [2]
    nic.dispatch(wire.pack_msg("post", {"q": 3, "cpu": 0}, d.tobytes()))  # no such queue
    assert nic.count("bad_messages") == 1


def test_go_down_returns_posted_buffers_and_frees_queued_frames(page_memory) -> None:
    nic, pm, cpus, _, _, _ = make_nic(page_memory, completion_us=1000)
    posted = post(nic, pm, 10)
    ids = page_pool_dev_alloc_pages(pool_of(pm, 0, owner=True), 3, device_code(0))
    xdp_xmit_queue(pm, ids, device_code(0))
    nic.dispatch(wire.pack_msg("xmit", {"txq": 0, "cpu": 0, "kind": "tx"}, descs_of(pm, ids).tobytes()))
    nic.go_down()
    (_cpu, _, hdr, back), = cpus.take("rxret")
    assert hdr == {"dev": "eth0", "q": 0} and back["page"].tolist() == posted.tolist()
    (_, _, _, freed), = cpus.take("txc")  # never sent: completed at once
    assert freed["page"].tolist() == ids.tolist() and nic.count("tx_dropped") == 3
    assert (pm.state[ids] == PageState.TX_INFLIGHT).all()
    # Down: new posts go straight back, new transmits are refused.
    more = post(nic, pm, 2)
    (_, _, _, again), = cpus.take("rxret")
    assert again["page"].tolist() == more.tolist()


def test_link_up_follows_the_cables_carrier_not_the_peers_address(page_memory) -> None:
    """A cable to another host is up once its connection to the peer is made (the wire's carrier), not
    when the ``link`` message names the peer; carrier lost: down; the peer's host gone: down for good."""
    nic, _, _, tx, _, _ = make_nic(page_memory)
    opened: list[str] = []
    nic.link_socket = lambda addr: (opened.append(addr) or "sock", "carrier")
    tx.up = False  # zmq still resolving the peer's name, connecting, or in its handshake
    nic.dispatch(wire.pack_msg("link", {"peer": "tcp://h2.links:4000"}, b""))
    assert opened == ["tcp://h2.links:4000"] and (tx.sock, tx.watch) == ("sock", "carrier")
    assert nic.cabled and nic.count("link_up") == 0
    nic.watch_carrier()
    assert nic.count("link_up") == 0
    tx.up = True  # the handshake with the peer's ingress succeeded
    nic.watch_carrier()
    assert nic.count("link_up") == 1
    tx.up = False  # the connection was lost (zmq reconnects by itself)
    nic.watch_carrier()
    assert nic.count("link_up") == 0
    tx.up = True
    nic.watch_carrier()
    assert nic.count("link_up") == 1
    nic.apply_offline(1 << LINK_DOWN_BIT)  # the coordinator: the peer's host is lost
    assert not nic.cabled and nic.count("link_up") == 0
    nic.dispatch(wire.pack_msg("link", {"peer": "tcp://h2.links:4001"}, b""))
    assert opened == ["tcp://h2.links:4000"]  # a cable whose far end is gone is not plugged in again


def _jumbo_messages(link: FakeLink, nmsgs: int, size: int = 9018) -> None:
    """`nmsgs` link messages of 7 frames of `size` bytes, as a LinkSender cuts them (`msg_frames`)."""
    from emu.net.link import msg_frames

    per = msg_frames(size)
    assert per == 7
    for m in range(nmsgs):
        link.msgs.append(wire.pack_frames(frames(per, size, start=m * per)))


def test_flow_control_waits_for_one_message_of_the_longest_frames_not_256_buffers(page_memory) -> None:
    """16 KiB pages, a ring of 64, MTU 9000: a link message holds 7 frames of 9018 bytes, so the device takes
    messages while 7 buffers are posted (xon) and coalesces them while 7 more are free, never pausing the
    link for a ring's worth (which a CPU with frames in flight never posts: every message would wait
    XON_WAIT_NS)."""
    nic, pm, cpus, _, link, clock = make_nic(page_memory, rx_ring=64, mtu=9000, page_size=16384)
    assert nic.xon == 7
    post(nic, pm, 40)  # the CPU holds the ring's other 24 buffers (frames in its poll)
    _jumbo_messages(link, 10)
    # 40 buffers: 5 messages of 7 (35 frames) coalesced into one DMA pass; 5 left < 7: the rest stay on the link.
    assert nic.receive() == 35
    assert len(link.msgs) == 5 and nic.nposted == [5] and nic.fifo == 0
    assert nic.count("tx_flow_control_xoff") == 0
    # Below one message's worth: a short pause for the refill (one xoff), and the bell asks for the 2 missing.
    assert nic.receive() == 0 and nic.count("tx_flow_control_xoff") == 1 and len(link.msgs) == 5
    assert nic.post_bell() == 2 * DESC_DTYPE.itemsize
    post(nic, pm, 2)
    assert nic.receive() == 7 and len(link.msgs) == 4 and nic.count("tx_flow_control_xoff") == 1
    assert clock.ns == 1_000_000_000  # (no time passed: nothing waited for XON_WAIT_NS)
    (_, _, _, d1), (_, _, _, d2) = cpus.take("rx")
    assert len(d1) == 35 and len(d2) == 7 and (d1["len"] == 9018).all()


def test_small_frames_keep_the_coalescing_of_full_messages(page_memory) -> None:
    """MTU 1454 on 2 KiB pages (max frame 1472 bytes: 44 a message; l2fwd.yaml): xon is 44, whatever the frames' size;
    64-byte frames come 256 a message and what the posted buffers do not hold waits in the RX FIFO."""
    nic, pm, _, _, link, _ = make_nic(page_memory, rx_ring=512, mtu=1454, page_size=2048)
    assert nic.xon == 44
    post(nic, pm, 300)
    link.msgs.extend(wire.pack_frames(frames(256, start=k)) for k in range(3))
    assert nic.receive() == 300 and nic.fifo == 212 and len(link.msgs) == 1  # 300 - 256 = 44: one more taken
    assert nic.count("tx_flow_control_xoff") == 0


def test_an_sg_device_counts_a_message_in_buffers(page_memory) -> None:
    """4 KiB pages with rx-sg, MTU 9000: a 9018-byte frame takes 3 buffers, a message of 7 takes 21 (xon),
    and the coalescing stops when fewer than 21 buffers are left, not 21 frames."""
    nic, pm, cpus, _, link, _ = make_nic(page_memory, rx_ring=128, mtu=9000, page_size=4096, sg=True)
    assert nic.sg and nic.xon == 21
    post(nic, pm, 70)
    _jumbo_messages(link, 5)
    # 70 buffers: 3 messages (63 buffers) in one pass; 7 left < 21.  Counted in frames (7 a message), the
    # loop would have taken a fourth message and 4 of its frames would wait in the FIFO.
    assert nic.receive() == 21 and len(link.msgs) == 2 and nic.fifo == 0 and nic.nposted == [7]
    assert nic.count("rx_sg_frames") == 21 and nic.count("tx_flow_control_xoff") == 0
    (_, _, _, d), = cpus.take("rx")
    assert pm.nfrags[d["page"]].tolist() == [2] * 21
