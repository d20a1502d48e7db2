"""Topology: what an emulated network looks like, and reading it from a file.

`model` holds the frozen dataclasses of a topology and the kernel constants their defaults mirror;
`schema` declares every key, bound, default and constraint of a topology file (``python -m
emu.topology.schema --markdown`` writes its tables into ``topology/README.md``); `file` reads and validates
files (`load_topology`, `validate_topology_text`).

This package re-exports `model`'s public names, so ``from emu.topology import Topology, HostConfig``
works.  It does not import `file` or `schema`: worker processes import the model and must not load PyYAML.
"""

# Every public name of the model, and only those (its __all__ is the list).
from emu.topology import model as _model
from emu.topology.model import *  # noqa: F403

__all__ = list(_model.__all__)
