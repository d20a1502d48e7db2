"""Memory and pool: a host's page memory in shared memory and the per-CPU page pools over it.

`shm` (named POSIX segments), `locks` (cross-process byte-range locks), `page` (what a page is: its
states, descriptors, the header's words), `pagepool` (the per-CPU page pool of ``net/core/page_pool.c``:
its parameters, counters, control words and share of the layout, every change of a page's state, the
descriptor check and the conservation audit), `pagemem` (the shared-memory segments the pages, the page
table and the pools live in) and `reclaim` (giving back what dead processes held).  Imports go one way:
``page`` <- ``pagepool`` <- ``pagemem``.  It knows nothing of processes, topologies or XDP; besides
`emu.errors` it imports only the protocol's constants (`emu.net`).
"""
