"""Dead-worker reclaim: what a killed CPU worker or device leaves behind in a host's page memory.

The kernel never has to do this (a CPU does not die while the machine runs on), but an emulator's
process can, and the project's promise is that every page still comes home.  Every page records its
``holder`` (the CPU or device that has it now; a sender writes it before handing pages over), so the
pages a dead process stranded are found in the page table alone, without asking anyone:

* `reclaim_cpu`: the pages a dead CPU held (received, in XDP, queued to transmit, in an skb) and the
  empty RX buffers it had posted, which devices dropped from its offline queues; its own pool is taken
  over and destroyed (``page_pool_destroy``), as nobody else may touch its alloc cache;
* `reclaim_device`: the pages a dead device held (posted RX buffers, frames on its TX queues or
  awaiting their TX completion);
* `reclaim_stranded`: after every process exited, pages still out of their pools (a completion a dead
  process was about to send, say); then every pool drains again;
* `free_torn`: pages a kill left marked as pooled but in no pool (a process killed between a cache's
  count and its pages' states);
* `wire_losses`: the frames lost on a dead device's cables, from the counters at both ends (they never
  were in a page of this host, or were and left it).

With fragments (``pool.frag_size``) these return buffers: a fragment a dead process held drops its
page's reference, and the page goes home with its last fragment, as on any other return (a fragment
already back, FRAG, waiting for a sibling, is nobody's to return).

Each returns what it did, with the packets the reclaimed pages carried, which the run counts as
``fault.lost``.  They are plain functions over a `PageMemory` (and the stats rows), given the facts they
need as arguments, so a unit test drives them without a process.  The caller is responsible for the
concurrency rule: a page may be reclaimed only once no live process can still use it, that is after
every live process acknowledged the dead one's offline bit (`Run._offline`), or after all have exited.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from emu.mem.page import IN_USE, PageState
from emu.mem.pagemem import PageMemory
from emu.mem.pagepool import fragments_in_use, page_pool_return_page, pool_of, return_pages
from emu.net.protocol import transit_to

# States in which a page holds a packet that has not reached its end (received, in XDP, queued to
# transmit, in an skb); a posted RX buffer does too once its length is set (a frame was DMAed into it).
# TX_INFLIGHT is not one: the frame is on the wire, and its fate is counted at the far end.
_CARRYING = np.zeros(256, dtype=bool)
_CARRYING[[PageState.RX_POSTED, PageState.XDP, PageState.SKB, PageState.TX_QUEUED]] = True


@dataclass(frozen=True)
class Reclaimed:
    """What one reclaim did: pages given back to their pools, and packets those pages carried (lost)."""

    pages: int = 0
    packets: int = 0


@dataclass(frozen=True)
class DeadLink:
    """The cable of a dead device: the device's stats row, and its peer's row and kind ("device" or
    "traffic"; both None when the peer is not on this machine, or there is none)."""

    device: str
    peer: str | None = None
    peer_kind: str | None = None


def carrying(pm: PageMemory, ids: np.ndarray, states: np.ndarray) -> int:
    """How many of pages `ids` (in states `states`) carry a packet: a frame was written into them and has
    not reached its end (a multi-buffer frame is one packet: `heads_only` leaves its fragments out first)."""
    return int(np.count_nonzero(_CARRYING[states] & (pm.len[ids] > 0)))


def heads_only(pm: PageMemory, ids: np.ndarray, fr: np.ndarray | None = None) -> np.ndarray:
    """`ids` without the fragments of multi-buffer frames in use (`fr`, `fragments_in_use`, given when the
    caller has it): those go home with their heads, as every return of a frame takes them (a fragment
    returned on its own would be returned twice)."""
    if fr is None:
        fr = fragments_in_use(pm)
    return ids if not len(fr) else ids[~np.isin(ids, fr)]


def reclaim_cpu(pm: PageMemory, cpu: int) -> Reclaimed:
    """Return the pages dead CPU `cpu` held to their pools, and its posted RX buffers that devices
    dropped, and destroy its own pool (its cache and ring back to the page allocator).

    Pages of its pool still out come back to its ring later; `reclaim_stranded` drains them at the end.
    """
    st = pm.state.copy()
    holder = pm.holder.copy()
    owner = pm.owner.copy()
    # Its pages, and those on their way to it from a device (`emu.net.protocol.transit_code`).
    to_it = (holder == cpu) | transit_to(holder, cpu)
    fr = fragments_in_use(pm)
    held = heads_only(pm, np.flatnonzero(to_it & IN_USE[st]), fr)
    lost = carrying(pm, held, st[held])
    # Empty RX buffers of the dead CPU that devices dropped from their (now offline) rings: a device
    # holds the ones it still posts, so these name another holder and no live process uses them.  Among them
    # may be the buffers of a multi-buffer frame a device scattered but has not handed over yet: a fragment
    # goes home with its head (returned on its own too, it would be in its pool twice).
    empty = heads_only(pm, np.flatnonzero((owner == cpu) & (st == PageState.RX_POSTED) & ~to_it), fr)
    for ids in (held, empty):
        if len(ids):
            return_pages(pm, None, ids, errors="count")
    # Its owner is gone: the caller's process takes the pool over (`owner=True` records its pid) to
    # destroy it, as `page_pool_destroy` would have at the dead CPU's exit.
    pool_of(pm, cpu, owner=True).drain()
    return Reclaimed(len(held) + len(empty), lost)


def reclaim_device(pm: PageMemory, holder: int) -> Reclaimed:
    """Return the pages held by the dead device whose holder code is `holder` to their pools; the frames
    queued on its TX queues are lost (posted buffers carry nothing yet, and a frame already transmitted
    is counted at the far end)."""
    st = pm.state.copy()
    held = heads_only(pm, np.flatnonzero((pm.holder == holder) & IN_USE[st]))
    lost = int(np.count_nonzero((st[held] == PageState.TX_QUEUED) & (pm.len[held] > 0)))
    if len(held):
        return_pages(pm, None, held, errors="count")
    return Reclaimed(len(held), lost)


def drain_pools(pm: PageMemory, cpus: range | list[int] | None = None) -> None:
    """Destroy the pools of `cpus` (all when None) again: pages that came back to their rings since go
    to the page allocator.  Only once their owners are gone (dead, or exited)."""
    for cpu in range(pm.ncpus) if cpus is None else cpus:
        pool_of(pm, cpu, owner=True).drain()


def reclaim_stranded(pm: PageMemory) -> Reclaimed:
    """After every process exited: return every page still out of its pool (stranded mid-handover by a
    dead process) and drain every pool.  Call it only after a process died: without one, pages still
    out are a leak, for the audit to report."""
    st = pm.state.copy()
    # In use: not a fragment that waits for its siblings (FRAG: nobody's to return; its page comes home
    # with the last of them).
    ids = heads_only(pm, np.flatnonzero(IN_USE[st]))
    lost = carrying(pm, ids, st[ids])
    if len(ids):
        return_pages(pm, None, ids, errors="count")
    drain_pools(pm)
    return Reclaimed(len(ids), lost)


def free_torn(pm: PageMemory) -> int:
    """After `reclaim_stranded` (every cache and ring empty): pages still marked CACHE or RING are in no
    pool, left so by a process killed between two stores (a cache's count and its pages' states).  They
    carried no packet; each goes back to the page allocator, released by its pool.  Returns how many."""
    st = pm.state.copy()
    torn = np.unique(np.flatnonzero((st == PageState.CACHE) | (st == PageState.RING)) // pm.frags)  # pages
    owners = pm.owner[torn * pm.frags]
    for cpu in np.unique(owners).tolist():
        page_pool_return_page(pm, torn[owners == cpu], cpu if 0 <= cpu < pm.ncpus else -1)
    return len(torn)


def wire_losses(links: list[DeadLink], read: Callable[[str], Mapping[str, int]], dead: set[str]) -> int:
    """Frames lost with dead devices, from the stats rows (`read(key)`): those their link peer sent that
    they never took, those they took but never completed to a CPU, and those they put on the wire that
    never reached the peer.  A dead peer's counters say nothing more (its own losses are its own)."""
    lost = 0
    for link in links:
        dev = read(link.device)
        lost += dev["rx_packets"] - dev["rx_dropped"] - dev["rx_completed"]
        if link.peer is None or link.peer in dead:
            continue
        peer = read(link.peer)
        if link.peer_kind == "traffic":
            # Replayed frames the devices could not take were never sent (counted where they were skipped).
            unsent = peer["link_down"] + peer["link_lost"] + peer.get("replay_oversize", 0) + peer.get("replay_runt", 0)
            sent, got = peer["generated"] - unsent, peer["received"]
        else:
            sent, got = peer["tx_packets"] - peer["tx_dropped"] - peer["link_lost"], peer["rx_packets"]
        lost += max(0, sent - dev["rx_packets"])
        lost += max(0, dev["tx_packets"] - dev["tx_dropped"] - got)
    return lost
