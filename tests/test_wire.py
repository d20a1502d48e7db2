"""Unit and property tests for emu.net.wire: round trips, and every malformed message is a WireError."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emu.net import wire
from emu.net.packets import FrameBatch, FrameFactory, verify_batch
from emu.net.wire import WIRE_VERSION, WireError, pack_frames, pack_msg, unpack_frames, unpack_msg

DESC = np.dtype(
    [("page", "<u4"), ("gen", "<u4"), ("off", "<u4"), ("len", "<u4"), ("owner", "<u2"), ("aux", "<u2")]
)


def frames_msg(n: int = 5, size: int = 100) -> bytes:
    return pack_frames(FrameFactory(size, 4, "02:00:00:00:00:01", "02:00:00:00:00:02").build(0, n))


# -- envelope ---------------------------------------------------------------------------------------


def test_msg_round_trip_with_numpy_blob() -> None:
    d = np.zeros(3, DESC)
    d["page"] = [1, 2, 3]
    d["owner"] = 7
    msg = pack_msg("rx", {"dev": "eth0", "q": 1}, d)
    kind, hdr, blob = unpack_msg(msg, ("rx", "tx"))
    assert (kind, hdr) == ("rx", {"dev": "eth0", "q": 1})
    assert np.array_equal(np.frombuffer(blob, DESC), d)
    # The envelope is a plain msgpack array, readable by any msgpack implementation.
    assert msgpack.unpackb(msg) == ["rx", WIRE_VERSION, {"dev": "eth0", "q": 1}, d.tobytes()]


def test_msg_blob_kinds() -> None:
    assert unpack_msg(pack_msg("x", {}))[2] == b""
    assert unpack_msg(pack_msg("x", {}, memoryview(b"abc")))[2] == b"abc"
    assert unpack_msg(bytearray(pack_msg("x", {}, bytearray(b"ab"))))[2] == b"ab"
    strided = np.arange(10, dtype=np.uint16)[::2]
    assert unpack_msg(pack_msg("x", {}, strided))[2] == strided.tobytes()


def test_packer_is_reusable_after_a_bad_header() -> None:
    with pytest.raises(TypeError, match="cannot pack"):
        pack_msg("x", {"bad": object()})
    with pytest.raises(TypeError):
        pack_msg("", {})
    assert unpack_msg(pack_msg("y", {"a": 1}, b"z")) == ("y", {"a": 1}, b"z")


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (b"", "msgpack decoding failed"),
        (b"\xc1", "msgpack decoding failed"),
        (msgpack.packb([1, 2, 3]), "4-element array"),
        (msgpack.packb({"a": 1}), "4-element array"),
        (msgpack.packb(["rx", 1, {}, b""]) + b"\x00", "trailing bytes"),
        (msgpack.packb([5, 1, {}, b""]), "kind is"),
        (msgpack.packb(["rx", 2, {}, b""]), "wire version 2"),
        (msgpack.packb(["rx", True, {}, b""]), "wire version"),
        (msgpack.packb(["rx", 1, [], b""]), "header"),
        (msgpack.packb(["rx", 1, {b"k": 1}, b""]), "string keys"),
        (msgpack.packb(["rx", 1, {}, "text"]), "blob"),
        (msgpack.packb(["nope", 1, {}, b""]), "unknown message kind 'nope'"),
        (msgpack.packb(["rx", 1, {"t": msgpack.ExtType(1, b"x")}, b""]), "msgpack decoding failed"),
        (msgpack.packb(["rx", 1, {"k": "x" * 5000}, b""]), "msgpack decoding failed"),
        (msgpack.packb(["rx", 1, {"k": list(range(2000))}, b""]), "msgpack decoding failed"),
        (b"\x91" * 5000, "msgpack decoding failed"),
    ],
)
def test_bad_messages_are_wire_errors(msg: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        unpack_msg(msg, ("rx",))


def test_non_bytes_and_oversize() -> None:
    with pytest.raises(WireError, match="not bytes"):
        unpack_msg("text")  # type: ignore[arg-type]
    big = pack_msg("x", {}, bytes(2000))
    with pytest.raises(WireError):
        unpack_msg(big, max_blob=100)
    assert isinstance(WireError("x"), ValueError)


# -- frames -----------------------------------------------------------------------------------------


def test_frames_round_trip_batch_and_list() -> None:
    f = FrameFactory(128, 4, "02:00:00:00:00:01", "02:00:00:00:00:02")
    b = f.build(10, 6)
    got = unpack_frames(pack_frames(b))
    assert got.stride == 128 and got.to_list() == b.to_list()
    assert verify_batch(got).ok == 6
    frames = [b"a" * 60, b"bb" * 40, b"c"]
    got = unpack_frames(pack_frames(frames))
    assert got.to_list() == frames and got.stride == 0
    assert got.offsets.tolist() == [0, 60, 140] and got.lengths.tolist() == [60, 80, 1]
    empty = unpack_frames(pack_frames([]))
    assert len(empty) == 0


def test_frames_layout_is_lengths_then_bytes() -> None:
    kind, hdr, blob = unpack_msg(pack_frames([b"xy", b"abc"]))
    assert (kind, hdr) == ("frames", {"n": 2})
    assert blob == (2).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"xyabc"


def test_frames_from_scattered_batch_and_duck_type() -> None:
    data = np.frombuffer(b"..AB..CDE.", dtype=np.uint8).copy()
    b = FrameBatch(data, np.array([6, 2]), np.array([3, 2]))
    assert unpack_frames(pack_frames(b)).to_list() == [b"CDE", b"AB"]

    class Like:
        def __init__(self) -> None:
            self.data, self.offsets, self.lengths = data, np.array([2]), np.array([2])

    assert unpack_frames(pack_frames(Like())).to_list() == [b"AB"]  # type: ignore[arg-type]


def test_frames_writable_copy() -> None:
    msg = frames_msg(2)
    ro = unpack_frames(msg)
    assert not ro.data.flags.writeable
    rw = unpack_frames(msg, writable=True)
    rw.data[0] ^= 1
    assert rw.data.flags.writeable and ro.data[0] != rw.data[0]


def test_pack_refuses_zero_length_frames() -> None:
    with pytest.raises(ValueError, match="zero-length"):
        pack_frames([b"a", b""])


def raw_frames(n: object, lengths: list[int], payload: bytes, kind: str = "frames") -> bytes:
    blob = np.array(lengths, dtype="<u4").tobytes() + payload
    return msgpack.packb([kind, 1, {"n": n}, blob])


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (raw_frames(2, [1, 1], b"ab", kind="rx"), "unknown message kind 'rx'"),
        (raw_frames("2", [1, 1], b"ab"), "integer 'n'"),
        (raw_frames(True, [1], b"a"), "integer 'n'"),
        (raw_frames(-1, [], b""), "claims -1"),
        (raw_frames(70000, [], b""), "claims 70000"),
        (raw_frames(3, [1, 1], b"ab"), "too short"),
        (raw_frames(2, [1, 2], b"ab"), "add up to 3"),
        (raw_frames(2, [1, 0], b"a"), "zero-length"),
        (raw_frames(1, [70000], bytes(70000)), "70000-byte frame"),
        (raw_frames(0, [], b"x"), "stray"),
        (msgpack.packb(["frames", 1, {}, b""]), "integer 'n'"),
    ],
)
def test_bad_frames_messages(msg: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        unpack_frames(msg)


def test_frame_limits_are_the_callers() -> None:
    msg = frames_msg(5, 100)
    with pytest.raises(WireError):
        unpack_frames(msg, max_frames=4)
    with pytest.raises(WireError):
        unpack_frames(msg, max_frame=99)
    assert len(unpack_frames(msg, max_frames=5, max_frame=100)) == 5


# -- properties: never anything but a result or a WireError ----------------------------------------

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_batch(b: FrameBatch) -> None:
    assert b.lengths.min(initial=1) >= 1
    assert b.nbytes == len(b.data)
    if len(b):
        assert int(b.offsets[-1] + b.lengths[-1]) == len(b.data)
    else:
        assert len(b.data) == 0 and len(b.offsets) == 0


def try_both(msg: bytes) -> None:
    try:
        kind, hdr, blob = unpack_msg(msg)
        assert isinstance(kind, str) and isinstance(hdr, dict) and isinstance(blob, bytes)
    except WireError:
        pass
    try:
        check_batch(unpack_frames(msg))
    except WireError:
        pass


@given(st.binary(max_size=512))
@SETTINGS
def test_random_bytes(msg: bytes) -> None:
    try_both(msg)


@given(
    frames=st.lists(st.binary(min_size=1, max_size=80), max_size=8),
    data=st.data(),
)
@SETTINGS
def test_truncated_messages_always_fail(frames: list[bytes], data: st.DataObject) -> None:
    msg = pack_frames(frames)
    assert unpack_frames(msg).to_list() == frames
    cut = data.draw(st.integers(0, len(msg) - 1))
    with pytest.raises(WireError):
        unpack_frames(msg[:cut])
    with pytest.raises(WireError):
        unpack_msg(msg[:cut])


@given(
    frames=st.lists(st.binary(min_size=1, max_size=80), max_size=8),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("sid")), min_size=1
    ),
)
@SETTINGS
def test_mutated_messages_round_trip_or_fail_cleanly(
    frames: list[bytes], edits: list[tuple[int, int, str]]
) -> None:
    msg = bytearray(pack_frames(frames))
    for pos, val, op in edits:
        i = pos % (len(msg) + 1)
        if op == "s" and i < len(msg):
            msg[i] = val
        elif op == "i":
            msg[i:i] = bytes([val])
        elif op == "d" and i < len(msg):
            del msg[i]
    try_both(bytes(msg))


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@given(st.lists(msgpack_values, max_size=5) | msgpack_values)
@SETTINGS
def test_arbitrary_msgpack_values(obj: object) -> None:
    try_both(msgpack.packb(obj))


@given(
    kind=st.text(min_size=1, max_size=10),
    header=st.dictionaries(
        st.text(max_size=6), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=6), max_size=5
    ),
    blob=st.binary(max_size=64),
)
@SETTINGS
def test_msg_round_trip_property(kind: str, header: dict[str, object], blob: bytes) -> None:
    assert unpack_msg(pack_msg(kind, header, blob), {kind}) == (kind, header, blob)


def test_module_surface() -> None:
    assert wire.WIRE_VERSION == 1 and wire.FRAMES == "frames"
