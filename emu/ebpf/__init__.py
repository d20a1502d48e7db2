"""eBPF objects: clang-built XDP programs loaded the libbpf way and run by the emulator's native engine.

`obj` holds what a loaded object is (programs with relocated instructions, map definitions), shared by the
ELF loader, the kernel loader (``bpf(2)``, the verifier) and the engine.
"""
