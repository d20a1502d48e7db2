"""The object's maps in shared memory: the kernel's semantics per map type (array, percpu_array, hash,
percpu_hash, lru_hash, lru_percpu_hash, devmap, devmap_hash, prog_array, global data, ringbuf), the
bpf(2) errnos, sharing between processes, and the report's snapshot."""

from __future__ import annotations

import errno
import multiprocessing as mp

import pytest

from emu.ebpf import obj as o
from emu.ebpf.maps import ObjMaps, map_layout
from emu.ebpf.obj import MapDef
from emu.errors import BadInputError
from emu.xdp.bpfmaps import BPF_EXIST, BPF_NOEXIST, MapError


def mk(run_prefix: str, *defs: MapDef, ncpus: int = 2) -> ObjMaps:
    return ObjMaps.create(f"{run_prefix}-om", list(defs), ncpus)


def errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(MapError) as ei:
        fn(*args)
    return ei.value.errno


def test_array(run_prefix: str) -> None:
    with mk(run_prefix, MapDef("a", o.BPF_MAP_TYPE_ARRAY, 4, 12, 4)) as m:
        assert m.lookup("a", 3) == bytes(12)  # preallocated, zeroed
        assert m.lookup("a", 4) is None
        m.update("a", 1, b"x" * 12)
        assert m.lookup("a", 1) == b"x" * 12
        assert errno_of(m.update, "a", 4, bytes(12)) == errno.E2BIG
        assert errno_of(m.update, "a", 1, bytes(12), BPF_NOEXIST) == errno.EEXIST
        assert errno_of(m.delete, "a", 1) == errno.EINVAL
        assert m.keys("a") == [0, 1, 2, 3]
        assert m.snapshot()["a"]["entries"] == {"1": (b"x" * 12).hex()}
        with pytest.raises(BadInputError, match="12 expected"):
            m.update("a", 0, b"short")
        m.unlink()


def test_percpu_array(run_prefix: str) -> None:
    with mk(run_prefix, MapDef("pc", o.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 2), ncpus=3) as m:
        m.update("pc", 0, 5)  # every CPU
        m.update("pc", 1, 7, cpu=2)
        assert m.lookup("pc", 0) == [5, 5, 5]
        assert m.lookup("pc", 1) == [0, 0, 7]
        assert m.lookup("pc", 1, cpu=2) == 7
        snap = m.snapshot()["pc"]
        assert snap["entries"]["1"] == {"cpus": [0, 0, 7], "sum": 7} and snap["ncpus"] == 3
        m.unlink()


@pytest.mark.parametrize("mtype", [o.BPF_MAP_TYPE_HASH, o.BPF_MAP_TYPE_PERCPU_HASH])
def test_hash(run_prefix: str, mtype: int) -> None:
    key = b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d"  # 13-byte keys, as a 5-tuple would be
    with mk(run_prefix, MapDef("h", mtype, 13, 4, 3)) as m:
        assert m.lookup("h", key) is None
        assert errno_of(m.delete, "h", key) == errno.ENOENT
        assert errno_of(m.update, "h", key, 1, BPF_EXIST) == errno.ENOENT
        m.update("h", key, 1, BPF_NOEXIST)
        assert errno_of(m.update, "h", key, 2, BPF_NOEXIST) == errno.EEXIST
        m.update("h", key, 2, BPF_EXIST)
        m.update("h", 2, 3)
        m.update("h", 3, 4)
        assert errno_of(m.update, "h", 4, 5) == errno.E2BIG  # full
        m.update("h", 3, 6)  # an existing key still updates
        m.delete("h", 2)
        m.update("h", 4, 5)  # room again
        assert sorted(m.keys("h"), key=str) == sorted([key.hex(), "03" + "00" * 12, "04" + "00" * 12])  # > 8 bytes: hex
        want = [2, 2] if mtype == o.BPF_MAP_TYPE_PERCPU_HASH else 2
        assert m.lookup("h", key) == want
        assert errno_of(m.update, "h", key, 1, 4) == errno.EINVAL  # unknown flags
        m.unlink()


def test_percpu_hash_new_key_zeroes_other_cpus(run_prefix: str) -> None:
    with mk(run_prefix, MapDef("h", o.BPF_MAP_TYPE_PERCPU_HASH, 4, 8, 8), ncpus=2) as m:
        m.update("h", 1, 9, cpu=1)
        assert m.lookup("h", 1) == [0, 9]
        m.update("h", 1, 4, cpu=0)
        assert m.lookup("h", 1) == [4, 9]
        m.unlink()


@pytest.mark.parametrize("mtype", [o.BPF_MAP_TYPE_LRU_HASH, o.BPF_MAP_TYPE_LRU_PERCPU_HASH])
def test_lru_evicts_the_least_recently_used(run_prefix: str, mtype: int) -> None:
    with mk(run_prefix, MapDef("l", mtype, 4, 8, 3)) as m:
        for k in (1, 2, 3):
            m.update("l", k, k)
        m.lookup("l", 1)  # 1 is now more recent than 2
        m.update("l", 4, 4)  # full: evicts 2
        assert sorted(m.keys("l")) == [1, 3, 4]
        m.unlink()


def test_hash_survives_many_deletes(run_prefix: str) -> None:
    with mk(run_prefix, MapDef("h", o.BPF_MAP_TYPE_HASH, 8, 8, 16)) as m:
        for rnd in range(50):
            for k in range(16):
                m.update("h", rnd * 100 + k, k, BPF_NOEXIST)
            for k in range(16):
                m.delete("h", rnd * 100 + k)
        assert m.keys("h") == []
        m.update("h", 1, 1)
        assert m.lookup("h", 1) == 1
        m.unlink()


@pytest.mark.parametrize("mtype", [o.BPF_MAP_TYPE_DEVMAP, o.BPF_MAP_TYPE_DEVMAP_HASH])
def test_devmap_populated_by_device_name(run_prefix: str, mtype: int) -> None:
    with mk(run_prefix, MapDef("tx", mtype, 4, 8, 4)) as m:
        m.populate({"tx": {"0": "eth1", 2: 7}}, {"eth1": 3}.__getitem__)
        assert m.lookup("tx", 0) == 3 and m.lookup("tx", 2) == 7
        assert m.lookup("tx", 1) is None  # no device
        assert sorted(m.keys("tx")) == [0, 2]
        with pytest.raises(KeyError):
            m.populate({"tx": {1: "nope"}}, {"eth1": 3}.__getitem__)
        m.unlink()


def test_populate_refuses_names_where_no_device_fits(run_prefix: str) -> None:
    with mk(run_prefix, MapDef("h", o.BPF_MAP_TYPE_HASH, 4, 8, 4)) as m:
        with pytest.raises(BadInputError, match="names a device"):
            m.populate({"h": {1: "eth0"}}, lambda n: 1)
        with pytest.raises(BadInputError, match="no map 'x'"):
            m.populate({"x": {1: 1}}, lambda n: 1)
        m.unlink()


def test_global_data_initial_bytes_and_vars(run_prefix: str) -> None:
    ro = MapDef(".rodata", o.BPF_MAP_TYPE_ARRAY, 4, 8, 1, map_flags=o.BPF_F_RDONLY_PROG, section=".rodata",
                data=(3).to_bytes(4, "little") + (9).to_bytes(4, "little"))
    with mk(run_prefix, ro) as m:
        m.globals = {"egress": o.GlobalVar("egress", 0, 0, 4), "mode": o.GlobalVar("mode", 0, 4, 4)}
        assert m.snapshot()[".rodata"]["vars"] == {"egress": 3, "mode": 9}
        m.unlink()


def test_unsupported_and_malformed_maps_are_refused() -> None:
    with pytest.raises(BadInputError, match="map type 16 is not supported"):
        map_layout([MapDef("cpus", o.BPF_MAP_TYPE_CPUMAP, 4, 4, 4)], 1)
    with pytest.raises(BadInputError, match="4-byte keys"):
        map_layout([MapDef("a", o.BPF_MAP_TYPE_ARRAY, 8, 4, 4)], 1)
    with pytest.raises(BadInputError, match="devmap"):
        map_layout([MapDef("d", o.BPF_MAP_TYPE_DEVMAP, 4, 6, 4)], 1)
    with pytest.raises(BadInputError, match="must all be positive"):
        map_layout([MapDef("h", o.BPF_MAP_TYPE_HASH, 4, 0, 4)], 1)
    with pytest.raises(BadInputError, match="bytes of shared memory"):
        map_layout([MapDef("big", o.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 4096, 1 << 17)], 4)


def _child(name: str, defs: list[MapDef], q: mp.Queue) -> None:  # type: ignore[type-arg]
    m = ObjMaps.attach(name, defs, 2)
    for k in range(100):
        m.update("h", 1000 + k, k)
    q.put(m.lookup("h", 1))
    m.close()


def test_another_process_shares_the_maps(run_prefix: str) -> None:
    defs = [MapDef("h", o.BPF_MAP_TYPE_HASH, 4, 8, 256)]
    with mk(run_prefix, *defs) as m:
        m.update("h", 1, 42)
        q: mp.Queue = mp.get_context("fork").Queue()  # type: ignore[type-arg]
        procs = [mp.get_context("fork").Process(target=_child, args=(m.name, defs, q)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        assert q.get(timeout=10) == 42 and q.get(timeout=10) == 42
        assert len(m.keys("h")) == 101  # both children inserted the same keys: no duplicates
        m.unlink()


def test_attach_refuses_other_maps(run_prefix: str) -> None:
    defs = [MapDef("h", o.BPF_MAP_TYPE_HASH, 4, 8, 8)]
    with mk(run_prefix, *defs) as m:
        with pytest.raises(ValueError, match="other maps or another CPU count"):
            ObjMaps.attach(m.name, [MapDef("h", o.BPF_MAP_TYPE_HASH, 4, 8, 9)], 2)
        with pytest.raises(ValueError, match="other maps or another CPU count"):
            ObjMaps.attach(m.name, defs, 3)
        m.unlink()
