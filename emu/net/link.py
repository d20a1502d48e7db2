"""The sending end of an emulated wire: frames leave in batches, through the link's impairments, and wait
in a short backlog when the peer is not taking them.

Devices and traffic ports both put frames on links, so both use this.  A link carries frame bytes, never
page ids: the receiving end DMAs them into pages of its own host, which is what lets a link cross hosts
(zmq over TCP) as easily as processes.  Between two processes of one machine the frames go through a
shared-memory ring (`emu.net.shmring.MsgRing`, created by the coordinator, one per direction), which rings
the receiver's doorbell (`emu.net.doorbell`); a full ring is a link the peer is not taking from, as a full socket
queue is.  Frames travel as messages of at most `LINK_BATCH` frames and `LINK_BYTES` bytes, so one
message never asks more of a receiver than one RX burst, and always fits a ring.

Impairments (``delay``, ``jitter``, ``loss``, ``rate`` on the link in the topology) are applied here, by
the sender, to what it sends, as netem would on each end of a veth pair: lost frames are counted in the
sender's ``link_lost`` counter (a named drop in the run's accounting), and a delayed message waits in the
backlog until its departure time.  Without impairments nothing of this is on the path.

A cable to another host has a carrier (`Carrier`): it is up once zmq's handshake with the peer's link
ingress has succeeded (CURVE's too, when the cable uses it), not when the peer's address is handed over.
Between the two, zmq may still be resolving the peer's name (a lookup in a container network can take
the resolver's 5 s timeout), connecting, or retrying; the host agent reports its cables plugged in, and
the coordinator starts the traffic, only once every carrier is up.
"""

from __future__ import annotations

import collections
import struct
import time

import numpy as np
import zmq

from emu.net import wire
from emu.net.doorbell import Doorbell
from emu.net.netem import LinkShaper
from emu.net.packets import FrameBatch
from emu.net.protocol import LINK_BATCH
from emu.net.shmring import BELL_FILL, BELL_MSG, Inbox, MsgRing, ring_bell, take

# Bytes of frames per message (64-byte frames: 256 a message; 1500-byte frames: 43).
LINK_BYTES = 1 << 16


def msg_frames(longest: int) -> int:
    """How many frames of `longest` bytes one link message holds (`LINK_BATCH` frames, `LINK_BYTES` bytes,
    each frame with its 4-byte length: 256 of 64 bytes, 43 of 1518, 7 of 9018)."""
    return min(LINK_BATCH, max(1, LINK_BYTES // (longest + 4)))


# Messages waiting to leave before a sender counts as busy (pauses its generator, stops transmitting).
BACKLOG_MAX = 256
# The socket monitor's events that move a cable's carrier: the handshake with the peer done (up), the
# connection lost (down; zmq reconnects by itself, and the next handshake brings it up again).
CARRIER_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


class Carrier:
    """Whether a connecting link socket reaches its peer, from zmq's socket monitor: down until the
    handshake with the peer's ingress succeeds, down again while the connection is lost.

    Made by the socket's `setup`, before its ``connect``, so that no event can come before the monitor;
    the monitor is a PAIR socket over inproc, read without blocking by whoever owns the link socket."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.monitor = sock.get_monitor_socket(CARRIER_EVENTS)
        self.up = False

    def poll(self) -> bool:
        """Take the events that came since the last call; returns whether the carrier is up."""
        mon = self.monitor
        while mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = mon.recv_multipart(zmq.NOBLOCK)
            # A monitor message's first frame: the event (16 bits) and its value (32 bits).
            event = struct.unpack_from("=H", frames[0])[0]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.up = False
        return self.up

    def close(self) -> None:
        """Before the link socket closes."""
        if not self.sock.closed:
            self.sock.disable_monitor()
        self.monitor.close(0)


class LinkSender:
    """One link's transmit side: `sock` is None while the link has no peer (not cabled, or down); `ring`,
    when the peer runs on this machine, carries the frames and `sock` only the frames too large for it."""

    def __init__(self, sock: zmq.Socket | None, shaper: LinkShaper | None = None,
                 ring: MsgRing | None = None) -> None:
        self.sock = sock
        self.watch: Carrier | None = None  # the carrier of a cable to another host (None: not watched)
        self.ring = ring
        self.shaper = shaper if shaper is not None and shaper.active else None
        self.backlog: collections.deque[tuple[int, bytes, int]] = collections.deque()  # (due_ns, msg, frames)

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def connect(self, sock: zmq.Socket, carrier: Carrier | None = None) -> None:
        """The peer's address became known (a link between hosts is cabled after both ends are up);
        `carrier`, the socket's, says when it reaches the peer (without one it counts as up at once)."""
        self._close_socket()
        self.sock = sock
        self.watch = carrier

    def _close_socket(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def carrier(self) -> bool:
        """The link reaches its peer: connected, and its handshake done when the carrier is watched."""
        if self.sock is None:
            return False
        return self.watch is None or self.watch.poll()

    def busy(self) -> bool:
        """Too much waits to leave: the sender should stop producing until the peer takes more."""
        return len(self.backlog) >= BACKLOG_MAX

    def blocked(self) -> bool:
        """A message is due but the peer's queue is full (it paused the link)."""
        if not self.backlog:
            return False
        due = self.backlog[0][0]
        return not due or due <= time.monotonic_ns()

    def send(self, frames: FrameBatch) -> int:
        """Put a batch on the wire (or in the backlog); returns how many frames the link lost."""
        n = len(frames)
        lost = 0
        shaper = self.shaper
        if shaper is not None:
            mask = shaper.lose(n)
            if mask is not None and np.logical_or.reduce(mask):
                keep = np.flatnonzero(~mask)
                lost = n - len(keep)
                frames = FrameBatch(frames.data, frames.offsets[keep], frames.lengths[keep]).compact()
                n = len(keep)
        now = time.monotonic_ns() if shaper is not None else 0
        longest = frames.stride or (int(np.maximum.reduce(frames.lengths)) if n else 0)
        step = msg_frames(longest)
        for s in range(0, n, step):
            e = min(n, s + step)
            part = frames if (s, e) == (0, n) else frames.slice(s, e)
            due = shaper.departure(int(np.add.reduce(part.lengths)), now) if shaper is not None else 0
            self.backlog.append((due, wire.pack_frames(part), e - s))
        self.flush()
        return lost

    def flush(self) -> None:
        """Send what is due, until the peer's queue is full."""
        sock = self.sock
        if sock is None:
            return
        backlog = self.backlog
        ring = self.ring
        now = time.monotonic_ns() if self.shaper is not None else 0
        while backlog:
            due, msg, _ = backlog[0]
            if due > now:
                return
            # Messages are cut to fit a ring (LINK_BYTES); the socket path is for cables without one.
            if ring is not None and len(msg) <= ring.max_msg:
                if not ring.put(msg):
                    return  # the peer is not taking frames (paused): wait, as for a full socket queue
                if ring.wants_bell():
                    ring_bell(ring, sock)
            else:
                try:
                    sock.send(msg, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
            backlog.popleft()

    def next_due_ms(self) -> int | None:
        """Milliseconds until the backlog's head may leave (None: nothing waits; 0: now or blocked)."""
        if not self.backlog:
            return None
        due = self.backlog[0][0]
        if not due:
            return 0
        return max(0, (due - time.monotonic_ns()) // 1_000_000)

    def pending_frames(self) -> int:
        return sum(n for _, _, n in self.backlog)

    def cut(self) -> int:
        """Carrier lost: close the socket and drop the backlog; returns the frames dropped."""
        dropped = self.pending_frames()
        self.backlog.clear()
        self.close()
        return dropped

    def close(self) -> None:
        self._close_socket()
        if self.ring is not None:
            self.ring.close()
            self.ring = None


class LinkReceiver:
    """One link's receive side: the peer's ring when it runs on this machine, then the link socket
    (strangers, peers on other hosts, and the bells of a receiver without a doorbell); `bell` is the
    receiving process's doorbell."""

    def __init__(self, sock: zmq.Socket, ring: MsgRing | None = None, bell: Doorbell | None = None) -> None:
        self.sock = sock
        self.inbox = Inbox(sock, [ring], bell) if ring is not None else None

    def take(self) -> bytes | None:
        """The next message on the link, or None; doorbells are not messages."""
        inbox = self.inbox
        if inbox is None:
            return take(self.sock)
        while True:
            msg = inbox.take()
            if msg != BELL_MSG:
                return msg

    def idle(self, bell_at: int = BELL_FILL) -> bool:
        """About to sleep: have the peer ring once `bell_at` bytes wait; False when frames came meanwhile."""
        return self.inbox is None or self.inbox.idle(bell_at)

    def awake(self, poked: bool) -> None:
        if self.inbox is not None:
            self.inbox.awake(poked)

    def close(self) -> None:
        if self.inbox is not None:
            self.inbox.close()  # its socket too
        else:
            self.sock.close(0)
