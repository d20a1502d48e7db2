"""Transport: how a host's processes, and hosts, talk.

`protocol` (the contract between a host's processes), `wire` (message envelopes and frame batches),
`shmring` and `doorbell` (message rings in shared memory and their wake-ups), `sockets` and `security`
(zmq sockets, and CURVE for those that cross machines), `link` (both ends of an emulated wire), `netem`
(link impairments) and `packets` (the test frames themselves).  Its rings live in `emu.mem` segments.
"""
