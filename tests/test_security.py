"""CURVE keys, CURVE sockets and the Gatekeeper: right keys talk, every kind of wrong peer is refused and counted.

Each test uses its own contexts, binds to ``tcp://127.0.0.1:*`` (so tests run in parallel under
pytest-xdist), keeps its keys under tmp_path, and closes every socket and terminates every context it made
(the `net` fixture).  zmq retries a refused handshake every reconnect interval, so refusals are asserted as
``>= 1`` after waiting for the condition (generous deadlines, no timing asserted) and correct peers as
``== 0``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.utils import z85

from emu.net.security import (
    PUBLIC_NAME,
    SECRET_NAME,
    ZAP_ENDPOINT,
    CurveKeys,
    Gatekeeper,
    KeyFileError,
    generate_keys,
    load_keys,
    make_client,
    make_server,
)

DEADLINE = 20.0  # seconds; only ever waited out when something is broken
QUIET = 0.3  # seconds to look for a message that must not arrive


def wait_until(cond: Callable[[], object], timeout: float = DEADLINE) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


def recv_within(sock: zmq.Socket, timeout: float = DEADLINE) -> list[bytes] | None:
    if sock.poll(int(timeout * 1000)):
        return sock.recv_multipart()
    return None


def host_port(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def keyset(path: Path) -> CurveKeys:
    generate_keys(str(path))
    keys = load_keys(str(path))
    assert keys is not None
    return keys


class Net:
    """Contexts, sockets and gatekeepers of one test, all torn down afterwards (sockets, then gatekeepers,
    then contexts, which is the order zmq needs)."""

    def __init__(self) -> None:
        self.contexts: list[zmq.Context] = []
        self.sockets: list[zmq.Socket] = []
        self.gatekeepers: list[Gatekeeper] = []

    def context(self) -> zmq.Context:
        ctx = zmq.Context()
        self.contexts.append(ctx)
        return ctx

    def socket(self, ctx: zmq.Context, kind: int) -> zmq.Socket:
        s = ctx.socket(kind)
        s.linger = 0
        self.sockets.append(s)
        return s

    def gatekeeper(self, ctx: zmq.Context, keys: CurveKeys) -> Gatekeeper:
        gk = Gatekeeper(ctx, keys)
        self.gatekeepers.append(gk)
        return gk.start()

    def server(self, kind: int, keys: CurveKeys) -> tuple[zmq.Socket, str, Gatekeeper]:
        """A CURVE server socket on its own context with a started, watching Gatekeeper."""
        ctx = self.context()
        gk = self.gatekeeper(ctx, keys)
        srv = self.socket(ctx, kind)
        make_server(srv, keys)
        gk.watch(srv)
        srv.bind("tcp://127.0.0.1:*")
        return srv, srv.last_endpoint.decode(), gk

    def client(self, kind: int, endpoint: str, setup: Callable[[zmq.Socket], None]) -> zmq.Socket:
        """A client socket on its own context (another machine, as far as zmq can tell), sending b"hello"."""
        c = self.socket(self.context(), kind)
        c.reconnect_ivl = 50
        setup(c)
        c.connect(endpoint)
        c.send(b"hello", zmq.NOBLOCK)  # queued on the connecting pipe until a handshake succeeds
        return c

    def close(self) -> None:
        for s in self.sockets:
            s.close(linger=0)
        for gk in self.gatekeepers:
            gk.stop()
        for ctx in self.contexts:
            ctx.term()


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def keys(tmp_path: Path) -> CurveKeys:
    return keyset(tmp_path / "cluster")


@pytest.fixture
def other_keys(tmp_path: Path) -> CurveKeys:
    return keyset(tmp_path / "elsewhere")


PAIRS = [pytest.param(zmq.PUSH, zmq.PULL, id="push-pull"), pytest.param(zmq.DEALER, zmq.ROUTER, id="dealer-router")]


# -- key files ------------------------------------------------------------------------------------------


def test_generate_and_load_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "new" / "keys"  # generate_keys creates missing parents
    public_path, secret_path = generate_keys(str(d))
    assert public_path == str(d / PUBLIC_NAME) and secret_path == str(d / SECRET_NAME)
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
    assert sorted(os.listdir(d)) == [PUBLIC_NAME, SECRET_NAME]  # no temporary left behind

    keys = load_keys(str(d))
    assert keys is not None
    file_public, file_secret = zmq.auth.load_certificate(secret_path)
    assert keys.public == zmq.auth.load_certificate(public_path)[0] == file_public
    assert keys.secret == file_secret
    assert zmq.curve_public(keys.secret) == keys.public
    assert len(keys.public) == len(keys.secret) == 40
    assert keys.allowed == frozenset({keys.public})
    assert keys.directory == str(d)
    assert keys.secret.decode() not in repr(keys)


def test_load_none_is_none() -> None:
    assert load_keys(None) is None


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    public_path, secret_path = generate_keys(str(tmp_path))
    before = load_keys(str(tmp_path))
    with pytest.raises(FileExistsError, match="already exists") as err:
        generate_keys(str(tmp_path))
    assert PUBLIC_NAME in str(err.value)
    assert load_keys(str(tmp_path)) == before

    os.unlink(public_path)  # half a key set is still refused: the secret would be lost
    with pytest.raises(FileExistsError, match=SECRET_NAME):
        generate_keys(str(tmp_path))

    generate_keys(str(tmp_path), force=True)
    after = load_keys(str(tmp_path))
    assert after is not None and before is not None and after.public != before.public
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600


def _truncate_key(path: Path) -> None:
    path.write_text(path.read_text().replace('public-key = "', 'public-key = "zz', 1))


def _swap_secret(path: Path) -> None:
    other = path.parent.parent / "other"
    generate_keys(str(other))
    (path.parent / SECRET_NAME).write_bytes((other / SECRET_NAME).read_bytes())


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        pytest.param(PUBLIC_NAME, lambda p: p.unlink(), "does not exist", id="public-missing"),
        pytest.param(SECRET_NAME, lambda p: p.unlink(), "does not exist", id="secret-missing"),
        pytest.param(PUBLIC_NAME, lambda p: p.write_bytes(os.urandom(200)), "no public-key", id="public-binary"),
        pytest.param(PUBLIC_NAME, _truncate_key, "not a CURVE key", id="public-garbled"),
        pytest.param(SECRET_NAME, lambda p: p.write_text('public-key = "short"\n'), "not a CURVE key",
                     id="secret-garbled"),
        pytest.param(
            SECRET_NAME,
            lambda p: p.write_text("\n".join(ln for ln in p.read_text().splitlines() if "secret-key" not in ln)),
            "no secret-key",
            id="secret-without-secret",
        ),
        pytest.param(SECRET_NAME, _swap_secret, "does not belong", id="secret-of-another-set"),
        pytest.param("authorized/node.key", lambda p: p.write_text("curve\n    public-key = \"nope\"\n"),
                     "not a CURVE key", id="authorized-garbled"),
    ],
)
def test_load_names_the_bad_file(tmp_path: Path, name: str, damage: Callable[[Path], None], message: str) -> None:
    d = tmp_path / "keys"
    generate_keys(str(d))
    (d / "authorized").mkdir()
    path = d / name
    damage(path)
    with pytest.raises(KeyFileError, match=message) as err:
        load_keys(str(d))
    assert isinstance(err.value, ValueError)
    assert str(path) in str(err.value)


def test_load_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist") as err:
        load_keys(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(err.value)


# -- sockets with the right keys --------------------------------------------------------------------------


@pytest.mark.parametrize(("client_kind", "server_kind"), PAIRS)
def test_right_keys_exchange_messages(net: Net, keys: CurveKeys, client_kind: int, server_kind: int) -> None:
    srv, endpoint, gk = net.server(server_kind, keys)
    c = net.client(client_kind, endpoint, lambda s: make_client(s, keys))
    for i in range(3):
        got = recv_within(srv)
        assert got is not None and got[-1] == (b"hello" if i == 0 else b"more %d" % i)
        if server_kind == zmq.ROUTER:  # and back: the control channel is two-way
            srv.send_multipart([got[0], b"reply %d" % i])
            assert recv_within(c) == [b"reply %d" % i]
        c.send(b"more %d" % (i + 1))
    assert gk.refused == 0
    assert gk.last_refusal is None


def test_no_keys_means_plaintext(net: Net) -> None:
    ctx = net.context()
    srv = net.socket(ctx, zmq.PULL)
    make_server(srv, None)
    srv.bind("tcp://127.0.0.1:*")
    assert srv.curve_server == 0
    net.client(zmq.PUSH, srv.last_endpoint.decode(), lambda s: make_client(s, None))
    assert recv_within(srv) == [b"hello"]


def test_authorized_key_is_accepted(net: Net, tmp_path: Path) -> None:
    """A node with a key pair of its own: the operator copies its public key into ``authorized/``."""
    d = tmp_path / "cluster"
    generate_keys(str(d))
    own = keyset(tmp_path / "node7")  # the node's own pair, kept on the node
    (d / "authorized").mkdir()
    (d / "authorized" / "node7.key").write_bytes((tmp_path / "node7" / PUBLIC_NAME).read_bytes())
    (d / "authorized" / "README").write_text("not a .key file: ignored")
    keys = load_keys(str(d))
    assert keys is not None and keys.allowed == frozenset({keys.public, own.public})

    def as_node7(s: zmq.Socket) -> None:
        s.curve_serverkey = keys.public
        s.curve_publickey = own.public
        s.curve_secretkey = own.secret

    srv, endpoint, gk = net.server(zmq.ROUTER, keys)
    net.client(zmq.DEALER, endpoint, as_node7)
    got = recv_within(srv)
    assert got is not None and got[-1] == b"hello"
    assert gk.refused == 0


# -- wrong peers: refused and counted ---------------------------------------------------------------------


def _plaintext(keys: CurveKeys, other: CurveKeys) -> Callable[[zmq.Socket], None]:
    return lambda s: make_client(s, None)


def _other_key_set(keys: CurveKeys, other: CurveKeys) -> Callable[[zmq.Socket], None]:
    return lambda s: make_client(s, other)


def _wrong_server_key(keys: CurveKeys, other: CurveKeys) -> Callable[[zmq.Socket], None]:
    def setup(s: zmq.Socket) -> None:
        make_client(s, keys)
        s.curve_serverkey = other.public  # knows the cluster pair, targets another server

    return setup


def _unauthorized_client_key(keys: CurveKeys, other: CurveKeys) -> Callable[[zmq.Socket], None]:
    def setup(s: zmq.Socket) -> None:
        make_client(s, other)
        s.curve_serverkey = keys.public  # knows the server, but its own key is not allowed

    return setup


WRONG_PEERS = [
    # Which side of a mechanism mismatch notices first is a race: the server reports the mismatch, or the
    # plaintext client hangs up first and the server sees a broken handshake.
    pytest.param(_plaintext, ("without CURVE",), id="plaintext"),
    pytest.param(_other_key_set, ("wrong server key",), id="other-key-set"),
    pytest.param(_wrong_server_key, ("wrong server key",), id="wrong-server-key"),
    pytest.param(_unauthorized_client_key, ("from 127.0.0.1 refused",), id="unauthorized-client-key"),
]


@pytest.mark.parametrize(("client_kind", "server_kind"), PAIRS)
@pytest.mark.parametrize(("peer", "reason"), WRONG_PEERS)
def test_wrong_peer_is_refused_and_counted(
    net: Net,
    keys: CurveKeys,
    other_keys: CurveKeys,
    client_kind: int,
    server_kind: int,
    peer: Callable[[CurveKeys, CurveKeys], Callable[[zmq.Socket], None]],
    reason: tuple[str, ...],
) -> None:
    srv, endpoint, gk = net.server(server_kind, keys)
    net.client(client_kind, endpoint, peer(keys, other_keys))
    assert wait_until(lambda: gk.refused >= 1), "the wrong peer was never counted"
    assert srv.poll(int(QUIET * 1000)) == 0, "a message from a refused peer got through"
    assert gk.last_refusal is not None and any(r in gk.last_refusal for r in reason), gk.last_refusal
    assert endpoint in gk.last_refusal or "127.0.0.1" in gk.last_refusal
    if peer is _unauthorized_client_key:
        assert other_keys.public.decode() in gk.last_refusal

    # A correct peer next to the refused one still gets through.
    net.client(client_kind, endpoint, lambda s: make_client(s, keys))
    got = recv_within(srv)
    assert got is not None and got[-1] == b"hello"


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
        pytest.param(bytes(range(256)) * 4, id="binary"),
        pytest.param(b"\xff\x00\x00", id="truncated-greeting"),
        pytest.param(b"", id="connect-and-hang-up"),
    ],
)
def test_garbage_bytes_are_refused_and_counted(net: Net, keys: CurveKeys, garbage: bytes) -> None:
    srv, endpoint, gk = net.server(zmq.PULL, keys)
    with socket.create_connection(host_port(endpoint), timeout=DEADLINE) as raw:
        with contextlib.suppress(OSError):  # the server may have hung up already
            raw.sendall(garbage)
            raw.shutdown(socket.SHUT_WR)
        assert wait_until(lambda: gk.refused >= 1)
    assert gk.refused == 1  # a raw socket does not reconnect: one attempt, counted once
    assert gk.last_refusal is not None and "handshake" in gk.last_refusal and endpoint in gk.last_refusal
    assert srv.poll(0) == 0


def test_correct_peers_leaving_are_not_refusals(net: Net, keys: CurveKeys) -> None:
    srv, endpoint, gk = net.server(zmq.PULL, keys)
    clients = [net.client(zmq.PUSH, endpoint, lambda s: make_client(s, keys)) for _ in range(5)]
    for _ in clients:
        assert recv_within(srv) == [b"hello"]
    for c in clients:
        c.close(linger=0)
    # The server sees every disconnect; none of them is a refusal.  Prove the gatekeeper has caught up
    # by a refused attempt after them and then checking it is the only one.
    with socket.create_connection(host_port(endpoint), timeout=DEADLINE) as raw:
        raw.sendall(b"junk that is no greeting")
        assert wait_until(lambda: gk.refused >= 1)
    time.sleep(QUIET)
    assert gk.refused == 1


# -- the gatekeeper itself --------------------------------------------------------------------------------


def test_malformed_zap_requests_do_not_kill_the_gatekeeper(net: Net, keys: CurveKeys) -> None:
    srv, endpoint, gk = net.server(zmq.PULL, keys)
    zap = net.socket(srv.context, zmq.DEALER)
    zap.connect(ZAP_ENDPOINT)
    zap.send_multipart([b"no delimiter"])  # dropped
    zap.send_multipart([b"", b"1.0"])  # too short to answer: dropped
    for request in [
        [b"2.0", b"r1", b"emu", b"127.0.0.1", b"", b"CURVE", b"k" * 32],  # unknown version
        [b"1.0", b"r2", b"emu"],  # too few frames
        [b"1.0", b"r3", b"emu", b"10.0.0.1", b"", b"NULL"],  # not CURVE
        [b"1.0", b"r4", b"emu", b"10.0.0.1", b"", b"CURVE", b"short"],  # not a 32-byte key
        [b"1.0", b"r5", b"emu", b"10.0.0.1", b"", b"CURVE", os.urandom(32)],  # a key nobody allowed
    ]:
        zap.send_multipart([b"", *request])
        reply = recv_within(zap)
        assert reply is not None and reply[:4] == [b"", b"1.0", request[1], b"400"], reply
        assert len(reply) == 7
    zap.send_multipart([b"", b"1.0", b"ok", b"emu", b"10.0.0.2", b"", b"CURVE", z85.decode(keys.public)])
    reply = recv_within(zap)
    assert reply is not None and reply[3] == b"200"
    assert gk.refused == 5
    assert gk.last_refusal is not None and "10.0.0.1" in gk.last_refusal

    net.client(zmq.PUSH, endpoint, lambda s: make_client(s, keys))  # still serving real handshakes
    assert recv_within(srv) == [b"hello"]


def test_gatekeepers_on_separate_contexts_are_independent(net: Net, keys: CurveKeys, other_keys: CurveKeys) -> None:
    srv_a, endpoint_a, gk_a = net.server(zmq.PULL, keys)
    srv_b, endpoint_b, gk_b = net.server(zmq.PULL, other_keys)
    net.client(zmq.PUSH, endpoint_a, lambda s: make_client(s, other_keys))  # wrong for a
    net.client(zmq.PUSH, endpoint_b, lambda s: make_client(s, other_keys))  # right for b
    assert recv_within(srv_b) == [b"hello"]
    assert wait_until(lambda: gk_a.refused >= 1)
    assert gk_b.refused == 0
    assert srv_a.poll(0) == 0


def test_one_gatekeeper_per_context(net: Net, keys: CurveKeys) -> None:
    ctx = net.context()
    net.gatekeeper(ctx, keys)
    with pytest.raises(zmq.ZMQError, match="already has a ZAP handler"):
        Gatekeeper(ctx, keys).start()


def test_lifecycle(net: Net, keys: CurveKeys) -> None:
    ctx = net.context()
    never_started = Gatekeeper(ctx, keys)
    watched = net.socket(ctx, zmq.PULL)
    never_started.watch(watched)
    never_started.stop()
    never_started.stop()
    with pytest.raises(RuntimeError):
        never_started.watch(net.socket(ctx, zmq.PULL))

    other_ctx = net.context()
    with Gatekeeper(other_ctx, keys) as gk:
        with pytest.raises(ValueError, match="context"):
            gk.watch(watched)  # a socket of another context
        s = net.socket(other_ctx, zmq.PULL)
        gk.watch(s)
        gk.watch(s)  # watching twice is harmless
        s.close()  # the monitor sees the socket go and drops it
    assert gk.refused == 0
    gk.stop()  # idempotent after the with block
