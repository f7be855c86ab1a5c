"""The rollout's latency gate on a real TorchServe: the same weights behind a slower handler are stopped."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import REPO
from support.servers import ONE_WORKER, unregister_all

from servekit.build import archive
from servekit.build.archive import HandlerSpec, build_archive
from servekit.deliver.rollout import RolloutFailed, RolloutPolicy, rollout
from servekit.serve.client import ServeClient
from servekit.serve.deployments import default_version, registered_versions
from servekit.serve.handle import Server
from servekit.store.heldout import read_held_out, write_bodies
from servekit.store.workspace import HELD_OUT_DIR

pytestmark = pytest.mark.server


# The session server is shared: this test's digits goes by its own name, removed at its end.
NAME = "gated"
# Inputs the shadow step compares and the latency gate times; the slow candidate has no other golden samples, so
# its smoke test (one request at a time, each through the 0.3 s sleep) sends these too.
SHADOW_SAMPLES = 8


@pytest.fixture
def slow_candidate_store(tmp_path, model_store, trained_digits, monkeypatch):
    """The session store with digits as NAME 1.0.0 and 1.2.0-slow (one worker each): the same weights, the second
    behind tests/slow_digits.py (sleeps 0.3 s per batch) with the first SHADOW_SAMPLES held-out samples as golden."""
    store = model_store
    build_archive(NAME, "1.0.0", trained_digits, store, options=ONE_WORKER)
    source = tmp_path / "slow"
    shutil.copytree(trained_digits, source, ignore=shutil.ignore_patterns(HELD_OUT_DIR))
    kept = read_held_out(trained_digits / HELD_OUT_DIR)[:SHADOW_SAMPLES]
    write_bodies({s.path.name: s.path.read_bytes() for s in kept}, [s.label for s in kept], source / HELD_OUT_DIR)
    shutil.copy2(REPO / "handlers" / "digits.py", source / "digits.py")  # the slow handler subclasses it
    slow = HandlerSpec(str(REPO / "tests" / "slow_digits.py"), extra_files=("labels.json", "digits.py"))
    monkeypatch.setitem(archive.HANDLERS, "slow_digits", slow)
    build_archive(NAME, "1.2.0-slow", source, store, handler="slow_digits", options=ONE_WORKER)
    return store


def test_the_latency_gate_stops_a_slower_candidate(torchserve, slow_candidate_store):
    assert slow_candidate_store == Path(torchserve.model_store)  # both versions in the server's own store
    client = ServeClient(torchserve.endpoints())
    try:
        assert rollout(Server(torchserve, client), NAME, "1.0.0", policy=RolloutPolicy(watch_s=0.5)).promoted
        policy = RolloutPolicy(shadow_samples=SHADOW_SAMPLES, watch_s=0.5)
        with pytest.raises(RolloutFailed, match="ratio") as info:
            rollout(Server(torchserve, client), NAME, "1.2.0-slow", policy=policy)
        report = info.value.report
        assert [step.name for step in report.steps][-2:] == ["shadow", "latency"] and not report.promoted
        assert report.steps[-2].numbers["agreement"] == 1.0  # the same weights: only the speed differs
        assert report.steps[-1].numbers["ratio"] > RolloutPolicy().max_latency_ratio
        assert default_version(client, NAME) == "1.0.0"
        assert "1.2.0-slow" not in registered_versions(client, NAME)
    finally:
        unregister_all(client, NAME)
