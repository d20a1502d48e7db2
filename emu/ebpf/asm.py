"""A tiny eBPF assembler: ``struct bpf_insn`` bytes from Python calls, for tests and hand-written programs.

Kernel counterpart: the ``BPF_*`` instruction macros of include/linux/filter.h (``BPF_ALU64_IMM``,
``BPF_LDX_MEM``, ``BPF_LD_MAP_FD`` ...), with the same operand order (destination first).  Map references
use ``BPF_PSEUDO_MAP_IDX``/``_IDX_VALUE`` (the map's index in `emu.ebpf.obj.BpfObject.maps`), as the ELF
loader leaves them.
"""

from __future__ import annotations

import struct

from emu.ebpf.obj import BPF_PSEUDO_CALL, BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE

_I = struct.Struct("<BBhi")
BPF_PSEUDO_FUNC = 4

ALU = {"add": 0x00, "sub": 0x10, "mul": 0x20, "div": 0x30, "or": 0x40, "and": 0x50, "lsh": 0x60, "rsh": 0x70,
       "neg": 0x80, "mod": 0x90, "xor": 0xA0, "mov": 0xB0, "arsh": 0xC0,
       "sdiv": 0x30, "smod": 0x90}  # sdiv/smod: off = 1
JMP = {"ja": 0x00, "jeq": 0x10, "jgt": 0x20, "jge": 0x30, "jset": 0x40, "jne": 0x50, "jsgt": 0x60,
       "jsge": 0x70, "jlt": 0xA0, "jle": 0xB0, "jslt": 0xC0, "jsle": 0xD0}
SIZE = {"w": 0x00, "h": 0x08, "b": 0x10, "dw": 0x18}
ATOMIC = {"add": 0x00, "or": 0x40, "and": 0x50, "xor": 0xA0, "fetch_add": 0x01, "fetch_or": 0x41,
          "fetch_and": 0x51, "fetch_xor": 0xA1, "xchg": 0xE1, "cmpxchg": 0xF1}


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One raw instruction; `imm` may be given unsigned (it is wrapped to s32)."""
    imm &= 0xFFFFFFFF
    return _I.pack(code, (src << 4) | dst, off, imm - (1 << 32) if imm >= 1 << 31 else imm)


def _alu(cls: int, op: str, dst: int, src: int | None, imm: int, off: int) -> bytes:
    signed = op in ("sdiv", "smod")
    if src is None:
        return insn(cls | ALU[op], dst, 0, 1 if signed else off, imm)
    return insn(cls | ALU[op] | 0x08, dst, src, 1 if signed else off, 0)


def alu64(op: str, dst: int, src: int | None = None, imm: int = 0, off: int = 0) -> bytes:
    """``dst op= src`` (64-bit); with `src` None the immediate.  `off` 8/16/32 with ``mov``: movsx."""
    return _alu(0x07, op, dst, src, imm, off)


def alu32(op: str, dst: int, src: int | None = None, imm: int = 0, off: int = 0) -> bytes:
    return _alu(0x04, op, dst, src, imm, off)


def mov(dst: int, imm: int) -> bytes:
    return alu64("mov", dst, imm=imm)


def endian(dst: int, bits: int, big: bool) -> bytes:
    """``BPF_ALU | BPF_END`` (to_le/to_be)."""
    return insn(0xD4 | (0x08 if big else 0), dst, 0, 0, bits)


def bswap(dst: int, bits: int) -> bytes:
    """``BPF_ALU64 | BPF_END``: unconditional swap (cpu v4)."""
    return insn(0xD7, dst, 0, 0, bits)


def ld_imm64(dst: int, value: int, src: int = 0, hi: int | None = None) -> bytes:
    value &= (1 << 64) - 1
    return insn(0x18, dst, src, 0, value & 0xFFFFFFFF) + insn(0, 0, 0, 0, (value >> 32) if hi is None else hi)


def ld_map(dst: int, index: int) -> bytes:
    return ld_imm64(dst, index, BPF_PSEUDO_MAP_IDX, hi=0)


def ld_map_value(dst: int, index: int, off: int = 0) -> bytes:
    return ld_imm64(dst, index, BPF_PSEUDO_MAP_IDX_VALUE, hi=off)


def ld_func(dst: int, rel: int) -> bytes:
    """A callback's address (``BPF_PSEUDO_FUNC``), `rel` instructions after this ld_imm64's first half."""
    return insn(0x18, dst, BPF_PSEUDO_FUNC, 0, rel) + insn(0)


def ldx(size: str, dst: int, src: int, off: int = 0) -> bytes:
    return insn(0x61 | SIZE[size], dst, src, off)


def ldsx(size: str, dst: int, src: int, off: int = 0) -> bytes:
    return insn(0x81 | SIZE[size], dst, src, off)


def stx(size: str, dst: int, src: int, off: int = 0) -> bytes:
    return insn(0x63 | SIZE[size], dst, src, off)


def st(size: str, dst: int, off: int, imm: int) -> bytes:
    return insn(0x62 | SIZE[size], dst, 0, off, imm)


def atomic(size: str, op: str, dst: int, src: int, off: int = 0) -> bytes:
    return insn(0xC3 | SIZE[size], dst, src, off, ATOMIC[op])


def jmp(op: str, dst: int, src: int | None = None, imm: int = 0, off: int = 0) -> bytes:
    if src is None:
        return insn(0x05 | JMP[op], dst, 0, off, imm)
    return insn(0x05 | JMP[op] | 0x08, dst, src, off, 0)


def jmp32(op: str, dst: int, src: int | None = None, imm: int = 0, off: int = 0) -> bytes:
    if src is None:
        return insn(0x06 | JMP[op], dst, 0, off, imm)
    return insn(0x06 | JMP[op] | 0x08, dst, src, off, 0)


def ja(off: int) -> bytes:
    return insn(0x05, 0, 0, off)


def gotol(imm: int) -> bytes:
    return insn(0x06, 0, 0, 0, imm)


def call(helper: int) -> bytes:
    return insn(0x85, 0, 0, 0, helper)


def call_local(rel: int) -> bytes:
    """bpf-to-bpf call to the instruction `rel` after the next one."""
    return insn(0x85, 0, BPF_PSEUDO_CALL, 0, rel)


def exit_() -> bytes:
    return insn(0x95)


def ret(imm: int) -> bytes:
    """``r0 = imm; exit``."""
    return mov(0, imm) + exit_()


def program(*parts: bytes) -> bytes:
    return b"".join(parts)
