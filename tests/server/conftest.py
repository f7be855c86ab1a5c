"""The servers the server tests share: one TorchServe and one TorchServe behind the traffic-split proxy per run,
both token-auth on, on free loopback ports, stopped by PID at the end (also after a failure or Ctrl-C).

Each test registers its own model names or versions on them and leaves them as it found them; only tests that
kill, restart or reconfigure a server start their own (support/servers.py: start_server, digits_server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support.servers import BROKEN_VERSION, ONE_WORKER, PROXIED_VERSIONS, start_server, stop_everything_from

from servekit.build.archive import BuildOptions, build_archive
from servekit.serve.client import ServeClient
from servekit.serve.deployments import register_verified
from servekit.store.heldout import read_held_out, write_bodies
from servekit.store.workspace import HELD_OUT_DIR, LABELS_FILE


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory, model_store):
    """A real TorchServe (token auth on) on free loopback ports serving from the session's model store."""
    workdir = tmp_path_factory.mktemp("torchserve")
    try:
        yield start_server(model_store, workdir)
    finally:
        stop_everything_from(workdir)


@pytest.fixture(scope="session")
def served_digits(torchserve) -> ServeClient:
    """A client of the session server with digits 1.0.0 registered (batch size 4, one worker)."""
    client = ServeClient(torchserve.endpoints())
    client.register("digits-1.0.0.mar", initial_workers=1)
    return client


def without_eights_and_nines(trained: Path, folder: Path, samples: int) -> Path:
    """The same model with only 8 labels: it fails (503) on the ~20 % of inputs it classifies as 8 or 9, while its
    golden samples (`samples` of 0-7 only) pass the rollout's smoke, shadow and latency checks."""
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns(HELD_OUT_DIR))
    (folder / LABELS_FILE).write_text(json.dumps([str(i) for i in range(8)]))
    kept = [s for s in read_held_out(trained / HELD_OUT_DIR) if s.label not in ("8", "9")][:samples]
    write_bodies({s.path.name: s.path.read_bytes() for s in kept}, [s.label for s in kept], folder / HELD_OUT_DIR)
    return folder


@pytest.fixture(scope="session")
def split_store(tmp_path_factory, trained_digits) -> Path:
    """Three versions of digits (the same weights: the split tests count routing, not answers) and a broken one,
    each with one worker."""
    store = tmp_path_factory.mktemp("split_store")
    for version in PROXIED_VERSIONS:
        build_archive("digits", version, trained_digits, store, options=ONE_WORKER)
    # As many golden samples as test_split.py's shadow step compares: its smoke test asks each one, under load.
    broken = without_eights_and_nines(trained_digits, tmp_path_factory.mktemp("work") / "digits-no89", samples=8)
    options = BuildOptions(batch_size=1, workers=1, torch_threads=1, handler={"top_k": 1})
    build_archive("digits", BROKEN_VERSION, broken, store, options=options)
    return store


@pytest.fixture(scope="session")
def proxied(tmp_path_factory, split_store) -> Path:
    """The workdir of a TorchServe with the proxy in front, digits 1.0.0 (default), 1.1.0 and 1.2.0 registered.
    A test may restart it (stop, then start --resume): `server_at(workdir)` reads where it is now."""
    workdir = tmp_path_factory.mktemp("split_ts")
    try:
        state = start_server(split_store, workdir, proxy=True)
        client = ServeClient(state.endpoints())
        for version in PROXIED_VERSIONS:
            register_verified(client, split_store, "digits", version, workers=1)
        yield workdir
    finally:
        stop_everything_from(workdir)
