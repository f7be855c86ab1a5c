"""Trained models for the tests, cached across runs under pytest's cache folder and keyed by a hash of the training
code (servekit.build.train and every servekit module it imports, transitively) and of the call's arguments: a change to
any of them trains again, and a fresh clone trains once."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from support import REPO

PACKAGES = ("servekit", "servekit_worker")


def module_file(name: str) -> Path | None:
    """The source file of a first-party module name (None for third-party ones)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def training_sources(module: str = "servekit.build.train") -> list[Path]:
    """`module`'s file and the first-party files it imports, followed through their own imports."""
    seen: dict[Path, None] = {}
    pending = [module]
    while pending:
        path = module_file(pending.pop())
        if path is None or path in seen:
            continue
        seen[path] = None
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                pending.append(node.module)
                pending.extend(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                pending.extend(alias.name for alias in node.names)
    return sorted(seen)


def training_key(train: Callable, kwargs: dict) -> str:
    import torch

    digest = hashlib.sha256()
    for path in training_sources():
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    call = {"function": train.__name__, "kwargs": kwargs, "torch": torch.__version__}
    digest.update(json.dumps(call, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def trained(cache: pytest.Cache, out: Path, train: Callable, **kwargs) -> Path:
    """`train(out, **kwargs)`'s folder at `out`: copied from the cache when the same code and arguments trained it
    before, else trained now and cached."""
    cached = cache.mkdir("servekit-trained") / f"{train.__name__}-{training_key(train, kwargs)}"
    if not cached.is_dir():
        partial = cached.with_name(cached.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        train(partial, **kwargs)
        try:
            partial.rename(cached)
        except OSError:  # another run cached the same training first
            shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(cached, out)
    return out
