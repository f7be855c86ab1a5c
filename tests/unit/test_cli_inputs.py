"""Bad names and damaged state files through the CLI: one line, the right exit code, nothing written."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from servekit.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert len(lines) == 1, result.output
    return lines[0]


def test_build_refuses_a_version_with_a_trailing_newline_and_writes_nothing(tmp_path, trained_digits):
    store = tmp_path / "store"
    result = run("build", "digits", "--version", "1.0.7\n", "--from", str(trained_digits), "--store", str(store))
    assert result.exit_code == 2, result.output
    assert "semantic version" in one_line_error(result)
    assert not store.exists()


def test_optimize_refuses_a_name_that_leaves_the_store_and_writes_nothing(tmp_path, trained_digits, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model_store" / "work").mkdir(parents=True)
    shutil.copytree(trained_digits, tmp_path / "x")  # model_store/work/../../x is this folder
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = run("optimize", "../../x", "--variants", "eager", "--budget", "0.1")
    assert result.exit_code == 2, result.output
    assert "model name '../../x'" in one_line_error(result)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_truncated_catalog_gives_one_line_naming_the_file_and_the_fix(tmp_path, trained_digits):
    store = tmp_path / "store"
    args = ("build", "digits", "--version", "1.0.0", "--from", str(trained_digits), "--store", str(store))
    assert run(*args).exit_code == 0
    catalog = store / "catalog.json"
    catalog.write_bytes(catalog.read_bytes()[:200])
    for result in (run("models", "--store", "--store-dir", str(store)), run(*args[:3], "1.0.1", *args[4:])):
        assert result.exit_code == 1, result.output
        line = one_line_error(result)
        assert str(catalog) in line.replace("\n", "") and "servekit build NAME --version V --force" in line


def test_a_truncated_server_json_gives_one_line_naming_the_file_and_the_fix(tmp_path):
    state = {"pid": 1, "workdir": str(tmp_path), "inference_url": "http://127.0.0.1:9"}
    (tmp_path / "server.json").write_text(json.dumps(state)[:40])
    for args in (("models",), ("status",), ("predict", "digits", str(tmp_path / "server.json"))):
        result = run(*args, "--workdir", str(tmp_path))
        assert result.exit_code == 1, result.output
        line = one_line_error(result)
        assert str(tmp_path / "server.json") in line and "servekit serve stop --workdir" in line
