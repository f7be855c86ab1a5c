"""The CLI's contract: one clear line and exit code 2 for bad usage, 1 for failures, tables or JSON otherwise."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from servekit.cli import cli
from servekit.cli.base import SECONDS, SECONDS_OR_ZERO
from servekit.core.errors import ServerError
from servekit.serve import torchserve


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_build_with_a_bad_version_exits_2_with_one_line(tmp_path, trained_digits):
    result = run("build", "digits", "--version", "1.0", "--from", str(trained_digits), "--store", str(tmp_path))
    assert result.exit_code == 2
    assert "semantic version" in result.output and "Traceback" not in result.output


def test_build_then_models_store_lists_the_archive(tmp_path, trained_digits):
    result = run("build", "digits", "--version", "2.1.0", "--from", str(trained_digits), "--store", str(tmp_path))
    assert result.exit_code == 0, result.output
    listing = run("models", "--store", "--store-dir", str(tmp_path), "--json")
    rows = json.loads(listing.output)
    assert [(r["name"], r["version"], r["archive"]) for r in rows] == [("digits", "2.1.0", "digits-2.1.0.mar")]


def test_build_refuses_an_existing_version_with_exit_1(tmp_path, trained_digits):
    args = ("build", "digits", "--version", "1.0.0", "--from", str(trained_digits), "--store", str(tmp_path))
    assert run(*args).exit_code == 0
    again = run(*args)
    assert again.exit_code == 1 and "--force" in again.output


def test_commands_without_a_running_server_say_how_to_start_one(tmp_path):
    result = run("models", "--workdir", str(tmp_path))
    assert result.exit_code == 1 and "servekit serve start" in result.output


def test_missing_or_old_java_is_reported_with_the_fix(monkeypatch):
    monkeypatch.setattr(torchserve.shutil, "which", lambda name: None)
    with pytest.raises(ServerError, match="Java not found.*Java 11"):
        torchserve.require_java()
    monkeypatch.setattr(torchserve, "java_major_version", lambda: 8)
    with pytest.raises(ServerError, match="Java 8 found, TorchServe needs Java 11"):
        torchserve.require_java()


def test_java_version_strings_are_parsed(monkeypatch):
    class Result:
        stderr = 'openjdk version "1.8.0_392"'

    monkeypatch.setattr(torchserve.subprocess, "run", lambda *a, **k: Result())
    monkeypatch.setattr(torchserve.shutil, "which", lambda name: "/usr/bin/java")
    assert torchserve.java_major_version() == 8
    Result.stderr = 'openjdk version "17.0.15" 2025-04-15'
    assert torchserve.java_major_version() == 17


def test_durations_are_seconds_and_a_warm_up_may_be_zero():
    assert SECONDS.convert("20s", None, None) == 20.0 and SECONDS.convert("0.5", None, None) == 0.5
    assert SECONDS_OR_ZERO.convert("0", None, None) == 0.0 and SECONDS_OR_ZERO.convert("3s", None, None) == 3.0
    for option, text, message in (
        ("--duration", "0s", "must be positive"),
        ("--warmup", "-1s", "must be 0 or more"),
        ("--warmup", "nan", "must be 0 or more"),
        ("--duration", "ten", "is not seconds like 20 or 20s"),
    ):
        result = run("bench", "digits", option, text, "--workdir", "/nonexistent")  # refused before any server
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
        assert message in result.output


def test_tables_and_lines_piped_into_a_file_are_printed_whole(model_store):
    """Piped (no terminal, no COLUMNS), a table is as wide as its cells, where rich would cut it to 80 columns."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    environment = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    command = [str(Path(sys.executable).with_name("servekit")), "models", "--store", "--store-dir", str(model_store)]
    listing = subprocess.run(command, capture_output=True, text=True, env=environment, check=True).stdout
    [row] = [line for line in listing.splitlines() if "digits-1.0.0.mar" in line]
    assert "…" not in listing and len(row) > 80
    created = json.loads(run("models", "--store", "--store-dir", str(model_store), "--json").output)[0]["created"]
    assert created in row


def test_sigterm_ends_a_command_as_ctrl_c_does_running_its_cleanup():
    import signal
    import subprocess
    import sys

    program = """import sys, time
from servekit.cli import base, main

@base.cli.command("hold")
def hold():
    try:
        print("holding", flush=True)
        time.sleep(60)
    finally:
        print("cleaned up", flush=True)

sys.argv = ["servekit", "hold"]
main()
"""
    process = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "holding\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 128 + signal.SIGTERM
        assert process.stdout.read() == "cleaned up\n"
    finally:
        process.kill()
        process.wait()
