"""Memory and pool: a host's page memory in shared memory and the per-CPU page pools over it.

`shm` (named POSIX segments), `locks` (cross-process byte-range locks), `pagemem` (pages, page table,
descriptors, the pools' layout and counters, the conservation audit), `pagepool` (the per-CPU page pool
of ``net/core/page_pool.c``) and `reclaim` (giving back what dead processes held).  It knows nothing of
processes, topologies or XDP; besides `emu.errors` it imports only the protocol's constants (`emu.net`).
"""
