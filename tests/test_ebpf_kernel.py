"""The kernel side (emu/ebpf/kernel.py): the bundled objects load and pass the kernel's verifier, run under
BPF_PROG_TEST_RUN with their maps readable after, a program the verifier rejects is refused with its log, and
no descriptor is left open."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from emu.ebpf import kernel
from emu.ebpf.elf import load_object
from tests.ebpf_build import bundled, compile_c, compilers, need_kernel

pytestmark = pytest.mark.kernel

XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4


@pytest.fixture(scope="module")
def objs() -> Path:
    need_kernel()
    return bundled()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_bundled_objects_pass_the_verifier(objs: Path) -> None:
    before = _open_fds()
    for o in sorted(objs.glob("*.o")):
        obj = load_object(o)
        assert kernel.verify_object_programs(obj) is True
        with kernel.load(obj) as ko:
            assert set(ko.prog_fds) == set(obj.programs) and len(ko.map_fds) == len(obj.maps)
    assert _open_fds() <= before


@pytest.mark.parametrize("cc", compilers() or ["none"])
def test_bundled_sources_pass_the_verifier_with_every_clang(cc: str, objs: Path, tmp_path: Path) -> None:
    """Debian's clang 14 and a newer clang emit different code for the same C; the kernel must take both."""
    if cc == "none":
        pytest.skip("no clang")
    for src in sorted((objs).glob("*.c")):
        obj = load_object(compile_c(src, tmp_path, cflags=("-mcpu=v3",), cc=cc))
        assert kernel.verify_object_programs(obj), src.name


def test_xdp_drop_counts_per_cpu(objs: Path) -> None:
    obj = load_object(objs / "xdp_drop.o")
    with kernel.load(obj) as ko:
        ret, out, _ = kernel.prog_test_run(ko.prog_fds["xdp_drop"], bytes(range(100)), repeat=3)
        assert ret == XDP_DROP and out == bytes(range(100))
        cnt = ko.items("rxcnt")
        assert len(cnt[struct.pack("<I", 0)]) == kernel.possible_cpus()
        assert sum(struct.unpack("<Q", v)[0] for v in cnt[struct.pack("<I", 0)]) == 3  # type: ignore[union-attr]
        assert sum(struct.unpack("<Q", v)[0] for v in cnt[struct.pack("<I", 1)]) == 300  # type: ignore[union-attr]


def test_l2fwd_redirects_to_the_rodata_ifindex(objs: Path) -> None:
    obj = load_object(objs / "l2fwd.o", globals={"egress_ifindex": 1})
    frame = bytes(range(60))
    with kernel.load(obj) as ko:
        ret, out, _ = kernel.prog_test_run(ko.prog_fds["l2fwd"], frame)
        assert ret == XDP_REDIRECT
        assert out == frame[6:12] + frame[0:6] + frame[12:]
        with pytest.raises(kernel.BpfSyscallError):  # the kernel test-runs no frame shorter than ETH_HLEN
            kernel.prog_test_run(ko.prog_fds["l2fwd"], frame[:13])
        assert ko.items(".rodata") == {bytes(4): struct.pack("<I", 1)}


def test_rejected_program_names_file_program_and_log(objs: Path, tmp_path: Path) -> None:
    src = compile_c('#include "xdp_common.h"\n'
                    'SEC("xdp") int unchecked(struct xdp_md *ctx)\n'
                    '{ unsigned char *p = (void *)(long)ctx->data; return p[20]; }\n'
                    'char _l[] SEC("license") = "GPL";\n', tmp_path, name="unchecked")
    before = _open_fds()
    with pytest.raises(kernel.KernelRejected) as e:
        kernel.load(load_object(src))
    assert str(e.value).startswith(f"{src}:unchecked: kernel verifier rejected it:")
    assert "invalid access to packet" in str(e.value) and "invalid access to packet" in e.value.log
    assert e.value.exit_status == 2
    assert _open_fds() <= before


def test_unavailable_bpf_is_said_once(monkeypatch: pytest.MonkeyPatch, objs: Path) -> None:
    monkeypatch.setattr(kernel, "available", lambda: (False, "bpf(2) not permitted (test)"))
    monkeypatch.setattr(kernel, "_said_unavailable", False)
    said: list[str] = []
    obj = load_object(objs / "xdp_tx.o")
    assert kernel.verify_object_programs(obj, warn=said.append) is False
    assert kernel.verify_object_programs(obj, warn=said.append) is False
    assert said == ["emu: not verifying eBPF programs with the kernel: bpf(2) not permitted (test)"]


# -- emu validate / run: the kernel as the verifier --------------------------------------------------------

def _topology_with(obj: Path, tmp_path: Path, program: str) -> Path:
    root = Path(__file__).resolve().parent.parent
    text = (root / "topology" / "l2fwd-obj.yaml").read_text()
    text = text.replace("object: ../emu/programs/bpf/l2fwd.o", f"object: {obj}")
    text = text.replace("program: l2fwd\n", f"program: {program}\n")
    if program != "l2fwd":
        text = text.replace("          globals: {egress_ifindex: eth1}\n", "")
    topo = tmp_path / "topo.yaml"
    topo.write_text(text)
    return topo


def test_emu_validate_refuses_what_the_kernel_rejects(objs: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from emu.cli import main

    assert main(["validate", str(_topology_with(objs / "l2fwd.o", tmp_path, "l2fwd"))]) == 0
    assert "ok" in capsys.readouterr().out
    bad = compile_c('#include "xdp_common.h"\n'
                    'SEC("xdp") int unchecked(struct xdp_md *ctx)\n'
                    '{ unsigned char *p = (void *)(long)ctx->data; return p[20] ? XDP_PASS : XDP_DROP; }\n'
                    'char _l[] SEC("license") = "GPL";\n', tmp_path, name="unchecked")
    topo = _topology_with(bad, tmp_path, "unchecked")
    assert main(["validate", str(topo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{bad}:unchecked: kernel verifier rejected it:")
    assert "invalid access to packet" in err
    assert main(["validate", "--no-kernel-verify", str(topo)]) == 0  # the engine would run it (and abort)
    assert main(["run", str(topo), "-n", "10", "-q"]) == 2  # refused before anything starts
    assert "kernel verifier rejected it" in capsys.readouterr().err


def test_event_maps_created_as_libbpf_does(objs: Path, tmp_path: Path) -> None:
    """A perf_event_array without max_entries (libbpf: one per possible CPU) and a ringbuf load, with the
    helpers that write to them; a hash map's keys read back through GET_NEXT_KEY."""
    src = compile_c('#include "xdp_common.h"\n' + r"""
struct { __uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY); __uint(key_size, 4); __uint(value_size, 4); } events
	SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096); } ring SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_LRU_HASH); __type(key, __u32); __type(value, __u64); __uint(max_entries, 64); }
	seen SEC(".maps");
SEC("xdp") int ev(struct xdp_md *ctx)
{
	__u64 v = ctx->data_end - ctx->data;
	__u32 k = v & 7;
	bpf_perf_event_output(ctx, &events, BPF_F_CURRENT_CPU, &v, sizeof(v));
	bpf_ringbuf_output(&ring, &v, sizeof(v), 0);
	bpf_map_update_elem(&seen, &k, &v, BPF_ANY);
	return XDP_PASS;
}
char _l[] SEC("license") = "GPL";
""", tmp_path, name="events")
    obj = load_object(src)
    assert obj.maps[obj.map_index("events")].max_entries == 0
    with kernel.load(obj) as ko:
        for n in (20, 21, 30, 28):
            assert kernel.prog_test_run(ko.prog_fds["ev"], bytes(n))[0] == 2
        assert ko.items("seen") == {struct.pack("<I", k): struct.pack("<Q", v) for k, v in ((4, 28), (5, 21), (6, 30))}
