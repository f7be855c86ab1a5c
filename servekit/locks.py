"""Locks on files, across threads and processes: the catalog, the probe file and a key renewal each take one around
their read-modify-write."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from filelock import FileLock

# One FileLock per lock file and process: reentrant in a thread, it excludes other threads and processes.
_locks: dict[Path, FileLock] = {}


@contextmanager
def file_lock(path: Path, timeout_s: float, error: Exception) -> Iterator[None]:
    """Holds the lock file `path`; raises `error` (what to do about it) when another holder kept it for timeout_s."""
    from filelock import FileLock, Timeout  # 55 ms: only writers need it, not every command's start

    path = path.resolve()
    lock = _locks.setdefault(path, FileLock(path))
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise error from None
    try:
        yield
    finally:
        lock.release()
