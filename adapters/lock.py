"""The driver lock: one process at a time drives the executions of an embedded store."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class DriverLock:
    """An advisory file lock in FLOWLEDGER_HOME, naming the pid and role of its holder.

    Two processes driving the same execution would run its actions twice; the lock keeps
    one driver per store. A long-running `worker` holds it as role "worker": other
    commands then only write their command to the store and follow, and the worker
    picks it up.
    """

    def __init__(self, home: Path) -> None:
        self.path = home / "driver.lock"
        self._fd: int | None = None

    def acquire(self, role: str) -> bool:
        """Take the lock without blocking; False if another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {role}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> tuple[int, str] | None:
        """The (pid, role) written by the holder, if readable."""
        try:
            pid, role = self.path.read_text().split()
            return int(pid), role
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Give the lock up."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
