"""Every config servekit writes limits TorchServe's `allowed_urls` to the model store's own archives (issue #29),
written so that java.util.Properties and Java's regex read it as meant. The server itself is tested in
tests/server/test_least_privilege.py; here the pattern is matched with Python's `re`, which reads the same syntax
(`(?-i:...)`, `(?!...)`, `\\xHH`) alike, with TorchServe's CASE_INSENSITIVE flag."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from servekit.build import torchserve_config as configs
from servekit.build.export import DOCKER_MODEL_STORE, KSERVE_MODEL_STORE, KServeSpec, export_docker, export_kserve
from servekit.core.errors import UsageError
from servekit.core.properties import property_line, read_properties, store_archives_only, write_properties
from servekit.serve import torchserve
from servekit.serve.client import Endpoints, ServeClient


def allows(pattern: str, url: str) -> bool:
    """Whether TorchServe would fetch `url`: it splits allowed_urls at commas and full-matches each part."""
    return any(re.fullmatch(part, url, re.IGNORECASE) for part in pattern.split(","))


def refused_urls(store: str) -> list[str]:
    return [
        "http://127.0.0.1:8082/metrics",
        "https://example.com/digits-1.0.0.mar",
        "file:///etc/passwd",
        f"file://{store}/../etc/passwd",
        f"file://{store}/../outside/digits-1.0.0.mar",
        f"file://{store}/..%2Foutside%2Fdigits-1.0.0.mar",
        f"file://{store}/work/digits-1.0.0.mar",  # a subfolder of the store
        f"file://{store}-evil/digits-1.0.0.mar",  # a folder whose name starts like the store's
        f"FILE://{store}/digits-1.0.0.mar",
        f"file://{store.upper()}/digits-1.0.0.mar",
        f"file://{store}/digits-1.0.0.mar.sh",
        f"file://{store}/digits-1.0.0-rc..1.mar",
        f"file://{store}/passwd",
    ]


@pytest.mark.parametrize("store", ["/srv/servekit/model_store", "/tmp/a b,c.(d)+[e]\\E$é😀/store"])
def test_the_pattern_allows_only_archive_file_urls_directly_in_the_store(store):
    pattern = store_archives_only(store)
    assert "," not in pattern  # TorchServe would cut it in two at a comma
    for url in [f"file://{store}/digits-1.0.0.mar", f"file://{store}/my_model-12.3.4-rc.1.mar"]:
        assert allows(pattern, url), url
    for url in refused_urls(store):
        assert not allows(pattern, url), url
    # A bare file name is no URL: TorchServe reads it from the store without consulting allowed_urls at all.
    assert not allows(pattern, "digits-1.0.0.mar")


def test_a_property_line_reads_back_as_java_reads_it(tmp_path):
    """java.util.Properties drops a lone backslash and reads Latin-1: `\\x2E` and `é` must be written escaped."""
    values = {"allowed_urls": store_archives_only("/tmp/é😀, x"), "model_snapshot": '{\n  "a"\\: "b\\c"\t}'}
    path = tmp_path / "config.properties"
    write_properties(values, path)
    assert path.read_text().isascii()
    assert property_line("k", "a\\.é😀") == "k=a\\\\.\\u00e9\\ud83d\\ude00"
    assert read_properties(path) == values


def test_servekit_config_anchors_the_restriction_to_its_store(tmp_path):
    store = tmp_path / "my store"
    plan = configs.make_plan("0", 1, ["digits"], model_store=store)
    properties = read_properties(configs.write(plan, tmp_path / "out")[0])
    assert properties["model_store"] == str(store.resolve())
    assert properties["allowed_urls"] == store_archives_only(str(store.resolve()))
    assert allows(properties["allowed_urls"], f"file://{store.resolve()}/digits-1.0.0.mar")
    assert not allows(properties["allowed_urls"], "file:///etc/passwd")


def test_the_kserve_and_docker_exports_anchor_it_to_their_runtimes_store(tmp_path, model_store):
    _, kserve_path, _ = export_kserve(model_store, KServeSpec("digits", "1.0.0", "pvc://models"), tmp_path / "k")
    _, docker_path, _ = export_docker(model_store, "digits", "1.0.0", tmp_path / "d")
    for path, store in [(kserve_path, KSERVE_MODEL_STORE), (docker_path, DOCKER_MODEL_STORE)]:
        properties = read_properties(path)
        assert properties["model_store"] == store and properties["enable_model_api"] == "false"
        assert properties["allowed_urls"] == store_archives_only(store)
        for url in refused_urls(store):
            assert not allows(properties["allowed_urls"], url), (path, url)
    assert f"COPY model-store {DOCKER_MODEL_STORE}\n" in (tmp_path / "d" / "Dockerfile").read_text()


def base_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "base.properties"
    path.write_text("inference_address=http://127.0.0.1:8080\nmodel_store=model_store\n" + extra)
    return path


def test_serve_start_restricts_even_a_base_config_that_allows_everything(tmp_path):
    settings = torchserve.ServerSettings(base_config(tmp_path, "allowed_urls=.*\n"), tmp_path / "store", tmp_path / "w")
    properties = torchserve.startup_properties(settings, tmp_path / "w")
    assert properties["allowed_urls"] == store_archives_only(str((tmp_path / "store").resolve()))


def test_resume_adds_the_restriction_to_a_snapshot_written_without_it(tmp_path):
    """A snapshot from before the restriction (TorchServe copies every setting into its snapshots) comes back
    with it; its models and every other setting come back unchanged."""
    workdir = tmp_path / "w"
    (workdir / "logs" / "config").mkdir(parents=True)
    snapshot = {"name": "x.cfg", "modelCount": 1, "models": {"digits": {"1.0.0": {"marName": "digits-1.0.0.mar"}}}}
    escaped = json.dumps(snapshot, indent=2).replace(":", "\\:").replace("\n", "\\n")
    (workdir / "logs" / "config" / "20260101000000000-shutdown.cfg").write_text(
        "#Saving snapshot\n"
        "inference_address=http\\://127.0.0.1\\:18080\n"
        f"model_store={tmp_path}/st\\u00f6re\n"
        f"model_snapshot={escaped}\n"
    )
    settings = torchserve.ServerSettings(base_config(tmp_path), tmp_path / "ignored", workdir, resume=True)
    properties = torchserve.startup_properties(settings, workdir)
    assert properties["inference_address"] == "http://127.0.0.1:18080"
    assert json.loads(properties["model_snapshot"]) == snapshot
    assert properties["allowed_urls"] == store_archives_only(f"{tmp_path}/störe")


@pytest.mark.parametrize("archive", ["http://127.0.0.1:8082/metrics", "file:///etc/passwd", "../x-1.0.0.mar", "/a.mar"])
def test_the_client_registers_file_names_only_and_says_so_before_calling(archive):
    client = ServeClient(Endpoints("http://127.0.0.1:9", "http://127.0.0.1:9", "http://127.0.0.1:9"))
    with pytest.raises(UsageError, match="archive file name"):
        client.register(archive)
