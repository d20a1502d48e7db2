"""pagepool-emu: a multi-process emulator of XDP forwarding built around the kernel's per-CPU page pool."""

__version__ = "0.1.0"
