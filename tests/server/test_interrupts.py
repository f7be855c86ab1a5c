"""Ctrl-C in the middle of `servekit tune`, and `servekit bench` of a version the server does not have, on a real
TorchServe (loopback, bounded)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.processes import ctrl_c_after
from support.servers import ONE_WORKER, unregister_all

from servekit.build.archive import build_archive
from servekit.cli import cli
from servekit.serve import metrics
from servekit.serve.client import ServeClient
from servekit.serve.deployments import register_verified, registered_versions
from servekit.store.catalog import Catalog

pytestmark = pytest.mark.server


# The session server is shared: this module's digits goes by its own name, removed at its end.
NAME = "interrupted"


@pytest.fixture(scope="module")
def digits_server(torchserve, model_store, trained_digits):
    """The session TorchServe with digits as NAME 1.0.0 registered; 6.6.6 is in the catalog but not registered."""
    build_archive(NAME, "1.0.0", trained_digits, model_store, options=ONE_WORKER)
    build_archive(NAME, "6.6.6", trained_digits, model_store, options=ONE_WORKER)
    client = ServeClient(torchserve.endpoints())
    register_verified(client, model_store, NAME, "1.0.0")
    try:
        yield Path(torchserve.workdir), model_store, client
    finally:
        unregister_all(client, NAME)


def tune_versions(client: ServeClient) -> list[str]:
    return [v for v in registered_versions(client, NAME) if "tune" in v]


def test_ctrl_c_while_tune_registers_leaves_no_tune_version_and_the_next_tune_works(
    digits_server, trained_digits, tmp_path, monkeypatch
):
    workdir, store, client = digits_server
    source = tmp_path / "digits"
    shutil.copytree(trained_digits, source)
    args = ["tune", NAME, "--handler", "digits", "--from", str(source), "--workers", "1x1", "--batch-sizes", "1",
            "--delays", "1", "--duration", "1s", "--warmup", "0", "--slo", "p95=100000ms@1",
            "--out", str(tmp_path / "tune"), "--workdir", str(workdir)]  # fmt: skip
    real_register = ServeClient.register
    interrupts = []

    def register_then_ctrl_c(self, archive, *options, **settings):
        """Ctrl-C while the synchronous registration is in flight (its workers take seconds to start)."""
        if not interrupts:
            interrupts.append(ctrl_c_after(0.3))
        return real_register(self, archive, *options, **settings)

    monkeypatch.setattr(ServeClient, "register", register_then_ctrl_c)
    interrupted = CliRunner().invoke(cli, args)
    assert interrupts, interrupted.output
    interrupts[0].join()
    assert interrupted.exit_code == 1, interrupted.output
    note, error = interrupted.output.strip().splitlines()  # a note at once, one line when it is undone
    assert note.startswith(f"interrupted: waiting for the registration of {NAME} 0.0.0-tune."), note
    assert error.startswith("error: interrupted at setting 1 of 1") and "is unregistered" in error, error
    time.sleep(3)  # a registration the server was still finishing when the clean-up came would show by now
    assert tune_versions(client) == []
    assert not [v for v in Catalog.load(store).models[NAME] if "tune" in v]
    assert not list(store.glob(f"{NAME}-0.0.0-tune*"))
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "already registered" not in again.output and (source / "serving.json").is_file()
    assert tune_versions(client) == []


@pytest.mark.parametrize("version", ["6.6.6", "9.9.9"])  # in the catalog but not registered; in neither
def test_bench_of_an_unregistered_version_says_so_before_any_load(digits_server, version):
    workdir, _, client = digits_server
    before = metrics.scrape(client).responses["Requests4XX"]  # a prediction of an unregistered version: 404
    args = ["bench", NAME, "--version", version, "--duration", "1s", "--repeats", "1", "--concurrency", "1",
            "--warmup", "0", "--workdir", str(workdir)]  # fmt: skip
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1, refused.output
    assert refused.output.strip().splitlines() == [
        f"error: {NAME} {version} is not registered on this server (registered: 1.0.0): "
        f"servekit register {NAME} --version {version}"
    ]
    assert metrics.scrape(client).responses["Requests4XX"] == before  # not one prediction was sent
