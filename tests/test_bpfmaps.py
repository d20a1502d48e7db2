"""BPF maps in shared memory: kernel map semantics, layout checks, snapshots, and sharing across processes.

Every segment is named under the test's `run_prefix` and unlinked by the `mapset` fixture's finalizer, so
tests run in parallel under pytest-xdist and leave nothing in /dev/shm.  The multi-process tests use the
spawn context (child bodies are module-level so they pickle by reference) with generous deadlines.
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emu.mem.shm import SHM_DIR, new_run_prefix, segments_with_prefix
from emu.xdp.bpfmaps import (
    BPF_ANY,
    BPF_EXIST,
    BPF_NOEXIST,
    ArrayMap,
    DevMap,
    HashMap,
    MapError,
    MapSet,
    MapSpec,
    PerCpuArrayMap,
    PerCpuHashMap,
    populate,
)

CTX = mp.get_context("spawn")
DEADLINE = 120.0

MapSetFactory = Callable[..., MapSet]


@pytest.fixture
def mapset(run_prefix: str) -> Iterator[MapSetFactory]:
    """Factory: ``mapset(specs, ncpus=2, cpu=0)`` creates a map set under a fresh name;
    ``mapset.attach(ms, cpu)`` attaches another view of it.  All are closed and unlinked at teardown."""
    created: list[MapSet] = []
    attached: list[MapSet] = []

    def make(specs: Mapping[str, MapSpec], ncpus: int = 2, cpu: int = 0) -> MapSet:
        ms = MapSet.create(f"{run_prefix}-maps{len(created)}", specs, ncpus, cpu)
        created.append(ms)
        return ms

    def attach(ms: MapSet, cpu: int) -> MapSet:
        other = MapSet.attach(ms.name, ms.specs, ms.ncpus, cpu)
        attached.append(other)
        return other

    make.attach = attach  # type: ignore[attr-defined]
    yield make
    for ms in attached:
        ms.close()
    for ms in created:
        ms.unlink()
        ms.close()
    assert segments_with_prefix(run_prefix) == []


def err(exc: pytest.ExceptionInfo[MapError]) -> int:
    return exc.value.errno


# --------------------------------------------------------------------------------------------------
# MapSpec


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"type": "ringbuf", "max_entries": 4}, "map type"),
        ({"type": "array", "max_entries": 0}, "max_entries"),
        ({"type": "array", "max_entries": 1 << 30}, "max_entries"),
        ({"type": "array", "max_entries": 4, "value": "object"}, "value type"),
        ({"type": "array", "max_entries": 4, "value": ">u4"}, "native"),
        ({"type": "hash", "max_entries": 4, "key": "u16"}, "key type"),
        ({"type": "array", "max_entries": 4, "key": "u64"}, "key type"),
        ({"type": "devmap", "max_entries": 4, "value": "u64"}, "devmap"),
    ],
)
def test_mapspec_rejects(kwargs: dict, fragment: str) -> None:
    with pytest.raises((ValueError, TypeError), match=fragment):
        MapSpec(**kwargs)


def test_mapspec_value_types() -> None:
    assert MapSpec("array", 1).dtype == np.uint64
    assert MapSpec("array", 1, "u8").dtype == np.uint64  # numpy spelling: 8 bytes
    assert MapSpec("array", 1, "u32").dtype == np.uint32  # kernel spelling
    assert MapSpec("array", 1, "s64").dtype == np.int64
    assert MapSpec("array", 1, "f8").dtype == np.float64
    assert MapSpec("devmap", 1).dtype == np.uint32
    assert MapSpec("hash", 1, key="u64").key_dtype == np.uint64


# --------------------------------------------------------------------------------------------------
# Arrays


def test_array_semantics(mapset: MapSetFactory) -> None:
    ms = mapset({"a": MapSpec("array", 4)})
    a = ms["a"]
    assert isinstance(a, ArrayMap)
    assert [a.lookup(k) for k in range(4)] == [0, 0, 0, 0]
    a.update(1, 7)
    a[2] = 9
    a.add(2, 3)
    assert (a.lookup(1), a[2], len(a)) == (7, 12, 4)
    assert a.lookup(4) is None and a.lookup(-1) is None
    with pytest.raises(MapError) as e:
        a.update(4, 1)
    assert err(e) == errno.E2BIG
    with pytest.raises(MapError) as e:
        a.add(-1, 1)
    assert err(e) == errno.E2BIG
    with pytest.raises(KeyError):
        a[4]
    with pytest.raises(MapError) as e:
        a.update(0, 1, BPF_NOEXIST)
    assert err(e) == errno.EEXIST
    a.update(0, 5, BPF_EXIST)
    with pytest.raises(MapError) as e:
        a.update(0, 1, 8)
    assert err(e) == errno.EINVAL
    with pytest.raises(MapError) as e:
        a.delete(0)
    assert err(e) == errno.EINVAL
    assert a.snapshot()["entries"] == {"0": 5, "1": 7, "2": 12}


def test_array_add_wraps_like_fixed_width_arithmetic(mapset: MapSetFactory) -> None:
    ms = mapset({"u": MapSpec("array", 1), "s": MapSpec("array", 1, "s32"), "f": MapSpec("array", 1, "f8")})
    ms["u"].add(0, -1)
    assert ms["u"][0] == (1 << 64) - 1
    ms["u"].add(0, 2)
    assert ms["u"][0] == 1
    ms["s"].update(0, (1 << 31) - 1)
    ms["s"].add(0, 1)
    assert ms["s"][0] == -(1 << 31)
    ms["f"].add(0, 0.5)
    assert ms["f"][0] == 0.5


def test_structured_values_are_writable_views(mapset: MapSetFactory) -> None:
    spec = MapSpec("array", 2, value="u8,u4")  # fields f0 (u64), f1 (u32)
    ms = mapset({"s": spec})
    s = ms["s"]
    s.update(0, {"f0": 10, "f1": 2})
    v = s.lookup(0)
    v["f0"] += 5  # like writing through the pointer bpf_map_lookup_elem returns
    assert s.lookup(0)["f0"] == 15 and s.lookup(0)["f1"] == 2
    with pytest.raises(TypeError):
        s.add(0, 1)
    with pytest.raises(ValueError, match="unknown value fields"):
        s.update(1, {"nope": 1})
    assert ms.snapshot()["s"]["entries"] == {"0": {"f0": 15, "f1": 2}}


def test_percpu_array_rows_are_per_cpu(mapset: MapSetFactory) -> None:
    ms0 = mapset({"c": MapSpec("percpu_array", 2)}, ncpus=3, cpu=0)
    ms2 = mapset.attach(ms0, 2)  # type: ignore[attr-defined]
    c0, c2 = ms0["c"], ms2["c"]
    assert isinstance(c0, PerCpuArrayMap) and isinstance(c2, PerCpuArrayMap)
    c0.add(0, 5)
    c2.add(0, 7)
    c2[1] = 1
    assert (c0[0], c2[0], c0[1]) == (5, 7, 0)
    assert c0.values(0) == [5, 0, 7] and c0.sum(0) == 12
    c0.update_all(1, 4)
    assert c2.values(1) == [4, 4, 4]
    with pytest.raises(MapError):
        c0.values(2)
    snap = ms0.snapshot()["c"]
    assert snap["entries"]["0"] == {"cpus": [5, 0, 7], "sum": 12}
    assert snap["ncpus"] == 3 and snap["type"] == "percpu_array"


def test_percpu_structured_sum(mapset: MapSetFactory) -> None:
    ms = mapset({"c": MapSpec("percpu_array", 1, value="u8,u8")}, ncpus=2)
    c = ms["c"]
    assert isinstance(c, PerCpuArrayMap)
    c.update_cpu(0, 0, (1, 2))
    c.update_cpu(1, 0, (10, 20))
    assert c.sum(0) == {"f0": 11, "f1": 22}
    json.dumps(ms.snapshot())


# --------------------------------------------------------------------------------------------------
# Devmap


def test_devmap(mapset: MapSetFactory) -> None:
    ms = mapset({"tx": MapSpec("devmap", 4)})
    tx = ms["tx"]
    assert isinstance(tx, DevMap)
    assert tx.lookup(0) is None and tx.lookup(9) is None
    tx.update(0, 3)
    assert tx.lookup(0) == 3 and tx[0] == 3 and tx.ifindexes[0] == 3
    for bad in (0, -1, "eth0"):
        with pytest.raises(MapError) as e:
            tx.update(1, bad)  # type: ignore[arg-type]
        assert err(e) == errno.EINVAL
    with pytest.raises(MapError) as e:
        tx.update(4, 3)
    assert err(e) == errno.E2BIG
    with pytest.raises(MapError) as e:
        tx.update(0, 5, BPF_NOEXIST)
    assert err(e) == errno.EEXIST
    with pytest.raises(MapError) as e:
        tx.update(1, 5, BPF_EXIST)
    assert err(e) == errno.ENOENT
    assert ms.snapshot()["tx"]["entries"] == {"0": 3}
    tx.delete(0)
    assert tx.lookup(0) is None
    with pytest.raises(KeyError):
        tx[0]


# --------------------------------------------------------------------------------------------------
# Hash maps


def test_hash_semantics(mapset: MapSetFactory) -> None:
    ms = mapset({"h": MapSpec("hash", 4, key="u64")})
    h = ms["h"]
    assert isinstance(h, HashMap)
    big = (1 << 64) - 1
    assert h.lookup(1) is None and len(h) == 0
    h.update(1, 10)
    h.update(big, 20, BPF_NOEXIST)
    with pytest.raises(MapError) as e:
        h.update(1, 11, BPF_NOEXIST)
    assert err(e) == errno.EEXIST
    with pytest.raises(MapError) as e:
        h.update(2, 11, BPF_EXIST)
    assert err(e) == errno.ENOENT
    h.update(1, 12, BPF_EXIST)
    h.add(3, 5)  # inserts
    h.add(3, 1)
    assert (h.lookup(1), h[big], h.lookup(3), len(h)) == (12, 20, 6, 3)
    assert 3 in h and 2 not in h
    h.update(4, 0)
    with pytest.raises(MapError) as e:
        h.update(5, 0)
    assert err(e) == errno.E2BIG
    with pytest.raises(MapError) as e:
        h.update(-1, 0)
    assert err(e) == errno.EINVAL
    h.delete(4)
    with pytest.raises(MapError) as e:
        h.delete(4)
    assert err(e) == errno.ENOENT
    h.update(5, 50)  # room again after the delete
    assert sorted(h.items()) == [(1, 12), (3, 6), (5, 50), (big, 20)]
    assert ms.snapshot()["h"]["entries"] == {"1": 12, "3": 6, "5": 50, str(big): 20}


def test_hash_u32_keys_reject_wide_keys(mapset: MapSetFactory) -> None:
    h = mapset({"h": MapSpec("hash", 4)})["h"]
    with pytest.raises(MapError):
        h.update(1 << 32, 1)
    assert h.lookup(1 << 32) is None


def test_hash_is_shared_between_attachments(mapset: MapSetFactory) -> None:
    ms = mapset({"h": MapSpec("hash", 8)})
    other = mapset.attach(ms, 1)  # type: ignore[attr-defined]
    ms["h"].update(7, 70)
    assert other["h"].lookup(7) == 70
    other["h"].delete(7)
    assert ms["h"].lookup(7) is None


def test_percpu_hash_shares_keys(mapset: MapSetFactory) -> None:
    ms0 = mapset({"p": MapSpec("percpu_hash", 4)}, ncpus=2, cpu=0)
    ms1 = mapset.attach(ms0, 1)  # type: ignore[attr-defined]
    p0, p1 = ms0["p"], ms1["p"]
    assert isinstance(p0, PerCpuHashMap) and isinstance(p1, PerCpuHashMap)
    p0.add(9, 3)
    assert p1.lookup(9) == 0  # the key exists for every CPU; the other CPUs' values start at zero
    p1.add(9, 4)
    p1.update(9, 5)
    assert p0.values(9) == [3, 5] and p0.sum(9) == 8 and len(p1) == 1
    with pytest.raises(MapError) as e:
        p1.update(9, 1, BPF_NOEXIST)
    assert err(e) == errno.EEXIST
    p0.update_all(2, 6)
    assert p1.values(2) == [6, 6]
    assert dict(p0.items()) == {2: [6, 6], 9: [3, 5]}
    assert ms0.snapshot()["p"]["entries"]["9"] == {"cpus": [3, 5], "sum": 8}
    p1.delete(9)
    assert p0.lookup(9) is None
    p0.add(9, 1)  # a re-inserted key does not inherit the old per-CPU values
    assert p0.values(9) == [1, 0]


@pytest.mark.parametrize("kind", ["hash", "percpu_hash"])
def test_hash_tombstones_and_compaction(
    mapset: MapSetFactory, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting inside a probe cluster leaves tombstones; past 3/4 of the slots (tombstones included) the
    table is compacted without losing a key or a per-CPU value."""
    compactions: list[int] = []
    real = HashMap._compact
    monkeypatch.setattr(HashMap, "_compact", lambda self: (compactions.append(1), real(self))[1])
    ms0 = mapset({"h": MapSpec(kind, 4)}, ncpus=2, cpu=0)  # 8 slots
    ms1 = mapset.attach(ms0, 1)  # type: ignore[attr-defined]
    h0, h1 = ms0["h"], ms1["h"]

    def home(k: int) -> int:
        return (k * 0x9E3779B97F4A7C15) % (1 << 64) >> 61

    at0 = [k for k in range(1000) if home(k) == 0][:4]
    at4 = [k for k in range(1000) if home(k) == 4][:3]
    extra = 1 if kind == "percpu_hash" else 0
    for k in at0:
        h0.update(k, k)
        if extra:
            h1.update(k, k + 1)
    for k in at0[:3]:
        h1.delete(k)  # each has a used successor: three tombstones
    live = at0[3:]
    for k in at4:  # the third insert passes 3/4 of the slots counting tombstones: compaction
        h0.update(k, k)
        if extra:
            h1.update(k, k + 1)
        live.append(k)
        assert sorted(h0.keys()) == sorted(live)
        assert [h1.lookup(x) for x in live] == [x + extra for x in live]
    assert compactions == [1]
    for x in live:
        assert h0.lookup(x) == x
    if extra:
        assert [h0.values(x) for x in live] == [[x, x + 1] for x in live]  # type: ignore[attr-defined]
    for k in at0[:3]:  # deleted keys stay deleted, and can come back
        assert h0.lookup(k) is None
    h1.delete(live.pop())  # max_entries live keys: make room first
    h1.update(at0[0], 5)
    assert h0.lookup(at0[0]) == (0 if extra else 5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["update", "add", "delete", "lookup"]), st.integers(0, 40), st.integers(0, 99)
        ),
        max_size=200,
    )
)
def test_hash_matches_a_dict(ops: list[tuple[str, int, int]]) -> None:
    """Random operations (many deletes force tombstones and compaction) agree with a dict of 12 entries."""
    name = new_run_prefix() + "-hyp"
    ms = MapSet.create(name, {"h": MapSpec("hash", 12)}, 1)
    try:
        h = ms["h"]
        model: dict[int, int] = {}
        for op, k, v in ops:
            if op == "lookup":
                assert h.lookup(k) == model.get(k)
                continue
            full = k not in model and len(model) >= 12
            try:
                if op == "update":
                    h.update(k, v, BPF_ANY)
                    model[k] = v
                elif op == "add":
                    h.add(k, v)
                    model[k] = model.get(k, 0) + v
                else:
                    h.delete(k)
                    del model[k]
            except MapError as e:
                expected = errno.ENOENT if op == "delete" else errno.E2BIG
                assert e.errno == expected and ((op == "delete" and k not in model) or full)
            assert len(h) == len(model)
        assert dict(h.items()) == model
    finally:
        ms.unlink()
        ms.close()
    assert not os.path.exists(f"{SHM_DIR}/{name}")


# --------------------------------------------------------------------------------------------------
# Map sets


def test_layout_is_deterministic_and_attach_checks_specs(mapset: MapSetFactory) -> None:
    specs = {"b": MapSpec("hash", 8), "a": MapSpec("percpu_array", 3), "c": MapSpec("devmap", 2)}
    reordered = dict(reversed(list(specs.items())))
    assert MapSet.required_bytes(specs, 2) == MapSet.required_bytes(reordered, 2)
    ms = mapset(specs, ncpus=2)
    ms["a"].add(1, 5)
    other = MapSet.attach(ms.name, reordered, 2, 1)
    try:
        assert other["a"].values(1) == [5, 0]  # type: ignore[attr-defined]
    finally:
        other.close()
    with pytest.raises(ValueError, match="other map specs"):
        MapSet.attach(ms.name, {**specs, "a": MapSpec("percpu_array", 4)}, 2, 1)
    with pytest.raises(ValueError, match="other map specs"):
        MapSet.attach(ms.name, specs, 3, 1)
    with pytest.raises(ValueError, match="cpu"):
        MapSet.attach(ms.name, specs, 2, 2)


def test_snapshot_is_json_and_close_forbids_use(mapset: MapSetFactory) -> None:
    ms = mapset(
        {
            "arr": MapSpec("array", 4),
            "pc": MapSpec("percpu_array", 2),
            "h": MapSpec("hash", 4),
            "ph": MapSpec("percpu_hash", 4, key="u64"),
            "dev": MapSpec("devmap", 2),
        }
    )
    ms["arr"].add(3, 1)
    ms["pc"].add(0, 2)
    ms["h"].update(5, 6)
    ms["ph"].add(1 << 40, 1)
    ms["dev"].update(1, 3)
    snap = json.loads(json.dumps(ms.snapshot()))
    assert set(snap) == {"arr", "pc", "h", "ph", "dev"}
    assert snap["arr"] == {"type": "array", "max_entries": 4, "value": "uint64", "entries": {"3": 1}}
    assert snap["ph"]["entries"] == {str(1 << 40): {"cpus": [1, 0], "sum": 1}}
    assert snap["dev"]["entries"] == {"1": 3}
    arr = ms["arr"]
    ms.close()
    with pytest.raises(ValueError):
        arr.lookup(0)


def test_populate(mapset: MapSetFactory) -> None:
    ms = mapset(
        {"tx_port": MapSpec("devmap", 4), "pc": MapSpec("percpu_array", 2), "ph": MapSpec("percpu_hash", 2)}
    )
    ifindexes = {"eth0": 2, "eth1": 3}
    populate(ms, {"tx_port": {0: "eth1", "1": 2}, "pc": {"1": 9}, "ph": {4: 1}}, ifindexes.__getitem__)
    assert ms["tx_port"].lookup(0) == 3 and ms["tx_port"].lookup(1) == 2
    assert ms["pc"].values(1) == [9, 9]  # type: ignore[attr-defined]
    assert ms["ph"].values(4) == [1, 1]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="no map 'nope'"):
        populate(ms, {"nope": {0: 1}}, ifindexes.__getitem__)
    with pytest.raises(ValueError, match="not an integer"):
        populate(ms, {"tx_port": {"x": 1}}, ifindexes.__getitem__)
    with pytest.raises(KeyError):
        populate(ms, {"tx_port": {0: "eth9"}}, ifindexes.__getitem__)


# --------------------------------------------------------------------------------------------------
# Across processes

N_PERCPU = 20_000
N_HASH = 4_000
NPROCS = 3
HASH_SPECS = {"h": MapSpec("hash", 64)}
PERCPU_SPECS = {"c": MapSpec("percpu_array", 1)}


def _percpu_child(name: str, cpu: int) -> None:
    ms = MapSet.attach(name, PERCPU_SPECS, NPROCS, cpu)
    try:
        c = ms["c"]
        for _ in range(N_PERCPU):
            c.add(0, 1)
    finally:
        ms.close()


def _hash_child(name: str, cpu: int) -> None:
    ms = MapSet.attach(name, HASH_SPECS, NPROCS, cpu)
    try:
        h = ms["h"]
        for i in range(N_HASH):
            h.add(i % 8, 1)  # keys every process fights over
            h.add(100 + cpu * 10 + i % 5, 2)  # keys of its own, inserted concurrently with the others'
    finally:
        ms.close()


def _run(target: Callable[[str, int], None], name: str) -> None:
    procs = [CTX.Process(target=target, args=(name, cpu), daemon=True) for cpu in range(NPROCS)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(DEADLINE)
        assert [p.exitcode for p in procs] == [0] * NPROCS
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)


def test_percpu_rows_across_processes(mapset: MapSetFactory) -> None:
    ms = mapset(PERCPU_SPECS, ncpus=NPROCS)
    _run(_percpu_child, ms.name)
    c = ms["c"]
    assert c.values(0) == [N_PERCPU] * NPROCS  # type: ignore[attr-defined]
    assert c.sum(0) == NPROCS * N_PERCPU  # type: ignore[attr-defined]


def test_global_hash_under_lock_across_processes(mapset: MapSetFactory) -> None:
    ms = mapset(HASH_SPECS, ncpus=NPROCS)
    _run(_hash_child, ms.name)
    got = dict(ms["h"].items())  # type: ignore[attr-defined]
    want = {k: NPROCS * N_HASH // 8 for k in range(8)}
    for cpu in range(NPROCS):
        want.update({100 + cpu * 10 + j: 2 * N_HASH // 5 for j in range(5)})
    assert got == want
    assert len(ms["h"]) == len(want)  # type: ignore[arg-type]
