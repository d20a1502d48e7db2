"""Doorbells between the processes of one host: how a producer that has just filled a shared-memory ring
wakes the consumer sleeping on it, as a NIC raises an interrupt or a driver writes a doorbell register.

A consumer owns one `Doorbell`: a datagram socket in Linux's abstract Unix namespace (no file, gone with
the process), named by a random token that the consumer writes into the header of every ring it consumes
(`emu.net.shmring.MsgRing.bell_token`).  A producer rings it with one non-blocking ``sendto`` of one byte
(`ring`), which the kernel turns straight into the wake-up of the consumer's ``poll``.  The doorbell
first went over the consumer's zmq socket; that cost the sender's zmq I/O thread a wake-up and a write,
then the consumer's I/O thread a wake-up and a mailbox signal, three context switches in all: on l2fwd,
the I/O threads took about a tenth of the machine (`docs/benchmarks.md`).

A bell carries nothing: whatever arrives (a bell, or a stranger's datagram) only wakes the consumer,
which then looks at its rings, so a bell lost to a full socket queue (`EAGAIN`: it is full of bells) or a
consumer that has gone away (`ECONNREFUSED`) loses nothing.
"""

from __future__ import annotations

import errno
import os
import socket

import zmq

_NAME = b"\0pagepool-emu-bell-%016x"


def _socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


class Doorbell:
    """The consumer's side: a socket to poll (`fd`) and the token producers ring it by."""

    def __init__(self) -> None:
        self.sock = _socket()
        for _ in range(16):
            token = int.from_bytes(os.urandom(8), "little") >> 1 | 1  # > 0 and fits an int64 header word
            try:
                self.sock.bind(_NAME % token)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    self.sock.close()
                    raise
        else:  # pragma: no cover - 16 collisions of 63 random bits
            self.sock.close()
            raise OSError(errno.EADDRINUSE, "no free doorbell name")
        self.token = token
        self.fd = self.sock.fileno()  # what to register in a zmq.Poller (which reports fds by number)

    def clear(self) -> int:
        """Take every waiting bell (after a poll that said some wait); returns how many."""
        n = 0
        recv = self.sock.recv
        while True:
            try:
                recv(64)
            except BlockingIOError:
                return n
            n += 1

    def close(self) -> None:
        self.sock.close()


def wait(poller: zmq.Poller, timeout_ms: float, bell: Doorbell | None) -> dict:
    """Sleep in `poller` (which has `bell` registered) for at most `timeout_ms`; returns its events, with
    the bells that woke us already taken."""
    events = dict(poller.poll(timeout_ms))
    if bell is not None and bell.fd in events:
        bell.clear()
    return events


_sender: socket.socket | None = None
_names: dict[int, bytes] = {}


def ring(token: int) -> None:
    """Wake the consumer whose doorbell is `token`.  Never waits and never fails: see the module's
    docstring for why a bell that cannot be delivered may be dropped."""
    global _sender
    name = _names.get(token)
    if name is None:  # the first bell to this consumer: maybe this process's first bell of all
        name = _names[token] = _NAME % token
        if _sender is None:
            _sender = _socket()
    try:
        _sender.sendto(b"\1", name)  # type: ignore[union-attr]
    except (BlockingIOError, ConnectionRefusedError):
        pass
