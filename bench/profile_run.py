#!/usr/bin/env python3
"""Where the time goes: py-spy profiles of every process of an l2fwd run, per packet.

    python bench/profile_run.py [--seconds 8] [--rate 100] [--topology l2fwd] [--no-save]
    python bench/profile_run.py --sweep [--rounds 3] [--seconds 3]    # l2fwd knob sensitivity, no py-spy

Runs the topology in this process (``emu.run.coordinator.Run``, timed phase by phase for the start-up
breakdown), and once traffic flows attaches ``py-spy record --nonblocking --format raw`` to each CPU
worker, device and traffic port for `--seconds`.  Over the same window it reads each process's CPU time
(``/proc/<pid>/stat``) and the packets the CPUs received, so a function's share of a process's samples
turns into CPU microseconds per packet.  Needs py-spy (``pip install py-spy``) and permission to attach
(root, or ``ptrace_scope`` 0).

``--sweep`` instead runs l2fwd variants (batch sizes, page memory, CPUs; knobs every topology has) in
interleaved rounds and reports delivered pkt/s, CPU us per packet per process kind and peak RSS: the
measurements behind the design changes in ``docs/benchmarks.md``.

Writes ``bench/results/profile-<topology>.{md,json}`` (or ``sweep.{md,json}``) unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import emu_runs
from bench.baselines import cache_handover, proc_cpu_seconds, proc_threads_cpu, thread_schedstat, usable_cores
from bench.pool_bench import machine_info, write_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CPROFILE_ENV = "PPEMU_BENCH_CPROFILE"  # set: spawned workers profile themselves into this directory


def _install_cprofile(outdir: str) -> None:
    """In a spawned emulator process (this file is its ``__mp_main__``): wrap the workers' entry points so
    each runs under cProfile with a per-thread CPU-time clock and dumps its stats at exit.  Spawn imports the
    main module before it unpickles the process target, so the target resolves to the wrapper."""
    import cProfile
    import os

    import workers.cpu
    import workers.device
    import workers.traffic

    def wrap(orig):
        def main(spec) -> None:
            prof = cProfile.Profile(time.thread_time)
            prof.enable()
            try:
                orig(spec)
            finally:
                prof.disable()
                prof.dump_stats(os.path.join(outdir, spec.key.replace("/", "_") + ".prof"))

        return main

    for mod in (workers.cpu, workers.device, workers.traffic):
        mod.main = wrap(mod.main)


if __name__ == "__mp_main__" and CPROFILE_ENV in __import__("os").environ:
    _install_cprofile(__import__("os").environ[CPROFILE_ENV])

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """``"CpuWorker.run_xdp (workers/cpu.py:260)"`` -> ``"CpuWorker.run_xdp (workers/cpu.py)"``."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m.group("file")
    for cut in ("site-packages/", "lib/python3."):
        if cut in f:
            f = f.split(cut, 1)[1]
            if cut.startswith("lib/"):
                f = "stdlib:" + f.split("/", 1)[1]
            break
    return f"{m.group('fn')} ({f})"


# Leaf frames that are waiting, not working: zmq polls with a timeout (the GIL is released, the thread
# sleeps in the kernel; py-spy's --nonblocking sampling cannot always tell).
WAITING = ("Poller.poll (zmq/sugar/poll.py)", "Socket.poll (zmq/sugar/socket.py)")


def parse_raw(text: str) -> tuple[int, collections.Counter, collections.Counter, collections.Counter]:
    """py-spy raw (collapsed) output -> (samples, own samples per function, inclusive samples per function,
    own samples per source line)."""
    total = 0
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    lines: collections.Counter = collections.Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        raw = stack.split(";")
        frames = [frame_name(f) for f in raw]
        total += n
        own[frames[-1]] += n
        lines[raw[-1].strip()] += n
        for f in set(frames):
            incl[f] += n
    return total, own, incl, lines


class TimedRun:
    """`emu.run.coordinator.Run` with timestamps of its start-up phases (a subclass made at call time)."""

    @staticmethod
    def make(topo, duration: float):
        from emu.run.coordinator import Run, RunOptions

        class _Timed(Run):
            def __init__(self, *a, **k) -> None:
                super().__init__(*a, **k)
                self.marks = {"created": time.monotonic()}

            def prepare(self) -> None:
                super().prepare()
                self.marks["shm_and_maps"] = time.monotonic()

            def spawn(self) -> None:
                super().spawn()
                self.marks["spawned"] = time.monotonic()

            def wait_ready(self) -> None:
                super().wait_ready()
                self.marks["all_ready"] = time.monotonic()

        return _Timed(topo, RunOptions(duration=duration, quiet=True))


def profile(topo_name: str, seconds: float, rate: int, warmup: float = 1.5) -> dict:
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    topo = emu_runs.case(topo_name)
    kinds = emu_runs.kinds_of(topo)
    run = TimedRun.make(topo, warmup + seconds + 1.0)
    out: dict = {"processes": {}, "errors": []}
    tmp = Path(tempfile.mkdtemp(prefix="ppemu-profile-"))

    def attach() -> None:
        try:
            while not run.started_ns:
                time.sleep(0.02)
            time.sleep(warmup)
            pids = {p.key: p.process.pid for p in run.procs}
            cpu0 = {k: proc_cpu_seconds(pid) for k, pid in pids.items()}
            thr0 = {k: proc_threads_cpu(pid) for k, pid in pids.items()}
            sch0 = {k: thread_schedstat(pid) for k, pid in pids.items()}
            snap0 = run.snapshot()
            spies = {}
            for key, pid in pids.items():
                f = tmp / f"{key.replace('/', '_')}.txt"
                cmd = [pyspy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
                       "--nonblocking", "--format", "raw", "--output", str(f)]
                spies[key] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), f)
            t0 = time.monotonic()
            time.sleep(seconds)
            cpu1 = {k: proc_cpu_seconds(pid) for k, pid in pids.items()}
            thr1 = {k: proc_threads_cpu(pid) for k, pid in pids.items()}
            sch1 = {k: thread_schedstat(pid) for k, pid in pids.items()}
            snap1 = run.snapshot()
            window = time.monotonic() - t0
            rx = snap1.total("cpu", "rx_packets") - snap0.total("cpu", "rx_packets")
            delivered = snap1.delivered() - snap0.delivered()
            out.update(window_s=round(window, 2), rx_packets=rx, delivered=delivered,
                       pps=round(delivered / window))
            for key, (p, f) in spies.items():
                try:
                    _, err = p.communicate(timeout=seconds + 30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    _, err = p.communicate()
                text = f.read_text() if f.exists() else ""
                total, own, incl, hot = parse_raw(text)
                waiting = sum(own[w] for w in WAITING)
                work = max(total - waiting, 1)
                secs = (cpu1[key] or 0) - (cpu0[key] or 0)
                us_pkt = secs / rx * 1e6 if rx else 0.0

                def top(counter: collections.Counter, k: int, us_pkt: float = us_pkt, work: int = work) -> list:
                    return [(fn, n, round(n / work, 4), round(n / work * us_pkt, 3))
                            for fn, n in counter.most_common(k + 8) if frame_name(fn) not in WAITING][:k]

                threads = {name: round(v - thr0[key].get(name, 0.0), 3) for name, v in thr1[key].items()}
                zmq_s = sum(v for name, v in threads.items() if name.startswith("ZMQbg"))
                a, b = sch0[key], sch1[key]
                on_cpu, runq = ((b[0] - a[0]) / 1e9, (b[1] - a[1]) / 1e9) if a and b else (0.0, 0.0)
                out["processes"][key] = {
                    "kind": kinds.get(key, "?"),
                    "threads_cpu_s": threads,
                    "zmq_thread_share": round(zmq_s / secs, 3) if secs > 0 else 0.0,
                    # main thread: seconds on a CPU and seconds runnable but waiting for one, in the window
                    "main_on_cpu_s": round(on_cpu, 3),
                    "main_runqueue_s": round(runq, 3),
                    "cpu_s": round(secs, 3),
                    "cpu_us_per_pkt": round(us_pkt, 2),
                    "busy": round(secs / window, 3),
                    "samples": total,
                    "waiting_samples": waiting,
                    # shares are of the working samples; us/packet = share x the process's CPU us/packet
                    "self": top(own, 15),
                    "self_lines": top(hot, 8),
                    "inclusive": top(incl, 40),
                    "pyspy_stderr": (err or "").strip().splitlines()[-1:] if p.returncode else [],
                }
        except Exception as exc:
            out["errors"].append(repr(exc))

    th = threading.Thread(target=attach, name="bench-profiler", daemon=True)
    th.start()
    try:
        report = run.run()
    finally:
        th.join(seconds + 60)
        shutil.rmtree(tmp, ignore_errors=True)
    m = run.marks
    start = m["created"]
    out["startup_s"] = {
        "shm_and_maps": round(m.get("shm_and_maps", start) - start, 3),
        "spawned": round(m.get("spawned", start) - start, 3),
        "all_ready": round(m.get("all_ready", start) - start, 3),
        "first_packet": report.get("first_packet_s"),
    }
    out["report"] = {k: report[k] for k in ("rx_pps", "delivered_pps", "elapsed_s")}
    out["violations"] = emu_runs.sum_violations(report)
    out["topology"] = topo_name
    return out


def render(res: dict) -> str:
    lines = [
        f"Topology {res['topology']}: profiled {res.get('window_s')} s of traffic, "
        f"{res.get('rx_packets', 0):,} packets through XDP ({res.get('pps', 0):,} pkt/s delivered while "
        f"profiled); violations {res['violations']}.",
        "",
        "Start-up (seconds after Run()): " + ", ".join(f"{k} {v}" for k, v in res["startup_s"].items()),
        "",
        "| process | kind | CPU us/packet | of which zmq I/O thread | busy (CPU s / wall s) "
        "| main thread waiting for a core (s / wall s) | py-spy samples (waiting in zmq poll) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    procs = res["processes"]
    for key, p in procs.items():
        lines.append(f"| {key} | {p['kind']} | {p['cpu_us_per_pkt']:.2f} | {p['zmq_thread_share']:.0%} | "
                     f"{p['busy']:.0%} | {p['main_runqueue_s'] / res['window_s']:.0%} | "
                     f"{p['samples']:,} ({p['waiting_samples']:,}) |")
    total = sum(p["cpu_us_per_pkt"] for p in procs.values())
    zmq_total = sum(p["cpu_us_per_pkt"] * p["zmq_thread_share"] for p in procs.values())
    lines.append(f"| **all** | | **{total:.2f}** | {zmq_total:.2f} us | | | |")
    h = res.get("handover")
    if h:
        lines += ["", f"Cache hand-over (`bench/baselines.py: cache_handover`, {h['rounds']} batches of {h['batch']} "
                  f"random pages): reading a packet's first cache line right after a process on the other core "
                  f"wrote it costs {h['remote_ns_per_pkt']} ns a packet, reading it again {h['local_ns_per_pkt']} ns: "
                  f"{h['handover_ns_per_pkt']} ns a hop.  In l2fwd eth0 writes each frame, a CPU worker reads and "
                  f"rewrites its header and eth1 reads it: at most about {3 * h['handover_ns_per_pkt'] / 1000:.2f} us "
                  f"of the {total:.2f} above (less when two hops happen to run on the same core)."]
    lines += ["", "Shares below are of a process's py-spy samples outside zmq polls (its Python thread, running or "
              "waiting for a core: on an oversubscribed machine a doorbell's `ring` includes the preemption the "
              "wake-up it causes may bring); us/packet = share x the process's CPU us/packet."]
    for key, p in procs.items():
        lines += ["", f"### {key} ({p['kind']}): {p['cpu_us_per_pkt']:.2f} CPU us/packet", "",
                  "| own time in (Python function; C calls it makes count as its own) | share of work | us/packet |",
                  "| --- | ---: | ---: |"]
        for fn, _, share, us in p["self"][:12]:
            lines.append(f"| `{fn}` | {share:.1%} | {us:.3f} |")
        lines.append("")
        lines.append("Hottest lines: " + "; ".join(f"`{fn}` {share:.0%}" for fn, _, share, _ in p["self_lines"][:5]))
    return "\n".join(lines)


def cprofile_run(topo_name: str, seconds: float, top: int = 12) -> dict:
    """Run the topology with every worker under cProfile (CPU-time clock); own CPU time per function and
    per packet.  Deterministic profiling inflates call-heavy code (each call reads the thread clock), so the
    shares are indicative; the absolute CPU per packet comes from the unprofiled py-spy run."""
    import os
    import pstats

    kinds = emu_runs.kinds_of(emu_runs.case(topo_name))
    tmp = Path(tempfile.mkdtemp(prefix="ppemu-cprofile-"))
    try:
        # In a fresh interpreter: workers are forked from a fork server that inherits the environment it
        # started in, and in this process one is already up (the py-spy run) without CPROFILE_ENV.
        report_file = tmp / "report.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--cprofile-child", str(report_file),
                        "--topology", topo_name, "--seconds", str(seconds)],
                       env={**os.environ, CPROFILE_ENV: str(tmp)}, check=True, timeout=seconds + 120)
        report = json.loads(report_file.read_text())
        rx = report["rx_packets"]
        out: dict = {"seconds": seconds, "rx_packets": rx, "delivered_pps": report["delivered_pps"],
                     "processes": {}}
        for f in sorted(tmp.glob("*.prof")):
            st = pstats.Stats(str(f))
            total = sum(v[2] for v in st.stats.values())  # own time (tottime) of every function
            rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
            key = next((k for k in kinds if k.replace("/", "_") == f.stem), f.stem)
            out["processes"][key] = {
                "kind": kinds.get(key, "?"),
                "cpu_s": round(total, 3),
                "top": [
                    {"function": f"{fn} ({Path(file).name}:{line})" if line else fn, "calls": v[1],
                     "share": round(v[2] / total, 4) if total else 0.0,
                     "us_per_pkt": round(v[2] / rx * 1e6, 3) if rx else 0.0}
                    for (file, line, fn), v in rows
                ],
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not out["processes"]:
        raise RuntimeError(f"the cProfile run of {topo_name} left no profiles: its workers were not wrapped")
    return out


def render_cprofile(res: dict) -> str:
    lines = [f"cProfile with a CPU-time clock (`time.thread_time`), whole run of {res['seconds']:g} s, "
             f"{res['rx_packets']:,} packets ({res['delivered_pps']:,} pkt/s under the profiler).  Own CPU time "
             "per function (C functions listed on their own; profiler overhead included, so call-heavy code is "
             "inflated)."]
    for key, p in res["processes"].items():
        lines += ["", f"#### {key} ({p['kind']}): {p['cpu_s']:.2f} CPU s in the main thread", "",
                  "| function | calls | share of own CPU | us/packet |", "| --- | ---: | ---: | ---: |"]
        for r in p["top"]:
            lines.append(f"| `{r['function']}` | {r['calls']:,} | {r['share']:.1%} | {r['us_per_pkt']:.3f} |")
    return "\n".join(lines)


SWEEP = (
    ("bundled (2 CPUs, 24,576 x 2 KiB pages, RX rings of 4,096, TX rings of 2,048, napi_budget 64, burst 64)", {}),
    ("rings of 2,048, pool_size 2,048", {"ring": 2048, "pool_size": 2048}),
    ("rings of 1,024, pool_size 1,024", {"ring": 1024, "pool_size": 1024}),
    ("rings of 1,024, 8,192 x 4 KiB pages, pool_size 1,024 (the bundled topology until 2026-11-25)",
     {"ring": 1024, "pages": 8192, "page_size": 4096, "pool_size": 1024}),
    ("4 KiB pages (96 MiB page memory)", {"page_size": 4096}),
    ("pool_size 1,024 (the kernel's default, a quarter of the RX ring)", {"pool_size": 1024}),
    ("burst 256, napi_budget 256", {"burst": 256, "napi_budget": 256}),
    ("1 CPU", {"cpus": 1}),
)


def sweep(rounds: int, seconds: float) -> dict:
    samples: dict[str, list[dict]] = {name: [] for name, _ in SWEEP}
    for r in range(rounds):
        order = SWEEP[r % len(SWEEP):] + SWEEP[: r % len(SWEEP)]
        for name, knobs in order:
            samples[name].append(emu_runs.run_topology(emu_runs.l2fwd_variant(**knobs), seconds))
            print(f"round {r + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
    rows = []
    for name, knobs in SWEEP:
        ss = samples[name]
        kinds = sorted({k for s in ss for k in s["cpu_us_per_pkt"]})
        cpu = {k: round(statistics.median([s["cpu_us_per_pkt"][k] for s in ss if k in s["cpu_us_per_pkt"]]), 2)
               for k in kinds}
        rss = {k: max(s["rss_mb"].get(k, 0) for s in ss) for k in ("cpu", "device", "traffic")}
        rows.append({"variant": name, "knobs": knobs,
                     "delivered_pps": round(statistics.median([s["delivered_pps"] for s in ss])),
                     "pps_rounds": [s["delivered_pps"] for s in ss],
                     "cpu_us_per_pkt": cpu, "cpu_us_per_pkt_total": round(sum(cpu.values()), 2),
                     "rss_mb": rss, "violations": sum(s["violations"] for s in ss)})
    base = rows[0]["delivered_pps"] or 1
    for row in rows:
        row["vs_bundled"] = round(row["delivered_pps"] / base, 2)
    return {"rounds": rounds, "seconds": seconds, "rows": rows}


def render_sweep(res: dict) -> str:
    lines = [
        f"l2fwd variants, {res['rounds']} interleaved rounds of {res['seconds']:g} s each; medians.",
        "",
        "| variant | delivered pkt/s | vs bundled | CPU us/pkt cpu / device / traffic (total) "
        "| peak RSS MB cpu / device | violations |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["rows"]:
        c = r["cpu_us_per_pkt"]
        lines.append(
            f"| {r['variant']} | {r['delivered_pps']:,} | {r['vs_bundled']:.2f}x | "
            f"{c.get('cpu', 0):.2f} / {c.get('device', 0):.2f} / {c.get('traffic', 0):.2f} "
            f"({r['cpu_us_per_pkt_total']:.2f}) | {r['rss_mb']['cpu']:.1f} / {r['rss_mb']['device']:.1f} | "
            f"{r['violations']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="profiling window (default 8)")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100)")
    ap.add_argument("--topology", default="l2fwd",
                    help="bundled topology name, or one of the suite's variants: "
                         f"{', '.join(emu_runs.VARIANTS)} (default l2fwd)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="l2fwd knob sensitivity instead of a profile")
    ap.add_argument("--no-cprofile", action="store_true", help="skip the second run under cProfile")
    ap.add_argument("--rounds", type=int, default=3, help="--sweep: interleaved rounds (default 3)")
    ap.add_argument("--cprofile-child", metavar="REPORT", help=argparse.SUPPRESS)  # see cprofile_run
    args = ap.parse_args(argv)
    if args.cprofile_child:
        from emu.run.coordinator import Run, RunOptions

        report = Run(emu_runs.case(args.topology), RunOptions(duration=args.seconds, quiet=True)).run()
        rx = sum(c["rx_packets"] for c in report["cpus"])
        Path(args.cprofile_child).write_text(json.dumps({"rx_packets": rx, "delivered_pps": report["delivered_pps"]}))
        return 0
    if args.sweep:
        res = sweep(max(1, args.rounds), args.seconds)
        res["machine"] = machine_info()
        res["when"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        text = render_sweep(res)
        print(text)
        if not args.no_save:
            write_atomic(RESULTS_DIR / "sweep.json", json.dumps(res, indent=2) + "\n")
            write_atomic(RESULTS_DIR / "sweep.md", f"# bench/profile_run.py --sweep ({res['when']})\n\n{text}\n")
        return 0
    res = profile(args.topology, args.seconds, args.rate)
    if len(usable_cores()) >= 2:
        from emu.mem.shm import new_run_prefix

        res["handover"] = cache_handover(new_run_prefix())
    res["machine"] = machine_info()
    res["when"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    text = render(res)
    if not args.no_cprofile:
        res["cprofile"] = cprofile_run(args.topology, args.seconds)
        text += "\n\n## CPU time by function (cProfile)\n\n" + render_cprofile(res["cprofile"])
    print(text)
    if res["errors"]:
        print("errors: " + "; ".join(res["errors"]), file=sys.stderr)
    if not args.no_save:
        write_atomic(RESULTS_DIR / f"profile-{args.topology}.json", json.dumps(res, indent=2) + "\n")
        write_atomic(RESULTS_DIR / f"profile-{args.topology}.md",
                     f"# bench/profile_run.py ({res['when']})\n\n{text}\n")
    return 0 if not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
