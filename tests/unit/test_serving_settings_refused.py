"""maxBatchDelay 0 (which TorchServe turns into 100 ms) is refused by build, config, tune and BuildOptions."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from servekit.build.archive import BuildOptions
from servekit.cli import cli
from servekit.core.errors import UsageError
from servekit.measure import tune as tuning


def servekit(*args: str):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def test_max_batch_delay_zero_is_refused_by_build_config_and_tune(trained_digits, tmp_path):
    refused = servekit("build", "digits", "--version", "1.0.0", "--from", trained_digits, "--store", tmp_path,
                       "--max-batch-delay", "0")  # fmt: skip
    assert refused.exit_code == 2 and "100 ms" in refused.output and "use 1 ms" in refused.output
    assert not list(tmp_path.glob("*.mar")) and not (tmp_path / "catalog.json").exists()
    config = servekit("config", "--gpus", "0", "--models", "digits", "--max-batch-delay", "0", "--out", tmp_path / "c")
    assert config.exit_code == 2 and "100 ms" in config.output and not (tmp_path / "c").exists()
    with pytest.raises(UsageError, match="100 ms"):
        tuning.grid([(1, 1)], [1, 4], [0, 5])
    with pytest.raises(UsageError, match="100 ms"):
        BuildOptions(max_batch_delay_ms=0).validate()
