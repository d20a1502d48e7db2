"""The eBPF engine alone, per bundled C program: ns per packet over a batch in real page memory, in both
engines (the JIT, the default, and the interpreter), next to the kernel's own ``BPF_PROG_TEST_RUN``
duration for the same program and frame where ``bpf(2)`` is permitted (the ``xdp_engine_ns`` and
``xdp_engine_interp_ns`` of bench/run.py).  ``python -m bench.ebpf_bench [SECONDS]`` prints the table,
the engines measured alternately in the same rounds.

Each program runs over `BATCH` copies of one 64-byte UDP/IPv4 frame (port 9, as the traffic generator
sends), one engine call per batch, as a CPU worker calls it; the frames are restored before each call so
every packet takes the same path.  l2fwd_map's devmap slot 0 is filled, as its topology does.
"""

from __future__ import annotations

import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

from emu.ebpf.bundled import BPF_DIR, build

PROGRAMS = ("xdp_drop", "xdp_tx", "l2fwd", "l2fwd_map", "xdp_filter", "xdp_lb")
BATCH = 256
PAGE = 2048
HEADROOM = 256


def frame() -> bytes:
    """Ethernet + IPv4 + UDP to port 9, 64 bytes."""
    eth = bytes.fromhex("020000000002" "020000000001") + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 50, 0, 0, 64, 17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    udp = struct.pack("!HHHH", 1024, 9, 30, 0)
    return (eth + ip + udp).ljust(64, b"\0")


def objects() -> Path | None:
    """The bundled objects' directory, built with make (under the tests' lock) when missing; None when they
    cannot be built."""
    if not all((BPF_DIR / f"{p}.o").exists() for p in PROGRAMS) and build().returncode != 0:
        return None
    return BPF_DIR


class EngineCase:
    """One program in the engine (``jit`` or ``interp``) over a batch of frames; `run` is one call (BATCH
    packets)."""

    def __init__(self, name: str, engine: str = "jit") -> None:
        from emu.ebpf.elf import load_object
        from emu.ebpf.engine import Engine

        self.name = name
        self.obj = load_object(BPF_DIR / f"{name}.o")
        self.engine = Engine(self.obj, ncpus=1, engine=engine)
        if name == "l2fwd_map":
            self.engine.maps.update("tx_port", 0, 3)
        self.cpu = self.engine.cpu(0)
        if engine == "jit" and not self.cpu.jit:
            raise RuntimeError(f"{name}: no JIT on this host: {self.cpu.jit_error}")
        self.prog = self.cpu.index(next(iter(self.obj.programs)))
        self.mem = np.zeros((BATCH, PAGE), dtype=np.uint8)
        f = np.frombuffer(frame(), dtype=np.uint8)
        self.mem[:, HEADROOM:HEADROOM + len(f)] = f
        self.pristine = self.mem.copy()
        self.pages = np.arange(BATCH, dtype=np.uint32)
        self.offs = np.full(BATCH, HEADROOM, dtype=np.uint32)
        self.lens = np.full(BATCH, len(f), dtype=np.uint32)
        self.targets = np.full(BATCH, -1, dtype=np.int64)

    def run(self) -> None:
        self.offs[:] = HEADROOM
        self.lens[:] = 64
        self.cpu.run_batch(self.prog, self.mem, self.pages, self.offs, self.lens, self.targets, 2, 0)

    def ns_per_packet(self, seconds: float) -> float:
        """The engine's ns per packet, calls repeated for about `seconds` (CPU time of this process)."""
        self.run()
        calls = 0
        t0 = time.process_time()
        while True:
            for _ in range(20):
                self.run()
            calls += 20
            dt = time.process_time() - t0
            if dt >= seconds:
                return dt / (calls * BATCH) * 1e9

    def close(self) -> None:
        self.engine.close()


def kernel_ns(name: str, repeat: int = 20000) -> float | None:
    """``BPF_PROG_TEST_RUN``'s mean duration per run for `name` on the same frame, or None where bpf(2) is
    not permitted or the kernel refuses the program."""
    from emu.ebpf import kernel
    from emu.ebpf.elf import load_object

    ok, _ = kernel.available()
    if not ok:
        return None
    obj = load_object(BPF_DIR / f"{name}.o")
    try:
        with kernel.load(obj) as ko:
            prog = next(iter(obj.programs))
            if name == "l2fwd_map":
                kernel.map_update(ko.map_fd("tx_port"), struct.pack("<I", 0), struct.pack("<I", 1))
            _, _, ns = kernel.prog_test_run(ko.prog_fds[prog], frame(), repeat=repeat)
            return float(ns)
    except OSError:
        return None


def all_cases(engine: str = "jit") -> dict[str, EngineCase] | None:
    """One case per bundled program in `engine` (each holds a maps segment: `EngineCase.close` them), or
    None without the objects."""
    if objects() is None:
        return None
    cases: dict[str, EngineCase] = {}
    try:
        for name in PROGRAMS:
            cases[name] = EngineCase(name, engine)
    except BaseException:
        for c in cases.values():
            c.close()
        raise
    return cases


def main(seconds: float = 1.0, rounds: int = 3) -> None:
    """Both engines and the kernel side by side: the median over `rounds` of `seconds` each, the engines
    alternating within every round so that both see the same load."""
    engines = ("interp", "jit")
    cases = {e: all_cases(e) for e in engines}
    if any(c is None for c in cases.values()):
        sys.exit("no bundled objects (clang and libbpf-dev needed: scripts/build-bpf.sh)")
    try:
        got: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for name in PROGRAMS:
                for e in engines:
                    got.setdefault((e, name), []).append(cases[e][name].ns_per_packet(seconds))  # type: ignore[index]
    finally:
        for cs in cases.values():
            for c in (cs or {}).values():
                c.close()
    print(f"{'program':<12} {'interp ns/pkt':>14} {'jit ns/pkt':>11} {'speed-up':>9} {'kernel ns/run':>14}")
    for name in PROGRAMS:
        i, j = (statistics.median(got[(e, name)]) for e in engines)
        k = kernel_ns(name)
        print(f"{name:<12} {i:>14.1f} {j:>11.1f} {i / j:>8.1f}x {k if k is not None else '-':>14}")


if __name__ == "__main__":
    main(*(float(a) for a in sys.argv[1:2]))
