"""Every failure of the ``emu`` command is one line naming what and where, with its documented exit status.

Bad input (a directory, a missing file, a malformed topology, an unwritable ``--json``, an existing key
set, a missing key directory) exits 2 before anything starts; an internal error exits 3 with
``emu: internal error: <Type>: <message>``; ``--debug`` adds the traceback; the error families of
`emu.errors` map to exit statuses in one place, and every error class of the emulator belongs to one
while keeping the standard-library base existing ``except`` clauses rely on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from procs import ROOT

from emu import cli
from emu.cluster.control import ControlError
from emu.cluster.hostagent import CoordinatorLost
from emu.errors import BadInputError, EmuError, ProcessFailure, ResourceError, exit_status
from emu.mem.page import PageError
from emu.mem.pagepool import ForeignRecycleError, PoolOwnershipError
from emu.mem.shm import ShmSpaceError
from emu.net.security import KeyFileError
from emu.net.wire import WireError
from emu.run.coordinator import RunError
from emu.run.process import InjectedFault, last_words
from emu.topology.model import TopologyError
from emu.xdp.bpfmaps import MapError

GOOD = ROOT / "topology" / "l2fwd.yaml"


def emu(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", [["run"], ["validate"], ["coordinator"]])
def test_a_directory_is_refused_by_name(command: list[str], tmp_path: Path, capsys) -> None:
    status, _, err = emu(*command, str(tmp_path), capsys=capsys)
    assert status == 2
    assert one_line(err) == f"emu: {tmp_path}: Is a directory"


@pytest.mark.parametrize("command", [["run"], ["validate"], ["coordinator"]])
def test_a_missing_file_is_refused_by_name(command: list[str], tmp_path: Path, capsys) -> None:
    status, _, err = emu(*command, str(tmp_path / "nope.yaml"), capsys=capsys)
    assert status == 2
    assert one_line(err) == f"emu: {tmp_path / 'nope.yaml'}: No such file or directory"


def test_the_command_line_ends_in_no_traceback_for_a_directory(tmp_path: Path) -> None:
    """The issue's case, end to end: ``emu run SOME_DIRECTORY``."""
    p = subprocess.run([sys.executable, "-m", "emu.cli", "run", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert one_line(p.stderr) == f"emu: {tmp_path}: Is a directory"


def test_a_topology_error_keeps_its_file_line_form(tmp_path: Path, capsys) -> None:
    """``FILE:LINE: message`` without the ``emu:`` prefix: the form compilers use, that editors and CI
    annotations jump to (and README documents for ``emu validate``)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nhosts:\n  h1:\n    cpus: zero\n")
    for command in ("validate", "run"):
        status, _, err = emu(command, str(bad), capsys=capsys)
        assert status == 2
        line = one_line(err)
        assert line.startswith(f"{bad}:4: ") and not line.startswith("emu:"), line


@pytest.mark.parametrize("where", ["directory", "missing parent"])
def test_an_unwritable_json_file_is_refused_before_the_run(where: str, tmp_path: Path, capsys) -> None:
    target = tmp_path if where == "directory" else tmp_path / "no" / "r.json"
    status, _, err = emu("run", str(GOOD), "--json", str(target), capsys=capsys)
    assert status == 2
    line = one_line(err)
    assert line.startswith(f"emu: --json {target}: ") and ("directory" in line), line


def test_keys_and_host_refuse_bad_key_directories(tmp_path: Path, capsys) -> None:
    assert emu("keys", str(tmp_path), capsys=capsys)[0] == 0
    status, _, err = emu("keys", str(tmp_path), capsys=capsys)
    assert status == 2 and one_line(err).startswith(f"emu: {tmp_path}/emu.key already exists")
    missing = tmp_path / "none"
    # In a process of its own: `emu host` names its process (`emu: host h1`), which this one must keep.
    p = subprocess.run([sys.executable, "-m", "emu.cli", "host", "h1", "--keys", str(missing)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert one_line(p.stderr).startswith(f"emu: {missing}: key directory does not exist")


def test_clean_reports_what_it_removed(capsys) -> None:
    status, out, err = emu("clean", capsys=capsys)
    assert status == 0 and out.startswith("removed ") and err == ""


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch):
    """``failing(exc)``: `emu clean` raises `exc`."""

    def make(exc: BaseException) -> None:
        def raise_it(args) -> int:
            raise exc

        monkeypatch.setitem(cli.COMMANDS, "clean", raise_it)

    return make


def test_an_internal_error_is_one_line_and_status_3(failing, capsys) -> None:
    failing(ZeroDivisionError("division by zero"))
    status, _, err = emu("clean", capsys=capsys)
    assert status == 3
    assert one_line(err) == ("emu: internal error: ZeroDivisionError: division by zero "
                             "(run with --debug for the traceback)")


def test_debug_shows_the_traceback_too(failing, capsys) -> None:
    failing(ZeroDivisionError("division by zero"))
    status, _, err = emu("--debug", "clean", capsys=capsys)
    assert status == 3
    assert err.startswith("Traceback (most recent call last):") and "raise_it" in err
    assert err.strip().splitlines()[-1] == "emu: internal error: ZeroDivisionError: division by zero"


def test_interrupted_before_a_run_is_130(failing, capsys) -> None:
    failing(KeyboardInterrupt())
    status, _, err = emu("clean", capsys=capsys)
    assert status == cli.EXIT_INTERRUPTED == 130
    assert one_line(err) == "emu: interrupted"


def test_an_os_error_without_a_file_means_the_run_could_not_start(failing, capsys) -> None:
    failing(OSError(24, "Too many open files"))
    status, _, err = emu("clean", capsys=capsys)
    assert status == 3 and one_line(err) == "emu: Too many open files"


# Every error class of the emulator, an instance quoting a bad value, its family and the standard
# library base callers catch it by.
ERRORS = [
    (TopologyError("t.yaml", 3, "cpus must be >= 1, not 0"), BadInputError, ValueError),
    (MapError(7, "key 9 out of range"), BadInputError, KeyError),
    (ControlError("header field 'host' should be a str, got 5"), BadInputError, ValueError),
    (WireError("bad magic 0x1234"), BadInputError, ValueError),
    (KeyFileError("/k/emu.key: not a zmq certificate"), BadInputError, ValueError),
    (PageError("page 77 freed twice"), BadInputError, ValueError),
    (ForeignRecycleError("page 5 recycled into cpu 1's cache by pid 9"), BadInputError, ValueError),
    (ShmSpaceError(28, "/dev/shm has 10 bytes free but needs 20"), ResourceError, OSError),
    (PoolOwnershipError("cpu 0's page pool is already owned by live pid 12"), ResourceError, RuntimeError),
    (RunError("cpu process h1/cpu0 died (exit code 1)"), ProcessFailure, RuntimeError),
    (CoordinatorLost("no word from the coordinator for 10 s"), ProcessFailure, RuntimeError),
    (InjectedFault("fault injected with SIGUSR1"), ProcessFailure, RuntimeError),
]


@pytest.mark.parametrize(("exc", "family", "base"), ERRORS, ids=[type(e[0]).__name__ for e in ERRORS])
def test_every_error_has_a_family_and_keeps_its_base(exc: EmuError, family: type, base: type, failing,
                                                     capsys) -> None:
    assert isinstance(exc, family) and isinstance(exc, base) and isinstance(exc, EmuError)
    failing(exc)
    status, _, err = emu("clean", capsys=capsys)
    assert status == exit_status(exc) == family.exit_status
    line = one_line(err)
    assert line == (str(exc) if isinstance(exc, TopologyError) else f"emu: {exc}")
    assert "[Errno" not in line  # ShmSpaceError reads as its message, not as an OSError's repr


def test_a_report_with_a_failure_exits_3_before_anything_else() -> None:
    report = {"violations": {"leaked": 1}, "traffic": {"unaccounted": 5, "corrupted": 0}, "hosts_lost": [],
              "failures": [{"process": "h1/cpu0"}]}
    assert cli.report_status(report) == 3
    assert cli.report_status({**report, "failures": []}) == 1
    clean = {"violations": {}, "traffic": {"unaccounted": 0, "corrupted": 0}, "hosts_lost": [], "failures": []}
    assert cli.report_status(clean) == 0


def test_last_words_name_the_exception_and_where() -> None:
    def poll() -> None:
        raise ValueError("seq 8589934592 out of range")

    try:
        poll()
    except ValueError as exc:
        words = last_words(exc)
    # This test's file is neither in emu/ nor workers/: the innermost frame is named as it is.
    assert words.startswith("ValueError: seq 8589934592 out of range (at ")
    assert words.endswith(" in poll)") and "test_cli.py:" in words
