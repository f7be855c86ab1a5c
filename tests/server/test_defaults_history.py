"""Rollback after any sequence of register, rollout, rollback, retire and restart, on a real TorchServe; and a
frontend killed in the middle of a rollout."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from support import REPO
from support.servers import ONE_WORKER, server_at, start_server, stop_everything_from

from servekit.build.archive import build_archive
from servekit.cli import cli
from servekit.deliver.rollout import RolloutFailed, RolloutPolicy, rollout
from servekit.serve import torchserve
from servekit.serve.client import ServeClient
from servekit.serve.deployments import DefaultHistory, default_version, register_verified
from servekit.serve.handle import Server
from servekit.store.heldout import read_held_out

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, trained_digits) -> Path:
    store = tmp_path_factory.mktemp("history_store")
    for version in ("1.0.0", "1.0.1"):
        build_archive("digits", version, trained_digits, store, options=ONE_WORKER)
    return store


def ready_versions(client: ServeClient, name: str, timeout_s: float = 60.0) -> list[str]:
    """The versions of `name` once each has a READY worker (a resumed server loads its snapshot's models after it
    answers /ping), waiting up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        described = client.describe(name)
        ready = all(any(w["status"] == "READY" for w in d["workers"]) for d in described)
        if ready or time.monotonic() > deadline:
            return sorted(d["modelVersion"] for d in described)
        time.sleep(0.2)


def servekit(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_the_first_rollback_after_the_first_rollout_returns_to_the_first_version(two_versions, tmp_path):
    workdir = str(tmp_path / "ts")
    start_server(two_versions, Path(workdir))
    try:
        servekit("register", "digits", "--version", "1.0.0", "--workdir", workdir)
        servekit("rollout", "digits", "--version", "1.0.1", "--watch", "0.5", "--workdir", workdir)
        assert "from 1.0.1 to 1.0.0" in servekit("rollback", "digits", "--workdir", workdir)
        refused = CliRunner().invoke(cli, ["rollback", "digits", "--workdir", workdir])
        assert refused.exit_code == 2 and "nothing to roll back to from 1.0.0" in refused.output

        servekit("rollout", "digits", "--version", "1.0.1", "--watch", "0.5", "--workdir", workdir)
        before, client = server_at(Path(workdir))
        servekit("serve", "stop", "--workdir", workdir)
        servekit("serve", "start", "--resume", "--workdir", workdir, "--config", str(REPO / "config.properties"))
        after, client = server_at(Path(workdir))
        # the snapshot brings back every version, with its workers, the default and the addresses
        assert after.inference_url == before.inference_url and after.pid != before.pid
        assert ready_versions(client, "digits") == ["1.0.0", "1.0.1"] and default_version(client, "digits") == "1.0.1"
        assert "from 1.0.1 to 1.0.0" in servekit("rollback", "digits", "--workdir", workdir)
        servekit("retire", "digits", "--version", "1.0.1", "--workdir", workdir)
        gone = CliRunner().invoke(cli, ["rollback", "digits", "--workdir", workdir])
        assert gone.exit_code == 2 and "no earlier default" in gone.output
    finally:
        stop_everything_from(Path(workdir))


def test_killing_the_frontend_during_the_watch_fails_the_rollout_and_resume_is_consistent(two_versions, tmp_path):
    workdir = tmp_path / "ts"
    state = start_server(two_versions, workdir)
    orphans: list[psutil.Process] = []
    try:
        client = ServeClient(state.endpoints())
        history = DefaultHistory(workdir)
        register_verified(client, two_versions, "digits", "1.0.0", history=history)
        promoted = threading.Event()

        def on_step(step) -> None:
            if step.name == "promote":
                orphans.extend(psutil.Process(state.pid).children(recursive=True))
                os.kill(state.pid, signal.SIGKILL)
                promoted.set()

        with pytest.raises(RolloutFailed) as failure:
            rollout(Server(state, client), "digits", "1.0.1", policy=RolloutPolicy(watch_s=2), on_step=on_step)
        assert promoted.is_set()
        message = str(failure.value)
        assert "lost the server while watching" in message and "--resume" in message and "\n" not in message
        assert not failure.value.report.promoted
        assert [step.name for step in failure.value.report.steps][-2:] == ["promote", "watch"]

        resumed = torchserve.start(
            torchserve.ServerSettings(REPO / "config.properties", two_versions, workdir, resume=True)
        )
        client = ServeClient(resumed.endpoints())
        assert default_version(client, "digits") in ("1.0.0", "1.0.1")
        assert sorted(d["modelVersion"] for d in client.describe("digits")) == ["1.0.0", "1.0.1"]
        sample = read_held_out(two_versions / "golden" / "digits-1.0.0")[0]
        assert client.predict("digits", sample.path.read_bytes(), content_type="image/png")["label"] == sample.label
    finally:
        stop_everything_from(workdir)
        for process in orphans:  # workers of the killed frontend exit by themselves; make sure
            if process.is_running():
                process.kill()
