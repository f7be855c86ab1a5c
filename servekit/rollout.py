"""Putting archives on a running TorchServe safely: verified, registered, scaled to the asked worker count."""

from __future__ import annotations

from pathlib import Path

from servekit.archive import verify_archive
from servekit.client import ServeClient


def ready_workers(description: dict) -> int:
    return sum(worker["status"] == "READY" for worker in description.get("workers", []))


def register_verified(client: ServeClient, store: Path, name: str, version: str, workers: int | None = None) -> dict:
    """Registers NAME VERSION after checking the archive's sha256 against the catalog; returns its description.

    TorchServe lets the archive's model-config.yaml (minWorkers/maxWorkers) win over `initial_workers`, so an
    explicit `workers` is applied with a synchronous scale after registration.
    """
    entry = verify_archive(store, name, version)
    client.register(entry.archive, initial_workers=workers or 1)
    description = client.describe(name, version)[0]
    if workers and (ready_workers(description) != workers or description["minWorkers"] != workers):
        client.scale(name, version, min_workers=workers, max_workers=workers)
        description = client.describe(name, version)[0]
    return description
