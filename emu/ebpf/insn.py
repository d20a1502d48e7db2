"""eBPF instructions: the opcode fields of ``struct bpf_insn`` and a disassembler in the kernel's own syntax
(``kernel/bpf/disasm.c``, what the verifier log and ``bpftool prog dump xlated`` print).

An instruction is 8 bytes, little-endian: ``code`` (u8), ``dst_reg:4 | src_reg:4`` (u8), ``off`` (s16),
``imm`` (s32); ``BPF_LD | BPF_IMM | BPF_DW`` takes two slots, the second holding the upper 32 bits in its
``imm``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import NamedTuple

__all__ = ["INSN", "Insn", "decode", "disasm", "disasm_program", "is_helper_call", "is_ld_imm64", "iter_insns"]

INSN = struct.Struct("<BBhi")

# Instruction classes (code & 0x07).
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_JMP32, BPF_ALU64 = range(8)
# Size (code & 0x18) and mode (code & 0xe0) of loads and stores.
BPF_W, BPF_H, BPF_B, BPF_DW = 0x00, 0x08, 0x10, 0x18
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_MEMSX, BPF_ATOMIC = 0x00, 0x20, 0x40, 0x60, 0x80, 0xC0
# Source (code & 0x08) and operation (code & 0xf0) of ALU and jumps.
BPF_K, BPF_X = 0x00, 0x08
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH = (i << 4 for i in range(8))
BPF_NEG, BPF_MOD, BPF_XOR, BPF_MOV, BPF_ARSH, BPF_END = 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET, BPF_JNE, BPF_JSGT, BPF_JSGE = (i << 4 for i in range(8))
BPF_CALL, BPF_EXIT, BPF_JLT, BPF_JLE, BPF_JSLT, BPF_JSLE = 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0
BPF_FETCH, BPF_XCHG, BPF_CMPXCHG = 0x01, 0xE0 | 0x01, 0xF0 | 0x01

BPF_PSEUDO_KFUNC_CALL = 2
BPF_PSEUDO_FUNC = 4

LD_IMM64 = BPF_LD | BPF_IMM | BPF_DW
CALL = BPF_JMP | BPF_CALL


class Insn(NamedTuple):
    code: int
    dst: int
    src: int
    off: int
    imm: int


def decode(raw: bytes | memoryview, i: int) -> Insn:
    """Instruction `i` of `raw` (which must hold it)."""
    code, regs, off, imm = INSN.unpack_from(raw, i * 8)
    return Insn(code, regs & 0x0F, regs >> 4, off, imm)


def iter_insns(raw: bytes | memoryview) -> Iterator[tuple[int, Insn]]:
    """(index, instruction) for every slot of `raw`, the second slot of an ``ld_imm64`` included."""
    for i in range(len(raw) // 8):
        yield i, decode(raw, i)


def is_ld_imm64(insn: Insn) -> bool:
    return insn.code == LD_IMM64


def is_helper_call(insn: Insn) -> bool:
    return insn.code == CALL and insn.src == 0


_ALU = {BPF_ADD: "+=", BPF_SUB: "-=", BPF_MUL: "*=", BPF_DIV: "/=", BPF_OR: "|=", BPF_AND: "&=",
        BPF_LSH: "<<=", BPF_RSH: ">>=", BPF_MOD: "%=", BPF_XOR: "^=", BPF_MOV: "=", BPF_ARSH: "s>>="}
_JMP = {BPF_JEQ: "==", BPF_JGT: ">", BPF_JGE: ">=", BPF_JSET: "&", BPF_JNE: "!=", BPF_JSGT: "s>",
        BPF_JSGE: "s>=", BPF_JLT: "<", BPF_JLE: "<=", BPF_JSLT: "s<", BPF_JSLE: "s<="}
_SIZE = {BPF_W: "u32", BPF_H: "u16", BPF_B: "u8", BPF_DW: "u64"}
_ATOMIC = {BPF_ADD: "+=", BPF_OR: "|=", BPF_AND: "&=", BPF_XOR: "^="}


def disasm(insn: Insn, next_imm: int = 0, helper: Callable[[int], str] | None = None) -> str:
    """One instruction as the kernel's verifier log prints it (``r0 = *(u32 *)(r1 +4)``); `next_imm` is the
    second slot's ``imm`` of an ``ld_imm64``; `helper` names helper ids."""
    cls, op, d, s = insn.code & 0x07, insn.code & 0xF0, insn.dst, insn.src
    if cls in (BPF_ALU, BPF_ALU64):
        r = "r" if cls == BPF_ALU64 else "w"
        src = f"{r}{s}" if insn.code & BPF_X else str(insn.imm)
        if op == BPF_NEG:
            return f"{r}{d} = -{r}{d}"
        if op == BPF_END:
            if cls == BPF_ALU64:
                return f"r{d} = bswap{insn.imm} r{d}"
            return f"r{d} = {'be' if insn.code & BPF_X else 'le'}{insn.imm} r{d}"
        if op in (BPF_DIV, BPF_MOD) and insn.off == 1:
            return f"{r}{d} s{_ALU[op]} {src}"
        if op == BPF_MOV and insn.off in (8, 16, 32):
            return f"{r}{d} = (s{insn.off}){src}"
        if op in _ALU:
            return f"{r}{d} {_ALU[op]} {src}"
    elif cls in (BPF_JMP, BPF_JMP32):
        if insn.code == CALL:
            if s == 1:
                return f"call pc{insn.imm:+d}"
            if s == BPF_PSEUDO_KFUNC_CALL:
                return f"call kernel-function#{insn.imm}"
            return f"call {helper(insn.imm) if helper else insn.imm}#{insn.imm}"
        if op == BPF_EXIT:
            return "exit"
        if op == BPF_JA:
            return f"goto pc{(insn.imm if cls == BPF_JMP32 else insn.off):+d}"
        if op in _JMP:
            r = "r" if cls == BPF_JMP else "w"
            src = f"{r}{s}" if insn.code & BPF_X else str(insn.imm)
            return f"if {r}{d} {_JMP[op]} {src} goto pc{insn.off:+d}"
    elif insn.code == LD_IMM64:
        value = (insn.imm & 0xFFFFFFFF) | ((next_imm & 0xFFFFFFFF) << 32)
        tag = {1: "map_fd", 2: "map_value", 4: "func", 5: "map_idx", 6: "map_idx_value"}.get(s)
        return f"r{d} = {tag}[{insn.imm}]+{next_imm}" if tag else f"r{d} = {value:#x} ll"
    elif cls == BPF_LDX and insn.code & 0xE0 in (BPF_MEM, BPF_MEMSX):
        sx = "s" if insn.code & 0xE0 == BPF_MEMSX else ""
        return f"r{d} = *({sx}{_SIZE[insn.code & 0x18]} *)(r{s} {insn.off:+d})"
    elif cls == BPF_ST and insn.code & 0xE0 == BPF_MEM:
        return f"*({_SIZE[insn.code & 0x18]} *)(r{d} {insn.off:+d}) = {insn.imm}"
    elif cls == BPF_STX and insn.code & 0xE0 == BPF_MEM:
        return f"*({_SIZE[insn.code & 0x18]} *)(r{d} {insn.off:+d}) = r{s}"
    elif cls == BPF_STX and insn.code & 0xE0 == BPF_ATOMIC:
        size, r = _SIZE[insn.code & 0x18], "r" if insn.code & 0x18 == BPF_DW else "w"
        where = f"*({size} *)(r{d} {insn.off:+d})"
        if insn.imm == BPF_XCHG:
            return f"{r}{s} = atomic_xchg({where}, {r}{s})"
        if insn.imm == BPF_CMPXCHG:
            return f"{r}0 = atomic_cmpxchg({where}, {r}0, {r}{s})"
        aop = _ATOMIC.get(insn.imm & ~BPF_FETCH)
        if aop and insn.imm & BPF_FETCH:
            return f"{r}{s} = atomic_fetch_{aop[0].replace('+', 'add').replace('|', 'or').replace('&', 'and').replace('^', 'xor')}({where}, {r}{s})"  # noqa: E501
        if aop:
            return f"lock {where} {aop} {r}{s}"
    elif cls == BPF_LD and insn.code & 0xE0 in (BPF_ABS, BPF_IND):
        base = f"r{s} + " if insn.code & 0xE0 == BPF_IND else ""
        return f"r0 = *({_SIZE[insn.code & 0x18]} *)skb[{base}{insn.imm}]"
    return f"(code {insn.code:#04x}) invalid"


def disasm_program(raw: bytes, helper: Callable[[int], str] | None = None) -> list[str]:
    """Every instruction of `raw` as ``"  12: r0 = ..."`` lines (the second slot of an ``ld_imm64`` skipped)."""
    out = []
    n = len(raw) // 8
    i = 0
    while i < n:
        insn = decode(raw, i)
        nxt = decode(raw, i + 1).imm if insn.code == LD_IMM64 and i + 1 < n else 0
        out.append(f"{i:5d}: {disasm(insn, nxt, helper)}")
        i += 2 if insn.code == LD_IMM64 else 1
    return out
