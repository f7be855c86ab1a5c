"""Stopping a process we started and everything it spawned, by PID (TorchServe's frontend, nginx's master)."""

from __future__ import annotations

import contextlib
import time

from servekit.core.lazy import lazy_module

psutil = lazy_module("psutil")  # 25 ms, for commands that look at processes


def has_exited(process: psutil.Process) -> bool:
    """True once the process has ended: gone, or a zombie its parent has not reaped yet. A stopped server's
    processes are orphans whose new parent, init, may reap them seconds later (a container's PID 1 may never);
    waiting for that would only wait for the PID. A zombie child of ours is reaped here."""
    try:
        if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return True
    with contextlib.suppress(psutil.Error, ChildProcessError):
        process.wait(0)
    return True


def wait_until_exited(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Waits up to `timeout_s` until every process has exited (see has_exited); returns those still running."""
    deadline = time.monotonic() + timeout_s
    running = list(processes)
    while True:
        running = [process for process in running if not has_exited(process)]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.02)


def stop_process_tree(process: psutil.Process, timeout_s: float) -> None:
    """Terminates a process, then kills it and its children if they outlive `timeout_s` (children 10 s more)."""
    workers = process.children(recursive=True)
    process.terminate()
    if wait_until_exited([process], timeout_s):
        process.kill()
        if wait_until_exited([process], 10):
            raise psutil.TimeoutExpired(10, process.pid)
    for worker in wait_until_exited(workers, 10):
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    wait_until_exited(workers, 5)
