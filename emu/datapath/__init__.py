"""The data path of a host without its processes: a CPU's NAPI core (`napi`) and a NIC's core (`nic`).

Each core is a plain object that the process around it (`workers/cpu.py`, `workers/device.py`) feeds with
messages and drives from its loop, and that sends through a small interface the process implements over
its channels; a unit test drives it the same way with fakes, over a real page memory, without a process.
"""
