"""Serving settings reach the server with one precedence: flag > --model-config > serving.json > defaults; and
maxBatchDelay 0 (which TorchServe turns into 100 ms) is refused everywhere."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from servekit.cli import cli
from servekit.serve.deployments import register_verified, version_info


def servekit(*args: str):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.mark.server
def test_explicit_flags_beat_the_model_config_which_beats_serving_json(trained_digits, model_store, served_digits,
                                                                       tmp_path):  # fmt: skip
    source = tmp_path / "digits"
    shutil.copytree(trained_digits, source)
    (source / "serving.json").write_text(json.dumps({"batch_size": 2, "max_batch_delay_ms": 7, "workers": 1}))
    model_config = tmp_path / "model-config.yaml"
    model_config.write_text(yaml.safe_dump({"batchSize": 4, "maxBatchDelay": 9, "minWorkers": 1, "maxWorkers": 1}))
    built = servekit("build", "digits", "--version", "4.0.0", "--from", source, "--store", model_store, "--json",
                     "--model-config", model_config, "--batch-size", "16", "--max-batch-delay", "5")  # fmt: skip
    assert built.exit_code == 0, built.output
    assert json.loads(built.output)["settings_from"] == {"batch_size": "flag", "max_batch_delay_ms": "flag",
                                                         "workers": str(model_config)}  # fmt: skip
    shown = servekit("build", "digits", "--version", "4.0.3", "--from", source, "--store", model_store,
                     "--batch-size", "16")  # fmt: skip
    assert "batch_size 16 (flag)" in " ".join(shown.output.split()), shown.output
    register_verified(served_digits, model_store, "digits", "4.0.0")
    try:
        served = version_info(served_digits, "digits", "4.0.0")
        assert (served.batch_size, served.max_batch_delay_ms) == (16, 5)
    finally:
        served_digits.unregister("digits", "4.0.0")

    from_file = servekit("build", "digits", "--version", "4.0.1", "--from", source, "--store", model_store,
                         "--model-config", model_config, "--json")  # fmt: skip
    document = json.loads(from_file.output)
    assert (document["config"]["batchSize"], document["config"]["maxBatchDelay"]) == (4, 9)
    assert document["settings_from"]["batch_size"] == str(model_config)
    tuned = json.loads(servekit("build", "digits", "--version", "4.0.2", "--from", source, "--store", model_store,
                                "--json").output)  # fmt: skip
    assert (tuned["config"]["batchSize"], tuned["config"]["maxBatchDelay"]) == (2, 7)
    assert tuned["settings_from"] == {"batch_size": "serving.json", "max_batch_delay_ms": "serving.json",
                                      "workers": "serving.json"}  # fmt: skip
