"""The ELF loader (emu/ebpf/elf.py) on clang-built objects: maps from BTF and from the legacy section, global
data and variables, relocations, linked sub-programs, and refusals (bad files, unsupported features), always
as an ObjectError naming the file."""

from __future__ import annotations

import random
import shutil
import struct
from pathlib import Path

import pytest

from emu.ebpf import insn as I
from emu.ebpf.elf import load_object
from emu.ebpf.helpers import HELPER_NAMES
from emu.ebpf.obj import (
    BPF_F_MMAPABLE,
    BPF_F_RDONLY_PROG,
    BPF_F_XDP_HAS_FRAGS,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_DEVMAP,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_PSEUDO_CALL,
    BPF_PSEUDO_MAP_IDX,
    BPF_PSEUDO_MAP_IDX_VALUE,
)
from emu.errors import BadInputError, ObjectError
from tests.ebpf_build import bundled, compile_c

HDR = '#include "xdp_common.h"\n'


@pytest.fixture(scope="module")
def objs() -> Path:
    return bundled()


def _insns(raw: bytes) -> list[I.Insn]:
    return [i for _, i in I.iter_insns(raw)]


def test_bundled_l2fwd_map(objs: Path) -> None:
    o = load_object(objs / "l2fwd_map.o")
    assert o.license == "GPL"
    by = {m.name: m for m in o.maps}
    assert by["tx_port"].type == BPF_MAP_TYPE_DEVMAP and (by["tx_port"].key_size, by["tx_port"].value_size,
                                                          by["tx_port"].max_entries) == (4, 4, 64)
    assert by["rxcnt"].type == BPF_MAP_TYPE_PERCPU_ARRAY and by["rxcnt"].value_size == 8
    p = o.programs["l2fwd_map"]
    assert p.section == "xdp" and p.expected_attach == "xdp" and p.flags == 0
    assert set(p.helpers) == {1, 51}
    refs = [i for i in _insns(p.insns) if i.code == I.LD_IMM64 and i.src == BPF_PSEUDO_MAP_IDX]
    assert {r.imm for r in refs} == {o.map_index("tx_port"), o.map_index("rxcnt")}
    assert p.lines and all(":" in v for v in p.lines.values())


def test_bundled_l2fwd_rodata_global(objs: Path) -> None:
    o = load_object(objs / "l2fwd.o", globals={"egress_ifindex": 7})
    var = o.globals["egress_ifindex"]
    ro = o.maps[var.map_index]
    assert ro.name == ".rodata" and ro.type == BPF_MAP_TYPE_ARRAY and ro.max_entries == 1
    assert ro.map_flags & BPF_F_RDONLY_PROG and ro.map_flags & BPF_F_MMAPABLE
    assert ro.data is not None and struct.unpack_from("<I", ro.data, var.offset) == (7,)
    refs = [i for i in _insns(o.programs["l2fwd"].insns) if i.src == BPF_PSEUDO_MAP_IDX_VALUE]
    assert refs and refs[0].imm == var.map_index
    # Without globals, the compiled-in value; bad values refused by name.
    assert load_object(objs / "l2fwd.o").maps[var.map_index].data == bytes(4)
    with pytest.raises(ObjectError, match="does not fit"):
        load_object(objs / "l2fwd.o", globals={"egress_ifindex": 1 << 32})
    with pytest.raises(ObjectError, match=r"l2fwd\.o:globals: no global variable 'nope'.*egress_ifindex"):
        load_object(objs / "l2fwd.o", globals={"nope": 1})


def test_global_data_sections_and_offsets(tmp_path: Path) -> None:
    o = load_object(compile_c(HDR + r"""
__u64 counter = 5;            /* .data */
__u32 zeroed[4];              /* .bss */
const volatile __u16 port = 53; /* .rodata */
const volatile __u8 pad[3] = {1, 2, 3};
SEC("xdp.frags") int prog(struct xdp_md *ctx)
{
	counter += zeroed[2] + port + pad[1];
	zeroed[3] = 1;
	bpf_printk("hello %d", port);
	return XDP_PASS;
}
char _license[] SEC("license") = "Dual BSD/GPL";
""", tmp_path, name="globals"), globals={"pad": b"\x09"})
    assert o.license == "Dual BSD/GPL"
    names = {m.name: m for m in o.maps}
    assert {".data", ".bss", ".rodata"} <= set(names)
    assert names[".bss"].data == bytes(names[".bss"].value_size)
    assert struct.unpack_from("<Q", names[".data"].data, o.globals["counter"].offset) == (5,)  # type: ignore[arg-type]
    pad = o.globals["pad"]
    assert o.maps[pad.map_index].data[pad.offset:pad.offset + 3] == b"\x09\x00\x00"  # type: ignore[index]
    p = o.programs["prog"]
    assert p.flags == BPF_F_XDP_HAS_FRAGS and p.section == "xdp.frags"
    assert 6 in p.helpers  # trace_printk, its format string in a read-only global-data map
    assert any(m.map_flags & BPF_F_RDONLY_PROG and b"hello %d" in (m.data or b"") for m in o.maps)
    # every global-data reference points inside its map
    for i, ins in I.iter_insns(p.insns):
        if ins.code == I.LD_IMM64 and ins.src == BPF_PSEUDO_MAP_IDX_VALUE:
            off = I.decode(p.insns, i + 1).imm
            assert 0 <= off < o.maps[ins.imm].value_size


def test_subprograms_linked(tmp_path: Path) -> None:
    o = load_object(compile_c(HDR + r"""
struct { __uint(type, BPF_MAP_TYPE_HASH); __type(key, __u32); __type(value, __u64); __uint(max_entries, 8); }
        h SEC(".maps");
static __noinline int leaf(int x) { return x * 3 + 1; }
__noinline int mid(int x) { __u32 k = x; bpf_map_lookup_elem(&h, &k); return leaf(x) + leaf(x + 1); }
static int cb(__u32 i, void *c) { *(int *)c += i; return 0; }
SEC("xdp") int a(struct xdp_md *ctx) { int s = 0; bpf_loop(4, cb, &s, 0); return mid(ctx->rx_queue_index) + s; }
SEC("xdp") int b(struct xdp_md *ctx) { return leaf(ctx->ingress_ifindex) & 3; }
char _license[] SEC("license") = "GPL";
""", tmp_path, name="subprogs"))
    assert set(o.programs) == {"a", "b"}
    assert o.maps[0].type == BPF_MAP_TYPE_HASH
    for name, n_sub in (("a", 3), ("b", 1)):
        p = o.programs[name]
        code = _insns(p.insns)
        calls = [(k, i) for k, i in enumerate(code) if i.code == I.CALL and i.src == BPF_PSEUDO_CALL]
        funcs = [(k, i) for k, i in enumerate(code) if i.code == I.LD_IMM64 and i.src == I.BPF_PSEUDO_FUNC]
        targets = {k + i.imm + 1 for k, i in calls + funcs}
        assert len(targets) == n_sub, (name, targets)
        exits = [k for k, i in enumerate(code) if i.code == I.BPF_JMP | I.BPF_EXIT]
        for t in targets:  # each target starts a function: just after an exit of the one before
            assert 0 < t < len(code) and t - 1 in exits
    assert 181 in o.programs["a"].helpers and 1 in o.programs["a"].helpers  # bpf_loop, and mid's lookup


def test_legacy_maps_section(tmp_path: Path) -> None:
    o = load_object(compile_c(HDR + r"""
struct bpf_map_def_legacy { unsigned int type, key_size, value_size, max_entries, map_flags; };
struct bpf_map_def_legacy SEC("maps") counters = { BPF_MAP_TYPE_ARRAY, 4, 8, 16, 0 };
struct bpf_map_def_legacy SEC("maps") ports = { BPF_MAP_TYPE_HASH, 2, 1, 32, 1 };
SEC("xdp") int prog(struct xdp_md *ctx)
{
	__u32 k = 1; __u16 p = 7;
	__u64 *v = bpf_map_lookup_elem(&counters, &k);
	if (v) *v += 1;
	return bpf_map_lookup_elem(&ports, &p) ? XDP_DROP : XDP_PASS;
}
char _license[] SEC("license") = "GPL";
""", tmp_path, name="legacy"))
    by = {m.name: m for m in o.maps}
    assert (by["counters"].type, by["counters"].key_size, by["counters"].value_size, by["counters"].max_entries) \
        == (BPF_MAP_TYPE_ARRAY, 4, 8, 16)
    assert (by["ports"].type, by["ports"].key_size, by["ports"].value_size, by["ports"].map_flags) \
        == (BPF_MAP_TYPE_HASH, 2, 1, 1)
    assert all(m.section == "maps" for m in by.values())


def test_devmap_and_cpumap_sections(tmp_path: Path) -> None:
    o = load_object(compile_c(HDR + r"""
SEC("xdp/devmap") int on_dev(struct xdp_md *ctx) { return XDP_PASS; }
SEC("xdp.frags/cpumap") int on_cpu(struct xdp_md *ctx) { return XDP_PASS; }
char _license[] SEC("license") = "GPL";
""", tmp_path, name="attach"))
    assert o.programs["on_dev"].expected_attach == "xdp/devmap" and o.programs["on_dev"].flags == 0
    assert o.programs["on_cpu"].expected_attach == "xdp/cpumap"
    assert o.programs["on_cpu"].flags == BPF_F_XDP_HAS_FRAGS


# -- refusals --------------------------------------------------------------------------------------------

def test_unknown_helper_refused_with_place(tmp_path: Path) -> None:
    src = compile_c(HDR + r"""
SEC("xdp") int prog(struct xdp_md *ctx)
{
	if (ctx->rx_queue_index)
		return XDP_PASS;
	return bpf_get_current_pid_tgid() & 1;
}
char _license[] SEC("license") = "GPL";
""", tmp_path, name="badhelper")
    with pytest.raises(ObjectError, match=r"badhelper\.o:xdp\+\d+: unknown func get_current_pid_tgid#14") as e:
        load_object(src)
    assert isinstance(e.value, BadInputError)
    assert 14 not in HELPER_NAMES


def test_unknown_map_type_refused(tmp_path: Path) -> None:
    src = compile_c(HDR + r"""
struct { __uint(type, BPF_MAP_TYPE_LPM_TRIE); __type(key, __u64); __type(value, __u32);
        __uint(max_entries, 16); __uint(map_flags, BPF_F_NO_PREALLOC); } trie SEC(".maps");
SEC("xdp") int prog(struct xdp_md *ctx) { __u64 k = 0; return bpf_map_lookup_elem(&trie, &k) ? 1 : 2; }
char _license[] SEC("license") = "GPL";
""", tmp_path, name="lpm")
    with pytest.raises(ObjectError, match=r"lpm\.o:\.maps: map 'trie': lpm_trie \(type 11\) is not supported"):
        load_object(src)


def test_core_relocation_refused(tmp_path: Path) -> None:
    src = compile_c(HDR + r"""
struct thing { int a; int b; } __attribute__((preserve_access_index));
SEC("xdp") int prog(struct xdp_md *ctx)
{
	struct thing *t = (void *)(long)ctx->data;
	if ((void *)(t + 1) > (void *)(long)ctx->data_end) return XDP_DROP;
	return t->b;
}
char _license[] SEC("license") = "GPL";
""", tmp_path, name="core")
    with pytest.raises(ObjectError, match=r"core\.o:xdp\+\d+: CO-RE relocation .*struct thing.*not supported"):
        load_object(src)


def test_non_xdp_section_name_refused(tmp_path: Path) -> None:
    src = compile_c(HDR + 'SEC("xdp_prog") int p(struct xdp_md *c) { return 2; }\n'
                    'char _l[] SEC("license") = "GPL";\n', tmp_path, name="oldsec")
    with pytest.raises(ObjectError, match=r"oldsec\.o:xdp_prog: not an XDP section name libbpf accepts"):
        load_object(src)


def test_not_bpf_elf_and_not_elf(tmp_path: Path) -> None:
    true = Path(shutil.which("true") or "/bin/true")
    with pytest.raises(ObjectError, match=r"true: .*not (a relocatable|BPF)"):
        load_object(true)
    (tmp_path / "x.o").write_text("hello")
    with pytest.raises(ObjectError, match=r"x\.o: not an ELF file"):
        load_object(tmp_path / "x.o")
    with pytest.raises(ObjectError, match=r"missing\.o: cannot read"):
        load_object(tmp_path / "missing.o")


def test_big_endian_refused(tmp_path: Path) -> None:
    src = compile_c(HDR + 'SEC("xdp") int p(struct xdp_md *c) { return 2; }\n', tmp_path, name="be",
                    target="bpfeb")
    with pytest.raises(ObjectError, match=r"be\.o: a big-endian object"):
        load_object(src)


def _only_object_errors(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        load_object(path)
    except ObjectError as e:
        assert str(e).startswith(str(path))
    # a corruption that still loads is fine: it changed nothing the loader reads, or changed it validly


def test_truncated_files_refused(objs: Path, tmp_path: Path) -> None:
    data = (objs / "l2fwd_map.o").read_bytes()
    bad = tmp_path / "cut.o"
    for n in sorted({*range(0, 200), *range(0, len(data), 97), len(data) - 1}):
        bad.write_bytes(data[:n])
        with pytest.raises(ObjectError, match=r"cut\.o"):
            load_object(bad)


def test_fuzzed_files_give_object_errors_only(objs: Path, tmp_path: Path) -> None:
    rng = random.Random(1717)
    sources = [(objs / n).read_bytes() for n in ("l2fwd_map.o", "l2fwd.o", "xdp_drop.o")]
    for k in range(1500):
        data = bytearray(rng.choice(sources))
        for _ in range(rng.choice((1, 2, 4, 16))):
            pos = rng.randrange(len(data))
            data[pos] = rng.randrange(256) if rng.random() < 0.7 else data[pos] ^ (1 << rng.randrange(8))
        _only_object_errors(tmp_path / f"fuzz{k % 7}.o", bytes(data))


# -- emu inspect -----------------------------------------------------------------------------------------

def test_emu_inspect_text_and_json(objs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from emu.cli import main

    assert main(["inspect", str(objs / "xdp_lb.o")]) == 0
    text = capsys.readouterr().out
    assert "xdp_lb" in text and "map_lookup_elem, xdp_adjust_head, csum_diff" in text
    assert "backends" in text and "percpu_array" in text and "num_backends" in text and "read-only" in text
    # `const volatile __u32 num_backends = 1`: the value the program reads, not its bytes read as big-endian
    # hex (it showed 0x01000000)
    assert "size 4    initial 0x00000001  read-only" in text.split("num_backends", 1)[1].splitlines()[0]
    assert main(["inspect", "--json", "-d", str(objs / "l2fwd_map.o")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["loadable"] and info["license"] == "GPL"
    (prog,) = info["programs"]
    assert prog["name"] == "l2fwd_map" and prog["insns"] == len(prog["disasm"]) + sum(
        "map_idx" in line for line in prog["disasm"])  # an ld_imm64 is two slots, one line
    assert [h["name"] for h in prog["helpers"]] == ["map_lookup_elem", "redirect_map"]
    assert {m["name"]: (m["type"], m["max_entries"]) for m in info["maps"]}["tx_port"] == ("devmap", 64)


def test_emu_inspect_shows_what_it_cannot_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from emu.cli import main

    src = compile_c(HDR + r"""
struct { __uint(type, BPF_MAP_TYPE_LPM_TRIE); __type(key, __u64); __type(value, __u32);
        __uint(max_entries, 16); __uint(map_flags, BPF_F_NO_PREALLOC); } trie SEC(".maps");
SEC("xdp") int prog(struct xdp_md *ctx)
{ __u64 k = 0; if (bpf_map_lookup_elem(&trie, &k)) return 1; return bpf_get_current_pid_tgid() & 1; }
SEC("tc") int other(void *ctx) { return 0; }
char _license[] SEC("license") = "GPL";
""", tmp_path, name="mixed")
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "cannot load it" in text and "get_current_pid_tgid (unsupported)" in text
    assert "lpm_trie" in text and "(unsupported)" in text and "ignored (not XDP): tc" in text
    assert main(["inspect", shutil.which("true") or "/bin/true"]) == 2
    assert "not an eBPF object" in capsys.readouterr().err
