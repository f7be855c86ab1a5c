"""Everyday commands start without torch: the heavy modules load only in the commands that need them."""

from __future__ import annotations

import json

import pytest
from helpers import heavy_modules_after

LIGHT_COMMANDS = ["serve", "register", "models", "predict", "status", "rollout", "rollback", "retire", "scale",
                  "export", "config", "evaluate"]  # fmt: skip


def test_help_imports_no_heavy_module():
    assert heavy_modules_after("--help") == []


@pytest.mark.parametrize("command", LIGHT_COMMANDS)
def test_light_commands_import_no_heavy_module_for_help(command):
    assert heavy_modules_after(command, "--help") == []


def test_a_real_catalog_call_imports_no_heavy_module(tmp_path):
    (tmp_path / "catalog.json").write_text(json.dumps({"schema": 1, "models": {}, "optimizations": {}}))
    assert heavy_modules_after("models", "--store", "--store-dir", str(tmp_path), "--json") == []


def test_the_probe_sees_heavy_imports_when_a_command_makes_them(tmp_path):
    """The check above can fail: a training command's help is light, but running it imports torch."""
    assert "torch" in heavy_modules_after("train", "digits", "--epochs", "1", "--out", str(tmp_path / "d"))
