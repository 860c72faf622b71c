"""Serialise appends across threads and processes: a thread lock plus ``flock``."""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["LOCK_TIMEOUT_S", "FlockLock", "LockTimeout"]

LOCK_TIMEOUT_S = 30.0
# First poll interval for a contended lock: an append holds it for microseconds.
_LOCK_POLL_S = 0.0005


class LockTimeout(Exception):
    pass


class FlockLock:
    """``flock`` on a sibling lock file, kept open for the process's life.

    The same lock filelock's UnixFileLock takes (so tools using it interoperate),
    without its per-acquire open/close and bookkeeping, which cost more than the
    append itself. Uncontended it is one system call; contended it polls briefly,
    since a holder keeps it for microseconds.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        delay = _LOCK_POLL_S
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout from None
                time.sleep(delay)
                delay = min(delay * 2, 0.01)

    def release(self) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also drops the lock, were it held
            self._fd = None
