"""How the emulator's processes start: forked from a fork server that has already imported their modules.

A worker needs numpy, pyzmq, msgpack and the emulator's own modules; a fresh interpreter importing them
takes about 0.25 s of CPU, and a topology of six processes on two cores spent 0.7 s starting them before
the first packet could move.  multiprocessing's ``forkserver`` start method imports them once, in a
server process started on first use, and forks each worker from it: a worker is ready in milliseconds,
and the first packet of an l2fwd run arrives 0.3 s after ``Run()`` (0.1 s when the server is already up)
instead of 0.7 s.  Forking from the server, not from the coordinator, keeps what ``spawn`` gave: no
threads, locks or sockets of the coordinator are inherited, and each worker still gets the coordinator's
``sys.path`` and working directory.

The workers are then children of the fork server, which lives until the coordinator and every worker
are gone; so a worker watches the coordinator itself, through a pidfd (`emu.run.process.Liveness`).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context

# The modules every worker imports; the fork server imports them (and so numpy, zmq, msgpack) once.
WORKER_MODULES = ["workers.cpu", "workers.device", "workers.traffic"]
# Imported first by the fork server alone: names it and keeps it out of a SIGTERM's way (its docstring).
SERVER_SETUP = "emu.run.forkserver"


def worker_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context the coordinator starts its workers from."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([SERVER_SETUP, *WORKER_MODULES])
    return ctx


def prestart() -> None:
    """Start the fork server now, so that its imports overlap with what the caller does meanwhile (the
    CLI's own imports and the topology's validation).  Later starts reuse it."""
    worker_context()
    from multiprocessing import forkserver

    forkserver.ensure_running()
