"""Stopping a process we started and everything it spawned, by PID (TorchServe's frontend, nginx's master)."""

from __future__ import annotations

from servekit.lazy import lazy_module

psutil = lazy_module("psutil")  # 25 ms, for commands that look at processes


def stop_process_tree(process: psutil.Process, timeout_s: float) -> None:
    """Terminates a process, then kills it and its children if they outlive `timeout_s` (children 10 s more)."""
    workers = process.children(recursive=True)
    process.terminate()
    try:
        process.wait(timeout_s)
    except psutil.TimeoutExpired:
        process.kill()
        process.wait(10)
    _, alive = psutil.wait_procs(workers, timeout=10)
    for worker in alive:
        worker.kill()
    psutil.wait_procs(alive, timeout=5)
