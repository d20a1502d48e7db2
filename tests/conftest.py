"""Shared fixtures: unique shared-memory names per test, and page memories cleaned up after it.

Kept small and generic.  Every name a test creates starts with its `run_prefix` (which carries the
creating pid and a random token), so tests run in parallel (pytest-xdist) never collide, and
`emu.mem.shm.sweep_stale` can remove what a killed run left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from emu.mem.pagemem import PageMemory
from emu.mem.pagepool import PoolParams
from emu.mem.shm import new_run_prefix, unlink_prefix


@pytest.fixture
def run_prefix() -> Iterator[str]:
    """A segment-name prefix unique to this test; anything left under it is unlinked afterwards."""
    prefix = new_run_prefix()
    yield prefix
    unlink_prefix(prefix)


@pytest.fixture
def page_memory(run_prefix: str) -> Iterator[Callable[..., PageMemory]]:
    """Factory: ``page_memory(npages=256, page_size=256, ncpus=2, params=None)`` creates a PageMemory
    under a fresh name (``<run_prefix>-<n>``); every one created is unlinked and closed at teardown."""
    created: list[PageMemory] = []

    def make(npages: int = 256, page_size: int = 256, ncpus: int = 2, params: PoolParams | None = None,
             multibuf: bool = False) -> PageMemory:
        pm = PageMemory.create(f"{run_prefix}-{len(created)}", npages, page_size, ncpus, params, multibuf)
        created.append(pm)
        return pm

    yield make
    for pm in created:
        pm.unlink()
        pm.close()


# -- the reliability summary -------------------------------------------------------------------------
# Fault and bad-input tests record what they injected and what it cost (pages lost, frames corrupted,
# foreign-cache returns); the summary is printed at the end of the run, merged across xdist workers.

_RECORDS: list[dict] = []


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``reliability(kind, report=None, inputs=0)``: record one injected fault or batch of bad inputs."""

    def record(kind: str, report: dict | None = None, inputs: int = 0) -> None:
        entry = {"kind": kind, "inputs": inputs, "test": request.node.nodeid}
        if report is not None:
            entry["pages_lost"] = report["violations"]["leaked"] + report["pages"]["total"] - report["pages"][
                "accounted"]
            entry["corrupted"] = report["traffic"]["corrupted"]
            entry["foreign_cache_return"] = report["violations"]["foreign_cache_return"]
        _RECORDS.append(entry)

    return record


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the records to the controller
        session.config.workeroutput["reliability"] = list(_RECORDS)


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        class _XdistHooks:
            @pytest.hookimpl(optionalhook=True)
            def pytest_testnodedown(self, node, error) -> None:
                _RECORDS.extend(getattr(node, "workeroutput", {}).get("reliability", []))

        config.pluginmanager.register(_XdistHooks(), "reliability-xdist")


def pytest_terminal_summary(terminalreporter) -> None:
    if not _RECORDS or hasattr(terminalreporter.config, "workerinput"):
        return
    tr = terminalreporter
    kinds = sorted({r["kind"] for r in _RECORDS})
    runs = [r for r in _RECORDS if "pages_lost" in r]
    tr.write_sep("=", "reliability summary")
    tr.write_line(f"fault kinds injected: {len(kinds)} ({', '.join(kinds)})")
    tr.write_line(f"bad inputs tried: {sum(r['inputs'] for r in _RECORDS):,}")
    tr.write_line(f"runs checked: {len(runs)}; pages lost: {sum(r['pages_lost'] for r in runs)}; "
                  f"frames corrupted: {sum(r['corrupted'] for r in runs)}; "
                  f"foreign-cache returns: {sum(r['foreign_cache_return'] for r in runs)}")
