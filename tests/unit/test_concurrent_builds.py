"""Builds started together into one store: each stages alone, the catalog's lock keeps every entry."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from servekit.store.catalog import Catalog, sha256_file

SERVEKIT = Path(sys.executable).with_name("servekit")


def build_in_process(store: Path, source: Path, version: str) -> subprocess.CompletedProcess:
    """`servekit build digits --version VERSION` in its own process (its own interpreter, as users run it)."""
    command = [str(SERVEKIT), "build", "digits", "--version", version, "--from", str(source), "--store", str(store)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def run_together(store: Path, source: Path, versions: list[str]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(len(versions)) as pool:
        return list(pool.map(lambda v: build_in_process(store, source, v), versions))


def test_concurrent_builds_of_different_versions_all_succeed_and_are_all_cataloged(tmp_path, trained_digits):
    store = tmp_path / "store"
    versions = [f"3.0.{n}" for n in range(4)]
    results = run_together(store, trained_digits, versions)
    assert [r.returncode for r in results] == [0] * len(versions), [r.stderr[-500:] for r in results]
    catalog = Catalog.load(store)
    assert sorted(catalog.models["digits"]) == versions
    for version in versions:
        entry = catalog.get("digits", version)
        assert entry.sha256 == sha256_file(store / entry.archive)
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == sorted(
        ["catalog.json", "golden", *(f"digits-{v}.mar" for v in versions)]
    )
    assert not [p for p in store.iterdir() if p.name.startswith(".servekit-build") or p.suffix == ".tmp"]


def test_of_two_concurrent_builds_of_one_version_exactly_one_succeeds(tmp_path, trained_digits):
    store = tmp_path / "store"
    results = run_together(store, trained_digits, ["4.0.0", "4.0.0"])
    assert sorted(r.returncode for r in results) == [0, 1], [r.stderr[-500:] for r in results]
    loser = next(r for r in results if r.returncode == 1)
    assert "already exists" in loser.stderr and "Traceback" not in loser.stderr
    entry = Catalog.load(store).get("digits", "4.0.0")
    assert entry.sha256 == sha256_file(store / "digits-4.0.0.mar")
