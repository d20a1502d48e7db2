"""The bundled C programs' objects (emu/programs/bpf/*.o): where they are, and building them with make under
the one file lock every builder takes (the tests' pytest-xdist workers, the benchmarks, run alongside),
so that two makes never write the same object at once."""

from __future__ import annotations

import fcntl
import subprocess
from pathlib import Path

import emu

BPF_DIR = Path(emu.__file__).parent / "programs" / "bpf"
LOCK = BPF_DIR / ".build.lock"


def build() -> subprocess.CompletedProcess[bytes]:
    """``make -s -C emu/programs/bpf`` under the build lock (make is idempotent: a no-op when up to date)."""
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return subprocess.run(["make", "-s", "-C", str(BPF_DIR)], capture_output=True)
