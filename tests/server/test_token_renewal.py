"""Keys expire (token_expiration_min): every client renews them through TorchServe's token API and goes on
(wrk, which cannot renew mid-run, starts with a key the server accepts)."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.servers import digits_server

from servekit.cli import cli
from servekit.measure.loadgen import run_load
from servekit.serve import torchserve
from servekit.serve.client import Endpoints, FailoverClient, ServeClient

# TorchServe reads the expiry as a number of minutes, accepts fractions and keeps whole seconds: 0.05 min = 3 s,
# longer than any one step below takes with a key it has just renewed (wrk's 1 s run with one key included).
EXPIRY_MIN = 0.05


@pytest.fixture
def expiring_server(tmp_path, trained_digits):
    """A TorchServe whose keys expire 3 s after they are issued, with digits 1.0.0 registered."""
    with digits_server(tmp_path, trained_digits, f"token_expiration_min={EXPIRY_MIN}\n") as state:
        yield state


def keys_of(state: torchserve.ServerState) -> dict[str, str]:
    return {api: entry["key"] for api, entry in json.loads(Path(state.key_file).read_text()).items()}


def wait_until_expired(state: torchserve.ServerState) -> dict[str, str]:
    """Sleeps until the inference and management keys the file holds now have expired (it records when, in UTC);
    returns those (now refused) keys."""
    document = json.loads(Path(state.key_file).read_text())
    expires = max(
        datetime.fromisoformat(document[api]["expiration time"].replace("Z", "+00:00")).timestamp()
        for api in ("inference", "management")
    )
    time.sleep(max(0.0, expires - time.time()) + 0.2)
    return {api: entry["key"] for api, entry in document.items()}


@pytest.mark.server
def test_expired_keys_are_renewed_for_inference_management_failover_and_the_load_generator(
    expiring_server, good_png, tmp_path
):
    state = expiring_server
    client = ServeClient(state.endpoints())
    png = tmp_path / "seven.png"
    png.write_bytes(good_png)

    expired = wait_until_expired(state)
    runner = CliRunner()
    predicted = runner.invoke(cli, ["predict", "digits", str(png), "--workdir", state.workdir, "--json"])
    listed = runner.invoke(cli, ["models", "--workdir", state.workdir, "--json"])
    assert predicted.exit_code == 0 and listed.exit_code == 0, predicted.output + listed.output
    assert "label" in predicted.output and "digits" in listed.output
    renewed = keys_of(state)
    assert renewed["inference"] != expired["inference"] and renewed["management"] != expired["management"]
    assert renewed["API"] == expired["API"]
    for key in (*expired.values(), *renewed.values()):
        assert key not in predicted.output + listed.output

    # Each step below meets keys that expired and must have renewed them itself.
    expired = wait_until_expired(state)
    assert client.predict("digits", good_png, content_type="image/png")["label"]
    assert client.describe("digits", "1.0.0")[0]["modelVersion"] == "1.0.0"
    assert client.ping()["status"] == "Healthy"
    renewed = keys_of(state)
    assert renewed["inference"] != expired["inference"] and renewed["management"] != expired["management"]

    expired = wait_until_expired(state)
    failover = FailoverClient([ServeClient(Endpoints(state.inference_url, "", "", client.endpoints.key_file))])
    assert failover.predict("digits", good_png, content_type="image/png")["label"]
    assert keys_of(state)["inference"] != expired["inference"]

    expired = wait_until_expired(state)
    url = f"{state.inference_url}/predictions/digits"
    result = run_load(url, {}, [(good_png, "image/png")], 4, 2.0, keys=client.keys)
    assert result.ok > 0 and result.errors == 0, result.error_statuses
    assert keys_of(state)["inference"] != expired["inference"]

    expired = wait_until_expired(state)  # wrk sends one set of headers for its whole run: it starts with a renewed key
    by_wrk = run_load(url, {}, [(good_png, "image/png")], 2, 1.0, generator="wrk", keys=client.keys)
    assert by_wrk.generator == "wrk" and by_wrk.ok > 0 and by_wrk.errors == 0, by_wrk.error_statuses
    assert keys_of(state)["inference"] != expired["inference"]
