"""The host's inter-process protocol (`emu.net.protocol`): defined once, consistent, and what the stats rows use."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from emu.net import protocol
from emu.net.protocol import (
    CMD,
    CONTROL,
    CPU_KINDS,
    CPU_MASK,
    DEVICE_BIT,
    DEVICE_KINDS,
    HEARTBEAT_NS,
    LINK_DOWN_BIT,
    LINK_KINDS,
    NO_HOLDER,
    OFFLINE,
    OFFLINE_ACK,
    PID,
    STATE,
    Cmd,
    ProcState,
    device_code,
)
from emu.run.stats import StatsTable
from emu.topology.schema import MAX_CPUS

ROOT = Path(__file__).resolve().parent.parent
# Names only the protocol may define: a worker defining its own copy is how the three headrooms and the
# offline bits living in workers/cpu.py came about.
PROTOCOL_NAMES = {
    "CONTROL", "Cmd", "ProcState", "CPU_MASK", "DEVICE_BIT", "LINK_DOWN_BIT", "NO_HOLDER", "device_code",
    "XDP_PACKET_HEADROOM", "HEADROOM", "CPU_KINDS", "DEVICE_KINDS", "LINK_KINDS", "FRAMES", "BELL",
}


def _defined_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        names.add(t.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_protocol_names_are_defined_only_in_the_protocol() -> None:
    here = {p.relative_to(ROOT).as_posix(): _defined_names(p) & PROTOCOL_NAMES
            for pkg in ("emu", "workers") for p in sorted((ROOT / pkg).rglob("*.py"))}
    elsewhere = {path: sorted(names) for path, names in here.items() if names and path != "emu/net/protocol.py"}
    assert not elsewhere, f"protocol names defined outside emu/net/protocol.py: {elsewhere}"


def test_protocol_imports_nothing_of_the_project() -> None:
    tree = ast.parse((ROOT / "emu" / "net" / "protocol.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] in ("emu", "workers")]


def test_control_word_indices_name_the_control_words() -> None:
    assert [CONTROL[i] for i in (CMD, STATE, PID, HEARTBEAT_NS, OFFLINE, OFFLINE_ACK)] == list(CONTROL)


def test_stats_row_accessors_write_the_named_words(run_prefix: str) -> None:
    table = StatsTable.create(f"{run_prefix}-stats", [("cpu", "h1/cpu0"), ("device", "h1/eth0")])
    try:
        row = table.row("h1/eth0")
        table.command("h1/eth0", Cmd.DOWN)
        table.command("h1/eth0", Cmd.START)  # commands only move forward
        table.set_word("h1/eth0", "offline", 1 << LINK_DOWN_BIT | 1)
        row.set_state(ProcState.DOWN)
        row.ack_offline(row.offline)
        row.beat()
        words = table.read("h1/eth0")
        assert row.cmd == words["cmd"] == Cmd.DOWN
        assert words["state"] == ProcState.DOWN
        assert words["offline_ack"] == words["offline"] == 1 << LINK_DOWN_BIT | 1
        assert words["heartbeat_ns"] > 0
        assert not any(table.read("h1/cpu0").values())  # the other row untouched
        del row
    finally:
        table.close()
        table.unlink()


def test_offline_bits_do_not_overlap() -> None:
    assert CPU_MASK & (1 << DEVICE_BIT) == 0 and CPU_MASK + 1 == 1 << DEVICE_BIT
    assert DEVICE_BIT < LINK_DOWN_BIT < 63  # the mask is one int64 word, kept non-negative


def test_holder_codes_are_distinct() -> None:
    cpus = set(range(MAX_CPUS))
    devices = {device_code(i) for i in range(64)}
    assert NO_HOLDER not in cpus | devices and not cpus & devices
    assert max(devices) < 2**15  # the page table's holder column is int16


@pytest.mark.parametrize("kinds", [CPU_KINDS, DEVICE_KINDS, LINK_KINDS], ids=["cpu", "device", "link"])
def test_every_receiver_takes_a_bell(kinds: tuple[str, ...]) -> None:
    """A producer that finds its consumer asleep sends ``bell`` on its socket when the consumer has no
    doorbell: every receiver must accept one."""
    assert protocol.BELL in kinds and len(set(kinds)) == len(kinds)
