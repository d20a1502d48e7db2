"""Process names: what ``ps``, ``top`` and ``pgrep`` show for each process of a run.

Every worker is forked from the fork server (`emu.run.launch`), so without a title each would show the
server's command line (``python -c 'from multiprocessing.forkserver import main ...'``) and nobody
could tell cpu0 from eth1, or kill the right one.  Each process therefore names itself by its role:

* ``emu: run l2fwd`` / ``emu: coordinator multihost`` / ``emu: host h1``: the command's own process;
* ``emu: forkserver``: the fork server (`emu.run.forkserver`, imported first by the server alone);
* ``emu: h1/cpu0``, ``emu: h1:eth1``, ``emu: gen0``: a CPU worker, a device, a traffic port, named the
  way the topology names them (a device as ``host:device``, like a link's endpoint).

`setproctitle` rewrites the command line (``ps -o args``, ``pgrep -f``) and, on Linux, also sets the
kernel's ``comm`` (``prctl(PR_SET_NAME)``: ``top``, ``pgrep`` without ``-f``; 15 bytes, so a long name is
cut there).  The same names key the report's ``processes`` mapping (name -> pid).
"""

from __future__ import annotations

import setproctitle

TITLE_PREFIX = "emu: "


def process_name(kind: str, key: str) -> str:
    """The name of a run's process from its stats-row kind and key: ``h1/cpu0``, ``h1:eth1``, ``gen0``."""
    return key.replace("/", ":", 1) if kind == "device" else key


def set_title(name: str) -> None:
    """Show this process as ``emu: <name>`` in ``ps``/``top``/``pgrep`` (command line and ``comm``)."""
    setproctitle.setproctitle(TITLE_PREFIX + name)
