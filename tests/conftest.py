"""Shared fixtures: unique shared-memory names per test, and page memories cleaned up after it.

Kept small and generic.  Every name a test creates starts with its `run_prefix` (which carries the
creating pid and a random token), so tests run in parallel (pytest-xdist) never collide, and
`emu.shm.sweep_stale` can remove what a killed run left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from emu.pagemem import PageMemory, PoolParams
from emu.shm import new_run_prefix, unlink_prefix


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

    def make(npages: int = 256, page_size: int = 256, ncpus: int = 2, params: PoolParams | None = None) -> PageMemory:
        pm = PageMemory.create(f"{run_prefix}-{len(created)}", npages, page_size, ncpus, params)
        created.append(pm)
        return pm

    yield make
    for pm in created:
        pm.unlink()
        pm.close()
