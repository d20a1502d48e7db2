#!/usr/bin/env python3
"""The benchmark suite: the emulator next to its ceilings and to a naive baseline, in one run.

    python bench/run.py [--quick] [--json FILE] [--no-save] [--rounds N] [--duration S] [--no-cli]

Measured side by side in interleaved rounds (every measurement once per round, in rotating order; the
median over rounds is reported), so that a noisy, shared machine hits all of them alike:

1. ``bare``: the l2fwd XDP program called per packet in a tight loop over real shared-memory pages, one
   process (pinned to one core) -> ``bare_xdp_pps`` (the issue's ceiling); and its vectorised form,
   one call per 64 packets -> ``bare_xdp_vectorised_pps`` (what the emulator's CPUs run by default);
   and two copies of the per-packet loop at once, one process per core, against one copy measured the
   same way -> ``bare_scaling_2_to_1`` (what a second core gives when nothing is shared);
2. ``transport``: raw zmq PUSH/PULL of packed 64-descriptor batches between two processes, one way
   (``transport_desc_per_s``), out and back with 16 batches in flight (``transport_rtt_desc_per_s``) and
   one at a time (``transport_rtt_us``);
3. ``naive``: generator -> forwarder -> sink processes passing pickled packets through
   ``multiprocessing.Queue``, the forwarder swapping MACs -> ``naive_queue_pps``;
4. the emulator on the bundled ``xdp-drop``, ``xdp-tx`` and ``l2fwd`` topologies (``rx_pps`` for drop,
   the sinks' verified ``delivered_pps`` for the others), violations summed over every report;
5. the page pool's per-page costs through ``bench/pool_bench.py``'s own case functions;
6. l2fwd with one CPU worker (``l2fwd_1cpu_pps``) against the bundled two (``scaling_2_to_1``), and the
   same with a CPU-heavy program, ``emu.programs:l2fwd_filter`` (``filter_scaling_2_to_1``); peak RSS
   per process kind; the l2fwd topology's shared memory; time to the first delivered packet, and the
   CLI end to end from a cold start.

From the CPU time every process used (``/proc``) the suite also derives what the cores allow: how busy
each case kept them (``cores_busy``), and the ceilings that follow at the measured CPU cost per packet:
``l2fwd_to_bare_ceiling`` (both cores fully busy forwarding l2fwd) and ``scaling_2_to_1_ceiling`` (the
cores a one-CPU run leaves idle, given to a second worker).  A target above its ceiling cannot be met on
this machine by this design at its current cost per packet.

Results: a table on stdout, ``--json FILE``, and unless ``--no-save`` ``bench/results/run.{json,md,png}``
(the chart needs matplotlib: ``pip install -e ".[bench]"``).  Every process and shared-memory segment the
suite creates is removed on exit, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import baselines, ebpf_bench, emu_runs
from bench.pool_bench import (
    BULK,
    Bench,
    allocator_case,
    calibrate,
    fast_case,
    machine_info,
    ring_case,
    timed,
    write_atomic,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Config:
    rounds: int
    duration: float  # seconds of traffic per emulator run
    bare_seconds: float  # each bare measurement (and each run of `bare_parallel`)
    transport_batches: int
    rtt_batches: int
    latency_batches: int
    naive_packets: int
    pool_seconds: float
    cli: bool
    cli_count: int = 20000  # 1000 can end before the coordinator's first 20 ms check: no first_packet_s
    cli_runs: int = 3  # `emu run` from a cold start: the first-packet target's measurement
    rtt_window: int = 16


FULL = Config(rounds=5, duration=5.0, bare_seconds=0.5, transport_batches=50000, rtt_batches=30000,
              latency_batches=3000, naive_packets=50000, pool_seconds=0.1, cli=True)
QUICK = Config(rounds=2, duration=2.0, bare_seconds=0.2, transport_batches=10000, rtt_batches=6000,
               latency_batches=1000, naive_packets=10000, pool_seconds=0.03, cli=True, cli_runs=1)
# For the tests: every measurement runs, on tiny sizes (the numbers mean nothing).
TINY = Config(rounds=1, duration=0.6, bare_seconds=0.01, transport_batches=100, rtt_batches=100,
              latency_batches=20, naive_packets=300, pool_seconds=0.002, cli=False)

EMU_CASES = ("xdp-drop", "xdp-tx", "l2fwd", "l2fwd-1cpu", "l2fwd-filter", "l2fwd-filter-1cpu", "l2fwd-obj")

# name, key, threshold, goal (or None), direction
TARGETS = (
    ("l2fwd_to_bare >= 0.4 (goal 0.85)", "l2fwd_to_bare", 0.4, 0.85),
    ("l2fwd_to_naive >= 10 (goal 20)", "l2fwd_to_naive", 10.0, 20.0),
    ("xdp_drop_pps >= 1.5 x l2fwd_pps", "drop_to_l2fwd", 1.5, None),
    ("scaling_2_to_1 >= 1.6", "scaling_2_to_1", 1.6, None),
    ("l2fwd_obj_pps >= 0.9 x l2fwd_pps", "l2fwd_obj_to_l2fwd", 0.9, None),
)
ENGINE_L2FWD_MAP_LIMIT_NS = 150.0  # the engine alone on l2fwd_map (issue 17)
RSS_LIMIT_MB = 64.0
FIRST_PACKET_LIMIT_S = 1.0


# --------------------------------------------------------------------------------------------------
# measurements: each is a callable returning one sample (a dict); set-up that is not measured is done once


class Suite:
    def __init__(self, cfg: Config) -> None:
        from emu.mem.shm import new_run_prefix

        self.cfg = cfg
        self.prefix = new_run_prefix()
        self.bare: baselines.BareXdp | None = None
        self.pool: Bench | None = None
        self.measurements: dict[str, Callable[[], dict]] = {}
        self.topos: dict[str, object] = {}

    # -- set-up ------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.bare = baselines.BareXdp(self.prefix)
        self.bare_iters = calibrate(self.bare.run, cfg.bare_seconds)
        self.bare_vec_iters = calibrate(self.bare.run_vectorised, cfg.bare_seconds)
        self.pool = Bench(f"{self.prefix}-pool")
        pm = self.pool.memory("pool", 4096, 2)
        self.pool_cases = {
            "fast": fast_case(pm, 0, BULK),
            "ring": ring_case(pm, 1, BULK),
            "allocator": allocator_case(pm, BULK),
        }
        self.pool_iters = {k: calibrate(run, cfg.pool_seconds) for k, run in self.pool_cases.items()}
        # The bundled C programs (issue 17): built here when missing; without clang, the engine and the
        # l2fwd-obj cases are left out (their numbers None).
        self.engine_cases = ebpf_bench.all_cases()
        # the interpreter too, the same rounds: the JIT's gain measured side by side
        self.interp_cases = ebpf_bench.all_cases("interp") if self.engine_cases is not None else None
        cases = EMU_CASES if self.engine_cases is not None else tuple(c for c in EMU_CASES if c != "l2fwd-obj")
        self.topos = {name: emu_runs.case(name) for name in cases}
        self.measurements = {
            "bare": self.measure_bare,
            **({"bare-cores": self.measure_bare_cores} if len(baselines.usable_cores()) >= 2 else {}),
            "transport": self.measure_transport,
            "naive": self.measure_naive,
            "pool": self.measure_pool,
            **{name: (lambda name=name: self.measure_emu(name)) for name in self.topos},
            **({"engine": self.measure_engine} if self.engine_cases is not None else {}),
            # l2fwd again with one device captured (emu.run.capture): the capture's cost, same rounds.
            "l2fwd-capture": self.measure_capture,
        }
        self.capture_topo = emu_runs.l2fwd_capture()

    def close(self) -> None:
        for cases in (getattr(self, "engine_cases", None), getattr(self, "interp_cases", None)):
            for case in (cases or {}).values():
                case.close()
        self.engine_cases = self.interp_cases = None
        if self.bare is not None:
            self.bare.close()
            self.bare = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        from emu.mem.shm import unlink_prefix

        unlink_prefix(self.prefix)
        cap = getattr(self, "capture_topo", None)
        if cap is not None and cap.capture is not None:
            import shutil

            shutil.rmtree(cap.capture.dir, ignore_errors=True)  # the capture case's (emptied) directory

    # -- the measurements --------------------------------------------------------------------------

    def measure_bare(self) -> dict:
        assert self.bare is not None
        before = self.bare.packets_counted()
        with pinned_to_one_core():
            ns = timed(self.bare.run, self.bare_iters)
            mid = self.bare.packets_counted()
            vec_ns = timed(self.bare.run_vectorised, self.bare_vec_iters)
        pkts = self.bare_iters * self.bare.npages
        vec_pkts = self.bare_vec_iters * self.bare.npages
        return {"pps": pkts / ns * 1e9, "packets": pkts, "counted_by_program": mid - before,
                "vectorised_pps": vec_pkts / vec_ns * 1e9, "vectorised_packets": vec_pkts,
                "vectorised_counted": self.bare.packets_counted() - mid, "verdicts_ok": self.bare.verdicts_ok}

    def measure_bare_cores(self) -> dict:
        one = baselines.bare_parallel(f"{self.prefix}-bc", 1, self.cfg.bare_seconds)
        two = baselines.bare_parallel(f"{self.prefix}-bc", 2, self.cfg.bare_seconds)
        return {"pps_1": one["pps"], "pps_2": two["pps"], "scaling": two["pps"] / one["pps"],
                "counted_ok": one["counted_ok"] and two["counted_ok"],
                "verdicts_ok": one["verdicts_ok"] and two["verdicts_ok"]}

    def measure_transport(self) -> dict:
        cfg = self.cfg
        one = baselines.transport_one_way(cfg.transport_batches)
        rtt = baselines.transport_rtt(cfg.rtt_batches, cfg.rtt_window)
        lat = baselines.transport_rtt(cfg.latency_batches, 1)
        return {
            "desc_per_s": one["desc_per_s"], "rtt_desc_per_s": rtt["desc_per_s"], "rtt_us": lat["rtt_us"],
            "batches": one["batches"], "descs": one["descs"], "in_order": one["in_order"],
            "rtt_batches": rtt["batches"], "rtt_all_back": rtt["all_back"] and lat["all_back"],
            "latency_batches": lat["batches"],
        }

    def measure_naive(self) -> dict:
        return baselines.naive_queue(self.cfg.naive_packets)

    def measure_pool(self) -> dict:
        out = {}
        for k, run in self.pool_cases.items():
            out[f"{k}_ns"] = timed(run, self.pool_iters[k]) / (self.pool_iters[k] * BULK)
        return out

    def measure_engine(self) -> dict:
        """ns per packet of the engine alone for each bundled C program (CPU time, pinned to one core): the
        JIT under the program's name, the interpreter under ``interp:`` + the name."""
        assert self.engine_cases is not None and self.interp_cases is not None
        with pinned_to_one_core():
            out = {}
            for name, case in self.engine_cases.items():
                out[name] = case.ns_per_packet(self.cfg.bare_seconds)
                out[f"interp:{name}"] = self.interp_cases[name].ns_per_packet(self.cfg.bare_seconds)
            return out

    def measure_emu(self, name: str) -> dict:
        return emu_runs.run_topology(self.topos[name], self.cfg.duration)

    def measure_capture(self) -> dict:
        return emu_runs.run_topology(self.capture_topo, self.cfg.duration)


@contextlib.contextmanager
def pinned_to_one_core():
    """Run the block on one core (the one this process last ran on), then restore the affinity."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    old = os.sched_getaffinity(0)
    try:
        core = os.sched_getcpu() if hasattr(os, "sched_getcpu") else min(old)
        os.sched_setaffinity(0, {core if core in old else min(old)})
    except OSError:
        pass
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, old)


# --------------------------------------------------------------------------------------------------
# results


def med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def kernel_test_run_ns() -> dict | None:
    """BPF_PROG_TEST_RUN's duration per run of each bundled C program, where bpf(2) is permitted."""
    out = {name: ebpf_bench.kernel_ns(name) for name in ebpf_bench.PROGRAMS}
    return out if any(v is not None for v in out.values()) else None


def merge_cli(runs: list[dict]) -> dict:
    """Several cold `emu run`s as one: the median time to the first packet from exec (and the worst), the
    coordinator's peak memory over them, their violations summed; the rest from the last run."""
    c = dict(runs[-1])
    fx = [x["first_packet_from_exec_s"] for x in runs if x.get("first_packet_from_exec_s") is not None]
    c["first_packet_from_exec_s"] = round(med(fx), 3) if fx else None
    c["first_packet_from_exec_max_s"] = max(fx) if fx else None
    c["first_packet_from_exec_all_s"] = fx
    c["runs"] = len(runs)
    for k in ("coordinator_hwm_mb", "coordinator_private_mb", "coordinator_pss_mb"):
        c[k] = max(x[k] for x in runs)
    c["violations"] = sum(x["violations"] for x in runs)
    return c


def derive(samples: dict[str, list[dict]], cli: dict | None, cores: int | None = None) -> dict:
    """The suite's numbers from the per-round samples: medians, then ratios of those (rounded) medians;
    `cores` (default: those this process may use) for the ceilings."""
    emu = {name: samples.get(name, []) for name in EMU_CASES}
    # The cases measured (l2fwd-obj is left out where the C objects cannot be built).
    present = tuple(name for name in EMU_CASES if emu[name] or name != "l2fwd-obj")
    cores = cores or len(baselines.usable_cores())

    def emu_med(name: str, key: str) -> int:
        return round(med([s[key] for s in emu[name]]))

    r: dict = {}
    r["bare_xdp_pps"] = round(med([s["pps"] for s in samples["bare"]]))
    if all("vectorised_pps" in s for s in samples["bare"]):
        r["bare_xdp_vectorised_pps"] = round(med([s["vectorised_pps"] for s in samples["bare"]]))
    cores_runs = samples.get("bare-cores", [])
    r["bare_xdp_2core_pps"] = round(med([s["pps_2"] for s in cores_runs])) if cores_runs else None
    # The median of each round's own ratio: the two were measured back to back, the rounds minutes apart.
    r["bare_scaling_2_to_1"] = round(med([s["scaling"] for s in cores_runs]), 4) if cores_runs else None
    r["transport_desc_per_s"] = round(med([s["desc_per_s"] for s in samples["transport"]]))
    r["transport_rtt_desc_per_s"] = round(med([s["rtt_desc_per_s"] for s in samples["transport"]]))
    r["transport_rtt_us"] = round(med([s["rtt_us"] for s in samples["transport"]]), 1)
    r["naive_queue_pps"] = round(med([s["pps"] for s in samples["naive"]]))
    r["xdp_drop_pps"] = emu_med("xdp-drop", "rx_pps")
    r["xdp_tx_pps"] = emu_med("xdp-tx", "delivered_pps")
    r["l2fwd_pps"] = emu_med("l2fwd", "delivered_pps")
    r["l2fwd_1cpu_pps"] = emu_med("l2fwd-1cpu", "delivered_pps")
    r["l2fwd_2cpu_pps"] = r["l2fwd_pps"]
    r["l2fwd_to_bare"] = ratio(r["l2fwd_pps"], r["bare_xdp_pps"])
    r["l2fwd_to_naive"] = ratio(r["l2fwd_pps"], r["naive_queue_pps"])
    r["drop_to_l2fwd"] = ratio(r["xdp_drop_pps"], r["l2fwd_pps"])
    r["scaling_2_to_1"] = ratio(r["l2fwd_2cpu_pps"], r["l2fwd_1cpu_pps"])
    r["l2fwd_to_transport"] = ratio(r["l2fwd_pps"], r["transport_desc_per_s"])
    r["l2fwd_filter_pps"] = emu_med("l2fwd-filter", "delivered_pps")
    r["l2fwd_filter_1cpu_pps"] = emu_med("l2fwd-filter-1cpu", "delivered_pps")
    r["filter_scaling_2_to_1"] = ratio(r["l2fwd_filter_pps"], r["l2fwd_filter_1cpu_pps"])
    obj = emu.get("l2fwd-obj", [])
    r["l2fwd_obj_pps"] = emu_med("l2fwd-obj", "delivered_pps") if obj else None
    r["l2fwd_obj_to_l2fwd"] = ratio(r["l2fwd_obj_pps"], r["l2fwd_pps"]) if obj else None
    eng = samples.get("engine", [])
    r["xdp_engine_ns"] = {k: round(med([s[k] for s in eng]), 1) for k in ebpf_bench.PROGRAMS} if eng else None
    r["xdp_engine_interp_ns"] = ({k: round(med([s[f"interp:{k}"] for s in eng]), 1) for k in ebpf_bench.PROGRAMS}
                                 if eng else None)
    r["xdp_kernel_test_run_ns"] = kernel_test_run_ns() if eng else None
    # The capture's cost: l2fwd with eth0 captured against l2fwd, both in every round; the median of
    # each round's own ratio (measured minutes apart otherwise), and the share the capture ring dropped.
    cap = samples.get("l2fwd-capture", [])
    if cap:
        r["l2fwd_capture_pps"] = round(med([s["delivered_pps"] for s in cap]))
        by_round = {s.get("round"): s["delivered_pps"] for s in emu["l2fwd"]}
        rel = [s["delivered_pps"] / by_round[s.get("round")] for s in cap if by_round.get(s.get("round"))]
        r["capture_to_l2fwd"] = round(med(rel), 4) if rel else None
        kept = [s.get("capture_frames", 0) / max(1, s.get("capture_frames", 0) + s.get("capture_drops", 0))
                for s in cap]
        r["capture_kept_share"] = round(med(kept), 4)
        r["capture_violations"] = sum(s["violations"] + s["unaccounted"] + s["corrupted"] for s in cap)
    r["pool_ns_per_page"] = {k: round(med([s[f"{k}_ns"] for s in samples["pool"]]), 1)
                             for k in ("fast", "ring", "allocator")}

    runs = [s for name in present for s in emu[name]]
    rss: dict[str, float] = {}
    priv: dict[str, float] = {}
    pss: dict[str, float] = {}
    for s in runs:
        for k, v in s.get("pss_mb", {}).items():
            pss[k] = max(pss.get(k, 0.0), v)
        for k, v in s["rss_mb"].items():
            rss[k] = max(rss.get(k, 0.0), v)
        for k, v in s["rss_private_mb"].items():
            priv[k] = max(priv.get(k, 0.0), v)
    if cli is not None:
        rss["coordinator"] = cli["coordinator_hwm_mb"]
        priv["coordinator"] = cli["coordinator_private_mb"]
        pss["coordinator"] = cli["coordinator_pss_mb"]
        rss_note = "coordinator: `python -m emu.cli run` sampled from outside"
    else:
        st = baselines.proc_status(os.getpid())
        rss["coordinator"] = round(st.get("VmHWM", 0) / 1024, 1)
        priv["coordinator"] = round(st.get("RssAnon", 0) / 1024, 1)
        pss["coordinator"] = round(baselines.proc_pss_kb(os.getpid()) / 1024, 1)
        rss_note = "coordinator: this benchmark process (also ran the baselines: an upper bound)"
    r["rss_mb"] = rss
    # The peak VmHWM of a CPU worker or device in each case: which topology sets the peak above.
    r["rss_mb_by_topology"] = {
        name: max((max(s["rss_mb"].get("cpu", 0.0), s["rss_mb"].get("device", 0.0)) for s in emu[name]), default=0.0)
        for name in present
    }
    # The page memory ever handed out in each case: the part of the host's page memory in those VmHWMs.
    r["allocated_hwm_mb_by_topology"] = {
        name: max((s.get("allocated_hwm_mb", 0.0) for s in emu[name]), default=0.0) for name in present
    }
    r["rss_private_mb"] = priv
    r["pss_mb"] = pss
    r["rss_note"] = rss_note
    r["cpu_us_per_pkt"] = {
        name: {k: round(med([s["cpu_us_per_pkt"][k] for s in emu[name] if k in s["cpu_us_per_pkt"]]), 2)
               for k in sorted({k for s in emu[name] for k in s["cpu_us_per_pkt"]})}
        for name in present
    }
    r.update(ceilings(r, cores))
    fps = [s["first_packet_s"] for s in emu["l2fwd"] if s["first_packet_s"] is not None]
    r["first_packet_s"] = round(med(fps), 3) if fps else None
    r["first_packet_max_s"] = max(fps) if fps else None
    r["cli"] = cli
    # The target's reading: from the exec of a cold `emu run` (no fork server yet) to the first frame a
    # sink received.  Without the CLI runs, the in-process number from Run() stands in.
    r["first_packet_from_exec_s"] = cli.get("first_packet_from_exec_s") if cli else None
    all_runs = [{"topology": s["topology"], "round": s.get("round"), "violations": s["violations"],
                 "unaccounted": s["unaccounted"], "corrupted": s["corrupted"]} for s in runs]
    if cli is not None:
        all_runs.append({"topology": "l2fwd (emu.cli, --count)", "round": None,
                         "violations": cli["violations"], "unaccounted": 0, "corrupted": 0})
    r["runs"] = all_runs
    r["violations"] = sum(x["violations"] for x in all_runs)
    r["unaccounted"] = sum(x["unaccounted"] for x in all_runs)
    r["corrupted"] = sum(x["corrupted"] for x in all_runs)
    return r


PPS_KEY = {"xdp-drop": "xdp_drop_pps", "xdp-tx": "xdp_tx_pps", "l2fwd": "l2fwd_pps", "l2fwd-1cpu": "l2fwd_1cpu_pps",
           "l2fwd-filter": "l2fwd_filter_pps", "l2fwd-filter-1cpu": "l2fwd_filter_1cpu_pps",
           "l2fwd-obj": "l2fwd_obj_pps"}


def ceilings(r: dict, cores: int) -> dict:
    """What the cores allow, from the CPU time the processes used per packet (all of them: CPU workers,
    devices, traffic ports; not the coordinator, which is off the packet path, so the ceilings err high).

    * ``cores_busy``: cores kept busy, packets/s x CPU seconds per packet, per case.
    * ``pps_ceiling``: packets/s with every core busy at that cost per packet (cores / cost).  The cost
      per packet is not a constant (busier processes take bigger batches): these are ceilings at the
      cost measured, which for l2fwd rose, not fell, from one CPU worker to two in the runs recorded in
      docs/benchmarks.md.
    * ``l2fwd_to_bare_ceiling``: l2fwd's ceiling over the bare ceiling: the most `l2fwd_to_bare` can be
      at the CPU cost per packet l2fwd was measured at.
    * ``scaling_2_to_1_ceiling``: the cores a one-CPU l2fwd run keeps busy, against all of them: a
      second worker can at most take the idle rest (with no extra cost per packet), so two workers
      forward at most ``cores / cores_busy(1 CPU)`` times what one does.  ``filter_scaling_2_to_1_ceiling``:
      the same with the CPU-heavy program."""
    cost = {name: sum(per_kind.values()) for name, per_kind in r["cpu_us_per_pkt"].items()}
    busy = {name: round(r[PPS_KEY[name]] * us / 1e6, 2) for name, us in cost.items() if us > 0 and r[PPS_KEY[name]]}
    pps = {name: round(cores * 1e6 / us) for name, us in cost.items() if us > 0}

    def bound(num: float | None, den: float | None) -> float | None:
        return round(num / den, 4) if num and den else None

    return {
        "cores_used": cores,
        "cpu_us_per_pkt_total": {name: round(us, 2) for name, us in cost.items()},
        "cores_busy": busy,
        "pps_ceiling": pps,
        "l2fwd_to_bare_ceiling": bound(pps.get("l2fwd"), r["bare_xdp_pps"]),
        "scaling_2_to_1_ceiling": bound(cores, busy.get("l2fwd-1cpu")),
        "filter_scaling_2_to_1_ceiling": bound(cores, busy.get("l2fwd-filter-1cpu")),
    }


def shm_of_l2fwd() -> int:
    from emu.mem.pagemem import required_shm_bytes
    from emu.run.coordinator import pool_params

    topo = emu_runs.load("l2fwd")
    return sum(required_shm_bytes(h.pages, h.page_size, h.cpus, pool_params(h)) for h in topo.hosts.values())


def evaluate_targets(r: dict) -> list[dict]:
    out = []
    for text, key, threshold, goal in TARGETS:
        v = r.get(key)
        if v is None:  # not measured here (no clang for the C objects)
            continue
        # The most the cores allow at the measured cost per packet, where the suite can tell.
        ceiling = r.get(f"{key}_ceiling")
        out.append({"target": text, "key": key, "measured": v, "threshold": threshold, "met": v >= threshold,
                    "goal": goal, "goal_met": None if goal is None else v >= goal, "ceiling": ceiling,
                    "reachable": None if ceiling is None else ceiling >= threshold})
    eng = (r.get("xdp_engine_ns") or {}).get("l2fwd_map")
    if eng is not None:
        out.append({"target": f"eBPF engine alone on l2fwd_map <= {ENGINE_L2FWD_MAP_LIMIT_NS:.0f} ns/packet",
                    "key": "xdp_engine_ns", "measured": eng, "threshold": ENGINE_L2FWD_MAP_LIMIT_NS,
                    "met": eng <= ENGINE_L2FWD_MAP_LIMIT_NS, "goal": None, "goal_met": None})
    worst = max(r["rss_mb"].get("cpu", 0.0), r["rss_mb"].get("device", 0.0))
    out.append({"target": f"RSS per CPU worker / device process <= {RSS_LIMIT_MB:.0f} MB", "key": "rss_mb",
                "measured": worst, "threshold": RSS_LIMIT_MB, "met": 0 < worst <= RSS_LIMIT_MB,
                "goal": None, "goal_met": None})
    key = "first_packet_from_exec_s" if r.get("first_packet_from_exec_s") is not None else "first_packet_s"
    fp = r[key]
    out.append({"target": f"first packet within {FIRST_PACKET_LIMIT_S:.0f} s of `emu run`", "key": key,
                "measured": fp, "threshold": FIRST_PACKET_LIMIT_S,
                "met": fp is not None and fp <= FIRST_PACKET_LIMIT_S, "goal": None, "goal_met": None})
    return out


def spread(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{min(xs):,.0f} .. {max(xs):,.0f}"


def render_table(res: dict) -> str:
    s, m = res["samples"], res["machine"]
    cpu = res["cpu_us_per_pkt"]

    def col(name: str, key: str) -> list[float]:
        return [x[key] for x in s.get(name, [])]

    rows = [
        ("bare ceiling: l2fwd program alone, 1 core", res["bare_xdp_pps"], spread(col("bare", "pps")), "pkt/s"),
        *([("bare, its vectorised form (64 per call), 1 core", res["bare_xdp_vectorised_pps"],
            spread(col("bare", "vectorised_pps")), "pkt/s")] if "bare_xdp_vectorised_pps" in res else []),
        *([("bare, two processes on two cores at once", res["bare_xdp_2core_pps"], spread(col("bare-cores", "pps_2")),
            "pkt/s")] if res.get("bare_xdp_2core_pps") is not None else []),
        ("transport: zmq one way, 64-desc batches", res["transport_desc_per_s"],
         spread(col("transport", "desc_per_s")), "desc/s"),
        (f"transport: out and back, {res['config']['rtt_window']} batches in flight",
         res["transport_rtt_desc_per_s"], spread(col("transport", "rtt_desc_per_s")), "desc/s"),
        ("naive: pickled packets via mp.Queue, 3 procs", res["naive_queue_pps"], spread(col("naive", "pps")),
         "pkt/s"),
        ("emulator xdp-drop (rx)", res["xdp_drop_pps"], spread(col("xdp-drop", "rx_pps")), "pkt/s"),
        ("emulator xdp-tx (delivered)", res["xdp_tx_pps"], spread(col("xdp-tx", "delivered_pps")), "pkt/s"),
        ("emulator l2fwd, 2 CPUs (delivered)", res["l2fwd_pps"], spread(col("l2fwd", "delivered_pps")), "pkt/s"),
        ("emulator l2fwd, 1 CPU (delivered)", res["l2fwd_1cpu_pps"], spread(col("l2fwd-1cpu", "delivered_pps")),
         "pkt/s"),
        *([("emulator l2fwd-obj: the C object, 2 CPUs", res["l2fwd_obj_pps"],
            spread(col("l2fwd-obj", "delivered_pps")), "pkt/s")] if res.get("l2fwd_obj_pps") is not None else []),
        *[(f"eBPF engine alone (JIT): {k} (kernel test_run "
           f"{(res.get('xdp_kernel_test_run_ns') or {}).get(k, '-')} ns)", v, spread(col("engine", k)), "ns/pkt")
          for k, v in (res.get("xdp_engine_ns") or {}).items()],
        *[(f"eBPF engine alone (interpreter): {k}", v, spread(col("engine", f"interp:{k}")), "ns/pkt")
          for k, v in (res.get("xdp_engine_interp_ns") or {}).items()],
        *([("emulator l2fwd, eth0 captured (docs/capture.md)", res["l2fwd_capture_pps"],
            spread(col("l2fwd-capture", "delivered_pps")), "pkt/s")] if "l2fwd_capture_pps" in res else []),
        ("emulator l2fwd_filter (CPU-heavy program), 2 CPUs", res["l2fwd_filter_pps"],
         spread(col("l2fwd-filter", "delivered_pps")), "pkt/s"),
        ("emulator l2fwd_filter (CPU-heavy program), 1 CPU", res["l2fwd_filter_1cpu_pps"],
         spread(col("l2fwd-filter-1cpu", "delivered_pps")), "pkt/s"),
    ]
    lines = [
        f"Machine: {m['cpu_model']}, {m['cores']} cores ({m['usable_cores']} usable), load "
        f"{m['loadavg_at_start']} -> {m.get('loadavg_at_end')}, Python {m['python']}, numpy {m['numpy']}",
        f"Rounds: {res['config']['rounds']} interleaved, {res['config']['duration']:g} s of traffic per emulator "
        f"run; medians.",
        "",
        "| measurement | median | range over rounds | unit |",
        "| --- | ---: | ---: | --- |",
    ]
    lines += [f"| {a} | {b:,} | {c} | {d} |" for a, b, c, d in rows]
    pool = res["pool_ns_per_page"]
    lines += [
        f"| transport: one batch out and back (latency) | {res['transport_rtt_us']:,} | "
        f"{spread(col('transport', 'rtt_us'))} | us |",
        f"| page pool, bulk 64: fast / ring / allocator | {pool['fast']:,} / {pool['ring']:,} / "
        f"{pool['allocator']:,} | | ns/page |",
        "",
        "| ratio | value |",
        "| --- | ---: |",
        f"| l2fwd / bare | {res['l2fwd_to_bare']:.3f} |",
        f"| l2fwd / naive | {res['l2fwd_to_naive']:.2f} |",
        f"| xdp-drop / l2fwd | {res['drop_to_l2fwd']:.2f} |",
        f"| l2fwd 2 CPUs / 1 CPU | {res['scaling_2_to_1']:.2f} |",
        *([f"| bare program, 2 processes on 2 cores / 1 (what a second core gives) "
           f"| {res['bare_scaling_2_to_1']:.2f} |"] if res.get("bare_scaling_2_to_1") is not None else []),
        f"| l2fwd_filter 2 CPUs / 1 CPU | {res['filter_scaling_2_to_1']:.2f} |",
        f"| l2fwd pkt/s / transport desc/s (one hop) | {res['l2fwd_to_transport']:.3f} |",
        *([f"| l2fwd with eth0 captured / without (same rounds); frames the capture kept "
           f"| {res['capture_to_l2fwd']:.3f}; {res['capture_kept_share']:.1%} |"]
          if res.get("capture_to_l2fwd") is not None else []),
        "",
        "| process kind | peak RSS (VmHWM) MB | private (RssAnon) MB | PSS MB |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k in ("cpu", "device", "traffic", "coordinator"):
        if k in res["rss_mb"]:
            lines.append(f"| {k} | {res['rss_mb'][k]:,.1f} | {res['rss_private_mb'].get(k, 0):,.1f} | "
                         f"{res['pss_mb'].get(k, 0):,.1f} |")
    lines += [
        "",
        f"Shared memory of the l2fwd topology: {res['shm_bytes_l2fwd'] / 2**20:,.1f} MiB "
        f"({res['shm_bytes_l2fwd']:,} bytes; VmHWM counts the part of it a process touched).  {res['rss_note']}.",
        "Peak VmHWM of a CPU worker or device by topology: "
        + ", ".join(f"{k} {v:,.1f}" for k, v in res.get("rss_mb_by_topology", {}).items()) + " MB.",
        "Page memory ever out of the page allocator at once (the report's `allocated_hwm`; the most of the "
        "page memory a process can have touched) by topology: "
        + ", ".join(f"{k} {v:,.1f}" for k, v in res.get("allocated_hwm_mb_by_topology", {}).items()) + " MiB.",
        "",
        f"| topology | CPU us per packet: cpu / device / traffic | all | cores busy (of {res['cores_used']}) "
        "| pkt/s with every core busy at that cost |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in EMU_CASES:
        c = cpu.get(name, {})
        busy, ceil = res["cores_busy"].get(name), res["pps_ceiling"].get(name)
        lines.append(f"| {name} | " + " / ".join(f"{c.get(k, 0):.2f}" for k in ("cpu", "device", "traffic"))
                     + f" | {res['cpu_us_per_pkt_total'].get(name, 0):.2f} | {'-' if busy is None else busy} | "
                     + ("-" if ceil is None else f"{ceil:,}") + " |")
    fp = res["first_packet_s"]
    lines += ["", f"First delivered packet (l2fwd, from Run(), workers' fork server already up): median {fp} s, "
                  f"worst {res['first_packet_max_s']} s."]
    if res.get("cli"):
        c = res["cli"]
        lines.append(
            f"`emu run` from a cold start (`python -m emu.cli run topology/l2fwd.yaml --count {c['count']} --json -`, "
            f"{c.get('runs', 1)} runs): first packet at the sink {c['first_packet_from_exec_s']} s after exec "
            f"(median; worst {c.get('first_packet_from_exec_max_s')} s); the last run {c['wall_s']} s wall, "
            f"its Run() to first packet {c['first_packet_s']} s; interpreter + imports alone {c['import_s']} s."
        )
    lines.append(
        f"Violations summed over {len(res['runs'])} emulator runs: {res['violations']} "
        f"(unaccounted {res['unaccounted']}, corrupted {res['corrupted']})."
    )
    lines += ["", "| target | measured | at most, at the measured CPU cost per packet | result |",
              "| --- | ---: | ---: | --- |"]
    for t in res["targets"]:
        v = t["measured"]
        vs = "-" if v is None else (f"{v:,.3f}" if isinstance(v, float) else f"{v:,}")
        verdict = "MET" if t["met"] else "NOT MET"
        if t["goal"] is not None:
            verdict += f" (goal {t['goal']:g}: {'MET' if t['goal_met'] else 'NOT MET'})"
        if t.get("reachable") is False:
            verdict += ": beyond what the cores allow"
        ceil = t.get("ceiling")
        lines.append(f"| {t['target']} | {vs} | {'' if ceil is None else f'{ceil:.3f}'} | {verdict} |")
    return "\n".join(lines)


def write_chart(res: dict, path: Path) -> str | None:
    """The PNG chart; returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): chart skipped"
    bars = [
        ("bare XDP program (1 core)", res["bare_xdp_pps"], "#888888"),
        *([("bare XDP program (2 cores)", res["bare_xdp_2core_pps"], "#888888")]
          if res.get("bare_xdp_2core_pps") else []),
        ("zmq one way (desc/s)", res["transport_desc_per_s"], "#aaaaaa"),
        ("zmq out+back (desc/s)", res["transport_rtt_desc_per_s"], "#aaaaaa"),
        ("naive mp.Queue", res["naive_queue_pps"], "#d62728"),
        ("emu xdp-drop", res["xdp_drop_pps"], "#1f77b4"),
        ("emu xdp-tx", res["xdp_tx_pps"], "#1f77b4"),
        ("emu l2fwd 2 CPUs", res["l2fwd_pps"], "#2ca02c"),
        ("emu l2fwd 1 CPU", res["l2fwd_1cpu_pps"], "#98df8a"),
        ("emu l2fwd_filter 2 CPUs", res["l2fwd_filter_pps"], "#9467bd"),
        ("emu l2fwd_filter 1 CPU", res["l2fwd_filter_1cpu_pps"], "#c5b0d5"),
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    names = [b[0] for b in bars][::-1]
    vals = [max(b[1], 1) for b in bars][::-1]
    ax1.barh(names, vals, color=[b[2] for b in bars][::-1])
    ax1.set_xscale("log")
    ax1.set_xlabel("packets (or descriptors) per second, median, log scale")
    for y, v in enumerate(vals):
        ax1.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    ax1.axvline(res["bare_xdp_pps"] * 0.4, color="k", ls=":", lw=1)
    ax1.text(res["bare_xdp_pps"] * 0.4, len(vals) - 0.5, " 0.4 x bare", fontsize=7, va="top")
    ax1.set_xlim(right=max(vals) * 6)
    ax1.set_title(f"throughput ({res['config']['rounds']} interleaved rounds)")
    kinds = [k for k in ("cpu", "device", "traffic", "coordinator") if k in res["rss_mb"]]
    hwm = [res["rss_mb"][k] for k in kinds]
    priv = [res["rss_private_mb"].get(k, 0) for k in kinds]
    x = range(len(kinds))
    ax2.bar([i - 0.2 for i in x], hwm, 0.4, label="peak RSS (VmHWM)")
    ax2.bar([i + 0.2 for i in x], priv, 0.4, label="private (RssAnon)")
    ax2.axhline(RSS_LIMIT_MB, color="r", ls="--", lw=1, label=f"{RSS_LIMIT_MB:.0f} MB target")
    ax2.set_xticks(list(x), kinds)
    ax2.set_ylabel("MB per process")
    ax2.set_title("memory per process (peak)")
    ax2.legend(fontsize=8)
    m = res["machine"]
    fig.suptitle(f"pagepool-emu bench/run.py, {res['when']}: {m['cpu_model']}, {m['usable_cores']} cores", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return None


# --------------------------------------------------------------------------------------------------
# main


def run_suite(cfg: Config, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Every measurement, `cfg.rounds` interleaved rounds; returns the result dict (without targets)."""
    machine = machine_info()
    suite = Suite(cfg)
    t_start = time.monotonic()
    try:
        suite.setup()
        samples: dict[str, list[dict]] = {name: [] for name in suite.measurements}
        names = list(suite.measurements)
        for r in range(cfg.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                t0 = time.monotonic()
                sample = suite.measurements[name]()
                sample["round"] = r
                samples[name].append(sample)
                log(f"round {r + 1}/{cfg.rounds}: {name} ({time.monotonic() - t0:.1f} s)")
        cli = None
        if cfg.cli:
            runs = []
            for k in range(cfg.cli_runs):
                log(f"CLI end to end {k + 1}/{cfg.cli_runs} ...")
                runs.append(emu_runs.cli_end_to_end(cfg.cli_count))
            cli = merge_cli(runs)
    finally:
        suite.close()
    machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res = {
        "benchmark": "run",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "config": asdict(cfg),
        "wall_s": round(time.monotonic() - t_start, 1),
        **derive(samples, cli, cores=machine["usable_cores"]),
        "shm_bytes_l2fwd": shm_of_l2fwd(),
        "samples": samples,
    }
    res["targets"] = evaluate_targets(res)
    return res


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _end_children() -> None:
    """Whatever the suite started and is still running (our own children, by name and pid)."""
    for p in multiprocessing.active_children():
        if not p.name.startswith(("bench-", "emu-")):
            continue
        p.terminate()
        p.join(3)
        if p.is_alive():
            p.kill()
            p.join(3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 short rounds (about a minute)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' smoke run
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    ap.add_argument("--no-save", action="store_true", help=f"do not write {RESULTS_DIR}/run.{{json,md,png}}")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 5; --quick 2)")
    ap.add_argument("--duration", type=float, help="seconds of traffic per emulator run (default 5; --quick 2)")
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI end-to-end run")
    args = ap.parse_args(argv)
    cfg = TINY if args.tiny else QUICK if args.quick else FULL
    over = {}
    if args.rounds:
        over["rounds"] = max(1, args.rounds)
    if args.duration:
        over["duration"] = args.duration
    if args.no_cli:
        over["cli"] = False
    if over:
        cfg = Config(**{**asdict(cfg), **over})

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        res = run_suite(cfg)
        table = render_table(res)
        print(table)
        blob = json.dumps(res, indent=2) + "\n"
        if args.json:
            write_atomic(Path(args.json), blob)
        if not args.no_save:
            write_atomic(RESULTS_DIR / "run.json", blob)
            write_atomic(RESULTS_DIR / "run.md", f"# bench/run.py ({res['when']})\n\n{table}\n\n"
                         "![chart](run.png)\n")
            why = write_chart(res, RESULTS_DIR / "run.png")
            print(why or f"chart: {RESULTS_DIR / 'run.png'}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        _end_children()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
