"""servekit's layers (pyproject.toml [tool.importlinter]) hold, and the contract fails on an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, env=environment, capture_output=True, text=True)


def test_every_layer_imports_only_the_layers_below_it():
    checked = lint_imports(REPO)
    assert checked.returncode == 0, checked.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in checked.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    for package in ("servekit", "servekit_worker"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with (tmp_path / "servekit" / "store" / "heldout.py").open("a") as module:
        module.write("\nfrom servekit.deliver import rollout  # the store reaching up to delivery\n")
    with (tmp_path / "servekit_worker" / "answers.py").open("a") as module:
        module.write("\nimport servekit.core.errors  # the worker importing the library it ships without\n")
    checked = lint_imports(tmp_path)
    assert checked.returncode == 1, checked.stdout[-3000:]
    assert "servekit.store is not allowed to import servekit.deliver" in checked.stdout
    assert "servekit.store.heldout -> servekit.deliver.rollout" in checked.stdout
    assert "servekit_worker.answers -> servekit.core.errors" in checked.stdout
