"""Building .mar archives, the catalog, and checksum verification."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import yaml

from servekit.build.archive import BuildOptions, build_archive
from servekit.core.errors import ArchiveError, UsageError
from servekit.store.catalog import Catalog, sha256_file, verify_archive, version_key
from servekit.store.heldout import read_held_out


def test_archive_holds_handler_model_weights_labels_and_config(model_store):
    archive = model_store / "digits-1.0.0.mar"
    with zipfile.ZipFile(archive) as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(mar.read("model-config.yaml"))
    shipped = {"digits.py", "servekit_worker/base.py", "servekit_worker/architectures.py", "model.pt", "labels.json"}
    assert shipped <= names
    assert "model-config.yaml" in names and not any("__pycache__" in name for name in names)
    assert manifest["model"]["modelVersion"] == "1.0.0" and manifest["model"]["handler"] == "digits.py"
    assert config["batchSize"] == 4 and config["handler"]["model_class"] == "SimpleCNN"


def test_catalog_records_checksum_size_and_source_metrics(model_store, trained_digits):
    entry = Catalog.load(model_store).get("digits", "1.0.0")
    archive = model_store / "digits-1.0.0.mar"
    assert entry.sha256 == sha256_file(archive) and entry.size_bytes == archive.stat().st_size
    assert entry.source_weights_sha256 == sha256_file(trained_digits / "model.pt")
    assert entry.metrics["held_out_accuracy"] >= 0.95
    assert verify_archive(model_store, "digits", "1.0.0") == entry


def test_existing_version_is_not_overwritten_without_force(tmp_path, trained_digits):
    first = build_archive("digits", "1.0.0", trained_digits, tmp_path, options=BuildOptions(batch_size=4))
    with pytest.raises(ArchiveError, match="already exists.*--force"):
        build_archive("digits", "1.0.0", trained_digits, tmp_path)
    replaced = build_archive(
        "digits", "1.0.0", trained_digits, tmp_path, options=BuildOptions(batch_size=2), force=True
    )
    assert replaced.config["batchSize"] == 2 and first.config["batchSize"] == 4
    assert Catalog.load(tmp_path).get("digits", "1.0.0").config["batchSize"] == 2
    # The lock file stays (removing it would race with a waiting build); staging folders and temp files do not.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".catalog.json.lock",
        "catalog.json",
        "digits-1.0.0.mar",
        "golden",
    ]


@pytest.mark.parametrize(
    ("name", "version", "message"),
    [("digits", "1.0", "semantic version"), ("digits", "v1.0.0", "semantic version"), ("9lives", "1.0.0", "letter")],
)
def test_bad_name_or_version_is_refused(tmp_path, trained_digits, name, version, message):
    with pytest.raises(UsageError, match=message):
        build_archive(name, version, trained_digits, tmp_path)
    assert not any(tmp_path.iterdir())


def test_bad_build_options_and_missing_weights_are_refused(tmp_path, trained_digits):
    with pytest.raises(UsageError, match="batch size"):
        build_archive("digits", "1.0.0", trained_digits, tmp_path, options=BuildOptions(batch_size=0))
    with pytest.raises(UsageError, match="train first"):
        build_archive("digits", "1.0.0", tmp_path / "nothing", tmp_path)
    with pytest.raises(UsageError, match="unknown handler"):
        build_archive("digits", "1.0.0", trained_digits, tmp_path, handler="audio")


@pytest.mark.parametrize("damage", ["append", "truncate", "delete"])
def test_tampered_truncated_or_missing_archive_fails_verification(tmp_path, model_store, damage):
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    archive = store / "digits-1.0.0.mar"
    if damage == "append":
        archive.write_bytes(archive.read_bytes() + b"x")
    elif damage == "truncate":
        archive.write_bytes(archive.read_bytes()[:1000])
    else:
        archive.unlink()
    with pytest.raises(ArchiveError, match="modified or truncated" if damage != "delete" else "missing"):
        verify_archive(store, "digits", "1.0.0")


def test_unknown_version_and_corrupt_catalog_give_clear_errors(tmp_path, model_store):
    with pytest.raises(ArchiveError, match="not in"):
        verify_archive(model_store, "digits", "2.0.0")
    (tmp_path / "catalog.json").write_text("{not json")
    with pytest.raises(ArchiveError, match="not a servekit catalog"):
        Catalog.load(tmp_path)


def test_lineage_parent_defaults_to_the_previous_version_and_golden_samples_are_kept(tmp_path, trained_digits):
    build_archive("digits", "1.0.0", trained_digits, tmp_path)
    build_archive("digits", "1.10.0", trained_digits, tmp_path)
    middle = build_archive("digits", "1.2.0", trained_digits, tmp_path)
    assert middle.parent_version == "1.0.0"
    assert Catalog.load(tmp_path).get("digits", "1.0.0").parent_version == ""
    assert middle.built_by and middle.metrics["weights_sha256"] == middle.source_weights_sha256
    golden = read_held_out(tmp_path / middle.golden_dir)
    assert len(golden) == 32 and all(sample.path.is_file() for sample in golden)
    with pytest.raises(UsageError, match="parent version digits 0.9.0"):
        build_archive("digits", "2.0.0", trained_digits, tmp_path, parent_version="0.9.0")


def test_semantic_versions_sort_numerically_with_prereleases_first():
    versions = ["1.10.0", "1.2.0", "1.2.0-rc.1", "0.9.9", "1.2.1"]
    assert sorted(versions, key=version_key) == ["0.9.9", "1.2.0-rc.1", "1.2.0", "1.2.1", "1.10.0"]
