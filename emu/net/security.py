"""CURVE encryption and authentication for the sockets that cross machines, and counting of refused peers.

Hosts of one emulated cluster may run on different machines or containers: each connects a DEALER to the
coordinator's ROUTER (the control channel) and a PUSH to every peer device's PULL (the inter-host links).
Over a real network those sockets must neither be readable by nor accept frames from anyone else, so when
a key directory is configured every one of them uses zmq's CURVE mechanism (Curve25519 key exchange, then
authenticated encryption of every frame), and a peer that fails to authenticate is refused *and counted*:
a refused peer is otherwise invisible (zmq just drops the connection and the peer keeps retrying), and an
operator who mistyped a key path deserves a number and a reason in the report, not a silent hang.

Key model: one key set per emulated cluster, made by ``emu keys DIR`` (`generate_keys`) and copied to every
machine.  ``DIR/emu.key`` holds the cluster public key, ``DIR/emu.key_secret`` (mode 0600) the secret key,
both in zmq's certificate format.  Every node uses that pair both as its CURVE server key (`make_server`,
before ``bind``) and as its client key (`make_client`, before ``connect``).  Optional
``DIR/authorized/*.key`` files name further client public keys that are allowed, so an operator can give a
node a key pair of its own; the cluster public key is always allowed.  `load_keys` reads and checks all of
it, raising `KeyFileError` naming the file and what is wrong.

Who may connect is decided by a `Gatekeeper`, one per ``zmq.Context``: a ZAP handler (ZeroMQ RFC 27,
implemented here on a ROUTER bound at ``inproc://zeromq.zap.01``) in a daemon thread that accepts the
CURVE mechanism with a client key in `CurveKeys.allowed` and refuses everything else.  Peers that never
get as far as ZAP (a plaintext client, a client that targets the wrong server key, garbage bytes) are seen
through a socket monitor on each server socket passed to `Gatekeeper.watch`.  Each refused connection
attempt is counted once: a ZAP denial is counted when it is sent (its monitor event
``EVENT_HANDSHAKE_FAILED_AUTH`` is then ignored), ``EVENT_HANDSHAKE_FAILED_NO_DETAIL`` / ``_PROTOCOL`` are
counted as they arrive, and a connection that disconnects during its handshake without any such event
(libzmq rejects pre-ZMTP-3 greetings, which is what most garbage looks like, silently) is counted on its
``EVENT_DISCONNECTED``.  zmq reconnects by itself, so a peer that stays refused is counted once per attempt
(every reconnect interval).

Rules of use:

* start the Gatekeeper *before* binding server sockets: libzmq consults ZAP only if a handler is bound when
  a handshake starts, and a CURVE server without one accepts any client that knows the (public) server key;
* only server sockets' failures are seen, and only those of sockets passed to `Gatekeeper.watch` (ZAP
  denials are counted for every CURVE server socket of the context);
* call `Gatekeeper.stop` before ``ctx.term()``.

There is no module-level state: several Gatekeepers on different contexts coexist in one process.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any

import zmq
from zmq.utils import z85

from emu.errors import BadInputError

__all__ = [
    "PUBLIC_NAME",
    "SECRET_NAME",
    "ZAP_DOMAIN",
    "CurveKeys",
    "Gatekeeper",
    "KeyFileError",
    "generate_keys",
    "load_keys",
    "make_client",
    "make_server",
]

def _log() -> Any:
    """This module's logger; `logging` is imported only when there is something to say (it is half a
    megabyte of every device's memory otherwise)."""
    import logging

    return logging.getLogger(__name__)

KEY_NAME = "emu"
PUBLIC_NAME = f"{KEY_NAME}.key"
SECRET_NAME = f"{KEY_NAME}.key_secret"
AUTHORIZED_DIR = "authorized"
ZAP_DOMAIN = b"emu"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27; one handler per context


class KeyFileError(BadInputError, ValueError):
    """A key directory or key file is missing, unreadable or garbled; the message names the file."""


@dataclass(frozen=True)
class CurveKeys:
    """The cluster's CURVE key pair (z85, 40 bytes each) and the client public keys allowed to connect."""

    public: bytes
    secret: bytes = field(repr=False)  # never in a log line or a report
    allowed: frozenset[bytes]  # z85 public keys allowed as clients; always includes `public`
    directory: str


# -- key files ------------------------------------------------------------------------------------------


def generate_keys(directory: str, force: bool = False) -> tuple[str, str]:
    """Create the cluster key pair ``DIR/emu.key`` and ``DIR/emu.key_secret`` (mode 0600).

    Creates DIR if needed.  Refuses with `FileExistsError` to overwrite an existing key file unless
    ``force``: every machine of the cluster holds a copy, and a new pair locks them all out.  The pair is
    written into a private temporary directory first and moved into place, so the secret is never
    readable by others, not even for a moment, and a crash leaves no half-written pair.
    Returns ``(public_path, secret_path)``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = d / PUBLIC_NAME, d / SECRET_NAME
    if not force:
        for p in (public_path, secret_path):
            if p.exists():
                raise FileExistsError(
                    errno.EEXIST,
                    f"{p} already exists; every machine of the cluster uses this key set, so it is not "
                    f"overwritten (`emu keys --force` replaces it, then copy {d} to every machine again)",
                    str(p),
                )
    import tempfile

    tmp = tempfile.mkdtemp(prefix=".emu-keys-", dir=d)  # mode 0700
    try:
        import zmq.auth  # only `emu keys` needs it; workers stay lighter without (it pulls in asyncio)

        tmp_public, tmp_secret = zmq.auth.create_certificates(tmp, KEY_NAME)
        os.chmod(tmp_secret, 0o600)
        os.chmod(tmp_public, 0o644)
        os.replace(tmp_secret, secret_path)
        os.replace(tmp_public, public_path)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(public_path), str(secret_path)


def _check_z85_key(value: bytes | None, path: Path, what: str) -> bytes:
    if not value:
        raise KeyFileError(f"{path}: no {what} found (expected a line `{what} = \"<40 z85 characters>\"`)")
    try:
        raw = z85.decode(value)
    except (KeyError, ValueError, IndexError):
        raw = b""
    if len(value) != 40 or len(raw) != 32:
        raise KeyFileError(f"{path}: {what} is not a CURVE key (40 z85 characters): {value[:60]!r}")
    return bytes(value)


def _read_certificate(path: Path, want_secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        hint = f" (create the key set with `emu keys {path.parent}`)" if path.name in (PUBLIC_NAME, SECRET_NAME) else ""
        raise KeyFileError(f"{path}: key file does not exist{hint}")
    try:
        import zmq.auth

        public, secret = zmq.auth.load_certificate(path)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read key file: {e.strerror or e}") from e
    except ValueError as e:
        raise KeyFileError(f"{path}: not a zmq certificate: no public-key line found") from e
    public = _check_z85_key(public, path, "public-key")
    if want_secret:
        secret = _check_z85_key(secret, path, "secret-key")
    return public, secret


def load_keys(directory: str | None) -> CurveKeys | None:
    """Read and check a key directory made by `generate_keys`; ``None`` (no keys configured) gives ``None``.

    Checks that both files exist and hold well-formed keys, that the secret key really belongs to the
    public key in ``emu.key``, and that every ``authorized/*.key`` holds a public key; anything wrong
    raises `KeyFileError` naming the file.
    """
    if directory is None:
        return None
    d = Path(directory)
    if not d.is_dir():
        raise KeyFileError(f"{d}: key directory does not exist (create one with `emu keys {d}`)")
    public, _ = _read_certificate(d / PUBLIC_NAME, want_secret=False)
    secret_public, secret = _read_certificate(d / SECRET_NAME, want_secret=True)
    assert secret is not None
    try:
        derived = zmq.curve_public(secret)
    except zmq.ZMQError as e:
        raise KeyFileError(f"{d / SECRET_NAME}: secret-key is not usable: {e}") from e
    if derived != secret_public:
        raise KeyFileError(f"{d / SECRET_NAME}: secret-key does not match the public-key in the same file")
    if derived != public:
        raise KeyFileError(
            f"{d / SECRET_NAME}: secret-key does not belong to the public key in {d / PUBLIC_NAME} "
            "(files from two different key sets?)"
        )
    allowed = {public}
    auth_dir = d / AUTHORIZED_DIR
    if auth_dir.is_dir():
        for path in sorted(auth_dir.glob("*.key")):
            client_public, _ = _read_certificate(path, want_secret=False)
            allowed.add(client_public)
    return CurveKeys(public=public, secret=secret, allowed=frozenset(allowed), directory=str(d))


# -- sockets --------------------------------------------------------------------------------------------


def make_server(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    """Make ``sock`` a CURVE server with the cluster key (no-op for ``None``).  Call before ``bind``."""
    if keys is None:
        return
    sock.curve_server = True
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.zap_domain = ZAP_DOMAIN


def make_client(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    """Make ``sock`` a CURVE client of a cluster server, authenticating with the cluster key pair
    (no-op for ``None``).  Call before ``connect``."""
    if keys is None:
        return
    sock.curve_serverkey = keys.public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


# -- the gatekeeper -------------------------------------------------------------------------------------

_PROTOCOL_ERRORS = {
    getattr(zmq, name): name.removeprefix("PROTOCOL_ERROR_")
    for name in dir(zmq)
    if name.startswith("PROTOCOL_ERROR_") and isinstance(getattr(zmq, name), int)
}
_MONITOR_EVENTS = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_MONITOR_STOPPED
)
_TRACKED_LIMIT = 4096  # bound on remembered connections per socket (monitor events can be lost at HWM)


def _z85_text(key: bytes) -> str:
    return key.decode("ascii", "replace")


def _protocol_reason(code: int, endpoint: str) -> str:
    if code == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return f"peer without CURVE (plaintext or another mechanism) refused on {endpoint}"
    if code == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return (
            f"CURVE handshake failed on {endpoint}: the peer's HELLO does not decrypt "
            "(it targets the wrong server key, or its bytes are garbled)"
        )
    name = _PROTOCOL_ERRORS.get(code, f"{code:#x}")
    return f"ZMTP protocol error {name} from a peer on {endpoint}"


class _Watched:
    """One watched server socket: its monitor PAIR and what is known about its connections.

    libzmq's monitor events carry a connection's fd on ACCEPTED and DISCONNECTED, but none on
    HANDSHAKE_*; so a handshake outcome is matched to the oldest connection still handshaking, and a
    failure event leaves a credit that the failed connection's DISCONNECTED consumes.  Connections that
    disconnect while still handshaking with no credit were refused silently.  The totals are exact as long
    as no monitor event is lost (the monitor queue holds 1000); only which connection a silent refusal is
    attributed to (and so when it is counted) can be off when handshakes overlap.
    """

    def __init__(self, monitor: zmq.Socket, addr: str) -> None:
        self.monitor = monitor
        self.addr = addr
        self.endpoint = "?"
        self.handshaking: OrderedDict[int, None] = OrderedDict()
        self.resolved: OrderedDict[int, None] = OrderedDict()
        self.failure_credit = 0

    @staticmethod
    def _remember(d: OrderedDict[int, None], fd: int) -> None:
        d[fd] = None
        if len(d) > _TRACKED_LIMIT:
            d.popitem(last=False)


class Gatekeeper:
    """ZAP handler for one zmq.Context (runs in a daemon thread) + handshake-failure counting.

    ``with Gatekeeper(ctx, keys) as gk:`` starts and stops it.  `refused` and `last_refusal` may be read
    from any thread; `watch` must be called from the thread that owns the socket.
    """

    POLL_MS = 100  # idle wake-up period: how promptly stop() and newly watched sockets are noticed

    def __init__(self, ctx: zmq.Context, keys: CurveKeys) -> None:
        self.ctx = ctx
        self.keys = keys
        self._refused = 0  # written only by the gatekeeper thread
        self._last_refusal: str | None = None
        self._zap: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stopped = False
        self._new: SimpleQueue[_Watched] = SimpleQueue()
        self._watched_sockets: set[int] = set()
        self._seq = itertools.count()
        self._lock = threading.Lock()  # start/watch/stop against each other

    # -- what callers read --

    @property
    def refused(self) -> int:
        """Total connection attempts refused (wrong client key, no CURVE, wrong server key, garbage)."""
        return self._refused

    @property
    def last_refusal(self) -> str | None:
        """What was refused last and, where known, from which address."""
        return self._last_refusal

    # -- life cycle --

    def start(self) -> Gatekeeper:
        """Bind the ZAP endpoint (raises `zmq.ZMQError` if the context already has a handler) and start
        the thread.  Returns self."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("Gatekeeper was stopped; make a new one")
            if self._thread is not None:
                return self
            zap = self.ctx.socket(zmq.ROUTER)
            zap.linger = 0
            try:
                zap.bind(ZAP_ENDPOINT)
            except zmq.ZMQError as e:
                zap.close()
                if e.errno == zmq.EADDRINUSE:
                    msg = f"this context already has a ZAP handler at {ZAP_ENDPOINT} (one Gatekeeper per context)"
                    raise zmq.ZMQError(e.errno, msg) from e
                raise
            self._zap = zap
            # The socket is handed to the thread; Thread.start() is the memory barrier zmq asks for.
            self._thread = threading.Thread(target=self._run, name="emu-gatekeeper", daemon=True)
            self._thread.start()
            return self

    def watch(self, sock: zmq.Socket) -> None:
        """Count handshake failures of this server socket (one of this Gatekeeper's context), through a
        socket monitor.  Call from the thread that owns ``sock``, preferably before it binds."""
        if sock.context is not self.ctx and sock.context.underlying != self.ctx.underlying:
            raise ValueError("watch() needs a socket of the Gatekeeper's own context")
        with self._lock:
            if self._stopped:
                raise RuntimeError("Gatekeeper was stopped")
            if sock.underlying in self._watched_sockets:
                return
            addr = f"inproc://emu-gatekeeper-{id(self):x}-{next(self._seq)}"
            sock.monitor(addr, _MONITOR_EVENTS)
            mon = self.ctx.socket(zmq.PAIR)
            mon.linger = 0
            mon.connect(addr)  # inproc to an already bound endpoint: connected on return, no event is lost
            self._watched_sockets.add(sock.underlying)
            self._new.put(_Watched(mon, addr))  # adopted by the thread within POLL_MS; events queue meanwhile

    def stop(self) -> None:
        """Stop the thread and close its sockets.  Idempotent; call before ``ctx.term()``."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread = self._thread
        self._stop.set()
        if thread is not None:
            thread.join()
        else:  # never started: nothing was handed over, close what watch() made here
            self._close_queued()

    def __enter__(self) -> Gatekeeper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _close_queued(self) -> list[_Watched]:
        left = []
        while True:
            try:
                w = self._new.get_nowait()
            except Empty:
                return left
            w.monitor.close(linger=0)
            left.append(w)

    # -- the thread --

    def _refuse(self, reason: str) -> None:
        self._last_refusal = reason
        self._refused += 1

    def _run(self) -> None:
        zap = self._zap
        assert zap is not None
        poller = zmq.Poller()
        poller.register(zap, zmq.POLLIN)
        watched: dict[zmq.Socket, _Watched] = {}
        try:
            while not self._stop.is_set():
                try:
                    while True:
                        w = self._new.get_nowait()
                        watched[w.monitor] = w
                        poller.register(w.monitor, zmq.POLLIN)
                except Empty:
                    pass
                try:
                    ready = dict(poller.poll(self.POLL_MS))
                except zmq.ZMQError as e:
                    if e.errno == zmq.ETERM:  # someone terminated the context under us: let term() finish
                        return
                    raise
                try:
                    if zap in ready:
                        self._serve_zap(zap)
                    for sock in [s for s in ready if s is not zap]:
                        w = watched[sock]
                        if not self._drain_monitor(w):
                            poller.unregister(sock)
                            del watched[sock]
                            sock.close(linger=0)
                except zmq.ContextTerminated:
                    return
                except Exception:  # never let one bad message end the thread: unanswered ZAP hangs handshakes
                    _log().exception("emu gatekeeper: error while handling a message (ignored)")
                    self._stop.wait(self.POLL_MS / 1000)
        except Exception:
            _log().exception("emu gatekeeper: thread failed")
        finally:
            for sock in watched:
                sock.close(linger=0)
            zap.close(linger=0)
            self._close_queued()

    # ZAP (RFC 27): request = version, request id, domain, address, identity, mechanism, credentials...;
    # reply = version, request id, status code, status text, user id, metadata.

    def _serve_zap(self, zap: zmq.Socket) -> None:
        for _ in range(256):  # bounded so monitors get their turn under a flood
            try:
                frames = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                split = frames.index(b"")
            except ValueError:
                _log().warning("emu gatekeeper: dropped a ZAP request without an envelope delimiter")
                continue
            envelope, request = frames[: split + 1], frames[split + 1 :]
            if len(request) < 2:
                _log().warning("emu gatekeeper: dropped a ZAP request of %d frames", len(request))
                continue
            status, text, user = self._authenticate(request)
            zap.send_multipart([*envelope, b"1.0", request[1], status, text, user, b""])

    def _authenticate(self, request: list[bytes]) -> tuple[bytes, bytes, bytes]:
        if request[0] != b"1.0" or len(request) < 6:
            self._refuse(f"malformed ZAP request (version {request[0][:16]!r}, {len(request)} frames) refused")
            return b"400", b"malformed ZAP request", b""
        _version, _rid, domain, address, _identity, mechanism, *credentials = request
        peer = address.decode("utf-8", "replace") or "an unknown address"
        if mechanism != b"CURVE":
            self._refuse(f"{mechanism.decode('utf-8', 'replace') or '?'} peer from {peer} refused: CURVE required")
            return b"400", b"CURVE required", b""
        if len(credentials) != 1 or len(credentials[0]) != 32:
            self._refuse(f"CURVE peer from {peer} refused: malformed client key")
            return b"400", b"malformed client key", b""
        client_key = z85.encode(credentials[0])
        if client_key not in self.keys.allowed:
            self._refuse(
                f"CURVE client key {_z85_text(client_key)} from {peer} refused: not the cluster key and not in "
                f"{os.path.join(self.keys.directory, AUTHORIZED_DIR)}/"
                f" (ZAP domain {domain.decode('utf-8', 'replace')!r})"
            )
            return b"400", b"client key not authorized", b""
        return b"200", b"OK", b"cluster" if client_key == self.keys.public else client_key

    # Monitor events of one watched socket.  Returns False once the monitor is finished.

    def _drain_monitor(self, w: _Watched) -> bool:
        for _ in range(256):
            try:
                frames = w.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            try:
                ev = _parse_monitor_message(frames)
                event, value = int(ev["event"]), int(ev["value"])
                endpoint = ev["endpoint"].decode("utf-8", "replace") if ev["endpoint"] else w.endpoint
            except Exception:
                _log().warning("emu gatekeeper: ignored a malformed monitor message")
                continue
            if event == zmq.EVENT_MONITOR_STOPPED:
                return False
            self._on_event(w, event, value, endpoint)
        return True

    def _on_event(self, w: _Watched, event: int, value: int, endpoint: str) -> None:
        w.endpoint = endpoint
        if event == zmq.EVENT_ACCEPTED:
            w.resolved.pop(value, None)
            w._remember(w.handshaking, value)
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if w.handshaking:
                fd, _ = w.handshaking.popitem(last=False)
                w._remember(w.resolved, fd)
        elif event in (
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            zmq.EVENT_HANDSHAKE_FAILED_AUTH,
        ):
            w.failure_credit += 1
            if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self._refuse(_protocol_reason(value, endpoint))
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                why = os.strerror(value) if value else "no detail"
                self._refuse(
                    f"handshake with a peer on {endpoint} failed ({why}): the peer hung up or stalled "
                    "mid-handshake (a zmq peer without CURVE hangs up as soon as it sees the server wants CURVE; "
                    "otherwise garbage bytes or a stalled peer)"
                )
            # EVENT_HANDSHAKE_FAILED_AUTH: a ZAP denial, already counted when the reply was sent.
        elif event == zmq.EVENT_DISCONNECTED:
            if value in w.handshaking:
                del w.handshaking[value]
                if w.failure_credit:
                    w.failure_credit -= 1  # its failure was counted when it was reported
                else:
                    self._refuse(
                        f"peer on {endpoint} disconnected without completing a ZMTP 3 handshake "
                        "(garbage bytes or a pre-ZMTP-3 client; libzmq refuses those silently)"
                    )
            elif value in w.resolved:
                del w.resolved[value]  # an established connection closing (or one whose credit stays owed)
            elif w.failure_credit:
                w.failure_credit -= 1  # a connection accepted before watch() began


def _parse_monitor_message(frames: list[bytes]) -> dict:
    # Imported on first use: zmq.utils.monitor pulls in zmq.asyncio and asyncio, a few MB in every
    # device process that would never watch a socket.
    from zmq.utils.monitor import parse_monitor_message

    return parse_monitor_message(frames)
