"""The fork server's own set-up, done by importing this module: the server imports it first of its
preload modules (`emu.run.launch.worker_context`), and nothing else imports it.

multiprocessing offers no other hook into the server process, which it starts itself.  Two things are
set here, and every worker forked from the server inherits them until `emu.run.process.run_process`
sets its own:

* its title, ``emu: forkserver`` (`emu.run.procname`), so ``ps`` tells it from the coordinator;
* SIGTERM ignored.  The coordinator learns a worker's exit status through the server, so a server
  killed by a stray SIGTERM (systemd's ``KillMode=control-group`` sends one to every process of the
  unit) would make every worker look dead while the coordinator tears the run down in order.  The
  server ends by itself when the coordinator is gone (its ``alive`` pipe closes), and SIGKILL still works.
"""

from __future__ import annotations

import signal

from emu.run.procname import set_title

set_title("forkserver")
signal.signal(signal.SIGTERM, signal.SIG_IGN)
