"""Untuned archives serve with a worker per core, a 1 ms window and a batch from the model's cost; `tune --slo`
names the closest setting when none meets the objectives; `bench` states who used the CPU and which load
generator produced each figure (real TorchServe)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from servekit.build.archive import BuildOptions
from servekit.cli import cli
from servekit.measure import bench as benchmarks
from servekit.measure.loadgen import run_load
from servekit.serve.deployments import register_verified
from servekit.serve.handle import Server
from servekit.store.workspace import SERVING_FILE


@pytest.mark.server
def test_default_archive_gets_a_worker_per_core_batch_8_and_a_1_ms_window(served_digits, model_store, trained_digits,
                                                                            good_png):  # fmt: skip
    built = CliRunner().invoke(cli, ["build", "digits", "--version", "5.0.0", "--from", str(trained_digits),
                                     "--store", str(model_store), "--json"])  # fmt: skip
    assert built.exit_code == 0, built.output
    document = json.loads(built.output)
    config, defaults = document["config"], BuildOptions()
    assert (config["batchSize"], config["maxBatchDelay"]) == (8, 1)
    assert config["minWorkers"] == config["maxWorkers"] == defaults.workers
    assert config["handler"]["torch_threads"] == defaults.threads_per_worker
    assert document["settings_from"]["batch_size"] == "model cost"
    registration = register_verified(served_digits, model_store, "digits", "5.0.0")
    try:
        assert registration.info.ready_workers == defaults.workers and registration.info.max_batch_delay_ms == 1
        assert served_digits.predict("digits", good_png, version="5.0.0", content_type="image/png")["label"]
    finally:
        served_digits.unregister("digits", "5.0.0")


@pytest.mark.server
def test_tune_with_an_unmeetable_slo_names_the_closest_setting_and_exits_1(torchserve, served_digits, trained_digits,
                                                                           tmp_path):  # fmt: skip
    source = tmp_path / "digits"
    shutil.copytree(trained_digits, source)
    result = CliRunner().invoke(cli, [
        "tune", "digits", "--from", str(source), "--slo", "p50=0.001ms@1", "--workers", "1x1", "--batch-sizes", "1",
        "--delays", "1", "--duration", "1s", "--generator", "python", "--out", str(tmp_path / "tune"),
        "--workdir", torchserve.workdir,
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "no setting meets every objective; the closest, 1 worker(s) x 1 thread(s), batch 1" in result.output
    assert "p50=0.001ms@1: measured" in result.output and "% over" in result.output
    assert not (source / SERVING_FILE).exists() and (tmp_path / "tune" / "frontier.png").is_file()


@pytest.mark.server
def test_bench_states_client_and_server_cpu_and_the_generator_of_each_row(torchserve, served_digits, model_store,
                                                                          held_out, tmp_path):  # fmt: skip
    bodies = [(s.path.read_bytes(), "image/png") for s in held_out[:16]]
    plan = benchmarks.BenchPlan("digits", "1.0.0", [4], 1.0, repeats=2, bodies=bodies)
    report = benchmarks.bench(Server(torchserve, served_digits), plan)
    level = report.levels[0]
    assert level.served.generator == "python" and len(level.throughput.repeats) == 2
    assert level.cpu.measured_cores["server"] > 0.05 and level.cpu.measured_cores["client"] > 0.05
    benchmarks.write_reports(report, tmp_path)
    markdown = (tmp_path / "bench.md").read_text()
    assert "cores client/server/other" in markdown and "| 4 | python |" in markdown


@pytest.mark.server
def test_wrk_and_the_python_generator_both_drive_the_server_and_say_which_they_were(served_digits, held_out):
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: `make tools` installs it (servekit bench --generator wrk needs it)")
    bodies = [(s.path.read_bytes(), "image/png") for s in held_out[:8]]
    url = f"{served_digits.endpoints.inference_url}/predictions/digits/1.0.0"
    headers = served_digits.auth_headers("inference")
    by_wrk = run_load(url, headers, bodies, 4, 1.0, generator="wrk")
    by_python = run_load(url, headers, bodies, 4, 1.0, generator="python")
    for result in (by_wrk, by_python):
        assert result.ok > 0 and result.errors == 0 and result.p50_ms <= result.p99_ms
        assert result.client_cpu_s > 0
    assert (by_wrk.generator, by_python.generator) == ("wrk", "python")
    wrong_key = run_load(url, {"Authorization": "Bearer wrong"}, bodies, 2, 1.0, generator="wrk")
    assert wrong_key.ok == 0 and wrong_key.errors == wrong_key.requests > 0
