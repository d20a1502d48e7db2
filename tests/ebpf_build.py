"""Building eBPF objects for the tests: the bundled programs (``make -C emu/programs/bpf``, once, under a
lock, since pytest-xdist workers start together) and single C sources into a test's own directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from emu.ebpf.bundled import BPF_DIR, build

CORPUS_DIR = Path(__file__).parent / "ebpf_corpus"
ARCH_INC = f"/usr/include/{os.uname().machine}-linux-gnu"


def clang() -> str | None:
    """The newest clang on PATH (the Makefile's choice)."""
    for name in ("clang-19", "clang-18", "clang-17", "clang-16", "clang"):
        if path := shutil.which(name):
            return path
    return None


def compilers() -> list[str]:
    """Every clang on PATH of a distinct major version (Debian's default and a newer one, where both are)."""
    seen: dict[int, str] = {}
    for name in ("clang", "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14"):
        if (path := shutil.which(name)) is not None:
            seen.setdefault(clang_major(path), path)
    return list(seen.values())


def clang_major(cc: str | None = None) -> int:
    cc = cc or clang()
    if cc is None:
        return 0
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"version (\d+)", out)
    return int(m.group(1)) if m else 0


def need_clang() -> str:
    cc = clang()
    if cc is None or not Path("/usr/include/bpf/bpf_helpers.h").exists():
        pytest.skip("no clang or libbpf-dev (apt-get install -y clang libbpf-dev; run-tests.sh does)")
    return cc


def bundled() -> Path:
    """The bundled objects' directory, built if needed (make is idempotent; the lock serialises workers)."""
    need_clang()
    build().check_returncode()
    return BPF_DIR


def compile_c(src: Path | str, out_dir: Path, *, name: str | None = None, cflags: tuple[str, ...] = (),
              target: str = "bpf", cc: str | None = None) -> Path:
    """`src` (a path, or C text) compiled with clang -O2 -g (the newest, or `cc`) into `out_dir`."""
    cc = cc or need_clang()
    if isinstance(src, str) and "\n" in src:
        c = out_dir / f"{name or 'prog'}.c"
        c.write_text(src)
        src = c
    src = Path(src)
    out = out_dir / f"{name or src.stem}.o"
    cmd = [cc, "-O2", "-g", "-target", target, f"-I{ARCH_INC}", f"-I{BPF_DIR}", "-Wall", "-Wno-unused-function",
           *cflags, "-c", str(src), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise AssertionError(f"clang failed on {src}:\n{r.stderr}")
    return out


def need_kernel() -> None:
    """Skip where this process may not use bpf(2), with the reason; fail instead where the kernel is required
    (CI sets EMU_REQUIRE_KERNEL=1, as it sets EMU_REQUIRE_DOCKER)."""
    from emu.ebpf import kernel

    ok, reason = kernel.available()
    if not ok:
        if os.environ.get("EMU_REQUIRE_KERNEL"):
            pytest.fail(f"EMU_REQUIRE_KERNEL is set but {reason}")
        pytest.skip(reason)
