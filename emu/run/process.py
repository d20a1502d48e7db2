"""What every emulator process shares: its launch description, CPU pinning, channels and liveness.

Processes are forked by a fork server that has only imported their modules (`emu.run.launch`; a child
forked from the coordinator itself would inherit its zmq context, which libzmq does not survive) and
get one `ProcSpec`: which row of the stats table is theirs, which host's page memory to map, and the
zmq endpoints of everything they talk to.  Each creates its own zmq context after start.  A process
exits by itself when the coordinator asks (``Cmd.EXIT``) or when the coordinator is gone, so a
coordinator killed with SIGKILL leaves no worker behind.

A process names itself by its role (``emu: h1/cpu0``; `emu.run.procname`), ignores SIGINT and SIGTERM (the
coordinator alone decides how a run ends), and when it dies of an exception it leaves its last words:
one line with the exception and where in the worker it was raised, in a file under the run's
directory that the coordinator reads when it notices the death (`write_last_words`).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import zmq

from emu.errors import ProcessFailure
from emu.net.protocol import PID, ProcState
from emu.net.shmring import Channel, MsgRing
from emu.net.sockets import push
from emu.run.procname import process_name, set_title
from emu.run.stats import RowSpec, StatsRow, StatsTable


@dataclass(slots=True)
class ProcSpec:
    """Everything one process needs to find its place in a run (picklable for ``spawn``)."""

    kind: str  # "cpu" | "device" | "traffic"
    key: str  # stats row key
    stats_name: str
    stats_rows: list[RowSpec]
    parent_pid: int
    host: Any = None  # emu.topology.HostConfig for cpu/device
    host_prefix: str = ""  # page memory of the host
    cpu: int = -1
    core: int | None = None  # real core to pin to
    device: str = ""
    port: Any = None  # emu.topology.TrafficPort for traffic ports
    endpoints: dict[str, Any] = field(default_factory=dict)
    maps: dict[str, str] = field(default_factory=dict)  # device -> BPF map-set segment name
    options: dict[str, Any] = field(default_factory=dict)
    last_words: str = ""  # file the process writes its last words to if it dies of an exception


def pin(core: int | None) -> int | None:
    """A worker's scheduling: ``SCHED_BATCH`` always, and pinned to one real core when `core` is given
    (emulated CPU i -> core i mod the cores we may use); returns that core.

    A worker that rings a doorbell wakes its peer; under ``SCHED_OTHER`` the woken process may preempt
    the one that woke it at once, which then waits for a core in the middle of its pass (a worker lost
    about a third of its wall time so on the 2-core machine).  ``SCHED_BATCH`` processes never preempt on
    wake-up, only at the tick, so the producer finishes its batch and the consumer finds more waiting:
    l2fwd +7 %, l2fwd on one CPU +10 % (interleaved A/B in docs/benchmarks.md).  Needs no privilege.
    """
    if hasattr(os, "SCHED_BATCH"):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:
            pass
    if core is None or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        allowed = sorted(os.sched_getaffinity(0))
        real = allowed[core % len(allowed)]
        os.sched_setaffinity(0, {real})
        return real
    except OSError:
        return None


def attach_rings(spec: ProcSpec, to: str) -> list[MsgRing]:
    """The shared-memory rings whose consumer is `to` (``cpu0``, ``eth1``) on this process's host."""
    rings = spec.endpoints.get("rings", {})
    return [MsgRing.attach(name) for key, name in rings.items() if key.split(">")[1] == to]


def channel(ctx: zmq.Context, spec: ProcSpec, src: str, dst: str, addr: str) -> Channel:
    """The way from `src` to `dst` on one host: their ring, with the peer's socket for overflow and
    wake-ups."""
    name = spec.endpoints.get("rings", {}).get(f"{src}>{dst}")
    return Channel(push(ctx, addr), MsgRing.attach(name) if name else None)


def cpu_seconds(pid: int) -> float | None:
    """CPU time a process has used so far (``utime + stime`` of ``/proc/PID/stat``), in seconds; None
    when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command's closing parenthesis: state is field 3, utime and stime fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Liveness:
    """Heartbeat into the stats row and notice a vanished parent, checked cheaply from a hot loop."""

    def __init__(self, row: StatsRow, parent_pid: int, every: float = 0.05) -> None:
        self.row = row
        self.parent_pid = parent_pid
        # Workers are forked by the coordinator's fork server (`emu.run.launch`), which lives as long as any
        # worker does, so the parent's pid says little: watch the coordinator itself through a pidfd,
        # which becomes readable when it dies, even while it is an unreaped zombie (a killed `emu host`
        # whose own parent has not waited for it yet would still answer kill(pid, 0)).
        self.ppid = os.getppid()
        self.pidfd: int | None = None
        self.gone = False
        try:
            self.pidfd = os.pidfd_open(parent_pid)
        except ProcessLookupError:
            self.gone = True
        except (AttributeError, OSError):  # no pidfds (kernel < 5.3): the parent check below only
            pass
        self.every = every
        self.next = 0.0

    def tick(self) -> bool:
        """False when the process should stop because its parent is gone."""
        now = time.monotonic()
        if now < self.next:
            return True
        self.next = now + self.every
        self.row.beat()
        if self.gone or os.getppid() != self.ppid:
            return False
        if self.pidfd is not None and select.select([self.pidfd], [], [], 0)[0]:
            self.gone = True
            return False
        return True


class WarnOnce:
    """Print each kind of problem once per process (like the kernel's WARN_ONCE); counters carry the rest."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.seen: set[str] = set()

    def __call__(self, key: str, text: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            sys.stderr.write(f"emu: {self.who}: {text}\n")
            sys.stderr.flush()


class InjectedFault(ProcessFailure, RuntimeError):
    """Raised inside a worker by fault injection (`RunOptions.fault_injection`, ``EMU_FAULT_INJECTION``),
    to stand for a bug: the worker dies of it exactly as it would of any other exception."""


def _inject_fault(signum: int, frame: object) -> None:
    # A signal handler runs in the main thread between two bytecodes, so the exception surfaces wherever
    # the worker happens to be (its poll loop, a pool call, a socket wait), as a bug's would.
    raise InjectedFault(f"fault injected with {signal.Signals(signum).name}")


# Where a worker's code lives: last words name the innermost frame in these, not one inside numpy or zmq.
_OWN_CODE = (os.sep + "emu" + os.sep, os.sep + "workers" + os.sep)


def last_words(exc: BaseException) -> str:
    """One line for a process dying of `exc`: its type and message, and where in the emulator's code it
    was raised (``RuntimeError: boom (at workers/cpu.py:412 in poll)``)."""
    frames = traceback.extract_tb(exc.__traceback__)
    # An injected fault is raised by its signal handler: where it hit the worker is the frame before.
    own = [f for f in frames if any(part in f.filename for part in _OWN_CODE) and f.name != _inject_fault.__name__]
    where = (own or frames or [None])[-1]
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if where is None:
        return text
    path = where.filename
    for part in _OWN_CODE:  # relative to the project: workers/cpu.py, emu/mem/pagepool.py
        if part in path:
            path = path[path.rindex(part) + 1 :]
            break
    return f"{text} (at {path}:{where.lineno} in {where.name})"


def write_last_words(path: str, text: str) -> None:
    """Leave `text` in `path` for the coordinator (a file, not shared memory: it is written once, at
    death, off the hot path, may be any length, and goes away with the run's directory)."""
    if not path:
        return
    try:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)  # whole or not at all: the coordinator may read it at any moment
    except OSError:
        pass  # the run's directory is gone: nobody is left to read them


def read_last_words(path: str) -> str | None:
    """A dead process's last words, or None when it left none (killed by a signal, say)."""
    try:
        with open(path) as f:
            return f.read().strip() or None
    except (OSError, ValueError):
        return None


def run_process(spec: ProcSpec, body) -> None:
    """Common frame for a process: name it, attach its stats row, run `body(spec, table, row)`, record
    the end (and, when it dies of an exception, its last words)."""
    # Ctrl-C reaches the whole process group, and systemd's stop sends SIGTERM to every process of the
    # unit: the coordinator alone decides how to tear down, and tells the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_title(process_name(spec.kind, spec.key))
    if spec.options.get("fault_injection"):
        signal.signal(signal.SIGUSR1, _inject_fault)
    table = StatsTable.attach(spec.stats_name, spec.stats_rows)
    row = table.row(spec.key)
    row.c[PID] = os.getpid()
    row.beat()
    try:
        body(spec, table, row)
        row.set_state(ProcState.EXITED)
    except KeyboardInterrupt:
        row.set_state(ProcState.EXITED)
    except BaseException as exc:
        row.set_state(ProcState.FAILED)
        write_last_words(spec.last_words, last_words(exc))
        sys.stderr.write(f"emu: {spec.kind} {spec.key} failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        raise SystemExit(1) from None
    finally:
        table.close()
