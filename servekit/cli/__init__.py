"""The `servekit` command line: a thin layer over the library, one module per group of commands.

Each command parses and checks its arguments (click parameter types), makes one library call and prints. Start-up
stays light: the commands that talk to a server or the catalog never import torch; training, building, optimizing
and benchmarking import their heavy modules inside the command.
"""

from __future__ import annotations

import signal
import sys

from servekit.cli import delivering, deploying, making, measuring, packing, serving  # noqa: F401  (registers)
from servekit.cli.base import cli

__all__ = ["cli", "main"]


def main() -> None:
    # `kill` (SIGTERM) ends a command as Ctrl-C does: its cleanup runs, so a peer `bench` started (or paused) or a
    # trial `tune` registered is not left behind
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cli()
