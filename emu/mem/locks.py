"""Cross-process locks for the few shared structures that have more than one writer.

The kernel protects a page pool's `ptr_ring` producer side with a spinlock and the page allocator with
zone/PCP locks.  Between Python processes we use Linux open-file-description (OFD) record locks, one
byte each, on the host's metadata segment file:

* they work between unrelated processes (an ``emu host`` started by hand, a test's subprocess), not only
  between a parent and the children it forked;
* the kernel drops them when the holder dies, so a CPU worker killed with SIGKILL mid-put cannot wedge
  every other CPU the way a spinlock word in shared memory would;
* an uncontended lock/unlock pair is two system calls (~1-2 us from Python), which is why every user
  of a lock takes it once per *bulk* of pages, never per page.
"""

from __future__ import annotations

import fcntl
import os
import struct

# struct flock on Linux (x86_64, aarch64): short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid; l_pid must be 0 for OFD locks.
_FLOCK = "hhxxxxqqixxxx"


class OfdLockFile:
    """One open file description on which numbered one-byte locks are taken."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self._lock_req: dict[int, bytes] = {}
        self._unlock_req: dict[int, bytes] = {}

    def _reqs(self, index: int) -> tuple[bytes, bytes]:
        lock = self._lock_req.get(index)
        if lock is None:
            lock = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, index, 1, 0)
            self._lock_req[index] = lock
            self._unlock_req[index] = struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, index, 1, 0)
        return lock, self._unlock_req[index]

    def acquire(self, index: int) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLKW, self._reqs(index)[0])

    def release(self, index: int) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, self._reqs(index)[1])

    def lock(self, index: int) -> _Held:
        """``with locks.lock(i): ...``"""
        return _Held(self, index)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Held:
    __slots__ = ("_file", "_index")

    def __init__(self, file: OfdLockFile, index: int) -> None:
        self._file = file
        self._index = index

    def __enter__(self) -> None:
        self._file.acquire(self._index)

    def __exit__(self, *exc: object) -> None:
        self._file.release(self._index)
