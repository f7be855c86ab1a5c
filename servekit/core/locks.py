"""Locks on files, across threads and processes: the catalog, the probe file and a key renewal each take one around
their read-modify-write."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from filelock import FileLock

# One FileLock per lock file and process (keyed by pid too: a forked child may not use its parent's): reentrant in
# a thread, it excludes other threads and processes.
_locks: dict[tuple[int, Path], FileLock] = {}


@contextmanager
def file_lock(path: Path, timeout_s: float, error: Exception) -> Iterator[None]:
    """Holds the lock file `path`; raises `error` (what to do about it) when another holder kept it for timeout_s."""
    from filelock import FileLock, Timeout  # 55 ms: only writers need it, not every command's start

    key = (os.getpid(), path.resolve())
    lock = _locks.get(key) or _locks.setdefault(key, FileLock(key[1]))
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise error from None
    try:
        yield
    finally:
        lock.release()
