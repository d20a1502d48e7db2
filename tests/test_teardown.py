"""The coordinator's shutdown wait (DOWN, ``page_pool_release_retry``) without processes: it waits on a
condition (every live CPU and device acknowledged DOWN, every page a live process holds came home),
never for a fixed time; and its join after EXIT, which kills only a process that stopped beating.

Found by the generated topologies (tests/test_generated_topologies.py): a 3-host topology whose h2 had
an RX ring of 5,697 buffers and a pool cache of 1 ended, one run in four, with the whole ring
``leaked``.  h2's CPU was still in a pass begun before DOWN (refilling its ring) when the coordinator
saw every page home and sent EXIT; the ring it then posted was never handed back.  Here the CPU and
the device are played by the test through the stats rows and the page table."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
from fakes import FakeClock

from emu.mem.page import HOME, PageState
from emu.mem.pagepool import page_pool_dev_alloc_pages, pool_of, return_pages, xdpf_clone
from emu.net.protocol import ProcState, device_code
from emu.run import coordinator
from emu.run.coordinator import Proc, Run, RunOptions, pages_pending, wait_pools_released
from emu.topology.file import validate_topology_text

ONE = """
name: one
hosts:
  h1:
    cpus: 1
    pages: 512
    devices:
      eth0: {ifindex: 2, rx_ring_size: 256}
"""


def test_a_hand_back_later_than_any_timeout_is_waited_for() -> None:
    """The device's hand-back arrives 60 (emulated) seconds after DOWN: the wait goes on, warning in the
    kernel's words once a second, and ends when the pages are home.  (It gave up after 10 s, and the
    CPU then destroyed its pool with the ring still posted: leaked.)"""
    clock = FakeClock()
    warnings: list[str] = []

    def step() -> None:
        clock.t += 0.5

    def pending() -> dict[str, int]:
        return {"h2/cpu0": 5697 if clock.t < 60 else 0, "h2/no pool": 0}

    assert wait_pools_released(pending, lambda: True, step, warnings.append, lambda: False, clock,
                               pool_ids={"h1/cpu0": 1, "h1/cpu1": 2, "h2/cpu0": 3})
    assert clock.t == 60
    assert len(warnings) == 59
    assert warnings[0] == "page_pool_release_retry() stalled pool shutdown: id 3, 5697 inflight 1 sec (h2/cpu0)"
    assert warnings[-1] == "page_pool_release_retry() stalled pool shutdown: id 3, 5697 inflight 59 sec (h2/cpu0)"


def test_pages_of_no_pool_are_named_with_id_0() -> None:
    """xdpf_clone's copies belong to no pool (the kernel would not wait for them; the emulator does, to
    account for every page): their line keeps the kernel's format with id 0, which no pool has."""
    clock = FakeClock()
    warnings: list[str] = []

    def step() -> None:
        clock.t += 0.5

    def pending() -> dict[str, int]:
        return {"h1/cpu0": 0, "h1/no pool": 2 if clock.t < 2 else 0}

    assert wait_pools_released(pending, lambda: True, step, warnings.append, lambda: False, clock,
                               pool_ids={"h1/cpu0": 1})
    assert warnings == ["page_pool_release_retry() stalled pool shutdown: id 0, 2 inflight 1 sec (h1/no pool)"]


def test_every_page_home_is_not_enough_until_everyone_acknowledged_down() -> None:
    """Every page is home, but a CPU has not acknowledged DOWN: its pass may still post a ring, so the
    wait goes on until it acknowledges, and then until what it posted came back."""
    clock = FakeClock()
    log: list[str] = []
    out = {"h1/cpu0": 0}
    acked = False

    def step() -> None:
        nonlocal acked
        clock.t += 0.1
        n = len(log)
        log.append("step")
        if n == 2:  # the CPU's pass begun before DOWN refills its ring of 5,697, then it sees DOWN
            out["h1/cpu0"], acked = 5697, True
        elif n == 5:  # the device (down) hands the ring back, the CPU returns it to its pool
            out["h1/cpu0"] = 0

    assert wait_pools_released(lambda: dict(out), lambda: acked, step, log.append, lambda: False, clock)
    assert log.count("step") == 6 and acked and out["h1/cpu0"] == 0


def test_a_new_interrupt_ends_the_wait() -> None:
    clock = FakeClock()
    stops = iter([False, False, True])

    def step() -> None:
        clock.t += 1

    assert not wait_pools_released(lambda: {"h1/cpu0": 3}, lambda: True, step, lambda _: None,
                                   lambda: next(stops), clock)
    assert clock.t == 2


def test_pages_pending_counts_what_live_holders_hold_by_pool(page_memory) -> None:
    """Posted buffers of a live device are waited for, under their pool; those of a dead device (left out
    of the holders) are not (reclaim takes them back); an ``xdpf_clone`` copy counts under "no pool"."""
    pm = page_memory(npages=256, page_size=512, ncpus=2)
    page_pool_dev_alloc_pages(pool_of(pm, 0, owner=True), 10, device_code(0))
    page_pool_dev_alloc_pages(pool_of(pm, 1, owner=True), 7, device_code(1))
    rx = page_pool_dev_alloc_pages(pool_of(pm, 1, owner=True), 3, device_code(0))
    pm.state[rx] = PageState.XDP
    pm.len[rx] = 64
    xdpf_clone(pm, rx[:2], 1)
    live = {0: "h1/cpu0", 1: "h1/cpu1", device_code(0): "h1/eth0"}  # h1/eth1 is dead
    assert pages_pending(pm, "h1", live) == {"h1/cpu0": 10, "h1/cpu1": 3, "h1/no pool": 2}
    assert pages_pending(pm, "h1", {}) == {"h1/cpu0": 0, "h1/cpu1": 0, "h1/no pool": 0}


def test_run_waits_for_the_ring_a_cpu_posts_after_every_page_was_home(monkeypatch) -> None:
    """`Run.wait_pages_home` over a real run's shared memory, the CPU and the device played by the test:
    at DOWN every page is home and the device is down, but the CPU's pass still posts its whole ring
    before it acknowledges.  The wait must outlast that pass and the hand-back that follows."""
    run = Run(validate_topology_text(ONE, "one.yaml"), RunOptions(quiet=True))
    try:
        run.prepare()
        table = run.table
        assert table is not None
        alive = SimpleNamespace(exitcode=None, pid=None, is_alive=lambda: True)
        run.procs = [Proc("cpu", "h1/cpu0", alive), Proc("device", "h1/eth0", alive)]  # type: ignore[arg-type]
        run.started_ns = time.monotonic_ns()
        cpu, dev = table.row("h1/cpu0"), table.row("h1/eth0")
        cpu.set_state(ProcState.READY)
        dev.set_state(ProcState.DOWN)  # went down with nothing posted
        cpu.beat()
        dev.beat()
        pm = run.pms["h1"]
        pool = pool_of(pm, 0, owner=True)
        assert HOME[pm.state].all()
        steps: list[int] = []
        posted = np.zeros(0, dtype=np.int64)

        def tick() -> None:
            nonlocal posted
            cpu.beat()
            dev.beat()
            steps.append(len(steps))
            if len(steps) == 2:  # the CPU's pass refills the ring, then the CPU sees DOWN
                posted = page_pool_dev_alloc_pages(pool, 256, device_code(0))
                cpu.set_state(ProcState.DOWN)
            elif len(steps) == 4:  # the device hands them back (RXRET), the CPU returns them
                return_pages(pm, None, posted)

        run.tick = tick  # type: ignore[method-assign]
        monkeypatch.setattr(coordinator.time, "sleep", lambda s: None)
        run.wait_pages_home()
        assert len(steps) >= 4 and len(posted) == 256
        assert HOME[pm.state].all()
        assert run.stalled == [] and run.failures == []
    finally:
        run.cleanup()


class StuckProcess:
    """A worker process that does not exit until killed."""

    def __init__(self) -> None:
        self.exitcode: int | None = None
        self.pid = None

    def is_alive(self) -> bool:
        return self.exitcode is None

    def kill(self) -> None:
        self.exitcode = -9

    def join(self, timeout: float | None = None) -> None:
        pass


def test_join_kills_a_process_that_stopped_beating_and_counts_it_dead(monkeypatch) -> None:
    """After EXIT a CPU worker neither exits nor beats: it is killed, named in the failures, and counted
    dead, so that `reclaim` takes back its pool (before, stragglers were killed after a fixed 10 s and
    nobody reclaimed what they held)."""
    run = Run(validate_topology_text(ONE, "one.yaml"), RunOptions(quiet=True))
    try:
        run.prepare()
        stuck = StuckProcess()
        run.procs = [Proc("cpu", "h1/cpu0", stuck)]  # type: ignore[arg-type]
        monkeypatch.setattr(coordinator, "HUNG_NS", 0)
        run.join()
        assert stuck.exitcode == -9
        assert run.dead == {"h1/cpu0"} and run.dead_pools == [("h1", 0)]
        (failure,) = run.failures
        assert failure["process"] == "h1/cpu0" and failure["last_words"].startswith("did not exit: sent no heartbeat")
    finally:
        run.cleanup()
