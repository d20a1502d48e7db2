"""The emulator's one message format: what crosses every zmq socket, and frames on an emulated link.

Every message is a msgpack array ``[kind: str, version: int, header: map, blob: bin]``.  The header carries
a few small fields; the bulk (descriptor batches, frames) is always one packed numpy array in `blob`,
never a list of tuples, which measured seven times slower to pack and unpack.

A ``"frames"`` message is what travels on a link between a device and a traffic port (or another device):
``header = {"n": n}`` and ::

    blob = lengths (n x u32 little-endian) | frame 0 | frame 1 | ... | frame n-1   (back to back)

Which kinds there are, and who sends each to whom, is the protocol's (`emu.net.protocol`); this module only
packs and checks.

Receivers never trust a message: anything garbled, truncated, foreign or from another wire version raises
`WireError` naming what was wrong, so the caller counts it and carries on.  Unpacking caps every msgpack
length, so a hostile message cannot make a receiver allocate more than it already holds.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol

import msgpack
import numpy as np

from emu.errors import BadInputError
from emu.net.packets import FrameBatch
from emu.net.protocol import FRAMES

WIRE_VERSION = 1

MAX_BLOB = 1 << 28  # 256 MiB: far above any batch the emulator sends, far below "gigabytes"
MAX_STR = 4096  # kinds, header keys and string values are short
MAX_ITEMS = 1024  # header maps and any arrays inside them

_LEN_DTYPE = np.dtype("<u4")
_BIN8, _BIN16, _BIN32 = struct.Struct(">BB"), struct.Struct(">BH"), struct.Struct(">BI")

BufferLike = bytes | bytearray | memoryview


class WireError(BadInputError, ValueError):
    """A message that is not a valid emulator message; the text says what was wrong with it."""


class FrameBatchLike(Protocol):
    data: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray


# msgpack Packers keep an internal buffer, so one is reused per thread (no allocation per message) but
# never shared between threads, where two packs could interleave.
_local = threading.local()


def _packer() -> msgpack.Packer:
    p = getattr(_local, "packer", None)
    if p is None:
        p = _local.packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    return p


def _as_buffer(blob: BufferLike | np.ndarray) -> BufferLike:
    if isinstance(blob, np.ndarray):
        # The buffer protocol needs a C-contiguous array; anything else is copied once here.
        return memoryview(np.ascontiguousarray(blob)).cast("B")
    return blob


def _pack_parts(kind: str, header: Mapping[str, Any], parts: Sequence[BufferLike], nbytes: int) -> bytes:
    """The envelope with a blob made of `parts`: msgpack writes only the small prefix (the bin header
    included), and one join copies the blob's bytes straight into the message."""
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"message kind must be a non-empty str, got {kind!r}")
    p = _packer()
    p.reset()
    try:
        p.pack_array_header(4)
        p.pack(kind)
        p.pack(WIRE_VERSION)
        p.pack(header)
    except (TypeError, ValueError, OverflowError) as exc:
        p.reset()
        raise TypeError(f"cannot pack {kind!r} message header {header!r}: {exc}") from exc
    prefix = p.bytes()
    p.reset()
    return b"".join((prefix, _bin_header(nbytes), *parts))


def _bin_header(n: int) -> bytes:
    """msgpack's bin 8/16/32 header (the Packer has no public call for it; the format is fixed)."""
    if n < 0x100:
        return _BIN8.pack(0xC4, n)
    if n < 0x10000:
        return _BIN16.pack(0xC5, n)
    if n <= 0xFFFFFFFF:
        return _BIN32.pack(0xC6, n)
    raise ValueError(f"blob of {n} bytes is too large for one message")


def pack_msg(kind: str, header: Mapping[str, Any], blob: BufferLike | np.ndarray = b"") -> bytes:
    """One message ``[kind, WIRE_VERSION, header, blob]``; a numpy `blob` is sent as its raw bytes."""
    buf = _as_buffer(blob)
    return _pack_parts(kind, header, (buf,), memoryview(buf).nbytes)


def unpack_msg(
    msg: BufferLike, kinds: Collection[str] | None = None, max_blob: int = MAX_BLOB
) -> tuple[str, dict[str, Any], bytes]:
    """``(kind, header, blob)`` of a message; WireError for anything that is not a valid message of one of
    `kinds` (any kind if None)."""
    try:
        size = memoryview(msg).nbytes
    except TypeError:
        raise WireError(f"message is a {type(msg).__name__}, not bytes") from None
    if size > max_blob + 64 * 1024:
        raise WireError(f"message of {size} bytes exceeds the {max_blob}-byte limit")
    try:
        obj = msgpack.unpackb(
            msg,
            use_list=False,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_STR,
            max_bin_len=max_blob,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise WireError("not a message: trailing bytes after the msgpack array") from None
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        # msgpack reports truncation as "incomplete input" and length caps as "exceeds max_..."
        raise WireError(f"not a message: msgpack decoding failed ({exc or type(exc).__name__})") from None
    if type(obj) is not tuple or len(obj) != 4:
        raise WireError(
            f"not a message: got {_describe(obj)}, expected a 4-element array [kind, version, header, blob]"
        )
    kind, version, header, blob = obj
    if type(kind) is not str:
        raise WireError(f"message kind is {_describe(kind)}, expected a string")
    if type(version) is not int or version != WIRE_VERSION:
        raise WireError(f"{kind!r} message has wire version {version!r}, expected {WIRE_VERSION}")
    if kinds is not None and kind not in kinds:
        raise WireError(f"unknown message kind {kind!r} (expected one of {sorted(kinds)})")
    if type(header) is not dict or not all(type(k) is str for k in header):
        raise WireError(f"{kind!r} message header is {_describe(header)}, expected a map with string keys")
    if type(blob) is not bytes:
        raise WireError(f"{kind!r} message blob is {_describe(blob)}, expected bytes")
    return kind, header, blob


def _describe(obj: object) -> str:
    """Short description for error text; never reprs a whole (possibly huge) value."""
    if isinstance(obj, bytes | str | tuple | dict):
        return f"a {type(obj).__name__} of length {len(obj)}"
    return f"{type(obj).__name__} {repr(obj)[:60]}"


def pack_frames(frames: FrameBatchLike | Sequence[BufferLike]) -> bytes:
    """A ``"frames"`` message holding a batch (anything with data/offsets/lengths) or a list of frames."""
    if hasattr(frames, "lengths"):
        batch = (
            frames
            if isinstance(frames, FrameBatch)
            else FrameBatch(frames.data, frames.offsets, frames.lengths)
        )
        batch = batch.compact()
        lengths = np.ascontiguousarray(batch.lengths, dtype=_LEN_DTYPE)
        payload = batch.nbytes
        parts: Sequence[BufferLike] = (memoryview(lengths).cast("B"), memoryview(batch.data[:payload]))
    else:
        seq = frames
        lengths = np.fromiter(map(len, seq), dtype=_LEN_DTYPE, count=len(seq))
        payload = int(np.add.reduce(lengths, dtype=np.uint64))
        parts = (memoryview(lengths).cast("B"), *seq)
    n = len(lengths)
    if n and not np.minimum.reduce(lengths):
        raise ValueError("pack_frames: zero-length frame (receivers refuse them)")
    return _pack_parts(FRAMES, {"n": n}, parts, 4 * n + payload)


def unpack_frames(
    msg: BufferLike, max_frame: int = 65536, max_frames: int = 65536, writable: bool = False
) -> FrameBatch:
    """The frames of a ``"frames"`` message; WireError if it is not one or its contents do not add up.

    The batch's data is a read-only view of the message unless `writable` (then it is a private copy)."""
    blob_cap = min(MAX_BLOB, max_frames * (4 + max_frame))
    _, header, blob = unpack_msg(msg, (FRAMES,), blob_cap)
    n = header.get("n")
    if type(n) is not int:
        raise WireError(f"frames message header needs an integer 'n', got {header!r}")
    if not 0 <= n <= max_frames:
        raise WireError(f"frames message claims {n} frames (limit {max_frames})")
    if len(blob) < 4 * n:
        raise WireError(
            f"frames message of {n} frames has a {len(blob)}-byte blob, too short for their lengths"
        )
    lengths = np.frombuffer(blob, dtype=_LEN_DTYPE, count=n).astype(np.uint32, copy=False)
    payload = len(blob) - 4 * n
    stride = 0
    if n:
        lo, hi = int(np.minimum.reduce(lengths)), int(np.maximum.reduce(lengths))
        if lo == 0:
            raise WireError(f"frames message has a zero-length frame (index {int(np.argmin(lengths))})")
        if hi > max_frame:
            raise WireError(
                f"frames message has a {hi}-byte frame (index {int(np.argmax(lengths))}), limit {max_frame}"
            )
        total = int(np.add.reduce(lengths, dtype=np.uint64))
        if total != payload:
            raise WireError(f"frames message lengths add up to {total} bytes but {payload} bytes follow them")
        stride = lo if lo == hi else 0
    elif payload:
        raise WireError(f"frames message with no frames carries {payload} stray bytes")
    data = np.frombuffer(blob, dtype=np.uint8, offset=4 * n)
    if writable:
        data = data.copy()
    offsets = np.arange(0, n * stride, stride, dtype=np.uint32) if stride else _offsets(lengths)
    return FrameBatch._make(data, offsets, lengths, stride)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offs = np.zeros(len(lengths), dtype=np.uint32)
    np.cumsum(lengths[:-1], out=offs[1:], dtype=np.uint32)
    return offs
