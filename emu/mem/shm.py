"""Named POSIX shared-memory segments shared by the processes of one emulated host.

This is the emulator's stand-in for physical memory: the page memory, the page table, the per-CPU pool
structures, the statistics blocks and the BPF maps all live in segments created here.  It is a thin
layer over `multiprocessing.shared_memory`'s primitive (`_posixshmem.shm_open` + `mmap`), with three
deliberate differences from `SharedMemory`:

* **Only the creator registers with the resource tracker.**  Before Python 3.13 `SharedMemory`
  registers every segment it *attaches* as well, so an independently started process (``emu host``, a
  test's subprocess) would unlink a segment it merely used when it exits.  Attaching here never touches
  the tracker; the creator unlinks.
* **Space is reserved at creation.**  A segment is a sparse file on tmpfs; touching a page tmpfs cannot
  back raises SIGBUS, not an exception.  `posix_fallocate` makes an undersized ``/dev/shm`` fail at once
  with the size that was needed.
* **Names carry a run prefix** (``ppemu-<pid>-<token>``) so that `sweep_stale` can remove what a run
  killed with SIGKILL left behind, and nothing else.
"""

from __future__ import annotations

import _posixshmem
import mmap
import os
from multiprocessing import resource_tracker

import numpy as np

from emu.errors import ResourceError

SHM_DIR = "/dev/shm"
PREFIX = "ppemu"


class ShmSpaceError(ResourceError, OSError):
    """``/dev/shm`` cannot hold what a topology needs; the message says how much it has and needs.

    Still an `OSError` (errno ``ENOSPC``) for callers that catch those; ``str()`` is the message alone,
    without the ``[Errno 28]`` an `OSError` would put before it."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def new_run_prefix() -> str:
    """A run-unique name prefix: the creating pid (for `sweep_stale`) and a random token."""
    # os.urandom, not secrets: `secrets` pulls in OpenSSL (hmac), 4 MB of every worker's memory.
    return f"{PREFIX}-{os.getpid()}-{os.urandom(4).hex()}"


def shm_free_bytes() -> int:
    """Bytes still free in ``/dev/shm``."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


class Segment:
    """One mapped shared-memory segment; `array` carves typed numpy views out of it."""

    def __init__(self, name: str, fd: int, size: int, owner: bool) -> None:
        self.name = name
        self.size = size
        self.owner = owner
        self._mmap: mmap.mmap | None = mmap.mmap(fd, size)
        os.close(fd)
        self.buf = memoryview(self._mmap)

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        """Create a zero-filled segment of `size` bytes, reserving its tmpfs space up front."""
        size = max(int(size), 1)
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            _posixshmem.shm_unlink("/" + name)
            raise ShmSpaceError(
                exc.errno,
                f"cannot reserve {size:,} bytes for shared-memory segment {name!r} in {SHM_DIR} "
                f"({shm_free_bytes():,} bytes free): {exc.strerror}",
            ) from None
        resource_tracker.register("/" + name, "shared_memory")
        return cls(name, fd, size, owner=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        """Map an existing segment without taking responsibility for unlinking it."""
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        size = os.fstat(fd).st_size
        return cls(name, fd, size, owner=False)

    def array(self, dtype: np.dtype | str | type, count: int, offset: int) -> np.ndarray:
        """A numpy view of `count` items of `dtype` at byte `offset` of the segment."""
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=offset)

    def close(self) -> None:
        """Drop this process's mapping.

        Numpy views handed out by `array` keep the mapping alive; while any exists the kernel mapping is
        released at garbage collection instead, which is harmless: only `unlink` frees the memory.
        """
        if self._mmap is None:
            return
        self.buf.release()
        try:
            self._mmap.close()
        except BufferError:
            pass
        self._mmap = None

    def unlink(self) -> None:
        """Remove the segment's name (the creator's job); mappings stay valid until closed."""
        try:
            _posixshmem.shm_unlink("/" + self.name)
        except FileNotFoundError:
            pass
        if self.owner:
            try:
                resource_tracker.unregister("/" + self.name, "shared_memory")
            except Exception:  # the tracker may already be gone at interpreter exit
                pass


def segments_with_prefix(prefix: str) -> list[str]:
    """Names of the segments in ``/dev/shm`` that belong to a run prefix."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix + "-") or n == prefix)


def unlink_prefix(prefix: str) -> list[str]:
    """Unlink every segment of a run prefix; returns the names removed."""
    return _unlink_all(segments_with_prefix(prefix))


def _unlink_all(names: list[str]) -> list[str]:
    """Unlink the segments `names`; returns those removed (one another process unlinked first is not)."""
    removed = []
    for name in names:
        try:
            _posixshmem.shm_unlink("/" + name)
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (a zombie counts until it is reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_pid(name: str) -> bool:
    parts = name.split("-")
    return len(parts) >= 3 and parts[0] == PREFIX and parts[1].isdigit() and not pid_alive(int(parts[1]))


def sweep_stale() -> list[str]:
    """Unlink the segments of runs whose creating process no longer exists (after a SIGKILL), and remove
    their socket directories.

    Only names of the form ``ppemu-<pid>-<token>-...`` are considered, and only when `<pid>` is dead, so
    concurrent runs (parallel tests, other users' labs) are never touched.
    """
    import shutil  # the coordinator's business; workers never import these
    import tempfile

    tmp = tempfile.gettempdir()
    try:
        for name in os.listdir(tmp):
            if _stale_pid(name) and os.path.isdir(os.path.join(tmp, name)):
                shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    except OSError:
        pass
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return _unlink_all([name for name in names if _stale_pid(name)])
