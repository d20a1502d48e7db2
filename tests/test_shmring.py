"""The shared-memory message rings between a host's processes: order, wrap-around, a full ring, the
socket fallback and doorbell, and a producer and consumer in different processes."""

from __future__ import annotations

import multiprocessing

import pytest
import zmq

from emu import shmring
from emu.shmring import BELL, Channel, Inbox, MsgRing


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


def test_channel_falls_back_to_the_socket_and_rings_the_bell(run_prefix: str, tmp_path) -> None:
    ctx = zmq.Context()
    r = MsgRing.create(f"{run_prefix}-ring", 1 << 16)
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"ipc://{tmp_path}/inbox")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"ipc://{tmp_path}/inbox")
    consumer = Inbox(pull, [MsgRing.attach(r.seg.name)])
    ch = Channel(push, MsgRing.attach(r.seg.name))
    try:
        ch.send(b"in the ring")
        assert not pull.poll(50)  # nothing on the socket: the consumer was awake
        assert consumer.take() == b"in the ring"
        assert consumer.idle()  # asleep now: a producer that fills the ring past BELL_FILL wakes it
        for _ in range(shmring.BELL_FILL // 1024 + 1):
            ch.send(bytes(1024))
        assert pull.poll(5000) and pull.recv() == BELL
        consumer.awake()
        big = bytes(r.cap)  # does not fit any ring: the socket carries it
        ch.send(big)
        got = []
        while len(got) < shmring.BELL_FILL // 1024 + 2:
            if (m := consumer.take()) is not None:
                if m != BELL:  # one bell per message sent while it slept past BELL_FILL
                    got.append(m)
            else:
                pull.poll(1000)
        assert got[-1] == big and all(m == bytes(1024) for m in got[:-1])
    finally:
        consumer.close()
        ch.close()
        pull.close(0)
        r.unlink()
        r.close()
        ctx.term()


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
