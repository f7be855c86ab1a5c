"""Names and versions are checked with a full match, in one place, before anything touches disk or the server."""

from __future__ import annotations

import pytest

from servekit.build import optimize as optimizer
from servekit.build.archive import build_archive
from servekit.core.errors import UsageError
from servekit.core.names import check_name, check_segment, check_version
from servekit.serve.client import Endpoints, ServeClient
from servekit.store.catalog import Catalog, CatalogEntry, verify_archive

BAD_NAMES = [
    "digits\n",
    "../../x",
    "a/b",
    "..",
    "dig its",
    "digits\t",
    "dig\x00its",
    "9lives",
    "",
    "x" * 65,
    "tokens",
    "tokenizer",
]
BAD_VERSIONS = ["1.0.7\n", "1.0", "v1.0.0", "1.0.0/../..", "1.0.0 ", " 1.0.0", "1.0.0-rc\x07", "1.0.0-..", "01.0.0"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(name):
    with pytest.raises(UsageError, match="model name"):
        check_name(name)


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_bad_versions_are_refused(version):
    with pytest.raises(UsageError, match="semantic version"):
        check_version(version)


@pytest.mark.parametrize("version", ["1.0.0", "0.0.0-tune.3", "1.2.0-rc.1", "10.20.30"])
def test_semantic_versions_pass(version):
    assert check_version(version) == version and check_name("digits_v2-fast") == "digits_v2-fast"


@pytest.mark.parametrize("segment", ["a/b", "..", "x\n", "has space", "%2e%2e", "", "1.0/.."])
def test_url_segments_refuse_separators_dots_and_control_characters(segment):
    with pytest.raises(UsageError, match="no '/'"):
        check_segment(segment)


def test_url_segments_accept_models_servekit_did_not_build():
    assert check_segment("resnet-18.v2") == "resnet-18.v2" and check_segment("1.0", "version") == "1.0"


def test_client_refuses_a_bad_name_before_sending_anything():
    # Nothing listens on port 9 (discard): a request sent would be a ServerError, not a UsageError.
    client = ServeClient(Endpoints("http://127.0.0.1:9", "http://127.0.0.1:9", "http://127.0.0.1:9"), timeout_s=1)
    for call in (
        lambda: client.predict("../models", b"x"),
        lambda: client.predict("digits", b"x", version="1.0.0/../../models"),
        lambda: client.describe("digits\n"),
        lambda: client.set_default("digits", "1.0.0 "),
        lambda: client.unregister("digits", ".."),
        lambda: client.scale("a/b", "1.0.0", 1, 1),
    ):
        with pytest.raises(UsageError):
            call()


@pytest.mark.parametrize(("name", "version"), [("digits", "1.0.7\n"), ("../../x", "1.0.0"), ("digits\n", "1.0.0")])
def test_library_entry_points_refuse_before_touching_disk(tmp_path, name, version):
    store = tmp_path / "store"
    with pytest.raises(UsageError):
        build_archive(name, version, tmp_path / "trained", store)
    with pytest.raises(UsageError):
        verify_archive(store, name, version)
    with pytest.raises(UsageError):
        optimizer.optimize(optimizer.OptimizePlan(name, tmp_path / "trained", tmp_path / "out"))
    with pytest.raises(UsageError):
        Catalog(store / "catalog.json").variant_dir(name, "best")
    entry = CatalogEntry(name, version, f"{name}-{version}.mar", "0" * 64, 1, "now", "digits")
    with pytest.raises(UsageError):
        Catalog(store / "catalog.json").add(entry)
    assert not any(tmp_path.iterdir())
