"""The shared-memory message rings between a host's processes: order, wrap-around, a full ring, the
socket fallback and doorbell thresholds, a producer and consumer in different processes, and a link
cable through a ring (order, back-pressure, bells and strangers on its socket)."""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Iterator

import pytest
import zmq

from emu.net import shmring, wire
from emu.net.link import LINK_BYTES, LinkReceiver, LinkSender
from emu.net.packets import FrameBatch
from emu.net.shmring import BELL_MSG, Channel, Inbox, MsgRing


@pytest.fixture
def ring(run_prefix: str):
    r = MsgRing.create(f"{run_prefix}-ring", 4096)
    yield r
    r.unlink()
    r.close()


def test_messages_come_out_in_order_across_wrap_arounds(ring: MsgRing) -> None:
    sent, got = [], []
    for i in range(2000):
        msg = bytes([i % 251]) * (1 + (i * 37) % 900)
        while not ring.put(msg):  # full: the consumer catches up
            got.append(ring.get())
        sent.append(msg)
        if i % 3 == 0:
            got.append(ring.get())
    while (m := ring.get()) is not None:
        got.append(m)
    assert got == sent and ring.empty()


def test_full_ring_and_oversize_messages_are_refused(ring: MsgRing) -> None:
    assert not ring.put(bytes(ring.cap // 2))  # larger than half the ring: never stored
    n = 0
    while ring.put(bytes(500)):
        n += 1
    assert n == ring.cap // 512 and ring.fill() == n * 512
    assert ring.get() == bytes(500) and ring.put(bytes(500))


@contextlib.contextmanager
def ring_and_sockets(run_prefix: str, tmp_path, size: int) -> Iterator[tuple]:
    """What a producer and a consumer on one host share: a ring of `size` bytes, and a PUSH socket
    connected to the consumer's bound PULL socket.  The test closes the sockets (its wrappers do); the
    ring and the context go at exit."""
    ctx = zmq.Context()
    r = MsgRing.create(f"{run_prefix}-ring", size)
    addr = f"ipc://{tmp_path}/inbox"
    pull = ctx.socket(zmq.PULL)
    pull.bind(addr)
    push = ctx.socket(zmq.PUSH)
    push.connect(addr)
    try:
        yield ctx, r, pull, push, addr
    finally:
        r.unlink()
        r.close()
        ctx.term()


def test_channel_falls_back_to_the_socket_and_rings_the_bell(run_prefix: str, tmp_path) -> None:
    with ring_and_sockets(run_prefix, tmp_path, 1 << 16) as (_, r, pull, push, _):
        consumer = Inbox(pull, [MsgRing.attach(r.seg.name)])
        ch = Channel(push, MsgRing.attach(r.seg.name))
        try:
            _channel_and_bell(r, pull, consumer, ch)
        finally:
            consumer.close()
            ch.close()


def _channel_and_bell(r: MsgRing, pull: zmq.Socket, consumer: Inbox, ch: Channel) -> None:
    ch.send(b"in the ring")
    assert not pull.poll(50)  # nothing on the socket: the consumer was awake
    assert consumer.take() == b"in the ring"
    assert consumer.idle()  # asleep now: a producer that fills the ring past BELL_FILL wakes it
    for _ in range(shmring.BELL_FILL // 1024 + 1):
        ch.send(bytes(1024))
    assert pull.poll(5000) and pull.recv() == BELL_MSG
    consumer.awake()
    big = bytes(r.cap)  # does not fit any ring: the socket carries it
    ch.send(big)
    got = []
    while len(got) < shmring.BELL_FILL // 1024 + 2:
        if (m := consumer.take()) is not None:
            if m != BELL_MSG:  # one bell per message sent while it slept past BELL_FILL
                got.append(m)
        else:
            pull.poll(1000)
    assert got[-1] == big and all(m == bytes(1024) for m in got[:-1])


def _produce(name: str, count: int) -> None:
    r = MsgRing.attach(name)
    for i in range(count):
        msg = i.to_bytes(4, "little") * (1 + i % 200)
        while not r.put(msg):
            pass
    r.close()


def test_producer_and_consumer_in_different_processes(run_prefix: str) -> None:
    r = MsgRing.create(f"{run_prefix}-ring", 8192)
    p = multiprocessing.get_context("spawn").Process(target=_produce, args=(r.seg.name, 20000))
    p.start()
    try:
        for i in range(20000):
            while (m := r.get()) is None:
                assert p.exitcode in (None, 0)
            assert m == i.to_bytes(4, "little") * (1 + i % 200)
        p.join(60)
        assert p.exitcode == 0 and r.empty()
    finally:
        if p.is_alive():
            p.kill()
        r.unlink()
        r.close()


def test_a_sleeping_consumer_names_the_fill_that_wakes_it(ring: MsgRing) -> None:
    assert not ring.wants_bell()  # awake: producers never ring
    ring.sleeping(100)
    ring.put(bytes(50))
    assert not ring.wants_bell()  # 64 bytes wait, 100 asked for
    ring.put(bytes(50))
    assert ring.wants_bell()
    ring.sleeping(0)
    assert not ring.wants_bell()


def test_link_frames_go_through_the_ring_in_order_and_a_full_ring_holds_them_back(run_prefix: str,
                                                                                   tmp_path) -> None:
    """A cable between two local processes: frames through the ring, bells and strangers on the socket,
    a full ring is back-pressure (the sender keeps its backlog, nothing is lost or reordered)."""
    with ring_and_sockets(run_prefix, tmp_path, 1 << 18) as (ctx, r, pull, push, addr):
        rx = LinkReceiver(pull, MsgRing.attach(r.seg.name))
        tx = LinkSender(push, None, MsgRing.attach(r.seg.name))
        stranger = ctx.socket(zmq.PUSH)
        stranger.connect(addr)
        try:
            _link_through_ring(pull, rx, tx, stranger)
        finally:
            stranger.close(0)
            rx.close()
            tx.close()


def _link_through_ring(pull: zmq.Socket, rx: LinkReceiver, tx: LinkSender, stranger: zmq.Socket) -> None:
    frames = [bytes([k % 256]) * (60 + k % 1400) for k in range(1400)]  # 1 MB
    assert rx.idle()  # nothing waits: asleep until BELL_FILL bytes do
    tx.send(FrameBatch.from_frames(frames[:10]))
    assert not pull.poll(50)  # 1 KiB: below the fill worth a doorbell
    tx.send(FrameBatch.from_frames(frames[10:]))
    assert pull.poll(5000)  # now the doorbell
    assert tx.backlog and tx.blocked()  # the 256 KiB ring filled up: the rest waits in the sender
    stranger.send(b"not a link message")
    rx.awake(True)
    got, other = [], []
    deadline = 200
    while len(got) < len(frames) and deadline:
        msg = rx.take()
        if msg is None:
            tx.flush()
            deadline -= 1
            pull.poll(10)
            continue
        try:
            batch = wire.unpack_frames(msg)
        except wire.WireError:
            other.append(msg)
            continue
        assert len(msg) <= LINK_BYTES + 4 * len(batch) + 64  # split by bytes as well as frames
        got += [bytes(batch.frame(k)) for k in range(len(batch))]
    assert got == frames and not tx.backlog
    # With a ring, the socket is looked at after a wake-up and every 64th empty look.
    deadline = time.monotonic() + 30
    while not other and time.monotonic() < deadline:
        if (m := rx.take()) is not None:
            other.append(m)
        elif pull.poll(10):
            rx.awake(True)
    assert other == [b"not a link message"]  # the bells were not messages
    assert rx.take() is None
    tx.send(FrameBatch.from_frames(frames[:5]))
    assert tx.cut() == 0 and tx.ring is None and not tx.connected
