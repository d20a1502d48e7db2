"""Descriptor rings in shared memory between the processes of one host, as a NIC and its driver share
their rings: a message costs a copy into memory the peer maps, not a trip through sockets and threads.

Each ring has one producer and one consumer (CPU -> device for posts and transmits, device -> CPU for RX
and TX completions, CPU -> CPU for skbs freed elsewhere), like the kernel's per-queue rings.  Messages
are the emulator's usual envelopes (`emu.net.wire`), stored as ``[u32 length, u32 0, bytes, padding to 8]``;
a record that does not fit before the end of the buffer is preceded by a wrap marker.  The producer
publishes a record by storing the new tail after its bytes; the consumer frees it by storing the new
head.  Both are aligned 8-byte stores, and x86-64 keeps stores in order (the page pool's rings rely on
the same), so a consumer that sees a tail sees the bytes before it.

A consumer that has nothing to do sleeps in ``zmq_poll`` on its inbox socket and its doorbell
(`emu.net.doorbell`, whose token it writes into the ring's `bell` word), after storing in its `sleeping`
word how many waiting bytes are worth waking it for; a producer that finds the word set and at least
that much waiting after publishing rings the doorbell (`ring_bell`: one datagram; a consumer without a
doorbell gets a tiny ``bell`` message on its socket instead).  Normally that is `BELL_FILL` (interrupt
moderation); a consumer that is stuck until a message comes asks for less (a device whose RX queues
ran short of buffers asks for the posts it needs to resume).  A full ring, or a message larger than
half of it, goes over the socket instead, so the socket remains the fallback and back-pressure path,
and what anyone sends to the socket itself (a test, a foreign process) is still validated and counted
as before.  Raising the word and publishing are plain stores that the CPU may reorder with the
following load, so a wake-up can be missed; the consumer's poll timeout bounds that delay
(milliseconds), and nothing is lost.
"""

from __future__ import annotations

import numpy as np
import zmq

from emu.mem.shm import Segment
from emu.net import doorbell, protocol, wire

RING_BYTES = 1 << 18  # 256 KiB: a dozen of the largest descriptor messages (1024 descriptors)
_HDR_WORDS = 8  # head, tail, sleeping (0: awake, else the fill that rings the bell), bell, (reserved)
_HEAD, _TAIL, _SLEEPING, _BELL = 0, 1, 2, 3
_WRAP = 0xFFFFFFFF
BELL_MSG = wire.pack_msg(protocol.BELL, {})  # the bell on a socket, packed once
# Interrupt moderation: a sleeping consumer is woken at once only when this much waits for it;
# otherwise its poll timeout (IDLE_POLL_MS, like ethtool's rx-usecs) picks the messages up.  Measured on
# l2fwd: 16 KiB beats 8 KiB (-4 % pkt/s), 32 KiB (-2 %) and 64 KiB (-3 %).
BELL_FILL = 1 << 14
IDLE_POLL_MS = 1


def _align8(n: int) -> int:
    return (n + 7) & ~7


class MsgRing:
    """One single-producer single-consumer message ring in a shared-memory segment."""

    def __init__(self, seg: Segment) -> None:
        self.seg = seg
        # memoryviews, not numpy scalars: a header word is read or written several times per message,
        # and a memoryview index costs half as much.
        self._hdr = seg.array(np.int64, _HDR_WORDS, 0)
        self.hdr = memoryview(self._hdr)
        self.cap = seg.size - 8 * _HDR_WORDS
        self.data = seg.array(np.uint8, self.cap, 8 * _HDR_WORDS)
        self.words = memoryview(self.data.view(np.uint32))
        self.mv = memoryview(self.data)
        # Each side keeps its own position; the other side's is read from the header.
        self.head = self.hdr[_HEAD]
        self.tail = self.hdr[_TAIL]
        self.max_msg = self.cap // 2 - 8  # the largest message `put` can ever take

    @classmethod
    def create(cls, name: str, size: int = RING_BYTES) -> MsgRing:
        return cls(Segment.create(name, 8 * _HDR_WORDS + _align8(size)))

    @classmethod
    def attach(cls, name: str) -> MsgRing:
        return cls(Segment.attach(name))

    def close(self) -> None:
        for view in (self.mv, self.words, self.hdr):
            view.release()
        del self._hdr, self.data
        self.seg.close()

    def unlink(self) -> None:
        self.seg.unlink()

    # -- producer ---------------------------------------------------------------------------------

    def put(self, msg: bytes) -> bool:
        """Append one message; False when it does not fit now (the caller sends it another way)."""
        n = len(msg)
        need = 8 + _align8(n)
        cap = self.cap
        if need > cap // 2:
            return False
        tail = self.tail
        free = cap - (tail - self.hdr[_HEAD])
        off = tail % cap
        room = cap - off
        if need > room:  # wrap: skip the end of the buffer
            if free < room + need:
                return False
            self.words[off >> 2] = _WRAP
            tail += room
            off = 0
        elif free < need:
            return False
        self.words[off >> 2] = n
        self.mv[off + 8 : off + 8 + n] = msg
        tail += need
        self.tail = tail
        self.hdr[_TAIL] = tail  # publish
        return True

    def fill(self) -> int:
        """Bytes waiting for the consumer."""
        return self.tail - self.hdr[_HEAD]

    def wants_bell(self) -> bool:
        """The consumer sleeps and what waits for it now is worth waking it for."""
        at = self.hdr[_SLEEPING]
        return bool(at) and self.tail - self.hdr[_HEAD] >= at

    # -- consumer ---------------------------------------------------------------------------------

    def get(self) -> bytes | None:
        head = self.head
        if head == self.hdr[_TAIL]:
            return None
        cap = self.cap
        off = head % cap
        n = self.words[off >> 2]
        if n == _WRAP:
            head += cap - off
            off = 0
            n = self.words[0]
        msg = bytes(self.mv[off + 8 : off + 8 + n])
        head += 8 + _align8(n)
        self.head = head
        self.hdr[_HEAD] = head
        return msg

    def empty(self) -> bool:
        return self.head == self.hdr[_TAIL]

    def sleeping(self, bell_at: int) -> None:
        """Sleep until `bell_at` bytes wait (0: awake)."""
        self.hdr[_SLEEPING] = bell_at

    @property
    def bell_token(self) -> int:
        """The consumer's doorbell (`emu.net.doorbell`), 0 when it has none."""
        return self.hdr[_BELL]

    @bell_token.setter
    def bell_token(self, token: int) -> None:
        self.hdr[_BELL] = token


def ring_bell(ring: MsgRing, sock: zmq.Socket) -> None:
    """Wake the consumer of `ring`, whose socket is `sock`: through its doorbell when it has one, else
    with a bell message.  Never waits: a socket too full to take a bell is full of bells, and its
    consumer will look at its ring."""
    token = ring.hdr[_BELL]
    if token:
        doorbell.ring(token)
        return
    try:
        sock.send(BELL_MSG, zmq.NOBLOCK)
    except zmq.Again:
        pass


class Channel:
    """The sending side towards one peer: its ring when there is room, its socket otherwise."""

    def __init__(self, sock: zmq.Socket, ring: MsgRing | None) -> None:
        self.sock = sock
        self.ring = ring

    def send(self, msg: bytes) -> None:
        ring = self.ring
        if ring is not None and ring.put(msg):
            if ring.wants_bell():
                ring_bell(ring, self.sock)
            return
        self.sock.send(msg, copy=True)

    def close(self) -> None:
        self.sock.close(0)
        if self.ring is not None:
            self.ring.close()
            self.ring = None


_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: enum flags cost a Python call per `&`


def take(sock: zmq.Socket) -> bytes | None:
    """The next message waiting on `sock`, or None.  Asking ZMQ_EVENTS first is much cheaper than a
    non-blocking recv that raises zmq.Again: an exception object per empty look is a measurable share
    of a busy loop."""
    if not sock.getsockopt(_EVENTS) & _POLLIN:
        return None
    try:
        return sock.recv(zmq.NOBLOCK, copy=True)
    except zmq.Again:
        return None


class Inbox:
    """The receiving side: every ring towards this process, then its socket; `bell`, when given, is the
    doorbell the rings' producers ring (the process polls it with the socket)."""

    def __init__(self, sock: zmq.Socket, rings: list[MsgRing], bell: doorbell.Doorbell | None = None) -> None:
        self.sock = sock
        self.rings = rings
        for ring in rings:
            ring.bell_token = bell.token if bell is not None else 0
        self.poked = True  # the socket may hold something: look at once
        self._empty = 0

    def take(self) -> bytes | None:
        for ring in self.rings:
            msg = ring.get()
            if msg is not None:
                return msg
        # With rings the socket carries only bells, overflow and strangers: look at it after a wake-up
        # and every 64th empty look, not every time (ZMQ_EVENTS makes libzmq process its command
        # mailbox, a system call: it was a fifth of a busy device's time).
        self._empty += 1
        if not self.poked and self._empty & 63:
            return None
        self.poked = False
        return take(self.sock)

    def idle(self, bell_at: int = BELL_FILL) -> bool:
        """Announce sleep until `bell_at` bytes wait in a ring; False (and no sleep) when a ring filled
        meanwhile."""
        bell_at = max(1, bell_at)
        rings = self.rings
        for ring in rings:
            ring.sleeping(bell_at)
        for ring in rings:
            if not ring.empty():
                self.awake(False)
                return False
        return True

    def awake(self, poked: bool = True) -> None:
        """Back from sleep; `poked`: the poll said the socket has something."""
        for ring in self.rings:
            ring.sleeping(0)
        self.poked = poked

    def close(self) -> None:
        self.sock.close(0)
        for ring in self.rings:
            ring.close()
        self.rings = []
