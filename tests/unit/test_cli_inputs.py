"""Bad names and damaged state files through the CLI: one line, the right exit code, nothing written."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from servekit.cli import cli
from servekit.serve.torchserve import free_port


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


def test_a_file_where_a_folder_belongs_is_one_line_not_a_traceback(tmp_path, trained_digits):
    in_the_way = tmp_path / "store"
    in_the_way.write_text("not a folder")
    result = run("build", "digits", "--version", "1.0.0", "--from", str(trained_digits), "--store", str(in_the_way))
    assert result.exit_code == 1, result.output
    assert f"{in_the_way}: File exists (a file stands where a folder is needed" in one_line_error(result)
    assert in_the_way.read_text() == "not a folder"


def test_markup_in_a_path_or_version_is_printed_as_typed(tmp_path):
    """Errors go through rich: "[/]" in a value once raised rich's MarkupError, "[red]" vanished from paths."""
    missing = tmp_path / "[red]store"
    result = run("serve", "start", "--store", str(missing), "--workdir", str(tmp_path / "ts"), "--no-proxy")
    assert result.exit_code == 2, result.output
    assert f"model store {missing} is not a folder" in one_line_error(result)
    bad = run("config", "--gpus", "0", "--models", "a[/]", "--out", str(tmp_path / "out"))
    assert bad.exit_code == 2 and "model name 'a[/]'" in one_line_error(bad)


def test_config_refuses_a_model_name_that_would_leave_the_out_folder(tmp_path):
    result = run("config", "--gpus", "0", "--models", "digits,../../escaped", "--out", str(tmp_path / "out" / "sub"))
    assert result.exit_code == 2, result.output
    assert "model name '../../escaped'" in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_predict_refuses_a_malformed_url_and_a_key_file_without_keys(tmp_path, good_png):
    body = tmp_path / "seven.png"
    body.write_bytes(good_png)
    keys = tmp_path / "key_file.json"
    keys.write_text("{}")
    for url in ("127.0.0.1:8080", "notaurl", "http://127.0.0.1:99999", "ftp://127.0.0.1/", "http://[::1"):
        result = run("predict", "digits", str(body), "--url", url, "--key-file", str(keys))
        assert result.exit_code == 2, result.output
        assert f"--url {url!r} is not an inference address" in one_line_error(result)
    port = str(free_port())
    result = run("predict", "digits", str(body), "--url", f"http://127.0.0.1:{port}", "--key-file", str(keys))
    assert result.exit_code == 1, result.output
    assert "is not a TorchServe key file (no inference, management, API key)" in one_line_error(result)


def test_flags_that_would_be_ignored_are_refused_before_any_server_call(tmp_path):
    """No server runs in tmp_path: each refusal comes before the command looks for one."""
    workdir = str(tmp_path / "ts")
    export = ("export", "kserve", "digits", "--from-split", "--storage-uri", "gs://b/d", "--workdir", workdir)
    for extra in (("--version", "1.0.0"), ("--canary-traffic-percent", "10")):
        result = run(*export, *extra)
        assert result.exit_code == 2, result.output
        assert "--from-split takes the version and canary share from the split" in one_line_error(result)
    result = run("split", "digits", "1.0.0=100", "--clear", "--workdir", workdir)
    assert result.exit_code == 2, result.output
    assert "give either --clear or VERSION=PERCENT shares" in one_line_error(result)


def test_build_refuses_a_handler_whose_inputs_the_model_does_not_take(tmp_path, trained_digits):
    """The image handler feeds 3-channel images: on the digits model every request answered 500 (a reviewer's
    find). The tensor handler feeds any model its own example shape."""
    store = tmp_path / "store"
    args = ("build", "digits", "--version", "1.2.0", "--from", str(trained_digits), "--store", str(store))
    for handler in ("image", "text"):
        result = run(*args, "--handler", handler)
        assert result.exit_code == 2, result.output
        line = one_line_error(result)
        assert f"the {handler} handler feeds its model" in line and "takes 1x28x28 float32" in line, line
        assert "build it with --handler digits or tensor" in line
    assert not store.exists()
    assert run(*args, "--handler", "tensor").exit_code == 0


def test_listing_a_store_that_is_not_there_says_so(tmp_path):
    result = run("models", "--store", "--store-dir", str(tmp_path / "nowhere"))
    assert result.exit_code == 2, result.output
    assert "is not a model store folder" in one_line_error(result)
