"""Doorbells (`emu.net.doorbell`): a producer that fills a ring past the consumer's threshold wakes its poll
through the consumer's doorbell, not its socket; bells pile up into one wake-up; a bell to a consumer
that is gone, or to one whose queue is full, is dropped without an error; a process elsewhere rings
it by the token it finds in the ring."""

from __future__ import annotations

import multiprocessing

import zmq

from emu.net import doorbell, shmring
from emu.net.shmring import Channel, Inbox, MsgRing


def test_a_bell_wakes_a_poll_and_is_taken_by_the_wait() -> None:
    bell = doorbell.Doorbell()
    poller = zmq.Poller()
    poller.register(bell.fd, zmq.POLLIN)
    try:
        assert doorbell.wait(poller, 0, bell) == {}
        for _ in range(3):
            doorbell.ring(bell.token)
        assert bell.fd in doorbell.wait(poller, 5000, bell)
        assert doorbell.wait(poller, 0, bell) == {}  # the three bells were one wake-up, all taken
    finally:
        bell.close()


def test_bells_nobody_can_take_are_dropped_without_error() -> None:
    bell = doorbell.Doorbell()
    gone = doorbell.Doorbell()
    gone_token = gone.token
    gone.close()
    try:
        doorbell.ring(gone_token)  # ECONNREFUSED: its consumer went away
        for _ in range(10_000):  # far more than a datagram queue holds: EAGAIN, dropped
            doorbell.ring(bell.token)
        assert 0 < bell.clear() < 10_000
        assert bell.clear() == 0
    finally:
        bell.close()


def test_every_doorbell_has_its_own_token() -> None:
    bells = [doorbell.Doorbell() for _ in range(50)]
    try:
        assert len({b.token for b in bells}) == 50 and all(b.token > 0 for b in bells)
    finally:
        for b in bells:
            b.close()


def test_a_channel_rings_the_consumers_doorbell_instead_of_its_socket(run_prefix: str, tmp_path) -> None:
    ctx = zmq.Context()
    r = MsgRing.create(f"{run_prefix}-ring", 1 << 16)
    addr = f"ipc://{tmp_path}/inbox"
    pull = ctx.socket(zmq.PULL)
    pull.bind(addr)
    push = ctx.socket(zmq.PUSH)
    push.connect(addr)
    bell = doorbell.Doorbell()
    consumer = Inbox(pull, [MsgRing.attach(r.seg.name)], bell)
    ch = Channel(push, MsgRing.attach(r.seg.name))
    poller = zmq.Poller()
    poller.register(bell.fd, zmq.POLLIN)
    poller.register(pull, zmq.POLLIN)
    try:
        assert r.bell_token == bell.token
        assert consumer.idle()
        ch.send(bytes(1024))  # below BELL_FILL: no bell
        assert doorbell.wait(poller, 50, bell) == {}
        for _ in range(shmring.BELL_FILL // 1024):
            ch.send(bytes(1024))
        events = doorbell.wait(poller, 5000, bell)
        assert bell.fd in events and pull not in events  # the doorbell rang, the socket carried nothing
        consumer.awake(False)
        got = 0
        while consumer.take() is not None:
            got += 1
        assert got == shmring.BELL_FILL // 1024 + 1
    finally:
        consumer.close()
        ch.close()
        bell.close()
        r.unlink()
        r.close()
        ctx.term()


def _fill_and_ring(name: str, n: int) -> None:
    r = MsgRing.attach(name)
    r.put(bytes(n))
    doorbell.ring(r.bell_token)  # the token in the ring is all it needs
    r.close()


def test_a_producer_in_another_process_rings_by_the_token_in_the_ring(run_prefix: str) -> None:
    r = MsgRing.create(f"{run_prefix}-ring", 8192)
    bell = doorbell.Doorbell()
    r.bell_token = bell.token
    poller = zmq.Poller()
    poller.register(bell.fd, zmq.POLLIN)
    p = multiprocessing.get_context("spawn").Process(target=_fill_and_ring, args=(r.seg.name, 100))
    p.start()
    try:
        assert bell.fd in doorbell.wait(poller, 60_000, bell)
        assert r.get() == bytes(100)
        p.join(60)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
        bell.close()
        r.unlink()
        r.close()
