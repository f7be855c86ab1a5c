"""`model_store/catalog.json`: what was built, from what, with which checksum."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from servekit.core.errors import ArchiveError, UsageError
from servekit.core.locks import file_lock
from servekit.core.names import check_name, check_name_version

CATALOG_FILE = "catalog.json"
SCHEMA_VERSION = 1
LOCK_TIMEOUT_S = 300.0


def version_key(version: str) -> tuple:
    """Semantic-version order: 1.2.0-rc.1 < 1.2.0 < 1.10.0."""
    core, _, prerelease = version.partition("-")
    numbers = tuple(int(part) for part in core.split("."))
    return (*numbers, 0 if prerelease else 1, prerelease)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class CatalogEntry:
    name: str
    version: str
    archive: str
    sha256: str
    size_bytes: int
    created: str
    handler: str
    model_format: str = "state_dict"
    parent_version: str = ""
    built_by: str = ""
    golden_dir: str = ""
    source_dir: str = ""
    source_weights_sha256: str = ""
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    servekit_version: str = ""
    requirements: list = field(default_factory=list)  # pip requirements of the model's code (servekit import)


@dataclass
class Catalog:
    """All archives of one model store, keyed by model name then version."""

    path: Path
    models: dict[str, dict[str, CatalogEntry]] = field(default_factory=dict)
    optimizations: dict[str, dict] = field(default_factory=dict)  # name -> best variant, report, variant folders

    @classmethod
    def load(cls, store: Path) -> Catalog:
        path = store / CATALOG_FILE
        if not path.exists():
            return cls(path)
        try:
            document = json.loads(path.read_text())
            models = {
                name: {version: CatalogEntry(**entry) for version, entry in versions.items()}
                for name, versions in document["models"].items()
            }
            optimizations = dict(document.get("optimizations", {}))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ArchiveError(
                f"{path} is truncated or not a servekit catalog ({exc}): restore it from a backup, or move it aside "
                "and rebuild each archive with `servekit build NAME --version V --force`"
            ) from None
        return cls(path, models, optimizations)

    @classmethod
    @contextmanager
    def locked(cls, store: Path) -> Iterator[Catalog]:
        """Loads the catalog under its lock and saves it when the block ends without an exception.

        Concurrent builds each read, change and write the catalog inside this block, so none loses another's entry.
        """
        with catalog_lock(store):
            catalog = cls.load(store)
            yield catalog
            catalog.save()

    def get(self, name: str, version: str) -> CatalogEntry | None:
        return self.models.get(name, {}).get(version)

    def entries(self) -> list[CatalogEntry]:
        return [entry for versions in self.models.values() for entry in versions.values()]

    def latest_before(self, name: str, version: str) -> str:
        """The highest cataloged version of `name` below `version` ('' if none): the default lineage parent."""
        older = [v for v in self.models.get(name, {}) if version_key(v) < version_key(version)]
        return max(older, key=version_key, default="")

    def variant_dir(self, name: str, variant: str) -> Path:
        """The folder of an optimized variant recorded by `servekit optimize --pick` (`best` = the fastest accepted)."""
        check_name(name)
        record = self.optimizations.get(name)
        if record is None:
            raise UsageError(
                f"no optimization of {name} is recorded in {self.path}: run servekit optimize {name} --pick fastest"
            )
        chosen = record["best"] if variant == "best" else variant
        if chosen not in record["variants"]:
            raise UsageError(
                f"variant {variant!r} of {name} is not an accepted variant; have: {', '.join(record['variants'])}"
            )
        return Path(record["variants"][chosen])

    def add(self, entry: CatalogEntry, replace: bool = False) -> None:
        check_name_version(entry.name, entry.version)
        versions = self.models.setdefault(entry.name, {})
        if entry.version in versions and not replace:
            raise ArchiveError(f"{entry.name} {entry.version} is already in {self.path}: pass --force to replace it")
        versions[entry.version] = entry

    def save(self) -> None:
        """Writes atomically under the catalog's lock (a unique temp file, fsync, rename): a crash or a concurrent
        writer never leaves half a catalog."""
        document = {
            "schema": SCHEMA_VERSION,
            "models": {
                name: {version: asdict(entry) for version, entry in sorted(versions.items())}
                for name, versions in sorted(self.models.items())
            },
            "optimizations": self.optimizations,
        }
        with catalog_lock(self.path.parent):
            write_atomically(self.path, json.dumps(document, indent=2) + "\n")


def catalog_lock(store: Path) -> AbstractContextManager[None]:
    """Holds the lock (a file beside catalog.json) that every reader-modifier-writer of the catalog takes."""
    store.mkdir(parents=True, exist_ok=True)
    path = (store / f".{CATALOG_FILE}.lock").resolve()
    why = f"another servekit held {path} for {LOCK_TIMEOUT_S:.0f} s: wait for its build to finish, then retry"
    return file_lock(path, LOCK_TIMEOUT_S, ArchiveError(why))


def write_atomically(path: Path, text: str) -> None:
    """Writes a unique temp file beside `path`, fsyncs it, renames it over `path`, and fsyncs the folder."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o644)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_archive(store: Path, name: str, version: str) -> CatalogEntry:
    """The catalog entry of NAME VERSION, after checking the archive on disk still has its recorded sha256."""
    check_name_version(name, version)
    entry = Catalog.load(store).get(name, version)
    if entry is None:
        raise ArchiveError(f"{name} {version} is not in {store / 'catalog.json'}: build it with servekit build")
    archive_path = store / entry.archive
    if not archive_path.is_file():
        raise ArchiveError(f"{archive_path} is missing: rebuild it with servekit build {name} --version {version}")
    actual = sha256_file(archive_path)
    if actual != entry.sha256:
        raise ArchiveError(
            f"{archive_path.name} has sha256 {actual[:12]}..., the catalog recorded {entry.sha256[:12]}...: "
            "the archive was modified or truncated; rebuild it with --force"
        )
    return entry
