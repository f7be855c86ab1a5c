"""Everyday commands start without torch: the heavy modules load only in the commands that need them, and `--help`
imports none of the libraries that are merely slow to import (requests, rich, yaml, ...)."""

from __future__ import annotations

import json

import pytest
from support.processes import heavy_modules_after, slow_modules_after

LIGHT_COMMANDS = ["serve", "register", "models", "predict", "status", "rollout", "rollback", "retire", "scale",
                  "export", "config", "evaluate", "probe"]  # fmt: skip


def test_help_imports_no_heavy_and_no_slow_module():
    assert heavy_modules_after("--help") == []
    assert slow_modules_after("--help") == []


@pytest.mark.parametrize("command", LIGHT_COMMANDS)
def test_light_commands_import_no_heavy_and_no_slow_module_for_help(command):
    assert heavy_modules_after(command, "--help") == []
    assert slow_modules_after(command, "--help") == []


def test_a_real_catalog_call_imports_no_heavy_and_no_slow_module(tmp_path):
    (tmp_path / "catalog.json").write_text(json.dumps({"schema": 1, "models": {}, "optimizations": {}}))
    as_json = ["models", "--store", "--store-dir", str(tmp_path), "--json"]
    assert heavy_modules_after(*as_json) == []
    assert slow_modules_after(*as_json) == []


def test_the_probe_sees_heavy_and_slow_imports_when_a_command_makes_them(tmp_path):
    """The checks above can fail: a training command's help is light, but running it imports torch; a table is
    printed with rich, which --json does without."""
    assert "torch" in heavy_modules_after("train", "digits", "--epochs", "1", "--out", str(tmp_path / "d"))
    (tmp_path / "catalog.json").write_text(json.dumps({"schema": 1, "models": {}, "optimizations": {}}))
    assert slow_modules_after("models", "--store", "--store-dir", str(tmp_path)) == ["rich"]
