"""The protocol of one emulated host: what its coordinator, CPU workers, devices and traffic ports agree on.

This module is the specification; every process imports its names from here and no process module
defines any of them, so that no worker needs to import another to talk to it.  It holds values only and
imports nothing of the project.  How the values travel is elsewhere: the message envelope and the frame
batch in `emu.net.wire`, the page descriptor record in `emu.mem.page` (``DESC_DTYPE``), the stats table's
rows and counter names in `emu.run.stats`, the rings and doorbells in `emu.net.shmring` and `emu.net.doorbell`.  The
control channel between ``emu coordinator`` and ``emu host`` agents, a separate protocol with its own
kinds, is `emu.cluster.control`.

Control words
-------------
Every process owns one row of the ``<run>-stats`` segment (`emu.run.stats`).  It begins with the control
words `CONTROL`, at the indices named here, followed by the process's counters:

``cmd`` (`CMD`)
    Written by the coordinator, read by the process at every pass of its loop: a `Cmd`.  It only ever
    grows (`emu.run.stats.StatsTable.command` keeps the larger value), so a process never misses a phase it
    was slow to see: it acts on every phase between the one it last applied and the current one.
``state`` (`STATE`)
    Written by the process: a `ProcState`.  The coordinator waits on it (READY before traffic starts,
    DONE when a generator has sent its count, DOWN after ``ndo_stop``, EXITED or FAILED at the end).
``pid`` (`PID`), ``heartbeat_ns`` (`HEARTBEAT_NS`)
    Written by the process: its pid once, and ``CLOCK_MONOTONIC`` a few times a second while it lives;
    a process silent for 15 s is declared hung and killed.
``offline`` (`OFFLINE`)
    Written by the coordinator when a process of the host died: the offline mask (below).
``offline_ack`` (`OFFLINE_ACK`)
    Written by the process once it has applied the mask it read in ``offline``; the coordinator reclaims
    the dead process's pages only after every live process acknowledged, so none still uses them.

The offline mask
----------------
Bits 0 to 31 (`CPU_MASK`): the CPUs of the host that died (bit ``c`` is CPU ``c``).  A device drops the
RX queues of a dead CPU and moves its TX completions to a live one; a CPU frees skbs locally instead of
on a dead `stack_cpu`.  (So a host has at most 32 CPUs, and at most ``LINK_DOWN_BIT - DEVICE_BIT`` = 30
devices: `emu.topology.schema` refuses more.)
Bits `DEVICE_BIT` + ``i``: device number ``i`` of the host (in topology order) died; CPUs post and
transmit nothing more to it (redirects to it count as ``redirect_err``).
Bit `LINK_DOWN_BIT`, only in the row of a device or traffic port: the far end of its link is gone
(carrier down); what it would send is counted as ``tx_dropped`` (device) or ``link_down`` (port).

Holder codes
------------
Every page records in the page table who has it now (``holder``), so that the coordinator can take back
what a dead process held.  The sender writes the receiver's code before it hands pages over:
`NO_HOLDER` for a page at home (page allocator, alloc cache, recycle ring), the CPU's number for a CPU
(``0`` .. ``ncpus - 1``), and `device_code` of its index for a device.

RX refill
---------
A CPU refills an RX queue once it is short of `refill_batch` of its ring size (64, or half a smaller
ring); a device waiting for buffers expects them in steps of that size.

Frames in pages
---------------
A device writes a received frame `XDP_PACKET_HEADROOM` bytes into its buffer (the offset the CPU posted
the buffer with, from the buffer's start: a page, or a fragment of one at its offset in the page), as the
kernel's drivers do, so a frame is at most ``buf_size - XDP_PACKET_HEADROOM`` bytes and an XDP program
may grow the head into the headroom.

Messages
--------
Every message is ``[kind, version, header, blob]`` (`emu.net.wire`); a receiver refuses any kind not in its
set below (counted as ``bad_messages``).  Descriptors travel as a blob of ``DESC_DTYPE`` records.

=========  ===========================  ===========================================================
kind       from -> to                   carries
=========  ===========================  ===========================================================
post       CPU -> device                empty pages for RX queue ``q`` (header ``q``, ``cpu``)
rx         device -> CPU                completed RX descriptors of queue ``q`` (frame in the page)
xmit       CPU -> device                pages for XDP TX queue ``txq`` (``kind``: tx or redirect)
txdrop     device -> CPU                pages a full (or down) TX ring refused
txc        device -> CPU                TX completions, to the CPU servicing the queue
rxret      device -> CPU                posted pages handed back at ``ndo_stop``
skb        CPU -> CPU                   XDP_PASS skbs to free on the stack CPU (``cpu``: sender)
cpumap     CPU -> CPU                   xdp_frames produced into a cpumap entry's ptr_ring, for the
                                        target CPU's kthread (``cpu``: sender, ``dev``: ingress
                                        device, ``map``: the cpumap's ordinal in its map set)
frames     link end -> link end;        frame bytes (``n`` frames: their lengths, then the frames);
           CPU -> device                on a CPU -> device socket, skbs for the normal transmit path
link       host agent -> device         the address of the device's link peer on another host
bell       producer -> consumer         nothing: "your ring holds what you asked to be woken for"
=========  ===========================  ===========================================================
"""

from __future__ import annotations

import enum
from typing import Any

# -- control words ------------------------------------------------------------------------------------

CONTROL = ("cmd", "state", "pid", "heartbeat_ns", "offline", "offline_ack")
CMD, STATE, PID, HEARTBEAT_NS, OFFLINE, OFFLINE_ACK = range(len(CONTROL))


class Cmd(enum.IntEnum):
    """What the coordinator asks a process to do (monotonic: a process only moves forward)."""

    RUN = 0  # set up and run; traffic ports wait for START
    START = 1  # traffic ports start generating
    QUIESCE = 2  # traffic ports stop generating; everything else keeps forwarding
    DOWN = 3  # devices stop receiving and hand posted RX pages back (ndo_stop)
    EXIT = 4  # CPU workers destroy their pools; everyone exits


class ProcState(enum.IntEnum):
    """What a process reports about itself."""

    STARTING = 0
    READY = 1
    RUNNING = 2
    DONE = 3  # a generator that has sent its count
    DOWN = 4  # saw DOWN: a device handed its posted buffers back, a CPU refills no more
    EXITED = 5
    FAILED = 6


# -- the offline mask ---------------------------------------------------------------------------------

CPU_MASK = (1 << 32) - 1  # bit c: CPU c of the host is gone
DEVICE_BIT = 32  # bit DEVICE_BIT + i: device number i of the host is gone
LINK_DOWN_BIT = 62  # in a device's or traffic port's row: its link peer is gone


# -- holder codes -------------------------------------------------------------------------------------

NO_HOLDER = -1  # at home: in the page allocator or kept by its pool
DEVICE_HOLDER_BASE = 256  # above every CPU number (a topology's hosts have at most 32 CPUs)


def device_code(index: int) -> int:
    """`holder` value of a page held by device number `index` of the host."""
    return DEVICE_HOLDER_BASE + index


# Pages a device handed to a CPU in a message the CPU has not taken yet: ``TRANSIT_HOLDER_BASE + device *
# TRANSIT_CPUS + cpu``.  The receiving CPU becomes their holder as it takes the message; if the device dies
# between handing them over and sending, the message never comes, and the CPU (the only one who can know
# that its ring from the dead device is empty) takes them back (`emu.datapath.napi.NapiCore.reclaim_transit`).
TRANSIT_HOLDER_BASE = 1024
TRANSIT_CPUS = 32


def transit_code(device: int, cpu: int) -> int:
    """`holder` value of pages device number `device` handed to CPU `cpu`, on their way to it."""
    return TRANSIT_HOLDER_BASE + device * TRANSIT_CPUS + cpu


def transit_to(holder: Any, cpu: int) -> Any:
    """Which `holder` values (an integer array) name pages on their way from some device to CPU `cpu`."""
    return (holder >= TRANSIT_HOLDER_BASE) & ((holder - TRANSIT_HOLDER_BASE) % TRANSIT_CPUS == cpu)


# -- RX refill ----------------------------------------------------------------------------------------

# A CPU posts RX buffers once a queue is short of this many (drivers refill in batches, not per packet),
# or of half its ring when that is fewer, so that a ring smaller than a batch is still refilled.  The
# device relies on the same number: it holds its link for a refill only while one is due.
REFILL_MIN = 64


def refill_batch(ring_size: int) -> int:
    """Buffers a queue of `ring_size` must be short of before its CPU refills it."""
    return max(1, min(REFILL_MIN, ring_size // 2))


# -- frames in pages ----------------------------------------------------------------------------------

XDP_PACKET_HEADROOM = 256  # include/uapi/linux/bpf.h: where a driver puts a received frame in its page


# -- message kinds ------------------------------------------------------------------------------------

POST, RX, XMIT, TXDROP, TXC, RXRET, SKB = "post", "rx", "xmit", "txdrop", "txc", "rxret", "skb"
CPUMAP = "cpumap"
FRAMES, LINK, BELL = "frames", "link", "bell"

CPU_KINDS = (RX, TXC, TXDROP, RXRET, SKB, BELL, CPUMAP)  # what a CPU worker's inbox takes
DEVICE_KINDS = (POST, XMIT, FRAMES, LINK, BELL)  # what a device's inbox takes
LINK_KINDS = (FRAMES, BELL)  # what a link end (a device's link ingress, a traffic port) takes
# Frames per link message at most (a sender never puts more in one): bounds the work one link message can
# ask of a receiver (a device waits a little for this many RX buffers posted on every queue, or a whole
# ring, before it takes a message).
LINK_BATCH = 256
