"""`emu.run.process.pin`: a worker runs on one core under SCHED_BATCH (it must not preempt the producer
that woke it), whatever core number the topology gives it."""

from __future__ import annotations

import multiprocessing
import os

from emu.run.process import pin


def _pin_and_report(core: int, q) -> None:
    real = pin(core)
    q.put((real, sorted(os.sched_getaffinity(0)), os.sched_getscheduler(0)))


def test_a_pinned_worker_runs_on_one_allowed_core_under_sched_batch() -> None:
    ctx = multiprocessing.get_context("spawn")
    allowed = sorted(os.sched_getaffinity(0))
    policy_here = os.sched_getscheduler(0)
    q = ctx.Queue()
    core = len(allowed) + 1  # more emulated CPUs than cores: wraps around
    p = ctx.Process(target=_pin_and_report, args=(core, q))
    p.start()
    try:
        real, affinity, policy = q.get(timeout=60)
        p.join(60)
    finally:
        if p.is_alive():
            p.kill()
    assert real == allowed[core % len(allowed)] and affinity == [real]
    assert policy == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == policy_here  # only the worker, not whoever started it
