"""Stopping a process we started and everything it spawned, by PID (TorchServe's frontend, nginx's master), and
pausing one for a while (a peer bench started, while the other side is measured)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

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


@contextlib.contextmanager
def paused(pids: list[int]) -> Iterator[None]:
    """Stops (SIGSTOP) each process and its children for the block and continues them after it, even when the block
    raises: an idle server that polls its queues (LitServe's workers: ~0.25 of a core here) then takes nothing
    from the one being measured. Processes gone meanwhile are skipped."""
    processes = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            processes += [root, *root.children(recursive=True)]
    stopped = []
    try:
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.suspend()
                stopped.append(process)
        deadline = time.monotonic() + 1.0  # the signal is delivered when each is next scheduled
        while time.monotonic() < deadline and not all(is_stopped(process) for process in stopped):
            time.sleep(0.005)
        yield
    finally:
        for process in reversed(stopped):
            with contextlib.suppress(psutil.Error):
                process.resume()


def is_stopped(process: psutil.Process) -> bool:
    """Stopped by a signal, or gone."""
    try:
        return process.status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True
