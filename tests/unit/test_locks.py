"""File locks: a lock another process holds gives the caller's own error (what to do) after the timeout; the holder
may take it again in its thread."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from servekit.core.errors import ArchiveError, ServerError
from servekit.core.locks import file_lock
from servekit.store import catalog

HOLD = """import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_lock_held_by_another_process_raises_the_callers_error_and_is_reentrant_in_its_thread(tmp_path, monkeypatch):
    path = tmp_path / f".{catalog.CATALOG_FILE}.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ServerError, match="renew later"), file_lock(path, 0.2, ServerError("renew later")):
            pytest.fail("entered a lock another process holds")
        monkeypatch.setattr(catalog, "LOCK_TIMEOUT_S", 0.2)
        with pytest.raises(ArchiveError, match="wait for its build to finish"), catalog.catalog_lock(tmp_path):
            pytest.fail("entered the catalog's lock another process holds")
    finally:
        holder.kill()
        holder.wait()
    with file_lock(path, 5, ServerError("busy")), file_lock(path, 0.1, ServerError("not reentrant")):
        assert path.exists()


def test_a_held_lock_keeps_other_threads_of_the_process_out(tmp_path):
    path = tmp_path / ".probes.prom.lock"
    outcome = []

    def other_thread():
        try:
            with file_lock(path, 0.2, ServerError("busy")):
                outcome.append("entered")
        except ServerError as exc:
            outcome.append(str(exc))

    with file_lock(path, 5, ServerError("unexpected")):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert outcome == ["busy"]
    other_thread()
    assert outcome == ["busy", "entered"]
