"""Control and cluster: a run spread over several machines.

`cluster` (``emu coordinator``, the control plane), `hostagent` (``emu host``, one machine running its part
with `emu.run.coordinator.Run`) and `control` (the control protocol between them).  The CURVE security of
the sockets that cross machines is transport (`emu.net.security`): devices use it for their links too.
"""
