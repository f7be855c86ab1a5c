"""What a running TorchServe has, and every change servekit makes to it: register (sha256 verified first),
versions with their default and workers, set-default with a history for rollback, scale and retire.

The defaults servekit has seen are kept per server in `WORKDIR/defaults.json`, oldest first per model:
every default in place when servekit registers, rolls out or rolls back is recorded, so the first rollback
after the first rollout has somewhere to go.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from servekit.core.errors import ApiError, ServekitError, UsageError
from servekit.core.requirements import check_serving_environment
from servekit.serve.client import ServeClient
from servekit.store.catalog import CatalogEntry, verify_archive, version_key

if TYPE_CHECKING:
    from servekit.serve.handle import Server

HISTORY_FILE = "defaults.json"
READY_POLL_START_S = 0.02
READY_POLL_MAX_S = 0.25


@dataclass
class VersionInfo:
    """One registered version as TorchServe describes it."""

    name: str
    version: str
    default: bool
    batch_size: int
    max_batch_delay_ms: int
    min_workers: int
    max_workers: int
    archive: str
    workers: list[dict] = field(default_factory=list)  # TorchServe's worker records: id, pid, status, memoryUsage

    @property
    def ready_workers(self) -> int:
        return sum(worker.get("status") == "READY" for worker in self.workers)

    @property
    def on_gpu(self) -> bool:
        """Whether TorchServe placed this version's workers on GPUs (its worker records carry `gpu`)."""
        return any(worker.get("gpu") for worker in self.workers)

    @classmethod
    def of(cls, description: dict, default_url: str | None) -> VersionInfo:
        return cls(
            name=description["modelName"],
            version=description["modelVersion"],
            default=description["modelUrl"] == default_url,
            batch_size=int(description.get("batchSize") or 1),
            max_batch_delay_ms=int(description.get("maxBatchDelay") or 0),
            min_workers=int(description.get("minWorkers") or 0),
            max_workers=int(description.get("maxWorkers") or 0),
            archive=description["modelUrl"],
            workers=description.get("workers", []),
        )


def default_urls(client: ServeClient) -> dict[str, str]:
    """Model name -> the archive TorchServe answers /predictions/NAME with."""
    return {model["modelName"]: model["modelUrl"] for model in client.list_models()}


def versions(client: ServeClient, name: str, default_url: str | None = None) -> list[VersionInfo]:
    """Every registered version of NAME in semantic-version order ([] if NAME is not registered)."""
    try:
        descriptions = client.describe(name)
    except ApiError as exc:
        if exc.status == 404:
            return []
        raise
    if default_url is None:
        default_url = default_urls(client).get(name)
    infos = [VersionInfo.of(description, default_url) for description in descriptions]
    return sorted(infos, key=lambda info: version_key(info.version))


def all_versions(client: ServeClient) -> list[VersionInfo]:
    """Every version of every registered model."""
    return [info for name, url in default_urls(client).items() for info in versions(client, name, url)]


def registered_versions(client: ServeClient, name: str) -> list[str]:
    return [info.version for info in versions(client, name)]


def default_version(client: ServeClient, name: str) -> str | None:
    """The version TorchServe answers /predictions/NAME with (None if NAME is not registered)."""
    return next((info.version for info in versions(client, name) if info.default), None)


def version_info(client: ServeClient, name: str, version: str) -> VersionInfo:
    for info in versions(client, name):
        if info.version == version:
            return info
    raise UsageError(f"{name} {version} is not registered on this server")


# Defaults and their history ---------------------------------------------------------------------------------------
class DefaultHistory:
    """The defaults servekit has seen on one server, oldest first, per model."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / HISTORY_FILE

    def read(self) -> dict[str, list[str]]:
        if not self.path.is_file():
            return {}
        try:
            document = json.loads(self.path.read_text())
            if not isinstance(document, dict) or not all(isinstance(v, list) for v in document.values()):
                raise ValueError("expected {model: [versions]}")
            return document
        except ValueError as exc:
            raise ServekitError(
                f"{self.path} is not a servekit defaults history ({exc}): delete it "
                "(rollback then knows only the defaults servekit sees from now on)"
            ) from None

    def write(self, history: dict[str, list[str]]) -> None:
        """Atomically, so a crash never leaves half a file."""
        descriptor, temporary = tempfile.mkstemp(prefix=".defaults-", dir=self.path.parent)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(json.dumps(history, indent=2))
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, self.path)

    def record(self, name: str, version: str) -> None:
        history = self.read()
        versions_seen = history.setdefault(name, [])
        if not versions_seen or versions_seen[-1] != version:
            versions_seen.append(version)
            self.write(history)

    def previous(self, name: str, current: str, registered: list[str]) -> str | None:
        for version in reversed(self.read().get(name, [])):
            if version != current and version in registered:
                return version
        return None

    def drop_latest(self, name: str, version: str) -> None:
        """Forgets the newest entries equal to `version` (a rollback undoes that default)."""
        history = self.read()
        versions_seen = history.get(name, [])
        while versions_seen and versions_seen[-1] == version:
            versions_seen.pop()
        self.write(history)


def observe_default(client: ServeClient, history: DefaultHistory, name: str) -> str | None:
    """Records the default in place now (set by anyone) and returns it."""
    current = default_version(client, name)
    if current is not None:
        history.record(name, current)
    return current


def set_default(client: ServeClient, history: DefaultHistory, name: str, version: str) -> None:
    observe_default(client, history, name)
    client.set_default(name, version)
    history.record(name, version)


def rollback(server: Server, name: str) -> tuple[str, str]:
    """Makes the default before the current one (still registered) the default again; returns (from, to).

    Rolling back undoes: the current default leaves the history, so a second rollback goes one further back.
    """
    client, history = server.client, server.history
    current = observe_default(client, history, name)
    if current is None:
        raise UsageError(f"{name} is not registered on this server")
    previous = history.previous(name, current, registered_versions(client, name))
    if previous is None:
        raise UsageError(f"no earlier default of {name} is registered here: nothing to roll back to from {current}")
    client.set_default(name, previous)
    history.drop_latest(name, current)
    history.record(name, previous)
    return current, previous


# Registering, scaling, retiring -----------------------------------------------------------------------------------
@dataclass
class Registration:
    info: VersionInfo
    timings_ms: dict[str, float]  # verify, register (upload and the synchronous worker start), ready (until READY)


def register(server: Server, name: str, version: str, workers: int | None = None) -> Registration:
    """`servekit register`: NAME VERSION from the server's store, verified, registered and READY; the first version
    of a model becomes its default and enters the server's default history."""
    return register_verified(server.client, server.store, name, version, workers, server.history)


def register_verified(
    client: ServeClient,
    store: Path,
    name: str,
    version: str,
    workers: int | None = None,
    history: DefaultHistory | None = None,
    verified: CatalogEntry | None = None,
) -> Registration:
    """Registers NAME VERSION after checking the archive's sha256 against the catalog; waits until it is ready.

    TorchServe lets the archive's model-config.yaml (minWorkers/maxWorkers) win over `initial_workers`, so an
    explicit `workers` is applied with a scale after registration. With a history, the default is recorded
    (the first version registered becomes the default). `verified` skips a second sha256 of an entry the caller
    has just verified. A model whose pip requirements (servekit import --requirements) this environment, the one
    servekit starts TorchServe's workers in, does not meet is refused before anything is sent.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    entry = verified or verify_archive(store, name, version)
    check_serving_environment(name, version, entry.requirements)
    timings["verify"] = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    client.register(entry.archive, initial_workers=workers or 1)
    timings["register"] = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    if workers and version_info(client, name, version).min_workers != workers:
        client.scale(name, version, workers, workers, synchronous=False)
    info = wait_until_ready(client, name, version, workers)
    timings["ready"] = (time.perf_counter() - started) * 1000
    if history is not None:
        observe_default(client, history, name)
    return Registration(info, timings)


def wait_until_ready(
    client: ServeClient, name: str, version: str, workers: int | None = None, timeout_s: float = 120.0
) -> VersionInfo:
    """Polls with a short, growing interval until `workers` (default: minWorkers, at least 1) are READY."""
    deadline = time.monotonic() + timeout_s
    interval = READY_POLL_START_S
    while True:
        info = version_info(client, name, version)
        wanted = workers if workers is not None else max(1, info.min_workers)
        if info.ready_workers >= wanted and (workers is None or info.min_workers == workers):
            return info
        if time.monotonic() > deadline:
            raise ServekitError(
                f"{name} {version}: {info.ready_workers}/{wanted} workers READY after {timeout_s:g} s: "
                "see the server's logs/model_log.log"
            )
        time.sleep(interval)
        interval = min(interval * 2, READY_POLL_MAX_S)


def scale(server: Server, name: str, version: str | None, min_workers: int, max_workers: int) -> VersionInfo:
    """Resizes a version (None: the default) and waits until `min_workers` workers are READY."""
    if min_workers > max_workers:
        raise UsageError(f"min workers {min_workers} is above max workers {max_workers}")
    client = server.client
    version = version or default_version(client, name)
    if version is None:
        raise UsageError(f"{name} is not registered on this server")
    version_info(client, name, version)
    client.scale(name, version, min_workers, max_workers, synchronous=False)
    return wait_until_ready(client, name, version, min_workers)


def retire(client: ServeClient, name: str, version: str) -> None:
    """Unregisters a version; the current default is refused (promote or roll back first)."""
    registered = registered_versions(client, name)
    if version not in registered:
        raise UsageError(f"{name} {version} is not registered; registered: {', '.join(registered) or 'none'}")
    if default_version(client, name) == version:
        raise UsageError(f"{name} {version} is the default: roll back or promote another version before retiring it")
    client.unregister(name, version)
