"""The ELF loader: a clang-built eBPF object file (``clang -O2 -g -target bpf``) read the way libbpf reads it,
into the `BpfObject` the kernel loader and the engine take.

Kernel/libbpf counterpart: ``bpf_object__open`` and ``bpf_object__load``'s preparation (tools/lib/bpf/
libbpf.c): XDP programs are the functions of the sections ``xdp``, ``xdp.frags``, ``xdp/devmap``,
``xdp/cpumap`` and their ``.frags`` forms (program type, expected attach type and ``BPF_F_XDP_HAS_FRAGS``
from the name, as libbpf's section table gives them); maps come from BTF (``.maps``: a struct whose members
encode the attributes as pointers to arrays, read as ``bpf_map__init_from_btf`` reads them) or from the
legacy ``maps`` section (``struct bpf_map_def``); ``.data``, ``.rodata`` (and ``.rodata.*``/``.data.*``) and
``.bss`` become one-entry array maps, ``.rodata`` read-only for the program; relocations (``.rel<section>``)
turn map references and global-data references into the ``fd_array`` form of `emu.ebpf.obj`, and
bpf-to-bpf calls (and callback pointers for ``bpf_loop``) are linked by appending every sub-program a
program uses after it, as libbpf's ``bpf_object__relocate_calls`` does.

Anything the emulator cannot run is refused here, before any process starts: an unsupported map type or
helper, a kfunc, an extern, a CO-RE relocation (an XDP program reads only its own ctx and packet, whose
layout the emulator defines, so CO-RE is rarely needed there; the loader does not resolve it), a
big-endian or non-BPF ELF file, and any malformed or truncated file.  Errors are `ObjectError`s:
``FILE:SECTION+INSN: what and why``.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from emu.ebpf import insn as I
from emu.ebpf.btf import BTF_KIND_ARRAY, BTF_KIND_PTR, BTF_KIND_STRUCT, Btf, BtfError, BtfExt
from emu.ebpf.helpers import HELPER_NAMES, MAP_TYPE_NAMES, helper_name, map_type_name
from emu.ebpf.obj import (
    BPF_F_MMAPABLE,
    BPF_F_RDONLY_PROG,
    BPF_F_XDP_HAS_FRAGS,
    BPF_MAP_TYPE_ARRAY,
    BPF_PSEUDO_CALL,
    BPF_PSEUDO_MAP_IDX,
    BPF_PSEUDO_MAP_IDX_VALUE,
    BpfObject,
    GlobalVar,
    MapDef,
    ProgDef,
)
from emu.errors import ObjectError

__all__ = ["XDP_SECTIONS", "ElfFile", "load_object", "parse_elf", "survey_object"]

# libbpf's section definitions for XDP: section name -> (expected attach, program flags).
XDP_SECTIONS: dict[str, tuple[str, int]] = {
    "xdp": ("xdp", 0),
    "xdp.frags": ("xdp", BPF_F_XDP_HAS_FRAGS),
    "xdp/devmap": ("xdp/devmap", 0),
    "xdp.frags/devmap": ("xdp/devmap", BPF_F_XDP_HAS_FRAGS),
    "xdp/cpumap": ("xdp/cpumap", 0),
    "xdp.frags/cpumap": ("xdp/cpumap", BPF_F_XDP_HAS_FRAGS),
}

EM_BPF = 247
ET_REL = 1
SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_NOBITS, SHT_REL = 1, 2, 3, 4, 8, 9
SHF_ALLOC, SHF_EXECINSTR = 0x2, 0x4
STT_OBJECT, STT_FUNC, STT_SECTION = 1, 2, 3
SHN_UNDEF, SHN_LORESERVE = 0, 0xFF00
R_BPF_64_64, R_BPF_64_32 = 1, 10

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_REL = struct.Struct("<QQ")
_MAP_DEF = struct.Struct("<IIIII")  # struct bpf_map_def: type, key_size, value_size, max_entries, map_flags

# BTF map attributes libbpf reads as __uint(name, N) (pointer to an array of N elements).
_UINT_ATTRS = ("type", "key_size", "value_size", "max_entries", "map_flags", "numa_node", "map_extra", "pinning")


@dataclass(frozen=True, slots=True)
class Section:
    index: int
    name: str
    type: int
    flags: int
    data: bytes  # zeroes for SHT_NOBITS
    link: int
    info: int
    entsize: int


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    type: int
    bind: int
    shndx: int
    value: int
    size: int


@dataclass
class ElfFile:
    """The parsed, not yet linked object: what `emu inspect` shows besides the loaded object."""

    path: Path
    sections: list[Section]
    symbols: list[Symbol]
    rels: dict[int, dict[int, tuple[Symbol, int]]]  # section index -> insn index -> (symbol, relocation type)
    btf: Btf | None
    ext: BtfExt
    other_programs: list[str] = field(default_factory=list)  # code sections that are not XDP (ignored)

    def err(self, where: str, message: str) -> ObjectError:
        return ObjectError(str(self.path), where, message)

    def by_name(self, name: str) -> Section | None:
        for s in self.sections:
            if s.name == name:
                return s
        return None


def parse_elf(path: Path) -> ElfFile:
    """Read and check an eBPF ELF file's headers, sections, symbols, relocations and BTF."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ObjectError(str(path), "", f"cannot read the object: {e.strerror or e}") from None
    f = str(path)
    if len(raw) < 16 or raw[:4] != b"\x7fELF":
        raise ObjectError(f, "", "not an ELF file (no \\x7fELF magic)")
    if raw[4] != 2:
        raise ObjectError(f, "", "a 32-bit ELF file; eBPF objects are ELF64")
    if raw[5] == 2:
        raise ObjectError(f, "", "a big-endian object (clang -target bpfeb); build it with -target bpf or bpfel")
    if raw[5] != 1:
        raise ObjectError(f, "", f"ELF data encoding {raw[5]} is neither little- nor big-endian")
    if len(raw) < _EHDR.size:
        raise ObjectError(f, "", f"truncated: {len(raw)} bytes, shorter than an ELF64 header")
    (_ident, e_type, e_machine, _ver, _entry, _phoff, shoff, _flags, _ehsize, _phentsize, _phnum, shentsize,
     shnum, shstrndx) = _EHDR.unpack_from(raw)
    if e_machine != EM_BPF:
        raise ObjectError(f, "", f"ELF machine {e_machine} is not BPF ({EM_BPF}): not an eBPF object")
    if e_type != ET_REL:
        raise ObjectError(f, "", f"ELF type {e_type} is not a relocatable object (clang -c output)")
    if shentsize != _SHDR.size or shnum == 0 or shoff + shnum * shentsize > len(raw):
        raise ObjectError(f, "", f"truncated or malformed: {shnum} section headers at offset {shoff} "
                          f"do not fit in {len(raw)} bytes")
    headers = [_SHDR.unpack_from(raw, shoff + i * shentsize) for i in range(shnum)]
    if shstrndx >= shnum:
        raise ObjectError(f, "", f"section name table index {shstrndx} out of range ({shnum} sections)")

    def body(i: int) -> bytes:
        _n, typ, _fl, _addr, off, size, *_ = headers[i]
        if typ == SHT_NOBITS:
            if size > 1 << 24:  # a .bss of more than 16 MiB: corrupt, not worth allocating
                raise ObjectError(f, f"section {i}", f"absurd size {size}")
            return bytes(size)
        if off + size > len(raw):
            raise ObjectError(f, f"section {i}", f"truncated: {size} bytes at offset {off} run past the "
                              f"file's {len(raw)} bytes")
        return raw[off:off + size]

    shstr = body(shstrndx)
    sections = []
    for i, (name_off, typ, flags, _addr, _off, _size, link, info, _align, entsize) in enumerate(headers):
        sections.append(Section(i, _cstr(shstr, name_off, f, "section names"), typ, flags, body(i), link, info,
                                entsize))

    symbols: list[Symbol] = []
    symtabs = [s for s in sections if s.type == SHT_SYMTAB]
    if len(symtabs) != 1:
        raise ObjectError(f, "", f"{len(symtabs)} symbol tables; an object file has one")
    symtab = symtabs[0]
    if symtab.link >= len(sections):
        raise ObjectError(f, ".symtab", f"string table index {symtab.link} out of range")
    strtab = sections[symtab.link].data
    for i in range(len(symtab.data) // _SYM.size):
        name_off, st_info, _other, shndx, value, size = _SYM.unpack_from(symtab.data, i * _SYM.size)
        symbols.append(Symbol(_cstr(strtab, name_off, f, ".strtab"), st_info & 0xF, st_info >> 4, shndx, value,
                              size))

    rels: dict[int, dict[int, tuple[Symbol, int]]] = {}
    for s in sections:
        if s.type not in (SHT_REL, SHT_RELA) or s.info >= len(sections):
            continue
        target = sections[s.info]
        if not target.flags & SHF_EXECINSTR:
            continue  # .rel.BTF, .rel.BTF.ext, .rel.debug_*: not the loader's
        if s.type == SHT_RELA:
            raise ObjectError(f, s.name, "RELA relocations; clang emits REL for BPF")
        table = rels.setdefault(target.index, {})
        for j in range(len(s.data) // _REL.size):
            offset, info = _REL.unpack_from(s.data, j * _REL.size)
            sym_idx, rtype = info >> 32, info & 0xFFFFFFFF
            if sym_idx >= len(symbols):
                raise ObjectError(f, s.name, f"relocation {j} names symbol {sym_idx} of {len(symbols)}")
            if offset % 8 or offset >= len(target.data):
                raise ObjectError(f, s.name, f"relocation {j} at offset {offset} is outside {target.name}'s "
                                  "instructions")
            table[offset // 8] = (symbols[sym_idx], rtype)

    btf: Btf | None = None
    ext = BtfExt()
    try:
        if (sec := _section(sections, ".BTF")) is not None:
            btf = Btf(sec.data)
            if (sec := _section(sections, ".BTF.ext")) is not None:
                ext = BtfExt.parse(sec.data, btf)
    except BtfError as e:
        raise ObjectError(f, "", str(e)) from None
    return ElfFile(path, sections, symbols, rels, btf, ext)


def _section(sections: list[Section], name: str) -> Section | None:
    return next((s for s in sections if s.name == name), None)


def _cstr(table: bytes, off: int, f: str, what: str) -> str:
    if off >= len(table):
        if off == 0:
            return ""
        raise ObjectError(f, what, f"name offset {off} outside the table ({len(table)} bytes)")
    end = table.find(b"\0", off)
    if end < 0:
        raise ObjectError(f, what, f"name at offset {off} is not NUL-terminated")
    return table[off:end].decode("utf-8", "replace")


def _is_data_section(name: str) -> bool:
    return name in (".data", ".rodata", ".bss") or name.startswith((".data.", ".rodata."))


class _Loader:
    """One object's maps, globals and linked programs."""

    def __init__(self, elf: ElfFile, strict: bool = True) -> None:
        self.elf = elf
        # strict: refuse what the emulator cannot run; not strict (emu inspect): record it in `problems`
        self.strict = strict
        self.problems: dict[str, list[str]] = {}  # program name ("" for the object) -> what it needs
        self.maps: list[MapDef] = []
        # (section index, offset of the map's definition) -> map index, for map relocations
        self.map_at: dict[tuple[int, int], int] = {}
        self.data_map: dict[int, int] = {}  # global-data section index -> map index
        self.globals: dict[str, GlobalVar] = {}

    def refuse(self, prog: str, where: str, message: str) -> None:
        if self.strict:
            raise self.elf.err(where, message)
        self.problems.setdefault(prog, []).append(f"{where}: {message}")

    def add_map(self, m: MapDef, where: str) -> int:
        if m.type not in MAP_TYPE_NAMES:
            if not self.strict:
                self.maps.append(m)
                return len(self.maps) - 1
            raise self.elf.err(where, f"map '{m.name}': {map_type_name(m.type)} (type {m.type}) is not supported; "
                               f"supported: {', '.join(MAP_TYPE_NAMES.values())}")
        if any(x.name == m.name for x in self.maps):
            raise self.elf.err(where, f"map '{m.name}' is defined twice")
        self.maps.append(m)
        return len(self.maps) - 1

    def var_offset(self, sec: Section, name: str, btf_offset: int) -> int:
        """A variable's offset in its section: from its symbol, as libbpf's ``btf_fixup_datasec`` takes it
        (clang leaves the DATASEC's offsets 0 for the loader to fill in)."""
        for s in self.elf.symbols:
            if s.shndx == sec.index and s.name == name and s.type != STT_SECTION:
                return s.value
        return btf_offset

    # -- maps ------------------------------------------------------------------------------------------
    def btf_maps(self, sec: Section) -> None:
        btf = self.elf.btf
        if btf is None:
            raise self.elf.err(".maps", "BTF-defined maps but no .BTF section (build with -g)")
        datasec = btf.datasecs().get(".maps")
        if datasec is None:
            raise self.elf.err(".maps", "no BTF DATASEC describes the .maps section")
        try:
            for _, var_id, _offset, _size in datasec.members:
                name = btf.var_name(var_id)
                offset = self.var_offset(sec, name, _offset)
                m = self.btf_map_def(btf, name, btf.type(var_id).size_or_type)
                self.map_at[(sec.index, offset)] = self.add_map(m, ".maps")
        except BtfError as e:
            raise self.elf.err(".maps", str(e)) from None

    def btf_map_def(self, btf: Btf, name: str, type_id: int) -> MapDef:
        where = ".maps"
        st = btf.type(btf.skip_modifiers(type_id))
        if st.kind != BTF_KIND_STRUCT:
            raise self.elf.err(where, f"map '{name}' is not a struct ({btf.describe(type_id)})")
        attrs: dict[str, int] = {}
        for m_name, m_type, _bit_off in st.members:
            t = btf.type(btf.skip_modifiers(m_type))
            if m_name in _UINT_ATTRS:
                arr = btf.type(btf.skip_modifiers(t.size_or_type)) if t.kind == BTF_KIND_PTR else None
                if arr is None or arr.kind != BTF_KIND_ARRAY or arr.array is None:
                    raise self.elf.err(where, f"map '{name}': attribute '{m_name}' is not __uint(...) "
                                       "(a pointer to an array)")
                attrs[m_name] = arr.array[2]
            elif m_name in ("key", "value"):
                if t.kind != BTF_KIND_PTR:
                    raise self.elf.err(where, f"map '{name}': '{m_name}' is not __type(...) (a pointer)")
                size = btf.size(t.size_or_type)
                other = attrs.get(f"{m_name}_size")
                if other is not None and other != size:
                    raise self.elf.err(where, f"map '{name}': {m_name}_size {other} disagrees with "
                                       f"{m_name}'s type ({btf.describe(t.size_or_type)}, {size} bytes)")
                attrs[f"{m_name}_size"] = size
            elif m_name in ("values", "inner_map", "inner_map_idx"):
                raise self.elf.err(where, f"map '{name}': '{m_name}' (statically initialised maps, map in map) "
                                   "is not supported")
            else:
                raise self.elf.err(where, f"map '{name}': unknown attribute '{m_name}'")
        if "type" not in attrs:
            raise self.elf.err(where, f"map '{name}' has no type")
        return MapDef(name, attrs["type"], attrs.get("key_size", 0), attrs.get("value_size", 0),
                      attrs.get("max_entries", 0), attrs.get("map_flags", 0), ".maps")

    def legacy_maps(self, sec: Section) -> None:
        syms = sorted((s for s in self.elf.symbols if s.shndx == sec.index and s.type != STT_SECTION and s.name),
                      key=lambda s: s.value)
        if not syms:
            raise self.elf.err("maps", "a legacy maps section without map symbols")
        def_size = len(sec.data) // len(syms)
        if def_size < 16 or len(sec.data) % len(syms):
            raise self.elf.err("maps", f"{len(sec.data)} bytes for {len(syms)} maps: not struct bpf_map_def")
        for s in syms:
            if s.value + def_size > len(sec.data) or s.value % def_size:
                raise self.elf.err("maps", f"map '{s.name}' at offset {s.value} is not a whole bpf_map_def")
            fields = sec.data[s.value:s.value + def_size] + bytes(max(0, 20 - def_size))
            mtype, key_size, value_size, max_entries, flags = _MAP_DEF.unpack_from(fields)
            if any(fields[20:def_size]):
                raise self.elf.err("maps", f"map '{s.name}': bpf_map_def fields past map_flags are not supported")
            self.map_at[(sec.index, s.value)] = self.add_map(
                MapDef(s.name, mtype, key_size, value_size, max_entries, flags, "maps"), "maps")

    def data_maps(self) -> None:
        btf = self.elf.btf
        secs = btf.datasecs() if btf is not None else {}
        for sec in self.elf.sections:
            if not (_is_data_section(sec.name) and sec.flags & SHF_ALLOC) or not sec.data:
                continue
            flags = BPF_F_MMAPABLE | (BPF_F_RDONLY_PROG if sec.name.startswith(".rodata") else 0)
            data = bytes(len(sec.data)) if sec.type == SHT_NOBITS else sec.data
            idx = self.add_map(MapDef(sec.name, BPF_MAP_TYPE_ARRAY, 4, len(sec.data), 1, flags, sec.name, data),
                               sec.name)
            self.data_map[sec.index] = idx
            if btf is None or sec.name not in secs:
                continue
            try:
                for _, var_id, _offset, size in secs[sec.name].members:
                    name = btf.var_name(var_id)
                    offset = self.var_offset(sec, name, _offset)
                    if offset + size > len(sec.data):
                        raise self.elf.err(sec.name, f"variable '{name}' at {offset}+{size} is outside the section")
                    self.globals.setdefault(name, GlobalVar(name, idx, offset, size))
            except BtfError as e:
                raise self.elf.err(sec.name, str(e)) from None

    # -- programs --------------------------------------------------------------------------------------
    def functions(self, sec: Section) -> list[Symbol]:
        return sorted((s for s in self.elf.symbols if s.shndx == sec.index and s.type == STT_FUNC),
                      key=lambda s: s.value)

    def function_at(self, sec: Section, insn_idx: int, where: str) -> tuple[int, int, str]:
        """(start, end, name) in instructions of the function starting at `insn_idx` of `sec`."""
        for s in self.functions(sec):
            if s.value == insn_idx * 8:
                end = (s.value + s.size) // 8 if s.size else len(sec.data) // 8
                if end > len(sec.data) // 8 or s.value % 8:
                    raise self.elf.err(where, f"function '{s.name}' runs past section {sec.name}")
                return insn_idx, end, s.name
        raise self.elf.err(where, f"call to instruction {insn_idx} of {sec.name}, where no function starts")

    def link(self, sec: Section, start: int, end: int, name: str) -> ProgDef:
        """The program whose entry function is `sec`[start:end], with every sub-program it uses appended."""
        elf = self.elf
        out = bytearray()
        placed: dict[tuple[int, int], int] = {}
        work: list[tuple[Section, int, int, int]] = []
        helpers: list[int] = []
        lines: dict[int, str] = {}

        funcs: list[tuple[int, str]] = []

        def place(s: Section, a: int, b: int, fname: str) -> int:
            key = (s.index, a)
            if key not in placed:
                placed[key] = len(out) // 8
                funcs.append((placed[key], fname))
                out.extend(s.data[a * 8:b * 8])
                work.append((s, a, b, placed[key]))
                for li in elf.ext.lines.get(s.name, ()):
                    if a <= li.insn_off // 8 < b:
                        lines[placed[key] + li.insn_off // 8 - a] = f"{li.file}:{li.line}"
            return placed[key]

        place(sec, start, end, name)
        while work:
            s, a, b, base = work.pop(0)
            for relo in elf.ext.core_relos.get(s.name, ()):
                if a <= relo.insn_off // 8 < b:
                    assert elf.btf is not None
                    self.refuse(name, f"{s.name}+{relo.insn_off // 8}", f"CO-RE relocation (kind {relo.kind}, "
                                  f"{elf.btf.describe(relo.type_id)} access {relo.access}) is not supported; "
                                  "an XDP program's ctx and packet need none")
            rels = elf.rels.get(s.index, {})
            i = a
            while i < b:
                where = f"{s.name}+{i}"
                ins = I.decode(s.data, i)
                at = base + i - a
                rel = rels.get(i)
                if ins.code == I.LD_IMM64:
                    if i + 1 >= b:
                        raise elf.err(where, "ld_imm64 without its second half at the end of the function")
                    if rel is not None:
                        self.ld_imm64(out, at, ins, rel, where, place)
                    elif ins.src not in (0,):
                        raise elf.err(where, f"ld_imm64 with src_reg {ins.src} and no relocation")
                    i += 2
                    continue
                if rel is not None and ins.code != I.CALL:
                    raise elf.err(where, f"relocation against '{rel[0].name}' on an instruction that is not "
                                  f"ld_imm64 or call ({I.disasm(ins)})")
                if ins.code == I.CALL:
                    if ins.src == BPF_PSEUDO_CALL:
                        if rel is not None:
                            sym = rel[0]
                            if sym.shndx == SHN_UNDEF or sym.shndx >= len(elf.sections):
                                raise elf.err(where, f"call to extern function '{sym.name}' is not supported")
                            ts = elf.sections[sym.shndx]
                            target = sym.value // 8 + ins.imm + 1
                        else:
                            ts, target = s, i + ins.imm + 1
                        ta, tb, fname = self.function_at(ts, target, where)
                        callee = place(ts, ta, tb, fname)
                        struct.pack_into("<i", out, at * 8 + 4, callee - (at + 1))
                    elif ins.src == I.BPF_PSEUDO_KFUNC_CALL:
                        self.refuse(name, where, f"call to kernel function (kfunc) "
                                    f"{rel[0].name if rel else ins.imm} is not supported")
                    elif ins.src == 0:
                        if ins.imm not in HELPER_NAMES:
                            self.refuse(name, where, f"unknown func {helper_name(ins.imm)}#{ins.imm}: the emulator "
                                        "does not support this helper (emu inspect lists the supported ones)")
                        if ins.imm not in helpers:
                            helpers.append(ins.imm)
                    else:
                        raise elf.err(where, f"call with src_reg {ins.src}")
                i += 1
        return ProgDef(name, sec.name, bytes(out), XDP_SECTIONS[sec.name][0], XDP_SECTIONS[sec.name][1],
                       tuple(helpers), lines, tuple(funcs))

    def ld_imm64(self, out: bytearray, at: int, ins: I.Insn, rel: tuple[Symbol, int], where: str,
                 place: object) -> None:
        elf = self.elf
        sym, rtype = rel
        if rtype != R_BPF_64_64:
            raise elf.err(where, f"relocation type {rtype} on ld_imm64 (want R_BPF_64_64)")
        if sym.shndx == SHN_UNDEF:
            raise elf.err(where, f"extern '{sym.name}' (__kconfig/__ksym) is not supported")
        if sym.shndx >= SHN_LORESERVE or sym.shndx >= len(elf.sections):
            raise elf.err(where, f"relocation against '{sym.name}' in special section {sym.shndx:#x}")
        ts = elf.sections[sym.shndx]
        regs = out[at * 8 + 1] & 0x0F
        if (ts.index, sym.value) in self.map_at and ts.name in (".maps", "maps"):
            idx = self.map_at[(ts.index, sym.value)]
            out[at * 8 + 1] = regs | BPF_PSEUDO_MAP_IDX << 4
            struct.pack_into("<i", out, at * 8 + 4, idx)
            struct.pack_into("<i", out, at * 8 + 12, 0)
        elif ts.index in self.data_map:
            idx = self.data_map[ts.index]
            offset = ins.imm + sym.value
            if not 0 <= offset <= len(ts.data):
                raise elf.err(where, f"reference to {ts.name}+{offset}, outside the section ({len(ts.data)} bytes)")
            out[at * 8 + 1] = regs | BPF_PSEUDO_MAP_IDX_VALUE << 4
            struct.pack_into("<i", out, at * 8 + 4, idx)
            struct.pack_into("<i", out, at * 8 + 12, offset)
        elif ts.flags & SHF_EXECINSTR:
            # a function's address (a bpf_loop callback): libbpf's RELO_SUBPROG_ADDR
            if (sym.value + ins.imm) % 8:
                raise elf.err(where, f"function pointer {sym.name}+{ins.imm} is not at an instruction")
            ta, tb, fname = self.function_at(ts, (sym.value + ins.imm) // 8, where)
            callee = place(ts, ta, tb, fname)  # type: ignore[operator]
            out[at * 8 + 1] = regs | I.BPF_PSEUDO_FUNC << 4
            struct.pack_into("<i", out, at * 8 + 4, callee - (at + 1))
            struct.pack_into("<i", out, at * 8 + 12, 0)
        elif ts.name in (".maps", "maps"):
            raise elf.err(where, f"reference to '{sym.name}' at {ts.name}+{sym.value}, where no map is defined")
        else:
            raise elf.err(where, f"reference to '{sym.name}' in section {ts.name or ts.index}, which is neither a "
                          "map nor global data")

    def programs(self) -> dict[str, ProgDef]:
        progs: dict[str, ProgDef] = {}
        for sec in self.elf.sections:
            if not (sec.flags & SHF_EXECINSTR) or sec.type != SHT_PROGBITS:
                continue
            if len(sec.data) % 8:
                raise self.elf.err(sec.name, f"{len(sec.data)} bytes of code, not a whole number of instructions")
            if sec.name == ".text":
                continue  # sub-programs, linked where called
            if sec.name not in XDP_SECTIONS:
                if sec.name.startswith("xdp"):
                    raise self.elf.err(sec.name, "not an XDP section name libbpf accepts (one of "
                                       f"{', '.join(XDP_SECTIONS)})")
                self.elf.other_programs.append(sec.name)
                continue
            funcs = [s for s in self.functions(sec) if s.size]
            if not funcs:
                funcs = [Symbol(sec.name, STT_FUNC, 1, sec.index, 0, len(sec.data))]
            for fn in funcs:
                if fn.value % 8 or fn.value + fn.size > len(sec.data):
                    raise self.elf.err(sec.name, f"function '{fn.name}' runs past the section")
                if fn.name in progs:
                    raise self.elf.err(sec.name, f"program '{fn.name}' is defined twice")
                progs[fn.name] = self.link(sec, fn.value // 8, (fn.value + fn.size) // 8, fn.name)
        if not progs:
            raise self.elf.err("", "no XDP program: no function in a section "
                               f"{', '.join(XDP_SECTIONS)}" + (f" (found {', '.join(self.elf.other_programs)})"
                                                             if self.elf.other_programs else ""))
        return progs


def load_object(path: Path, globals: Mapping[str, object] | None = None) -> BpfObject:
    """Read, check, relocate and link an eBPF object file; `globals` sets ``.rodata``/``.data``/``.bss``
    variables by name before load (ints, or bytes/str no longer than the variable), as a libbpf skeleton's
    ``skel->rodata->var = ...`` does.  Raises `ObjectError` (a `BadInputError`) for anything wrong."""
    obj, _, _ = _load(parse_elf(Path(path)), True, globals)
    return obj


def survey_object(path: Path) -> tuple[BpfObject, ElfFile, dict[str, list[str]]]:
    """`load_object` that records, instead of refusing, what the emulator does not support (helpers, map
    types, kfuncs, CO-RE relocations), by program name ("" for the object): for ``emu inspect``.  A
    malformed file is still an `ObjectError`."""
    return _load(parse_elf(Path(path)), False, None)


def _load(elf: ElfFile, strict: bool, globals: Mapping[str, object] | None) \
        -> tuple[BpfObject, ElfFile, dict[str, list[str]]]:
    ld = _Loader(elf, strict)
    for sec in elf.sections:
        if sec.name == ".maps":
            ld.btf_maps(sec)
        elif sec.name == "maps":
            ld.legacy_maps(sec)
    ld.data_maps()
    for m in ld.maps:
        if m.type not in MAP_TYPE_NAMES:
            ld.problems.setdefault("", []).append(f"{m.section}: map '{m.name}': {map_type_name(m.type)} "
                                                  f"(type {m.type}) is not supported")
    programs = ld.programs()
    lic = elf.by_name("license")
    license_ = lic.data.split(b"\0", 1)[0].decode("utf-8", "replace") if lic is not None else ""
    maps = ld.maps
    if globals:
        maps = set_globals(elf, maps, ld.globals, globals)
    btf = None
    if elf.btf is not None:
        try:
            btf = elf.btf.fixed_datasecs({sec.name: len(sec.data) for sec in elf.sections},
                                         {(sym.shndx, sym.name): sym.value for sym in elf.symbols},
                                         {sec.name: sec.index for sec in elf.sections})
        except BtfError as e:
            raise elf.err(".BTF", str(e)) from None
    return BpfObject(elf.path, programs, maps, ld.globals, license_, btf), elf, ld.problems


def set_globals(elf: ElfFile, maps: list[MapDef], known: Mapping[str, GlobalVar],
                values: Mapping[str, object]) -> list[MapDef]:
    """`maps` with the global-data maps' initial contents changed as `values` says."""
    maps = list(maps)
    for name, value in values.items():
        var = known.get(name)
        if var is None:
            raise elf.err("globals", f"no global variable '{name}' (the object has: "
                          f"{', '.join(sorted(known)) or 'none'})")
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int):
            lo = -(1 << (8 * var.size - 1))
            if not lo <= value < 1 << (8 * var.size):
                raise elf.err("globals", f"'{name}' = {value} does not fit the variable's {var.size} bytes")
            raw = (value & ((1 << (8 * var.size)) - 1)).to_bytes(var.size, "little")
        elif isinstance(value, str | bytes | bytearray):
            raw = value.encode() if isinstance(value, str) else bytes(value)
            if len(raw) > var.size:
                raise elf.err("globals", f"'{name}': {len(raw)} bytes do not fit the variable's {var.size}")
            raw = raw.ljust(var.size, b"\0")
        else:
            raise elf.err("globals", f"'{name}' = {value!r}: give an integer, bytes or a string")
        m = maps[var.map_index]
        data = bytearray(m.data if m.data is not None else bytes(m.value_size))
        data[var.offset:var.offset + var.size] = raw
        maps[var.map_index] = dataclasses.replace(m, data=bytes(data))
    return maps
