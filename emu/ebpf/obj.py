"""A loaded eBPF object: what libbpf hands the kernel after it has parsed and relocated an ELF file.

Kernel counterpart: the ``bpf_attr`` of ``BPF_MAP_CREATE`` (`MapDef`) and of ``BPF_PROG_LOAD`` (`ProgDef`).
Instructions are ``struct bpf_insn`` (8 bytes, little-endian) after relocation, in the form the kernel takes
with an ``fd_array``: a map reference is ``BPF_LD | BPF_IMM | BPF_DW`` with ``src_reg = BPF_PSEUDO_MAP_IDX``
and ``imm`` the index of the map in `BpfObject.maps`; a pointer into a global-data map (``.data``,
``.rodata``, ``.bss``) is ``src_reg = BPF_PSEUDO_MAP_IDX_VALUE`` with the map index in the first ``imm`` and
the offset in the second.  Sub-programs (bpf-to-bpf calls) are appended after the entry program and called
with ``BPF_JMP | BPF_CALL``, ``src_reg = BPF_PSEUDO_CALL``, ``imm`` the relative instruction offset, as
libbpf links them.  The ELF loader produces these; the kernel loader and the engine consume them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# include/uapi/linux/bpf.h
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_MAP_VALUE = 2
BPF_PSEUDO_MAP_IDX = 5
BPF_PSEUDO_MAP_IDX_VALUE = 6
BPF_PSEUDO_CALL = 1

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_DEVMAP = 14
BPF_MAP_TYPE_CPUMAP = 16
BPF_MAP_TYPE_DEVMAP_HASH = 25
BPF_MAP_TYPE_RINGBUF = 27

BPF_F_RDONLY_PROG = 1 << 7  # .rodata: the program may not write it
BPF_F_MMAPABLE = 1 << 10  # global-data maps are mmap-able arrays

# Program flags libbpf derives from the section name.
BPF_F_XDP_HAS_FRAGS = 1 << 5


@dataclass(frozen=True, slots=True)
class MapDef:
    """One map of the object, as ``BPF_MAP_CREATE`` receives it.

    `data` is the initial content of a global-data map (``.data``/``.rodata``: the section's bytes; ``.bss``:
    zeroes), one value of `value_size` bytes; None for every other map.  `section` is where the map was
    defined (``.maps``, ``maps``, ``.data``, ``.rodata``, ``.bss``, ``.rodata.str1.1`` ...).
    """

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int = 0
    section: str = ".maps"
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class GlobalVar:
    """A global variable in a global-data map (from BTF's DATASEC): map index, offset and size in bytes."""

    name: str
    map_index: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class ProgDef:
    """One program of the object, relocated and linked (see the module docstring for the instruction form).

    `section` is the ELF section (``xdp``, ``xdp.frags``, ``xdp/devmap``, ``xdp/cpumap``); `expected_attach`
    is the libbpf attach kind (``xdp``, ``xdp/devmap``, ``xdp/cpumap``); `flags` carries
    ``BPF_F_XDP_HAS_FRAGS`` for ``.frags`` sections; `helpers` lists the helper ids the program (with its
    sub-programs) calls; `lines` maps instruction index -> ``file:line`` from BTF.ext line info, when present;
    `funcs` lists where each function of the linked program starts and its name, the entry ``(0, name)``
    first (what the kernel's ``func_info`` describes, with `BpfObject.btf`).
    """

    name: str
    section: str
    insns: bytes
    expected_attach: str = "xdp"
    flags: int = 0
    helpers: tuple[int, ...] = ()
    lines: dict[int, str] = field(default_factory=dict)
    funcs: tuple[tuple[int, str], ...] = ()

    @property
    def insn_count(self) -> int:
        return len(self.insns) // 8

    @property
    def frags(self) -> bool:
        """Whether the program supports XDP multi-buffer (``BPF_F_XDP_HAS_FRAGS``, from an ``xdp.frags``
        section): the kernel's ``prog->aux->xdp_has_frags``."""
        return bool(self.flags & BPF_F_XDP_HAS_FRAGS)


@dataclass(frozen=True, slots=True)
class BpfObject:
    """A whole object file: its programs by function name, its maps (the instructions refer to them by
    index), its global variables and its license; `btf` is the object's ``.BTF`` as the kernel takes it
    (DATASEC sizes and offsets filled in, as libbpf does), None without BTF."""

    path: Path
    programs: dict[str, ProgDef]
    maps: list[MapDef]
    globals: dict[str, GlobalVar] = field(default_factory=dict)
    license: str = ""
    btf: bytes | None = None

    def map_index(self, name: str) -> int:
        for i, m in enumerate(self.maps):
            if m.name == name:
                return i
        raise KeyError(name)
