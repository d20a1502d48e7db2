"""The control channel between ``emu coordinator`` and the ``emu host`` agents of a multi-host run.

Only control crosses it, never packets or pages: registration, each host's part of the topology, the
addresses where devices listen for their links, the run's phases (start, quiesce, down, exit), and, a few
times a second, each host's counters, which double as its heartbeat.  The coordinator binds a ROUTER
socket; every host connects a DEALER socket, so hosts may start before the coordinator, and a host or a
coordinator that restarts is found again by zmq's reconnects.

A message is the emulator's usual envelope (`emu.net.wire`): ``[kind, version, header, blob]`` with a small
header and, where a message carries bulk data (counters, a report), a msgpack-encoded blob.  Anything
else (garbled, foreign, an unknown kind) raises `ControlError` naming what was wrong.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack

from emu.errors import BadInputError
from emu.net import wire

# host -> coordinator
HOST_KINDS = ("hello", "ready", "linked", "stats", "home", "final", "failed", "link_lost")
# coordinator -> host
COORD_KINDS = ("assign", "refuse", "peers", "start", "quiesce", "down", "exit", "peer_down", "ping", "abort",
               "bye")
MAX_PAYLOAD = 64 << 20  # a final report of a large host is a few MB at most
# How long a host waits for its cables' connections (`emu.net.link.Carrier`) before it gives up, naming
# them; the coordinator waits a little longer for its ``linked``, so that the host's reason is the one
# reported.  Generous: a peer's name may take a few of the resolver's 5 s timeouts to resolve in a
# container network, and zmq retries a connection that fails.
LINK_TIMEOUT = 90.0


class ControlError(BadInputError, ValueError):
    """A control message that is not one of ours."""


def pack(kind: str, header: dict[str, Any] | None = None, payload: Any = None) -> bytes:
    blob = b"" if payload is None else msgpack.packb(payload, use_bin_type=True)
    return wire.pack_msg(kind, header or {}, blob)


def unpack(msg: bytes, kinds: tuple[str, ...]) -> tuple[str, dict[str, Any], Any]:
    """``(kind, header, payload)``; ControlError says what is wrong with anything else."""
    try:
        kind, header, blob = wire.unpack_msg(msg, kinds, MAX_PAYLOAD)
    except wire.WireError as exc:
        raise ControlError(str(exc)) from None
    payload = None
    if blob:
        try:
            payload = msgpack.unpackb(blob, raw=False, strict_map_key=False, max_bin_len=MAX_PAYLOAD,
                                      max_str_len=MAX_PAYLOAD, max_array_len=1 << 20, max_map_len=1 << 20)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ControlError(f"{kind!r} message payload is not msgpack ({exc})") from None
    return kind, header, payload


def field(header: dict[str, Any], name: str, kind: type) -> Any:
    """A required header field of the given type, or ControlError naming it."""
    value = header.get(name)
    if type(value) is not kind:
        raise ControlError(f"header field {name!r} should be a {kind.__name__}, got {value!r}")
    return value


def write_status(path: str | None, word: str) -> None:
    """Replace a status file's contents atomically (a healthcheck may read it at any moment)."""
    if not path:
        return
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
    with open(tmp, "w") as f:
        f.write(word + "\n")
    os.replace(tmp, path)
