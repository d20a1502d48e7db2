"""BTF and BTF.ext: the type information clang writes next to an eBPF object, as far as a loader needs it.

Kernel counterpart: include/uapi/linux/btf.h (``struct btf_header``, ``struct btf_type`` and the records that
follow each kind) and libbpf's ``btf_ext`` (``.BTF.ext``: func info, line info, CO-RE relocations).  The loader
reads from it what libbpf reads: the ``.maps`` DATASEC and each map's struct of pointer-encoded attributes
(``bpf_map__init_from_btf``), the DATASECs of ``.data``/``.rodata``/``.bss`` for global variable names and
offsets, line info for messages, and whether any CO-RE relocation is present.  Every offset and count is
checked against the section, so a malformed section raises `BtfError` and nothing else.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["BTF_KIND_ARRAY", "BTF_KIND_DATASEC", "BTF_KIND_INT", "BTF_KIND_PTR", "BTF_KIND_STRUCT",
           "BTF_KIND_VAR", "Btf", "BtfError", "BtfExt", "BtfType", "CoreRelo", "LineInfo"]

BTF_MAGIC = 0xEB9F

BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_ARRAY, BTF_KIND_STRUCT, BTF_KIND_UNION, BTF_KIND_ENUM = 1, 2, 3, 4, 5, 6
BTF_KIND_FWD, BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT = 7, 8, 9, 10, 11
BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO, BTF_KIND_VAR, BTF_KIND_DATASEC, BTF_KIND_FLOAT = 12, 13, 14, 15, 16
BTF_KIND_DECL_TAG, BTF_KIND_TYPE_TAG, BTF_KIND_ENUM64 = 17, 18, 19

# Bytes of the record following a btf_type: fixed, and per vlen item.
_EXTRA: dict[int, tuple[int, int]] = {
    BTF_KIND_INT: (4, 0), BTF_KIND_PTR: (0, 0), BTF_KIND_ARRAY: (12, 0), BTF_KIND_STRUCT: (0, 12),
    BTF_KIND_UNION: (0, 12), BTF_KIND_ENUM: (0, 8), BTF_KIND_FWD: (0, 0), BTF_KIND_TYPEDEF: (0, 0),
    BTF_KIND_VOLATILE: (0, 0), BTF_KIND_CONST: (0, 0), BTF_KIND_RESTRICT: (0, 0), BTF_KIND_FUNC: (0, 0),
    BTF_KIND_FUNC_PROTO: (0, 8), BTF_KIND_VAR: (4, 0), BTF_KIND_DATASEC: (0, 12), BTF_KIND_FLOAT: (0, 0),
    BTF_KIND_DECL_TAG: (4, 0), BTF_KIND_TYPE_TAG: (0, 0), BTF_KIND_ENUM64: (0, 12),
}
# Kinds whose third word is a type id (the others: a size).
_REF_KINDS = {BTF_KIND_PTR, BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT, BTF_KIND_FUNC,
              BTF_KIND_VAR, BTF_KIND_DECL_TAG, BTF_KIND_TYPE_TAG, BTF_KIND_FUNC_PROTO}
_MODIFIERS = {BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT, BTF_KIND_TYPE_TAG}


class BtfError(ValueError):
    """The BTF or BTF.ext section is malformed (the message says what and where in it)."""


@dataclass(frozen=True, slots=True)
class BtfType:
    """One type: kind, name, the size-or-type word, and its kind-specific record decoded.

    `members`: STRUCT/UNION (name, type, bit offset), DATASEC (var type, offset, size) with name "";
    `array`: ARRAY (elem type, index type, nelems)."""

    kind: int
    name: str
    size_or_type: int
    vlen: int
    members: tuple[tuple[str, int, int], ...] = ()
    array: tuple[int, int, int] | None = None


class _Reader:
    """Bounds-checked little-endian reads from a section."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.what = data, what

    def unpack(self, fmt: str, off: int) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        if off < 0 or off + size > len(self.data):
            raise BtfError(f"{self.what}: {size} bytes at offset {off} run past its end ({len(self.data)} bytes)")
        return struct.unpack_from(fmt, self.data, off)


def _string(strings: bytes, off: int, what: str) -> str:
    if off < 0 or off >= max(len(strings), 1):
        if off == 0:
            return ""
        raise BtfError(f"{what}: string offset {off} outside the string section ({len(strings)} bytes)")
    end = strings.find(b"\0", off)
    if end < 0:
        raise BtfError(f"{what}: string at offset {off} is not NUL-terminated")
    return strings[off:end].decode("utf-8", "replace")


class Btf:
    """The ``.BTF`` section: types by id (id 0 is void) and strings."""

    def __init__(self, data: bytes) -> None:
        r = _Reader(data, ".BTF")
        magic, version, _flags, hdr_len = r.unpack("<HBBI", 0)
        if magic != BTF_MAGIC:
            raise BtfError(f".BTF: bad magic {magic:#06x} (want {BTF_MAGIC:#06x}; a big-endian object?)")
        if version != 1 or hdr_len < 24:
            raise BtfError(f".BTF: version {version}, header length {hdr_len}: not BTF version 1")
        type_off, type_len, str_off, str_len = r.unpack("<IIII", 8)
        tstart, sstart = hdr_len + type_off, hdr_len + str_off
        if tstart + type_len > len(data) or sstart + str_len > len(data):
            raise BtfError(f".BTF: type or string section runs past the section's {len(data)} bytes")
        self.strings = data[sstart:sstart + str_len]
        self.raw = data
        self.types: list[BtfType] = [BtfType(0, "void", 0, 0)]
        self.type_offsets: list[int] = [0]  # where each type's record starts in `raw`
        off, end = tstart, tstart + type_len
        while off < end:
            name_off, info, size_or_type = r.unpack("<III", off)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            where = f".BTF: type [{len(self.types)}]"
            if kind not in _EXTRA:
                raise BtfError(f"{where}: unknown kind {kind}")
            fixed, per = _EXTRA[kind]
            rec = off + 12
            if rec + fixed + per * vlen > end:
                raise BtfError(f"{where}: record runs past the type section")
            name = _string(self.strings, name_off, where)
            members: tuple[tuple[str, int, int], ...] = ()
            array = None
            if kind in (BTF_KIND_STRUCT, BTF_KIND_UNION):
                items = []
                for i in range(vlen):
                    m_name, m_type, m_off = r.unpack("<III", rec + 12 * i)
                    # kind_flag: the offset word holds bitfield size << 24 | bit offset
                    bit_off = m_off & 0xFFFFFF if info >> 31 else m_off
                    items.append((_string(self.strings, m_name, where), m_type, bit_off))
                members = tuple(items)
            elif kind == BTF_KIND_DATASEC:
                members = tuple(("", *r.unpack("<III", rec + 12 * i)) for i in range(vlen))  # type: ignore[misc]
            elif kind == BTF_KIND_ARRAY:
                array = r.unpack("<III", rec)  # type: ignore[assignment]
            self.types.append(BtfType(kind, name, size_or_type, vlen, members, array))
            self.type_offsets.append(off)
            off = rec + fixed + per * vlen

    def type(self, type_id: int) -> BtfType:
        if not 0 <= type_id < len(self.types):
            raise BtfError(f".BTF: type id {type_id} does not exist ({len(self.types) - 1} types)")
        return self.types[type_id]

    def skip_modifiers(self, type_id: int) -> int:
        """The type id under typedefs, const, volatile, restrict and type tags."""
        for _ in range(64):
            t = self.type(type_id)
            if t.kind not in _MODIFIERS:
                return type_id
            type_id = t.size_or_type
        raise BtfError(f".BTF: type [{type_id}]: a loop of modifiers")

    def size(self, type_id: int, depth: int = 0) -> int:
        """The size in bytes of a type, as the kernel's ``btf_type_size`` resolves it."""
        if depth > 64:
            raise BtfError(f".BTF: type [{type_id}]: nested too deep to have a size")
        t = self.type(self.skip_modifiers(type_id))
        if t.kind == BTF_KIND_PTR:
            return 8
        if t.kind == BTF_KIND_ARRAY:
            assert t.array is not None
            return t.array[2] * self.size(t.array[0], depth + 1)
        if t.kind == BTF_KIND_VAR:
            return self.size(t.size_or_type, depth + 1)
        if t.kind in (BTF_KIND_INT, BTF_KIND_STRUCT, BTF_KIND_UNION, BTF_KIND_ENUM, BTF_KIND_ENUM64,
                      BTF_KIND_DATASEC, BTF_KIND_FLOAT):
            return t.size_or_type
        raise BtfError(f".BTF: type [{type_id}] ({self.describe(type_id)}) has no size")

    def describe(self, type_id: int) -> str:
        """A short C-like name of a type for messages."""
        t = self.type(type_id)
        kinds = {BTF_KIND_STRUCT: "struct ", BTF_KIND_UNION: "union ", BTF_KIND_ENUM: "enum ", BTF_KIND_FWD: "fwd "}
        if t.kind == BTF_KIND_PTR:
            return self.describe(t.size_or_type) + " *"
        return (kinds.get(t.kind, "") + t.name) if t.name else f"type [{type_id}]"

    def func_id(self, name: str) -> int | None:
        """The id of the FUNC named `name` (func_info's type_id), None when there is none."""
        for i, t in enumerate(self.types):
            if t.kind == BTF_KIND_FUNC and t.name == name:
                return i
        return None

    def fixed_datasecs(self, section_sizes: dict[str, int], symbols: dict[tuple[int, str], int],
                       section_index: dict[str, int]) -> bytes:
        """The BTF with every DATASEC's size and its variables' offsets filled in from the ELF section sizes
        and symbols, which clang leaves to the loader (libbpf's ``btf_fixup_datasec``): what the kernel
        takes with ``BPF_BTF_LOAD``."""
        raw = bytearray(self.raw)
        for i, t in enumerate(self.types):
            if t.kind != BTF_KIND_DATASEC:
                continue
            off = self.type_offsets[i]
            if t.name in section_sizes:
                if section_sizes[t.name] > 0xFFFFFFFF:
                    raise BtfError(f"DATASEC {t.name}: section size {section_sizes[t.name]} does not fit BTF")
                struct.pack_into("<I", raw, off + 8, section_sizes[t.name])
            shndx = section_index.get(t.name, -1)
            for j, (_, var_id, _offset, size) in enumerate(t.members):
                value = symbols.get((shndx, self.var_name(var_id)))
                if value is not None and value > 0xFFFFFFFF:
                    raise BtfError(f"DATASEC {t.name}: variable offset {value} does not fit BTF")
                if value is not None:
                    struct.pack_into("<III", raw, off + 12 + 12 * j, var_id, value, size)
        return bytes(raw)

    def datasecs(self) -> dict[str, BtfType]:
        """Every DATASEC by section name (``.maps``, ``.data``, ``.rodata``, ``.bss``, ``.rodata.str1.1``...)."""
        return {t.name: t for t in self.types if t.kind == BTF_KIND_DATASEC}

    def var_name(self, type_id: int) -> str:
        t = self.type(type_id)
        if t.kind not in (BTF_KIND_VAR, BTF_KIND_FUNC):
            raise BtfError(f".BTF: DATASEC entry [{type_id}] is not a variable")
        return t.name


@dataclass(frozen=True, slots=True)
class LineInfo:
    insn_off: int  # bytes from the section's start
    file: str
    line: int
    col: int


@dataclass(frozen=True, slots=True)
class CoreRelo:
    insn_off: int  # bytes from the section's start
    type_id: int
    access: str
    kind: int


@dataclass
class BtfExt:
    """The ``.BTF.ext`` section: line info and CO-RE relocations, per ELF section name."""

    lines: dict[str, list[LineInfo]] = field(default_factory=dict)
    core_relos: dict[str, list[CoreRelo]] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes, btf: Btf) -> BtfExt:
        r = _Reader(data, ".BTF.ext")
        magic, version, _flags, hdr_len = r.unpack("<HBBI", 0)
        if magic != BTF_MAGIC or version != 1:
            raise BtfError(f".BTF.ext: bad magic {magic:#06x} or version {version}")
        _fi_off, _fi_len, li_off, li_len = r.unpack("<IIII", 8)
        ext = cls()
        for sec, recs in _info_sections(r, hdr_len + li_off, li_len, 16, btf, "line info"):
            for rec in recs:
                insn_off, file_off, line_off, line_col = r.unpack("<IIII", rec)
                del line_off  # the source line's text: not needed
                ext.lines.setdefault(sec, []).append(
                    LineInfo(insn_off, _string(btf.strings, file_off, ".BTF.ext line info"), line_col >> 10,
                             line_col & 0x3FF))
        if hdr_len >= 32:
            cr_off, cr_len = r.unpack("<II", 24)
            for sec, recs in _info_sections(r, hdr_len + cr_off, cr_len, 16, btf, "CO-RE relocations"):
                for rec in recs:
                    insn_off, type_id, access_off, kind = r.unpack("<IIII", rec)
                    ext.core_relos.setdefault(sec, []).append(
                        CoreRelo(insn_off, type_id, _string(btf.strings, access_off, ".BTF.ext CO-RE"), kind))
        return ext


def _info_sections(r: _Reader, start: int, length: int, min_rec: int, btf: Btf,
                   what: str) -> Iterator[tuple[str, list[int]]]:
    """(section name, record offsets) of one ``.BTF.ext`` info block: a record size, then per section its
    name, a count and that many records."""
    if length == 0:
        return
    end = start + length
    if end > len(r.data):
        raise BtfError(f".BTF.ext: {what} run past the section")
    (rec_size,) = r.unpack("<I", start)
    if rec_size < min_rec:
        raise BtfError(f".BTF.ext: {what} record size {rec_size} < {min_rec}")
    off = start + 4
    while off < end:
        name_off, count = r.unpack("<II", off)
        off += 8
        if off + count * rec_size > end:
            raise BtfError(f".BTF.ext: {what}: {count} records run past the section")
        yield _string(btf.strings, name_off, f".BTF.ext {what}"), [off + i * rec_size for i in range(count)]
        off += count * rec_size
