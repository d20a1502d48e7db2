"""Topology: what an emulated network looks like, and reading it from a file.

`model` holds the frozen dataclasses of a topology and the kernel constants their defaults mirror;
`schema` declares every key, bound, default and constraint of a topology file (``python -m
emu.topology.schema --markdown`` writes its tables into ``topology/README.md``); `file` reads and validates
files (`load_topology`, `validate_topology_text`).

This package re-exports `model`'s public names, so ``from emu.topology import Topology, HostConfig``
works.  It does not import `file` or `schema`: worker processes import the model and must not load PyYAML.
"""

from emu.topology.model import (
    DEV_MAP_BULK_SIZE,
    MAX_LINK_DELAY_US,
    MAX_LINK_RATE_BPS,
    NAPI_POLL_WEIGHT,
    PP_ALLOC_CACHE_REFILL,
    PP_ALLOC_CACHE_SIZE,
    PP_DEFAULT_RING_SIZE,
    XDP_BULK_QUEUE_SIZE,
    DeviceConfig,
    Endpoint,
    GeneratorConfig,
    HostConfig,
    LinkConfig,
    LinkImpairment,
    PoolConfig,
    Topology,
    TopologyError,
    TrafficPort,
    XdpConfig,
    host_from_dict,
    resolve_program,
    topology_from_dict,
)

__all__ = [
    "DEV_MAP_BULK_SIZE",
    "MAX_LINK_DELAY_US",
    "MAX_LINK_RATE_BPS",
    "NAPI_POLL_WEIGHT",
    "PP_ALLOC_CACHE_REFILL",
    "PP_ALLOC_CACHE_SIZE",
    "PP_DEFAULT_RING_SIZE",
    "XDP_BULK_QUEUE_SIZE",
    "DeviceConfig",
    "Endpoint",
    "GeneratorConfig",
    "HostConfig",
    "LinkConfig",
    "LinkImpairment",
    "PoolConfig",
    "Topology",
    "TopologyError",
    "TrafficPort",
    "XdpConfig",
    "host_from_dict",
    "resolve_program",
    "topology_from_dict",
]
