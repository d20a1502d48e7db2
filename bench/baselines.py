"""The reference points the emulator is measured against (used by ``bench/run.py``).

* `BareXdp`: the ceiling of the per-packet work.  The l2fwd XDP program called once per packet in a
  tight loop, in this process, over real pages: a shared-memory `PageMemory` holding generator frames at
  the XDP headroom, a ``memoryview`` slice per packet, and a context built the way ``workers/cpu.py``
  builds it (``emu.xdp.runtime.create_maps`` / ``program_for`` / ``make_context``).  No pools, no
  sockets, no verdict handling: what is left when everything but the program is free.
* `transport_one_way` / `transport_rtt`: the ceiling of the descriptor transport.  Raw zmq PUSH/PULL
  between this process and a second one over ``ipc://`` (same socket options as the emulator's,
  ``emu.run.process``), moving batches of 64 ``DESC_DTYPE`` descriptors in a ``wire.pack_msg`` envelope;
  the receiving side unpacks and validates each message (``unpack_msg`` + ``descs_from_bytes``) as the
  emulator's receivers do.
* `naive_queue`: what one would write without the emulator: generator -> forwarder -> sink processes,
  every packet a pickled dataclass through ``multiprocessing.Queue``, the forwarder swapping the MACs.

Each function returns a dict with what it counted, so a caller (and the tests) can check that the work it
timed really happened: descriptors received, packets at the sink, the program's own packet counter.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
L2FWD_TOPOLOGY = REPO / "topology" / "l2fwd.yaml"
BATCH = 64  # descriptors per message / packets per NAPI poll
JOIN_TIMEOUT = 10.0


def frame_factory(topology: Path = L2FWD_TOPOLOGY):
    """The frames the topology's first generator sends (size, flows, MACs)."""
    from emu.net.packets import FrameFactory
    from emu.topology.file import load_topology

    gen = next(p.generate for p in load_topology(topology).traffic.values() if p.generate is not None)
    return FrameFactory(gen.pkt_size, gen.flows, gen.src_mac, gen.dst_mac)


def _child_setup() -> None:
    """In a benchmark child: Ctrl-C goes to the whole process group; the parent decides and ends us."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop(procs: list[mp.process.BaseProcess], graceful: bool = True) -> None:
    """Join (when the measurement finished; not after an error or Ctrl-C), then terminate, then kill
    whatever is still running (only the processes we started)."""
    deadline = time.monotonic() + (JOIN_TIMEOUT if graceful else 0.0)
    for p in procs:
        if p.pid is not None:
            p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(3)
        if p.is_alive():
            p.kill()
            p.join(3)


# --------------------------------------------------------------------------------------------------
# 1. bare ceiling: the XDP program alone


class BareXdp:
    """The l2fwd program over `npages` real pages, one memoryview per packet, as the CPU worker calls it.

    `run(iters)` makes `iters` passes over all pages, in NAPI-sized batches of 64 (the per-batch
    ``tolist`` of starts and lengths is the worker's too).  `packets_counted` reads the program's own
    ``rxcnt`` map counter, so a caller can check every call really ran the program.
    """

    def __init__(self, prefix: str, npages: int = 1024, topology: Path = L2FWD_TOPOLOGY,
                 device: str = "eth0") -> None:
        from emu.mem.pagemem import PageMemory
        from emu.mem.pagepool import PoolParams
        from emu.topology.file import load_topology
        from emu.xdp import runtime as xdp_runtime
        from emu.xdp.context import XDP_REDIRECT

        topo = load_topology(topology)
        host = next(iter(topo.hosts.values()))
        factory = frame_factory(topology)
        pkt_size = factory.pkt_size
        dev = host.devices[device]
        self.prefix = prefix
        self.mapsets: list = []
        self.pm = PageMemory.create(f"{prefix}-bare", npages, host.page_size, 1, PoolParams())
        try:
            names, self.mapsets = xdp_runtime.create_maps(f"{prefix}-bare", host)
            prog, maps = xdp_runtime.program_for(dev, names.get(device), host.cpus, 0)
            assert prog is not None, f"{device} of {topology} has no XDP program"
            ifindexes = {name: d.ifindex for name, d in host.devices.items()}
            self.ctx = xdp_runtime.make_context(prog, maps, dev, 0, 0, ifindexes)
            self.fn = prog.fn
            self.rxcnt = maps.get("rxcnt")
            # Real frames in real pages, at the XDP headroom (what a device's RX DMA leaves there).
            headroom = 256
            frames = factory.build(0, npages)
            rows = frames.data.reshape(npages, pkt_size)
            data2d = self.pm.data.reshape(npages, host.page_size)
            data2d[:, headroom : headroom + pkt_size] = rows
            starts = np.arange(npages, dtype=np.int64) * host.page_size + headroom
            self.batches = [
                (starts[i : i + BATCH].tolist(), [pkt_size] * len(starts[i : i + BATCH]))
                for i in range(0, npages, BATCH)
            ]
            # The same packets for the program's vectorised form, one call per NAPI-sized batch, as
            # descriptor fields (page, offset, length) the way a CPU worker hands them over.
            self.batch_fn = prog.batch
            self.data2d = data2d
            ids = np.arange(npages, dtype=np.uint32)
            self.vec_batches = [
                (ids[i : i + BATCH], np.full(len(ids[i : i + BATCH]), headroom, np.uint32),
                 np.full(len(ids[i : i + BATCH]), pkt_size, np.uint32))
                for i in range(0, npages, BATCH)
            ]
        except BaseException:
            self.close()
            raise
        self.npages = npages
        self.redirect = XDP_REDIRECT
        self.verdicts_ok = True

    def packets_counted(self) -> int:
        """The program's own packet counter (``rxcnt[0]``, summed over CPUs)."""
        if self.rxcnt is None:
            return -1
        return int(np.asarray(self.rxcnt.view)[0])

    def run(self, iters: int) -> None:
        fn, ctx, buf = self.fn, self.ctx, self.pm.data_seg.buf
        redirect = self.redirect
        for _ in range(iters):
            for starts, lens in self.batches:
                out = [0] * len(starts)
                for k in range(len(starts)):
                    s = starts[k]
                    ctx.data = buf[s : s + lens[k]]
                    ctx.redirect_ifindex = -1
                    out[k] = fn(ctx)
                if out[0] != redirect or out[-1] != redirect:
                    self.verdicts_ok = False
        ctx.data = None

    def run_vectorised(self, iters: int) -> None:
        """`run`, through the program's vectorised form (`emu.xdp.XdpBatch`), one call per 64 packets."""
        from emu.mem.pagemem import PageSpans
        from emu.xdp.context import XdpBatch

        fn, ctx, mem = self.batch_fn, self.ctx, self.data2d
        spans = PageSpans(mem)  # kept across batches, as a CPU worker keeps its own
        redirect = self.redirect
        for _ in range(iters):
            for pages, offs, lens in self.vec_batches:
                v = fn(ctx, XdpBatch(mem, pages, offs, lens, spans))
                if v[0] != redirect or v[-1] != redirect:
                    self.verdicts_ok = False

    def close(self) -> None:
        for _, ms in self.mapsets:
            with contextlib.suppress(Exception):
                ms.unlink()
                ms.close()
        self.mapsets = []
        if getattr(self, "ctx", None) is not None:
            self.ctx.data = None
        self.pm.unlink()
        with contextlib.suppress(BufferError):
            self.pm.close()


def _bare_peer(prefix: str, core: int | None, seconds: float, conn) -> None:
    """One copy of the bare loop in its own process on its own core: ready, then from the start time the
    parent sends, whole passes over its pages until `seconds` have gone by."""
    _child_setup()
    if core is not None:
        os.sched_setaffinity(0, {core})
    bare = BareXdp(prefix)
    try:
        bare.run(1)  # warm: the pages and the program's code paths
        before = bare.packets_counted()
        conn.send("ready")
        start = conn.recv()
        while time.monotonic() < start:
            pass
        start = time.monotonic()  # later than asked only if this process got no core in time
        end = start + seconds
        passes = 0
        while True:
            bare.run(1)
            passes += 1
            if time.monotonic() >= end:
                break
        took = time.monotonic() - start
        conn.send({"packets": passes * bare.npages, "counted": bare.packets_counted() - before, "seconds": took,
                   "verdicts_ok": bare.verdicts_ok})
        conn.recv()
    finally:
        bare.close()


def usable_cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def bare_parallel(prefix: str, ncores: int, seconds: float) -> dict:
    """`ncores` copies of the bare loop at once, each in its own process pinned to its own core, all
    starting at the same moment and running for `seconds`: the packets per second they reach together.
    Against one copy measured the same way, what a second core adds on this machine when nothing is
    shared (a virtual machine's second vCPU can be less than a core)."""
    cores = usable_cores()
    if ncores > len(cores):
        raise ValueError(f"{ncores} cores asked for, {len(cores)} usable")
    mpc = mp.get_context("spawn")
    procs, conns = [], []
    done = False
    try:
        for k in range(ncores):
            parent, child = mpc.Pipe()
            p = mpc.Process(target=_bare_peer, args=(f"{prefix}-p{k}", cores[k], seconds, child), daemon=True,
                            name=f"bench-bare-{k}")
            p.start()
            procs.append(p)
            conns.append(parent)
        for conn, p in zip(conns, procs, strict=True):
            _wait_ready(conn, p)
        start = time.monotonic() + 0.1
        for conn in conns:
            conn.send(start)
        results = [_wait_ready(conn, p, seconds + 60.0, "finish") for conn, p in zip(conns, procs, strict=True)]
        for conn in conns:
            conn.send("bye")
        done = True
    finally:
        _stop(procs, graceful=done)
        from emu.mem.shm import unlink_prefix

        for k in range(ncores):
            unlink_prefix(f"{prefix}-p{k}")  # a peer that was killed cannot clean up after itself
    rates = [r["packets"] / r["seconds"] for r in results]
    return {"cores": ncores, "pps": sum(rates), "per_core_pps": rates,
            "packets": sum(r["packets"] for r in results),
            "counted_ok": all(r["counted"] == r["packets"] > 0 for r in results),
            "verdicts_ok": all(r["verdicts_ok"] for r in results)}


# Where a frame sits in its page (XDP_PACKET_HEADROOM) and how much of it a hop reads or writes: the
# first cache line (a 64-byte frame is exactly one).
_HEAD_OFF, _HEAD_LEN = 256, 64


def _handover_writer(name: str, core: int, npages: int, page_size: int, conn) -> None:
    """Write the first cache line of the pages the parent names, on `core`, then say so."""
    _child_setup()
    os.sched_setaffinity(0, {core})
    from emu.mem.shm import Segment

    seg = Segment.attach(name)
    mem = seg.array(np.uint8, npages * page_size, 0).reshape(npages, page_size)
    try:
        conn.send("ready")
        while True:
            msg = conn.recv()
            if msg is None:
                break
            pages, value = msg
            mem[pages, _HEAD_OFF : _HEAD_OFF + _HEAD_LEN] = value
            conn.send("written")
    finally:
        del mem
        seg.close()


def cache_handover(prefix: str, rounds: int = 200, batch: int = 512, npages: int = 8192,
                   page_size: int = 4096) -> dict:
    """What it costs a process to read the first cache line of a batch of packets another process just
    wrote on the other core, against reading them again once they are in its own cache: each hop of a
    packet through the emulator (eth0 writes the frame, a CPU worker reads and rewrites its header,
    eth1 reads it) pays the first.  `batch` random pages of `npages` (the host's page memory), gathered
    the way `XdpBatch.head` and a device's `_gather` do; ns per packet, medians over `rounds`."""
    cores = usable_cores()
    if len(cores) < 2:
        raise ValueError("cache_handover needs two usable cores")
    from emu.mem.shm import Segment

    name = f"{prefix}-handover"
    seg = Segment.create(name, npages * page_size)
    mpc = mp.get_context("spawn")
    parent, child = mpc.Pipe()
    p = mpc.Process(target=_handover_writer, args=(name, cores[1], npages, page_size, child), daemon=True,
                    name="bench-handover")
    old = os.sched_getaffinity(0)
    done = False
    try:
        os.sched_setaffinity(0, {cores[0]})
        mem = seg.array(np.uint8, npages * page_size, 0).reshape(npages, page_size)
        mem[:, _HEAD_OFF : _HEAD_OFF + _HEAD_LEN] = 0  # every page mapped in both processes first
        p.start()
        _wait_ready(parent, p)
        rng = np.random.default_rng(7)
        remote, local = [], []
        ok = True
        for r in range(rounds):
            pages = rng.choice(npages, batch, replace=False).astype(np.int64)
            value = r % 251 + 1
            parent.send((pages, value))
            _wait_ready(parent, p, doing="write")
            t0 = time.perf_counter_ns()
            rows = mem[pages, _HEAD_OFF : _HEAD_OFF + _HEAD_LEN]
            t1 = time.perf_counter_ns()
            again = mem[pages, _HEAD_OFF : _HEAD_OFF + _HEAD_LEN]
            t2 = time.perf_counter_ns()
            ok &= bool((rows == value).all() and (again == value).all())
            remote.append((t1 - t0) / batch)
            local.append((t2 - t1) / batch)
        parent.send(None)
        done = True
    finally:
        os.sched_setaffinity(0, old)
        _stop([p], graceful=done)
        mem = rows = again = None
        seg.close()
        seg.unlink()
    rem, loc = float(np.median(remote)), float(np.median(local))
    return {"batch": batch, "rounds": rounds, "remote_ns_per_pkt": round(rem, 1), "local_ns_per_pkt": round(loc, 1),
            "handover_ns_per_pkt": round(rem - loc, 1), "bytes_seen_ok": ok}


# --------------------------------------------------------------------------------------------------
# 2. transport ceiling: zmq PUSH/PULL of packed descriptor batches


def _desc_message(seq: int) -> bytes:
    from emu.mem.page import DESC_DTYPE
    from emu.net import wire

    d = np.zeros(BATCH, dtype=DESC_DTYPE)
    d["page"] = np.arange(BATCH) + seq * BATCH % 4096
    d["gen"] = seq & 0xFFFFFFFF
    d["off"] = 256
    d["len"] = 64
    return wire.pack_msg("rx", {"dev": "eth0", "q": 0, "seq": seq}, d.tobytes())


def _take(msg: bytes) -> tuple[int, int]:
    """Unpack and validate one message as a receiver does; (seq, descriptors)."""
    from emu.mem.page import descs_from_bytes
    from emu.net import wire

    _, hdr, blob = wire.unpack_msg(msg, ("rx",))
    return hdr["seq"], len(descs_from_bytes(blob))


def _transport_peer(mode: str, addr_in: str, addr_out: str, n: int, conn) -> None:
    """The second process.  ``send``: push one warm-up batch (so the connection is up before the clock
    starts), then `n` batches to `addr_out` once told to go.  ``echo``: pull from `addr_in` and push every
    message back to `addr_out`: the parent's warm-up batch, then `n` more."""
    _child_setup()
    from emu.net.sockets import new_context, pull, push

    ctx = new_context()
    inbox = pull(ctx, addr_in) if mode == "echo" else None
    out = push(ctx, addr_out)
    try:
        if mode == "send":
            out.send(_desc_message(-1), copy=False)
        conn.send("ready")
        if conn.recv() != "go":
            return
        if mode == "send":
            for seq in range(n):
                out.send(_desc_message(seq), copy=False)
        else:
            for _ in range(n + 1):
                msg = inbox.recv(copy=True)
                _take(msg)  # validate, as the device would
                out.send(msg, copy=False)
        conn.send("done")
        conn.recv()  # the parent has everything: now it is safe to close (LINGER 0 drops unsent data)
    finally:
        if inbox is not None:
            inbox.close(0)
        out.close(0)
        ctx.term()


def _wait_ready(conn, p: mp.process.BaseProcess, timeout: float = 60.0, doing: str = "start") -> object:
    """The next thing `p` sends on `conn`; an error naming it if it dies or stays silent first."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.1):
        if not p.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{p.name} did not {doing} (exit code {p.exitcode})")
    return conn.recv()


@contextlib.contextmanager
def _ipc_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ppemu-bench-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def transport_one_way(n_batches: int) -> dict:
    """Push `n_batches` descriptor batches from a second process to this one; time from "go" to the
    last batch received (unpacked and validated)."""
    from emu.net.sockets import new_context, pull

    mpc = mp.get_context("spawn")
    with _ipc_dir() as d:
        addr = f"ipc://{d}/oneway"
        zctx = new_context()
        inbox = pull(zctx, addr)
        parent, child = mpc.Pipe()
        p = mpc.Process(target=_transport_peer, args=("send", "", addr, n_batches, child), daemon=True,
                        name="bench-transport-send")
        done = False
        try:
            p.start()
            _wait_ready(parent, p)
            if not inbox.poll(30_000) or _take(inbox.recv(copy=True))[0] != -1:
                raise RuntimeError("transport peer: no warm-up batch")
            got = descs = 0
            expect = 0
            in_order = True
            t0 = time.perf_counter()
            parent.send("go")
            while got < n_batches:
                seq, k = _take(inbox.recv(copy=True))
                in_order &= seq == expect
                expect += 1
                got += 1
                descs += k
            t1 = time.perf_counter()
            parent.recv()
            parent.send("bye")
            done = True
        finally:
            _stop([p], graceful=done)
            inbox.close(0)
            zctx.term()
    return {"batches": got, "descs": descs, "in_order": in_order, "seconds": t1 - t0,
            "desc_per_s": descs / (t1 - t0)}


def transport_rtt(n_batches: int, window: int = 16) -> dict:
    """Batches out to a second process and back (it validates and returns each), `window` of them in
    flight; window 1 is the round-trip latency of one batch."""
    from emu.net.sockets import new_context, pull, push

    mpc = mp.get_context("spawn")
    with _ipc_dir() as d:
        a_in, a_out = f"ipc://{d}/back", f"ipc://{d}/out"
        zctx = new_context()
        inbox = pull(zctx, a_in)
        parent, child = mpc.Pipe()
        p = mpc.Process(target=_transport_peer, args=("echo", a_out, a_in, n_batches, child), daemon=True,
                        name="bench-transport-echo")
        out = None
        done = False
        try:
            p.start()
            _wait_ready(parent, p)
            out = push(zctx, a_out)
            msgs = [_desc_message(s) for s in range(min(n_batches, 4 * window))]
            sent = got = descs = 0
            seen = 0  # sum of sequence numbers back, to check each batch came back once
            parent.send("go")
            out.send(_desc_message(-1), copy=False)  # warm-up: both connections up before the clock starts
            if not inbox.poll(30_000) or _take(inbox.recv(copy=True))[0] != -1:
                raise RuntimeError("transport echo: the warm-up batch did not come back")
            t0 = time.perf_counter()
            while sent < min(window, n_batches):
                out.send(msgs[sent % len(msgs)], copy=False)
                sent += 1
            while got < n_batches:
                if not inbox.poll(30_000):
                    raise RuntimeError(f"transport echo stalled after {got} of {n_batches} batches")
                seq, k = _take(inbox.recv(copy=True))
                seen += seq
                got += 1
                descs += k
                if sent < n_batches:
                    out.send(msgs[sent % len(msgs)], copy=False)
                    sent += 1
            t1 = time.perf_counter()
            parent.recv()
            parent.send("bye")
            done = True
        finally:
            _stop([p], graceful=done)
            if out is not None:
                out.close(0)
            inbox.close(0)
            zctx.term()
    m = len(msgs)
    expect_seen = sum(s % m for s in range(n_batches))
    secs = t1 - t0
    return {"batches": got, "descs": descs, "window": window, "all_back": seen == expect_seen,
            "seconds": secs, "desc_per_s": descs / secs, "rtt_us": secs / n_batches * 1e6 * window}


# --------------------------------------------------------------------------------------------------
# 3. naive baseline: pickled packets through multiprocessing.Queue


@dataclass
class Packet:
    """What a hand-rolled emulator would pass around: one Python object per packet."""

    seq: int
    ifindex: int
    data: bytes


def _naive_generator(n: int, frame: bytes, out: mp.Queue, ready: mp.Queue, go) -> None:
    _child_setup()
    ready.put("gen")
    go.wait()
    for seq in range(n):
        out.put(Packet(seq, 2, frame))
    out.put(None)


def _naive_forwarder(inq: mp.Queue, out: mp.Queue, ready: mp.Queue) -> None:
    _child_setup()
    ready.put("fwd")
    while True:
        p = inq.get()
        if p is None:
            out.put(None)
            return
        d = p.data
        p.data = d[6:12] + d[0:6] + d[12:]  # swap the MACs
        p.ifindex = 3  # "redirect" to the egress port
        out.put(p)


def _naive_sink(inq: mp.Queue, expect_dst: bytes, result: mp.Queue, ready: mp.Queue) -> None:
    _child_setup()
    ready.put("sink")
    count = seq_sum = bad = 0
    while True:
        p = inq.get()
        if p is None:
            break
        count += 1
        seq_sum += p.seq
        if p.data[:6] != expect_dst or p.ifindex != 3:
            bad += 1
    result.put({"count": count, "seq_sum": seq_sum, "bad": bad, "t_end": time.monotonic()})


def naive_queue(n: int) -> dict:
    """Forward `n` packets generator -> forwarder -> sink; time from "go" to the sink's last packet.
    The frame is the l2fwd topology's generator frame (64 bytes)."""
    frame = bytes(frame_factory().build(0, 1).data)
    mpc = mp.get_context("spawn")
    q1, q2, res, ready = mpc.Queue(), mpc.Queue(), mpc.Queue(), mpc.Queue()
    go = mpc.Event()
    procs = [
        mpc.Process(target=_naive_generator, args=(n, frame, q1, ready, go), daemon=True, name="bench-naive-gen"),
        mpc.Process(target=_naive_forwarder, args=(q1, q2, ready), daemon=True, name="bench-naive-fwd"),
        mpc.Process(target=_naive_sink, args=(q2, frame[6:12], res, ready), daemon=True,
                    name="bench-naive-sink"),
    ]
    done = False
    try:
        for p in procs:
            p.start()
        for _ in procs:  # every interpreter up (start-up is not timed)
            ready.get(timeout=60)
        t0 = time.monotonic()
        go.set()
        deadline = time.monotonic() + max(60.0, n / 2000)
        while True:
            try:
                r = res.get(timeout=0.5)
                break
            except queue.Empty:
                if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("naive baseline: the pipeline stopped") from None
        done = True
    finally:
        _stop(procs, graceful=done)
        for q in (q1, q2, res, ready):
            q.close()
            q.join_thread()
    secs = r["t_end"] - t0
    return {"sent": n, "received": r["count"], "bad": r["bad"], "seq_ok": r["seq_sum"] == n * (n - 1) // 2,
            "seconds": secs, "pps": r["count"] / secs}


# --------------------------------------------------------------------------------------------------
# process memory


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssShmem of a process in kB ({} if it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def proc_pss_kb(pid: int) -> int:
    """Proportional set size (shared pages divided among the processes mapping them), in kB; 0 if unknown."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def proc_threads_cpu(pid: int) -> dict[str, float]:
    """utime + stime per thread name of a process (threads of one name summed), in seconds: shows how much
    of a process's CPU its zmq I/O thread (``ZMQbg/IO/0``) takes."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, _, rest = f.read().rpartition(")")
            name = head.split("(", 1)[1]
            fields = rest.split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return out


def thread_schedstat(pid: int, tid: int | None = None) -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for a CPU) of a thread (the main thread by default)."""
    try:
        with open(f"/proc/{pid}/task/{tid or pid}/schedstat") as f:
            run_ns, wait_ns, _ = f.read().split()
        return int(run_ns), int(wait_ns)
    except (OSError, ValueError):
        return None
