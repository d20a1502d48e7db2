"""``emu inspect FILE.o``: what an eBPF object holds and whether the emulator can run it, in the spirit of
``bpftool prog/map show`` and ``llvm-objdump``: its programs (section, attach type, instruction count after
linking, the helpers each calls with whether each is supported), its maps (type, key and value size,
max_entries, flags), its global variables, its license, and anything the loader would refuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emu.ebpf.elf import survey_object
from emu.ebpf.helpers import HELPER_NAMES, MAP_TYPE_NAMES, helper_name, map_type_name
from emu.ebpf.insn import disasm_program
from emu.ebpf.obj import BPF_F_MMAPABLE, BPF_F_RDONLY_PROG, BPF_F_XDP_HAS_FRAGS

__all__ = ["format_text", "inspect_object"]

_MAP_FLAGS = {1 << 0: "no_prealloc", 1 << 1: "no_common_lru", 1 << 2: "numa_node", 1 << 3: "rdonly",
              1 << 4: "wronly", 1 << 6: "zero_seed", BPF_F_RDONLY_PROG: "rdonly_prog", 1 << 8: "wronly_prog",
              BPF_F_MMAPABLE: "mmapable"}


def _flag_names(flags: int) -> list[str]:
    names = [n for bit, n in _MAP_FLAGS.items() if flags & bit]
    rest = flags & ~sum(_MAP_FLAGS)
    return names + ([hex(rest)] if rest else [])


def inspect_object(path: Path | str, disassemble: bool = False) -> dict[str, Any]:
    """The object as a JSON-able dict (``emu inspect --json``); `disassemble` adds each program's linked
    instructions."""
    obj, elf, problems = survey_object(Path(path))
    progs = []
    for p in obj.programs.values():
        entry: dict[str, Any] = {
            "name": p.name, "section": p.section, "attach": p.expected_attach,
            "frags": bool(p.flags & BPF_F_XDP_HAS_FRAGS), "insns": p.insn_count,
            "helpers": [{"id": h, "name": helper_name(h), "supported": h in HELPER_NAMES} for h in p.helpers],
            "unsupported": problems.get(p.name, []),
        }
        if disassemble:
            entry["disasm"] = disasm_program(p.insns, helper_name)
        progs.append(entry)
    maps = [{"name": m.name, "type": map_type_name(m.type), "type_id": m.type, "key_size": m.key_size,
             "value_size": m.value_size, "max_entries": m.max_entries, "flags": _flag_names(m.map_flags),
             "section": m.section, "supported": m.type in MAP_TYPE_NAMES} for m in obj.maps]
    glob = []
    for g in sorted(obj.globals.values(), key=lambda g: (g.map_index, g.offset)):
        m = obj.maps[g.map_index]
        data = m.data[g.offset:g.offset + g.size] if m.data is not None else b""
        glob.append({"name": g.name, "section": m.name, "offset": g.offset, "size": g.size,
                     "initial": data.hex(), "read_only": bool(m.map_flags & BPF_F_RDONLY_PROG)})
    unsupported = [x for v in problems.values() for x in v]
    return {"file": str(path), "license": obj.license, "programs": progs, "maps": maps, "globals": glob,
            "other_sections": elf.other_programs, "loadable": not unsupported, "unsupported": problems.get("", [])}


def _initial(hex_bytes: str, size: int) -> str:
    """A global's initial value as the program reads it: an integer variable (1, 2, 4 or 8 bytes) as its
    little-endian value in hex (the loader takes little-endian objects only), anything else as its bytes."""
    data = bytes.fromhex(hex_bytes)
    if size in (1, 2, 4, 8) and len(data) == size:
        return f"0x{int.from_bytes(data, 'little'):0{2 * size}x}"
    return f"bytes {data.hex(' ') or '-'}"


def format_text(info: dict[str, Any]) -> str:
    """The human form: one block per kind, aligned columns, as ``bpftool`` lists them."""
    out = [f"{info['file']}: license \"{info['license']}\""
           + ("" if info["loadable"] else "  (the emulator cannot load it: see 'unsupported')")]
    out.append("programs:")
    for p in info["programs"]:
        helpers = ", ".join(f"{h['name']}" + ("" if h["supported"] else " (unsupported)") for h in p["helpers"])
        out.append(f"  {p['name']:<20} section {p['section']:<16} attach {p['attach']:<10} "
                   f"{p['insns']:>6} insns{'  frags' if p['frags'] else ''}")
        out.append(f"  {'':<20} helpers: {helpers or '-'}")
        out += [f"  {'':<20} unsupported: {u}" for u in p["unsupported"]]
        out += [f"  {'':<20} {line}" for line in p.get("disasm", ())]
    out.append("maps:" if info["maps"] else "maps: none")
    for m in info["maps"]:
        out.append(f"  {m['name']:<20} {m['type']:<16} key {m['key_size']:>3}B  value {m['value_size']:>5}B  "
                   f"max_entries {m['max_entries']:<8} flags {','.join(m['flags']) or '-'}"
                   + ("" if m["supported"] else "  (unsupported)"))
    out.append("globals:" if info["globals"] else "globals: none")
    for g in info["globals"]:
        out.append(f"  {g['name']:<20} {g['section']:<16} offset {g['offset']:<5} size {g['size']:<4} "
                   f"initial {_initial(g['initial'], g['size'])}{'  read-only' if g['read_only'] else ''}")
    if info["other_sections"]:
        out.append(f"ignored (not XDP): {', '.join(info['other_sections'])}")
    out += [f"unsupported: {u}" for u in info["unsupported"]]
    return "\n".join(out)
