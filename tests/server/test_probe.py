"""`servekit probe`: golden-probe gauges from a real TorchServe, served by the real nginx proxy (token auth on)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from support.servers import ONE_WORKER, PROXIED_VERSIONS, server_at, start_server, stop_everything_from

from servekit.build.archive import build_archive
from servekit.cli import cli
from servekit.deliver.progressive import ProgressivePolicy
from servekit.serve import probe_metrics, torchserve, worker_dir
from servekit.serve.client import ServeClient
from servekit.serve.deployments import register_verified, registered_versions
from servekit.serve.probe_metrics import AGREEMENT, METRICS_PATH, SAMPLES, TIMESTAMP
from servekit.store.workspace import HELD_OUT_DIR, LABELS_FILE

pytestmark = pytest.mark.server
MISLABELLED = "7.0.0"  # the same weights with every label shifted by one: well-formed answers, all wrong
UNPROBED = "8.0.0"  # built from a folder without heldout/: the catalog keeps no golden samples for it


@pytest.fixture(scope="module")
def odd_versions(split_store, trained_digits, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("odd")
    shifted = work / "digits-shifted"
    shutil.copytree(trained_digits, shifted)
    (shifted / LABELS_FILE).write_text(json.dumps([str((i + 1) % 10) for i in range(10)]))
    build_archive("digits", MISLABELLED, shifted, split_store, options=ONE_WORKER)
    bare = work / "digits-bare"
    shutil.copytree(trained_digits, bare, ignore=shutil.ignore_patterns(HELD_OUT_DIR))
    build_archive("digits", UNPROBED, bare, split_store, options=ONE_WORKER)
    return split_store


def invoke(workdir: str, *arguments: str):
    return CliRunner().invoke(cli, ["probe", "digits", *arguments, "--workdir", workdir])


def served_metrics(state) -> requests.Response:
    return requests.get(f"{state.proxy_url}{METRICS_PATH}", timeout=10)


def test_probe_scores_good_versions_high_a_mislabelled_one_low_and_the_proxy_serves_it(proxied, odd_versions):
    state, client = server_at(proxied)
    register_verified(client, odd_versions, "digits", MISLABELLED, workers=1)
    try:
        result = invoke(state.workdir, "--json")
        assert result.exit_code == 0, result.output
        shown = {row["version"]: row for row in json.loads(result.output)["versions"]}
        threshold = ProgressivePolicy().min_agreement  # deploy/alerts.yml's ServekitGoldenProbesFailing
        assert set(shown) == {*PROXIED_VERSIONS, MISLABELLED}
        assert all(shown[v]["agreement"] >= threshold and shown[v]["samples"] == 32 for v in PROXIED_VERSIONS), shown
        assert shown[MISLABELLED]["agreement"] <= 0.2 and shown[MISLABELLED]["samples"] == 32, shown
        path = probe_metrics.probes_file(Path(state.workdir))
        written = probe_metrics.parse(path.read_text())
        assert {key: values[AGREEMENT] for key, values in written.items()} == {
            ("digits", v): shown[v]["agreement"] for v in shown
        }
        served = served_metrics(state)
        assert served.status_code == 200 and served.headers["Content-Type"].startswith("text/plain")
        assert served.text == path.read_text()
        # One version again: only its lines change.
        before = written
        again = invoke(state.workdir, "--version", PROXIED_VERSIONS[0])
        assert again.exit_code == 0 and "written to" in again.output, again.output
        after = probe_metrics.parse(served_metrics(state).text)
        assert after[("digits", PROXIED_VERSIONS[0])][TIMESTAMP] > before[("digits", PROXIED_VERSIONS[0])][TIMESTAMP]
        assert {key: after[key] for key in before if key[1] != PROXIED_VERSIONS[0]} == {
            key: values for key, values in before.items() if key[1] != PROXIED_VERSIONS[0]
        }
    finally:
        client.unregister("digits", MISLABELLED)
    # A whole-model probe forgets versions no longer registered.
    assert invoke(state.workdir).exit_code == 0
    assert ("digits", MISLABELLED) not in probe_metrics.parse(served_metrics(state).text)


def test_bad_input_exits_2_and_writes_nothing(proxied, odd_versions):
    state, client = server_at(proxied)
    path = probe_metrics.probes_file(Path(state.workdir))
    path.unlink(missing_ok=True)  # no probe yet: neither the file nor the copy the proxy's workers serve
    (worker_dir.folder(Path(state.workdir)) / probe_metrics.PROBES_FILE).unlink(missing_ok=True)
    register_verified(client, odd_versions, "digits", UNPROBED, workers=1)
    try:
        cases = {
            ("--version", "9.9.9"): "not registered",
            ("--version", UNPROBED): "no golden samples",
            (): "no golden samples",  # one version without golden samples stops the whole probe before it asks
            ("--every", "0"): "--every must be > 0",
            ("--every", "-5"): "--every must be > 0",
        }
        for arguments, message in cases.items():
            result = invoke(state.workdir, *arguments)
            assert result.exit_code == 2 and result.output.count("\n") == 1, (arguments, result.output)
            assert result.output.startswith("error:") and message in result.output, (arguments, result.output)
        unknown = CliRunner().invoke(cli, ["probe", "nosuch", "--workdir", state.workdir])
        assert unknown.exit_code == 2 and "not registered" in unknown.output, unknown.output
        assert not path.exists() and served_metrics(state).status_code == 404
    finally:
        client.unregister("digits", UNPROBED)
    assert UNPROBED not in registered_versions(client, "digits")


def test_samples_and_timestamps_are_exposed_for_every_probed_version(proxied):
    state, _ = server_at(proxied)
    assert invoke(state.workdir).exit_code == 0
    exposed = probe_metrics.parse(served_metrics(state).text)
    assert set(exposed) == {("digits", v) for v in PROXIED_VERSIONS}
    assert all(set(values) == {AGREEMENT, SAMPLES, TIMESTAMP} for values in exposed.values())


def test_a_whole_model_probe_after_a_restart_without_resume_removes_the_gauges_of_versions_gone(
    trained_digits, tmp_path
):
    store, workdir = tmp_path / "store", tmp_path / "ts"
    build_archive("digits", "1.0.0", trained_digits, store, options=ONE_WORKER)
    try:
        state = start_server(store, workdir, proxy=True)
        register_verified(ServeClient(state.endpoints()), store, "digits", "1.0.0", workers=1)
        assert invoke(str(workdir)).exit_code == 0
        other = probe_metrics.ProbeResult("text", "2.0.0", 10, 10, 1700000000.0)  # another model's lines stay
        probe_metrics.record(workdir, [other])
        torchserve.stop(workdir)
        state = start_server(store, workdir, proxy=True)  # `serve start` without --resume: nothing registered
        assert set(probe_metrics.parse(served_metrics(state).text)) == {("digits", "1.0.0"), ("text", "2.0.0")}

        cleared = invoke(str(workdir))
        assert cleared.exit_code == 0 and cleared.output.count("\n") == 1, cleared.output
        assert "no registered version: removed its gauges (1.0.0)" in cleared.output, cleared.output
        assert probe_metrics.parse(served_metrics(state).text) == probe_metrics.as_series([other])
        again = invoke(str(workdir), "--json")  # nothing left to remove: a typo gets the same answer
        assert again.exit_code == 2 and "not registered" in again.output and "--version V" in again.output
    finally:
        stop_everything_from(workdir)
