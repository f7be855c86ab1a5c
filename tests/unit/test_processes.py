"""Stopping process trees: a process has stopped once it exited, whether or not its parent has reaped it yet."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from servekit.core.processes import paused, stop_process_tree, wait_until_exited

# Starts a child, prints its PID and sleeps without ever reaping it: once the child exits it stays a zombie, as a
# stopped server's orphans do until an init that reaps late gets to them. With "wait", the child waits for its
# parent to go (its stdin closes), as TorchServe's workers end with their frontend.
PARENT = """import subprocess, sys, time
code = "import sys; sys.stdin.read()" if sys.argv[1] == "wait" else "pass"
child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
print(child.pid, flush=True)
time.sleep(60)
"""


def parent_and_child(mode: str) -> tuple[subprocess.Popen, psutil.Process]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    return parent, psutil.Process(int(parent.stdout.readline()))


def test_an_exited_process_its_parent_has_not_reaped_counts_as_exited():
    parent, child = parent_and_child("exit")
    try:
        assert wait_until_exited([child], 30) == []
        assert child.status() == psutil.STATUS_ZOMBIE  # its PID is still taken: waiting for it to go would hang
    finally:
        parent.kill()
        parent.wait()


def test_stop_process_tree_ends_a_running_process_and_its_children():
    parent, child = parent_and_child("wait")
    tree = psutil.Process(parent.pid)
    try:
        assert wait_until_exited([tree, child], 0) == [tree, child]  # running: neither counts as exited
        stop_process_tree(tree, 10)
        assert wait_until_exited([tree, child], 0) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_paused_stops_a_process_tree_for_the_block_and_continues_it_even_when_the_block_raises():
    parent, child = parent_and_child("wait")
    tree = psutil.Process(parent.pid)
    try:
        with pytest.raises(RuntimeError), paused([parent.pid, 2**22 + 1]):  # a PID that is not running is skipped
            assert {tree.status(), child.status()} == {psutil.STATUS_STOPPED}
            raise RuntimeError("the measurement failed")
        assert psutil.STATUS_STOPPED not in (tree.status(), child.status())
    finally:
        stop_process_tree(tree, 10)
