"""Attaching XDP programs to a host's devices: loading, their BPF maps, one context per RX queue.

The coordinator creates each attached program's maps once per device (`create_maps`), in shared memory,
pre-populated from the topology's params named after a map (``{"tx_port": {0: "eth1"}}``), the way
user space loads and fills maps before attaching.  Every CPU worker then attaches the same map set
(per-CPU maps resolve to its own row) and builds one `XdpContext` per RX queue it services.

Topology validation goes through the same code without starting anything: `scratch_maps` creates a
program's maps under a unique scratch name (always unlinked), `populate` fills them from the params with
the same `ifindex_resolver`, and the setup hook runs on a context, so what would fail in a run fails at
validation, with the line of the key at fault.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from emu.mem.shm import new_run_prefix
from emu.topology.model import DeviceConfig, HostConfig
from emu.xdp.bpfmaps import MapSet, populate
from emu.xdp.context import Program, XdpContext, load_program


def ifindex_resolver(host: HostConfig) -> Callable[[str], int]:
    """Device name -> ifindex on `host`, for map params; ValueError naming the host's devices otherwise."""
    ifindexes = {name: dev.ifindex for name, dev in host.devices.items()}

    def ifindex_of(name: str) -> int:
        try:
            return ifindexes[name]
        except KeyError:
            known = ", ".join(sorted(ifindexes))
            raise ValueError(f"no device {name!r} on host {host.name!r} (devices: {known})") from None

    return ifindex_of


@contextmanager
def scratch_maps(prog: Program, ncpus: int) -> Iterator[MapSet | None]:
    """`prog`'s maps created as a run creates them, under a unique scratch name unlinked on exit (None when
    the program has no maps): validation's stand-in for `create_maps`."""
    if not prog.maps:
        yield None
        return
    ms = MapSet.create(f"{new_run_prefix()}-scratch", prog.maps, ncpus)
    try:
        yield ms
    finally:
        ms.unlink()
        ms.close()


def object_globals(dev: DeviceConfig, host: HostConfig) -> dict[str, Any]:
    """The topology's ``globals`` for `dev`'s object, a device name of the host replaced by its ifindex."""
    assert dev.xdp is not None
    devs = {name: d.ifindex for name, d in host.devices.items()}
    return {k: devs[v] if isinstance(v, str) and v in devs else v for k, v in dev.xdp.globals.items()}


def load_xdp_object(dev: DeviceConfig, host: HostConfig | None = None) -> tuple[Any, str]:
    """`dev`'s eBPF object, loaded (with its globals set when `host` is given: a CPU worker needs none, the
    maps' segment already holds them) and the name of the program to attach."""
    from emu.ebpf.elf import load_object
    from emu.ebpf.engine import choose_program

    assert dev.xdp is not None and dev.xdp.object is not None
    obj = load_object(Path(dev.xdp.object), object_globals(dev, host) if host is not None else None)
    return obj, choose_program(obj, dev.xdp.program)


def create_object_maps(name: str, dev: DeviceConfig, host: HostConfig) -> Any:
    """The maps of `dev`'s object in segment `name`: global data as set, populated from ``maps:``."""
    from emu.ebpf.maps import ObjMaps

    assert dev.xdp is not None
    obj, _ = load_xdp_object(dev, host)
    om = ObjMaps.create(name, obj.maps, host.cpus)
    try:
        om.globals = dict(obj.globals)
        om.programs = list(obj.programs)
        om.populate(dev.xdp.maps, ifindex_resolver(host))
    except BaseException:
        om.unlink()
        om.close()
        raise
    return om


def create_maps(prefix: str, host: HostConfig) -> tuple[dict[str, str], list[tuple[str, MapSet]]]:
    """Create (and populate) the map set of every device whose program declares maps."""
    names: dict[str, str] = {}
    sets: list[tuple[str, MapSet]] = []
    ifindex_of = ifindex_resolver(host)
    try:
        for dname, dev in host.devices.items():
            if dev.xdp is None:
                continue
            if dev.xdp.object is not None:
                name = f"{prefix}-maps-{dname}"
                sets.append((f"{host.name}:{dname}", create_object_maps(name, dev, host)))
                names[dname] = name
                continue
            prog = load_program(dev.xdp.program)
            if not prog.maps:
                continue
            name = f"{prefix}-maps-{dname}"
            ms = MapSet.create(name, prog.maps, host.cpus)
            sets.append((f"{host.name}:{dname}", ms))
            names[dname] = name
            populate(ms, prog.initial_maps(dev.xdp.params), ifindex_of)
    except BaseException:
        for _, ms in sets:
            ms.unlink()
            ms.close()
        raise
    return names, sets


def program_for(
    dev: DeviceConfig, mapset_name: str | None, ncpus: int, cpu: int
) -> tuple[Program | None, dict[str, Any]]:
    """In a CPU worker: the device's program and its maps as seen from `cpu`."""
    if dev.xdp is None:
        return None, {}
    if dev.xdp.object is not None:  # an eBPF object, run natively (emu.ebpf.engine)
        from emu.ebpf.engine import xdp_program
        from emu.ebpf.maps import ObjMaps

        obj, name = load_xdp_object(dev)
        assert mapset_name is not None
        om = ObjMaps.attach(mapset_name, obj.maps, ncpus)
        return xdp_program(obj, name, om, cpu), dict(om.devmaps())  # devmaps: for a broadcast's targets
    prog = load_program(dev.xdp.program)
    if not prog.maps or mapset_name is None:
        return prog, {}
    ms = MapSet.attach(mapset_name, prog.maps, ncpus, cpu)
    return prog, dict(ms.maps)


def make_context(
    prog: Program | None, maps: dict[str, Any], dev: DeviceConfig, q: int, cpu: int, ifindexes: dict[str, int],
    mtus: dict[int, int] | None = None,
) -> XdpContext:
    """The context of RX queue `q` of `dev` on `cpu`, with the program's setup hook run; `mtus` are the
    host's devices' MTUs by ifindex (``bpf_check_mtu``)."""
    params = dev.xdp.params if dev.xdp is not None else {}
    if prog is None:
        return XdpContext(dev.ifindex, q, cpu, params, maps, ifindexes, mtus)
    return prog.new_context(dev.ifindex, q, cpu, params, maps, ifindexes, mtus)


def snapshot_maps(sets: list[tuple[str, MapSet]]) -> dict[str, Any]:
    """The contents of every map, per device, for the final report."""
    return {label: ms.snapshot() for label, ms in sets}
