"""The emulator's errors: one root, three families, and the exit status the ``emu`` command gives each.

Every error the emulator raises on purpose derives from `EmuError`, through one of three families that
say whose fault it is and so what a script running ``emu`` should do about it:

* `BadInputError` (exit status 2): what the user gave is wrong: a malformed topology, program, key
  file or message.  Nothing was started; fix the input and try again.
* `ResourceError` (exit status 2): the input is fine but this machine cannot provide what it asks for
  (too little ``/dev/shm``, a pool another live process owns).  Nothing was started.
* `ProcessFailure` (exit status 3): a run started and a process of it failed (a worker died, a host
  was lost before it registered, the coordinator went silent).

Each error's message quotes the bad value and names where it was found (``FILE:LINE:`` for topology
files), so that the one ``emu: ...`` line the CLI prints is enough to act on.  Existing families of
the standard library stay among the bases where callers relied on them (``TopologyError`` is still a
``ValueError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXIT_BAD_INPUT", "EXIT_PROCESS_FAILURE", "BadInputError", "EmuError", "FileLineError",
           "ObjectError", "ProcessFailure", "ResourceError", "exit_status"]

EXIT_BAD_INPUT = 2
EXIT_PROCESS_FAILURE = 3


class EmuError(Exception):
    """The root of every error the emulator raises on purpose; `exit_status` is what ``emu`` exits with."""

    exit_status = EXIT_PROCESS_FAILURE


class BadInputError(EmuError):
    """Something the user gave (a file, a value, a message) is wrong; nothing was started."""

    exit_status = EXIT_BAD_INPUT


class FileLineError(BadInputError, ValueError):
    """An input file is wrong at a line (a topology, an experiment spec); ``str()`` is ``"file:line:
    message"`` (line 1-based), the form the ``emu`` command prints as it is.  Still a ``ValueError`` for
    the callers that catch that."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce would call __init__ with the formatted string only; keep the exception
        # picklable so it can cross process boundaries (pytest-xdist, multiprocessing).
        return (type(self), (self.file, self.line, self.message))


class ObjectError(BadInputError, ValueError):
    """An eBPF object file is wrong or asks for what the emulator does not support; ``str()`` is
    ``"FILE:WHERE: message"``, WHERE being ``SECTION+INSN`` (an instruction index in the ELF section) or a
    section or program name, as the kernel's verifier and libbpf name places."""

    def __init__(self, file: str, where: str, message: str) -> None:
        super().__init__(f"{file}:{where}: {message}" if where else f"{file}: {message}")
        self.file = file
        self.where = where
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.file, self.where, self.message))


class ResourceError(EmuError):
    """This machine cannot provide what a valid input asks for (shared memory, a pool's ownership)."""

    exit_status = EXIT_BAD_INPUT


class ProcessFailure(EmuError):
    """A run started and one of its processes (or hosts) failed."""

    exit_status = EXIT_PROCESS_FAILURE


def exit_status(exc: BaseException) -> int:
    """The ``emu`` command's exit status for `exc` (3 for anything that is not an `EmuError`)."""
    return exc.exit_status if isinstance(exc, EmuError) else EXIT_PROCESS_FAILURE
