"""A cable's carrier (`emu.net.link.Carrier`) over real zmq sockets on loopback: down until zmq's handshake
with the peer's link ingress succeeds (CURVE's, here), down for a client the peer refuses, down again when
the peer goes away.  Each test binds its own ports (the kernel picks them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import zmq

from emu.net import security
from emu.net.link import Carrier, LinkSender
from emu.net.sockets import LINK_HWM, new_context, pull, push

DEADLINE = 30.0


def wait(what: str, cond: Callable[[], bool]) -> None:
    end = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < end, f"no {what} within {DEADLINE} s"
        time.sleep(0.01)


def watched_push(ctx: zmq.Context, addr: str, keys: security.CurveKeys | None) -> LinkSender:
    """A link's sending end as the device makes a cable's: CURVE (when `keys`), then the carrier's
    monitor, then the connect."""
    made: list[Carrier] = []

    def setup(s: zmq.Socket) -> None:
        security.make_client(s, keys)
        made.append(Carrier(s))

    tx = LinkSender(None)
    tx.connect(push(ctx, addr, hwm=LINK_HWM, setup=setup), made[0])
    return tx


def test_carrier_is_up_after_the_handshake_and_down_when_refused_or_gone(tmp_path: Path) -> None:
    security.generate_keys(str(tmp_path / "keys"))
    keys = security.load_keys(str(tmp_path / "keys"))
    ctx = new_context()
    ingress = pull(ctx, "tcp://127.0.0.1:*", hwm=LINK_HWM, setup=lambda s: security.make_server(s, keys))
    refusals = ingress.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                          | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    addr = ingress.getsockopt_string(zmq.LAST_ENDPOINT)
    good = watched_push(ctx, addr, keys)
    stranger = watched_push(ctx, addr, None)  # no CURVE: the ingress refuses its handshake
    try:
        assert not LinkSender(None).carrier()  # not cabled
        wait("handshake with the peer", good.carrier)
        assert good.carrier()  # stays up while connected
        wait("refused handshake at the ingress", lambda: bool(refusals.poll(10)))
        assert not stranger.carrier()
        ingress.disable_monitor()
        refusals.close(0)
        ingress.close(0)  # the peer goes away: its connection is lost
        wait("carrier lost", lambda: not good.carrier())
    finally:
        good.close()
        stranger.close()
        if not ingress.closed:
            ingress.close(0)
        if not refusals.closed:
            refusals.close(0)
        ctx.term()
