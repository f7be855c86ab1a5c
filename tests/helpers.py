"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "matplotlib", "sklearn", "torchao")
PROBE = "\n".join(
    [
        "import json, sys",
        "from servekit.cli import cli",
        "try:",
        "    cli(sys.argv[1:], standalone_mode=False)",
        "except SystemExit:",
        "    pass",
        f"print('\\nHEAVY=' + json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))",
    ]
)


def heavy_modules_after(*args: str) -> list[str]:
    """Runs `servekit ARGS` in a fresh interpreter and returns the heavy packages it imported."""
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    marker = next(line for line in result.stdout.splitlines() if line.startswith("HEAVY="))
    return json.loads(marker.removeprefix("HEAVY="))
