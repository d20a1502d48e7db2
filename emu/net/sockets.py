"""The zmq sockets of the emulator's processes: one context per process, PUSH/PULL with small queues.

Every process (the coordinator, a host agent, each worker) creates its own zmq context after it starts:
libzmq's I/O threads do not survive a fork, so a context is never inherited.  Data sockets are PUSH
(connected, one per peer) into one bound PULL per receiver, with a high-water mark small enough that a
slow receiver pushes back on its senders after a few hundred messages instead of buffering without
bound.  CURVE, when a link between hosts uses it, is set up by the caller (`emu.net.security`) through
`setup`, which runs before the bind or connect as CURVE requires.
"""

from __future__ import annotations

from collections.abc import Callable

import zmq

# Messages queued per socket before a sender sees back-pressure.  Small on purpose: a batch is tens of
# packets, so a few hundred messages already buffer tens of thousands of packets in flight.
DATA_HWM = 256
LINK_HWM = 64
# A TCP connect that has not completed in this long is abandoned and retried (zmq's reconnect interval):
# a first SYN lost while a container network is still coming up would otherwise wait out the kernel's
# SYN back-off (1, 3, 7, 15 s), long past the start of a short run.
CONNECT_TIMEOUT_MS = 500

SocketSetup = Callable[[zmq.Socket], None] | None


def new_context() -> zmq.Context:
    """This process's zmq context: one I/O thread, and sockets that drop unsent messages when closed
    (a process that leaves has nobody left to deliver them to)."""
    ctx = zmq.Context(io_threads=1)
    ctx.setsockopt(zmq.LINGER, 0)
    return ctx


def pull(ctx: zmq.Context, addr: str, hwm: int = DATA_HWM, setup: SocketSetup = None) -> zmq.Socket:
    """A bound PULL socket; `setup` runs before the bind (CURVE must be configured by then)."""
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVHWM, hwm)
    if setup is not None:
        setup(s)
    s.bind(addr)
    return s


def push(ctx: zmq.Context, addr: str, hwm: int = DATA_HWM, setup: SocketSetup = None) -> zmq.Socket:
    """A connected PUSH socket; `setup` runs before the connect."""
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.IMMEDIATE, 0)
    s.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
    if setup is not None:
        setup(s)
    s.connect(addr)
    return s
