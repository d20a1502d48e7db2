"""The emulator under measurement (used by ``bench/run.py`` and ``bench/profile_run.py``).

`run_topology` runs a topology in this process through ``emu.run.coordinator.Run`` for a fixed duration and
reads its report, while a thread samples the run's child processes (``multiprocessing.active_children()``
named ``emu-<key>``): peak RSS (``VmHWM``) and private RSS per process, and CPU time (utime + stime), so
that CPU microseconds per forwarded packet can be split by process kind.  `cli_end_to_end` times
``python -m emu.cli run ... --count N --json -`` as a user would start it and samples the coordinator's
own peak RSS.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from bench.baselines import REPO, proc_cpu_seconds, proc_pss_kb, proc_status

TOPOLOGIES = REPO / "topology"
VIOLATION_KEYS = ("foreign_cache_return", "recycled_before_tx_completion", "double_free", "leaked",
                  "stale_generation", "bad_descriptors", "bad_messages")


class Interrupted(KeyboardInterrupt):
    """The run under measurement was interrupted (Ctrl-C / SIGTERM); it has torn itself down."""


def load(name: str):
    from emu.topology.file import load_topology

    return load_topology(TOPOLOGIES / f"{name}.yaml")


# The program of the CPU-bound scaling case: per packet only, about 10 us a packet, the CPU workers' work
# dwarfing the devices' and the traffic ports' (see emu.programs).  Port 53 is denied so that the filter
# runs its lookup; the generator's frames go to port 9, so every one is forwarded and verified.
FILTER_PROGRAM = ("l2fwd_filter", "{egress: eth1, deny_ports: [53]}")


def l2fwd_variant(cpus: int | None = None, burst: int | None = None, napi_budget: int | None = None,
                  pages: int | None = None, page_size: int | None = None, ring: int | None = None,
                  pool_size: int | None = None, program: tuple[str, str] | None = None):
    """The bundled l2fwd topology with some knobs changed by editing its text (then validated as a file);
    `ring` sets every device's RX and TX ring sizes; `program` is (name in emu.programs, its params as
    YAML flow text)."""
    from emu.topology.file import validate_topology_text

    text = (TOPOLOGIES / "l2fwd.yaml").read_text()
    name = ["l2fwd"]

    def sub(pattern: str, repl: str) -> None:
        nonlocal text
        text, n = re.subn(pattern, repl, text)
        if n != 1:
            raise ValueError(f"topology/l2fwd.yaml changed shape: {n} matches for {pattern!r}")

    if cpus is not None:
        sub(r"(?m)^(\s*cpus:\s*)\d+", rf"\g<1>{cpus}")
        sub(r"(?m)^(\s*rx_queues:\s*)\d+", rf"\g<1>{cpus}")
        name.append(f"{cpus}cpu")
    if program is not None:
        prog, params = program
        sub(r'(?m)^(\s*program:\s*)"emu\.programs:l2fwd"', rf'\g<1>"emu.programs:{prog}"')
        sub(r"(?m)^(\s*params:\s*).*$", rf"\g<1>{params}")
        name.append(prog.replace("_", "-"))
    if burst is not None:
        sub(r"(?m)^(\s*burst:\s*)\d+", rf"\g<1>{burst}")
        name.append(f"burst{burst}")
    extra = {"napi_budget": napi_budget, "pages": pages, "page_size": page_size}
    for key, value in extra.items():
        if value is not None:
            if re.search(rf"(?m)^\s*{key}:", text):
                sub(rf"(?m)^(\s*{key}:\s*)\d+", rf"\g<1>{value}")
            else:
                sub(r"(?m)^(\s*)(cpus:.*)$", rf"\g<1>\g<2>\n\g<1>{key}: {value}")
            name.append(f"{key}{value}")
    if pool_size is not None:
        sub(r"(?m)^(\s*pool:\s*)\{pool_size:\s*\d+\}", rf"\g<1>{{pool_size: {pool_size}}}")
        name.append(f"pool{pool_size}")
    if ring is not None:
        for key in ("rx_ring_size", "tx_ring_size"):
            text, n = re.subn(rf"(?m)^(\s*{key}:\s*)\d+", rf"\g<1>{ring}", text)
            if n != len(re.findall(r"(?m)^\s*ifindex:", text)):
                raise ValueError(f"topology/l2fwd.yaml changed shape: {key} is not set on every device")
        name.append(f"ring{ring}")
    return validate_topology_text(text, "-".join(name) + ".yaml")


# The suite's cases that are not bundled files: variants of topology/l2fwd.yaml.
VARIANTS = {
    "l2fwd-1cpu": lambda: l2fwd_variant(cpus=1),
    "l2fwd-filter": lambda: l2fwd_variant(program=FILTER_PROGRAM),
    "l2fwd-filter-1cpu": lambda: l2fwd_variant(cpus=1, program=FILTER_PROGRAM),
}


# The capture case: l2fwd with eth0 captured (every frame at XDP entry; eth0 transmits nothing), into a
# temporary directory that each run empties again (emu.run.capture).  A snap length of 128 bytes, as a
# header capture would use.
CAPTURE_DEVICE = ("h1", "eth0", False)
CAPTURE_SNAPLEN = 128


def l2fwd_capture():
    """topology/l2fwd.yaml with ``capture`` of h1:eth0 into a fresh temporary directory."""
    import dataclasses
    import tempfile

    from emu.topology.model import CaptureConfig

    topo = load("l2fwd")
    where = tempfile.mkdtemp(prefix="emu-bench-capture-")
    return dataclasses.replace(topo, name="l2fwd-capture",
                               capture=CaptureConfig((CAPTURE_DEVICE,), where, CAPTURE_SNAPLEN))


def case(name: str):
    """A bundled topology by name, or one of the `VARIANTS`."""
    make = VARIANTS.get(name)
    return make() if make is not None else load(name)


def kinds_of(topo) -> dict[str, str]:
    """Process key -> kind ("cpu", "device", "traffic") for a topology's processes."""
    out = {}
    for hname, host in topo.hosts.items():
        for c in range(host.cpus):
            out[f"{hname}/cpu{c}"] = "cpu"
        for d in host.devices:
            out[f"{hname}/{d}"] = "device"
    for name in topo.traffic:
        out[name] = "traffic"
    return out


def sum_violations(report: dict) -> int:
    """Every violation counter of one report, summed (0 in a correct run)."""
    return int(sum(int(report["violations"].get(k, 0)) for k in report["violations"]))


@dataclass
class Sample:
    t: float
    cpu_s: dict[str, float]  # process key -> utime + stime
    delivered: int
    rx: int


@dataclass
class Sampler:
    """Samples the run's children from a thread of the coordinator's process every `every` seconds."""

    run: object
    kinds: dict[str, str]
    every: float = 0.25
    hwm_kb: dict[str, int] = field(default_factory=dict)
    anon_kb: dict[str, int] = field(default_factory=dict)
    pss_kb: dict[str, int] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _children(self) -> dict[str, int]:
        try:
            kids = multiprocessing.active_children()
        except RuntimeError:  # the set of children changed while it was listed: next time
            return {}
        return {p.name[4:]: p.pid for p in kids if p.name.startswith("emu-") and p.pid}

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.sample()
            except Exception as exc:  # never let the sampler break a run; say what went wrong
                self.errors.append(repr(exc))

    def sample(self) -> None:
        kids = self._children()
        cpu: dict[str, float] = {}
        for key, pid in kids.items():
            st = proc_status(pid)
            if st:
                self.hwm_kb[key] = max(self.hwm_kb.get(key, 0), st.get("VmHWM", 0))
                self.anon_kb[key] = max(self.anon_kb.get(key, 0), st.get("RssAnon", 0))
                self.pss_kb[key] = max(self.pss_kb.get(key, 0), proc_pss_kb(pid))
            secs = proc_cpu_seconds(pid)
            if secs is not None:
                cpu[key] = secs
        run = self.run
        if getattr(run, "started_ns", 0) and getattr(run, "table", None) is not None and not run.settled_ns:
            snap = run.snapshot()
            self.samples.append(Sample(time.monotonic(), cpu, snap.delivered(), snap.total("cpu", "rx_packets")))

    def per_kind_mb(self, table: dict[str, int]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, kb in table.items():
            kind = self.kinds.get(key, "other")
            out[kind] = max(out.get(kind, 0.0), round(kb / 1024, 1))
        return out

    def cpu_us_per_packet(self, skip: float = 0.5) -> dict[str, float]:
        """CPU time per packet by process kind (summed over the kind's processes), over the steady part of
        the run: from the first sample `skip` s into traffic to the last one before the drain."""
        if len(self.samples) < 2:
            return {}
        first = next((s for s in self.samples if s.t >= self.samples[0].t + skip), self.samples[0])
        last = self.samples[-1]
        pkts = (last.rx - first.rx) or (last.delivered - first.delivered)
        if pkts <= 0 or last is first:
            return {}
        out: dict[str, float] = {}
        for key, secs in last.cpu_s.items():
            if key in first.cpu_s:
                kind = self.kinds.get(key, "other")
                out[kind] = out.get(kind, 0.0) + (secs - first.cpu_s[key])
        return {k: round(v / pkts * 1e6, 2) for k, v in out.items()}


def run_topology(topo, duration: float, sample_every: float = 0.25) -> dict:
    """Run `topo` for `duration` seconds and return the numbers the suite reads from its report."""
    from emu.run.coordinator import Run, RunOptions

    run = Run(topo, RunOptions(duration=duration, quiet=True))
    sampler = Sampler(run, kinds_of(topo), sample_every)
    sampler.start()
    try:
        report = run.run()
    finally:
        sampler.stop()
    if getattr(run, "interrupted", False):
        raise Interrupted
    t = report["traffic"]
    captured = {}
    if topo.capture is not None:
        # What the capture kept and dropped; its files go (a second of l2fwd is hundreds of MB of them).
        frames = sum(c["packets"] for c in report.get("capture", []))
        drops = sum(c["capture_drops"] for c in report.get("capture", []))
        captured = {"capture_frames": frames, "capture_drops": drops,
                    "capture_bytes": sum(os.path.getsize(c["file"]) for c in report.get("capture", [])
                                         if c.get("file") and os.path.exists(c["file"]))}
        for c in report.get("capture", []):
            if c.get("file"):
                with contextlib.suppress(OSError):
                    os.unlink(c["file"])
    return {
        **captured,
        "topology": topo.name,
        "rx_pps": report["rx_pps"],
        "delivered_pps": report["delivered_pps"],
        "elapsed_s": report["elapsed_s"],
        "first_packet_s": report.get("first_packet_s"),
        "generated": t["generated"],
        "delivered": t["delivered"],
        "dropped": t["dropped"],
        "corrupted": t["corrupted"],
        "unaccounted": t["unaccounted"],
        "violations": sum_violations(report),
        "violations_by_kind": {k: int(v) for k, v in report["violations"].items() if v},
        "rss_mb": sampler.per_kind_mb(sampler.hwm_kb),
        "rss_private_mb": sampler.per_kind_mb(sampler.anon_kb),
        "pss_mb": sampler.per_kind_mb(sampler.pss_kb),
        "rss_processes_seen": len(sampler.hwm_kb),
        # The most page memory ever out of the page allocator at once: what a worker's VmHWM can hold of
        # the host's page memory (the rest of the segment was never handed out, so nobody touched it).
        "allocated_hwm_mb": round(report["pages"]["allocated_hwm"] * max(h.page_size for h in topo.hosts.values())
                                  / 2**20, 1),
        "cpu_us_per_pkt": sampler.cpu_us_per_packet(),
        "sampler_errors": sampler.errors,
    }


def cli_end_to_end(count: int = 20000, topology: str = "l2fwd", timeout: float = 120.0) -> dict:
    """``python -m emu.cli run topology/<topology>.yaml --count N --json -``: wall time to exit, the
    coordinator's peak RSS, the report's first-packet time (from its Run object), and the time from the
    exec to the first frame a sink received (its `first_rx_ns`, on the same monotonic clock): what a user
    of `emu run` waits, with the interpreter, the imports and the start of every process in it.  Also the
    interpreter + import time of the CLI alone, for reference."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import emu.cli, emu.run.coordinator"], cwd=REPO, check=True,
                   timeout=timeout)
    import_s = time.monotonic() - t0
    cmd = [sys.executable, "-m", "emu.cli", "run", f"topology/{topology}.yaml", "--count", str(count),
           "--json", "-"]
    hwm = anon = pss = 0
    t0 = time.monotonic()
    exec_ns = time.monotonic_ns()
    # Files, not pipes: a report larger than a pipe buffer would block the child while we only poll it.
    fout, ferr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=fout, stderr=ferr, text=True)
    try:
        while proc.poll() is None:
            st = proc_status(proc.pid)
            hwm, anon = max(hwm, st.get("VmHWM", 0)), max(anon, st.get("RssAnon", 0))
            pss = max(pss, proc_pss_kb(proc.pid))
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{' '.join(cmd)} did not finish in {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            # Ctrl-C reached it too (same process group) and it is tearing down: give it the time.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        if proc.poll() is None:
            proc.terminate()  # its workers exit when their parent is gone
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            from emu.mem.shm import sweep_stale

            sweep_stale()  # the segments of a coordinator that did not finish
    wall = time.monotonic() - t0
    fout.seek(0)
    ferr.seek(0)
    out, err = fout.read(), ferr.read()
    fout.close()
    ferr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err.strip()[-400:]}")
    report = json.loads(out)
    fp = report.get("first_packet_s")
    first_rx = [p["first_rx_ns"] for p in report["traffic"]["ports"].values() if p.get("first_rx_ns")]
    return {
        "count": count,
        "wall_s": round(wall, 3),
        "import_s": round(import_s, 3),
        "first_packet_s": fp,
        "first_packet_from_exec_s": round((min(first_rx) - exec_ns) / 1e9, 3) if first_rx else None,
        "delivered": report["traffic"]["delivered"],
        "violations": sum_violations(report),
        "coordinator_hwm_mb": round(hwm / 1024, 1),
        "coordinator_private_mb": round(anon / 1024, 1),
        "coordinator_pss_mb": round(pss / 1024, 1),
    }
