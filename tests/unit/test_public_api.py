"""The library's entry points, importable from `servekit` itself, each the object its module defines; importing
the package loads none of them (nor torch) until one is used."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import servekit


@pytest.mark.parametrize("name", sorted(servekit.PUBLIC))
def test_each_public_name_is_its_modules_own_object(name):
    assert getattr(servekit, name) is getattr(importlib.import_module(servekit.PUBLIC[name]), name)
    assert name in servekit.__all__


def test_importing_the_package_loads_no_entry_point_and_no_torch():
    probe = "import sys, servekit; print(sorted(m for m in sys.modules if m.startswith(('servekit.', 'torch'))))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        servekit.nope  # noqa: B018
