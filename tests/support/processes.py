"""Subprocesses and signals: what a CLI call imports, Ctrl-C from a timer, what a run left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from servekit.core.processes import stop_process_tree

HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "matplotlib", "sklearn", "torchao")


# Not heavy, but each costs 25-200 ms of start-up that `--help` and the everyday calls must not pay (issue 17).
SLOW_TO_IMPORT = ("requests", "urllib3", "rich", "yaml", "filelock", "prometheus_client", "psutil")


PROBE = "\n".join(
    [
        "import json, sys",
        "from servekit.cli import cli",
        "try:",
        "    cli(sys.argv[1:], standalone_mode=False)",
        "except SystemExit:",
        "    pass",
        # a module servekit.core.lazy deferred sits in sys.modules as a _LazyModule until its first use
        "loaded = {m.split('.')[0] for m, module in list(sys.modules.items())",
        "          if type(module).__name__ != '_LazyModule'}",
        f"print('\\nIMPORTED=' + json.dumps(sorted(loaded & set({HEAVY + SLOW_TO_IMPORT!r}))))",
    ]
)


def modules_after(*args: str) -> set[str]:
    """Runs `servekit ARGS` in a fresh interpreter and returns which of HEAVY and SLOW_TO_IMPORT it imported."""
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    marker = next(line for line in result.stdout.splitlines() if line.startswith("IMPORTED="))
    return set(json.loads(marker.removeprefix("IMPORTED=")))


def heavy_modules_after(*args: str) -> list[str]:
    """The heavy packages (torch and what pulls it in) `servekit ARGS` imported."""
    return sorted(modules_after(*args) & set(HEAVY))


def slow_modules_after(*args: str) -> list[str]:
    """The packages that are slow to import which `servekit ARGS` imported."""
    return sorted(modules_after(*args) & set(SLOW_TO_IMPORT))


def ctrl_c_after(seconds: float) -> threading.Timer:
    """SIGINT to this process's main thread (where the CLI runs) after `seconds`, as a terminal's Ctrl-C sends it."""
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    return timer


def processes_in(folder: Path) -> list[psutil.Process]:
    """Processes (not this one) running from `folder` or naming it on their command line: a TorchServe frontend
    and its workers run from their workdir, an nginx master names its config."""
    folder_name = str(folder.resolve())
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if process.info["pid"] == os.getpid():
            continue
        cwd, cmdline = process.info["cwd"] or "", " ".join(process.info["cmdline"] or [])
        if cwd == folder_name or cwd.startswith(folder_name + os.sep) or folder_name in cmdline:
            found.append(process)
    return found


def stop_leftovers(folder: Path) -> list[str]:
    """Stops every process `processes_in(folder)` finds (whole trees, by PID) and returns their command lines."""
    leftovers = processes_in(folder)
    described = []
    for process in leftovers:
        try:
            described.append(f"{process.pid} {' '.join(process.cmdline())[:160]}")
            stop_process_tree(process, 10)
        except psutil.NoSuchProcess:  # a child of one stopped before it
            pass
    return described
