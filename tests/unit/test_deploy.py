"""servekit config (GPU/CPU plans), build --model-config, and the KServe and Docker exports."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from support import REPO

from servekit.build import torchserve_config as configs
from servekit.build.export import KServeSpec, export_docker, export_kserve
from servekit.cli import cli
from servekit.core.errors import UsageError
from servekit.core.properties import read_properties
from servekit.store.catalog import sha256_file

GOLDEN = REPO / "tests" / "golden"


@pytest.fixture(autouse=True)
def two_cores(monkeypatch):
    """Generated thread counts depend on the machine; the golden files were written for 2 cores."""
    monkeypatch.setattr(configs.os, "cpu_count", lambda: 2)


def test_four_gpus_two_workers_each_matches_the_golden_files(tmp_path):
    plan = configs.make_plan(
        "4", 2, ["digits", "image"], batch_size=8, max_batch_delay_ms=10, model_store=Path("/srv/servekit/model_store")
    )
    configs.write(plan, tmp_path)
    assert (tmp_path / "config.properties").read_text() == (GOLDEN / "gpu4" / "config.properties").read_text()
    generated = (tmp_path / "models" / "image" / "model-config.yaml").read_text()
    assert generated == (GOLDEN / "gpu4" / "model-config.yaml").read_text()
    config = yaml.safe_load(generated)
    assert config["deviceType"] == "gpu" and config["deviceIds"] == [0, 1, 2, 3] and config["minWorkers"] == 8
    properties = read_properties(tmp_path / "config.properties")
    assert properties["number_of_gpu"] == "4" and properties["disable_token_authorization"] == "false"


def test_cpu_plan_sets_threads_per_worker_so_workers_do_not_oversubscribe(tmp_path):
    plan = configs.make_plan("0", 2, ["digits"])
    config = configs.model_config(plan)
    assert config["deviceType"] == "cpu" and config["minWorkers"] == 2 and config["handler"]["torch_threads"] == 1
    assert "deviceIds" not in config


def test_gpu_plan_bounds_each_workers_cpu_threads_too(monkeypatch):
    """GPU workers decode and collate on the CPU: 4 workers on a 16-core host get 4 threads each, not 16."""
    monkeypatch.setattr(configs.os, "cpu_count", lambda: 16)
    config = configs.model_config(configs.make_plan("1", 4, ["image"]))
    assert config["deviceType"] == "gpu" and config["minWorkers"] == 4 and config["handler"]["torch_threads"] == 4
    two_models = configs.model_config(configs.make_plan("2", 2, ["image", "digits"]))
    assert two_models["minWorkers"] == 4 and two_models["handler"]["torch_threads"] == 2


def test_device_subset_and_parallel_type(tmp_path):
    subset = configs.model_config(configs.make_plan("4", 1, ["digits"], device_ids=[2, 3]))
    assert subset["deviceIds"] == [2, 3] and subset["minWorkers"] == 2
    split = configs.model_config(configs.make_plan("2", 1, ["big"], parallel_type="tp"))
    assert split["parallelType"] == "tp" and split["torchrun"] == {"nproc-per-node": 2} and split["maxWorkers"] == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("2", 0, ["digits"]), "zero workers"),
        (("-1", 1, ["digits"]), ">= 0"),
        (("2", 1, []), "at least one model"),
        (("2", 1, ["digits"], [0, 2]), "distinct GPU indices in 0..1"),
        (("2", 1, ["digits"], [1, 1]), "distinct"),
        (("0", 1, ["digits"], [0]), "no GPUs"),
        (("1", 1, ["digits"], None, "tp"), "at least 2"),
    ],
)
def test_bad_combinations_are_refused(arguments, message):
    with pytest.raises(UsageError, match=message):
        configs.make_plan(*arguments)


def test_auto_detects_what_torch_sees(monkeypatch):
    monkeypatch.setattr(configs, "detect_gpus", lambda: 3)
    assert configs.make_plan("auto", 1, ["digits"]).gpus == 3


def test_build_merges_a_generated_model_config(tmp_path, trained_digits):
    runner = CliRunner()
    made = runner.invoke(
        cli, ["config", "--gpus", "2", "--workers-per-gpu", "2", "--models", "digits", "--out", str(tmp_path / "cfg")]
    )
    assert made.exit_code == 0, made.output
    built = runner.invoke(
        cli,
        [
            "build",
            "digits",
            "--version",
            "1.0.0",
            "--from",
            str(trained_digits),
            "--store",
            str(tmp_path / "store"),
            "--model-config",
            str(tmp_path / "cfg" / "models" / "digits" / "model-config.yaml"),
        ],
    )
    assert built.exit_code == 0, built.output
    with zipfile.ZipFile(tmp_path / "store" / "digits-1.0.0.mar") as mar:
        config = yaml.safe_load(mar.read("model-config.yaml"))
    assert (config["deviceType"], config["deviceIds"], config["minWorkers"], config["maxWorkers"]) == (
        "gpu",
        [0, 1],
        4,
        4,
    )
    assert config["handler"]["model_class"] == "SimpleCNN"
    refused = runner.invoke(cli, ["config", "--gpus", "two", "--models", "digits"])
    assert refused.exit_code == 2 and "number or auto" in refused.output


def test_kserve_export_is_a_valid_inference_service_with_the_layout_kserve_reads(tmp_path, model_store):
    spec = KServeSpec(
        "digits",
        "1.0.0",
        "gs://bucket/models/digits",
        gpus=1,
        min_replicas=1,
        max_replicas=4,
        canary_traffic_percent=10,
    )
    service_path, properties_path, archive = export_kserve(model_store, spec, tmp_path)
    service = yaml.safe_load(service_path.read_text())
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    predictor = service["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["canaryTrafficPercent"]) == (1, 4, 10)
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["storageUri"] == "gs://bucket/models/digits"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    properties = read_properties(properties_path)
    snapshot = json.loads(properties["model_snapshot"])
    assert snapshot["models"]["digits"]["1.0.0"]["marName"] == archive.name and properties_path.parent.name == "config"
    assert archive.parent.name == "model-store" and sha256_file(archive) == sha256_file(model_store / archive.name)
    with pytest.raises(UsageError, match="must be a URI"):
        export_kserve(model_store, KServeSpec("digits", "1.0.0", "bucket/digits"), tmp_path / "bad")
    with pytest.raises(UsageError, match="--max-replicas"):
        export_kserve(model_store, KServeSpec("digits", "1.0.0", "pvc://m", min_replicas=5, max_replicas=2), tmp_path)


def test_docker_export_serves_the_archive_on_the_official_image(tmp_path, model_store):
    dockerfile, properties_path, archive = export_docker(model_store, "digits", "1.0.0", tmp_path / "cpu")
    text = dockerfile.read_text()
    assert "FROM pytorch/torchserve:0.12.0-cpu" in text and "COPY model-store" in text and 'CMD ["serve"]' in text
    properties = read_properties(properties_path)
    assert properties["load_models"] == archive.name and properties["disable_token_authorization"] == "false"
    gpu_dockerfile, gpu_properties, _ = export_docker(model_store, "digits", "1.0.0", tmp_path / "gpu", gpu=True)
    assert "0.12.0-gpu" in gpu_dockerfile.read_text() and read_properties(gpu_properties)["number_of_gpu"] == "1"


def test_tune_keeps_a_gpu_plans_devices_and_varies_the_rest(tmp_path, monkeypatch):
    """`servekit tune --model-config` puts every trial on the plan's GPUs; workers, threads, batch and delay stay
    the trial's own."""
    from servekit.build.archive import placement

    monkeypatch.setattr(configs.os, "cpu_count", lambda: 16)
    written = configs.write(configs.make_plan("2", 2, ["image"], batch_size=32, max_batch_delay_ms=2), tmp_path)
    kept = placement(written[1])
    assert kept["deviceType"] == "gpu" and kept["deviceIds"] == [0, 1]
    assert not {"minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "handler"} & set(kept)
    assert placement(None) == {}


def test_gpu_plans_default_to_the_measured_workers_and_batch(monkeypatch):
    """4 workers per GPU while each keeps 4 cores, batches of 64: what served resnet18 at 6,030 req/s on an H200."""
    monkeypatch.setattr(configs.os, "cpu_count", lambda: 16)
    one = configs.make_plan("1", "auto", ["image"])
    assert (one.workers, one.batch_size, configs.model_config(one)["handler"]["torch_threads"]) == (4, 64, 4)
    assert configs.make_plan("4", "auto", ["image"]).workers == 4  # 1 per GPU: 16 cores / (4 cores x 4 GPUs)
    monkeypatch.setattr(configs.os, "cpu_count", lambda: 2)
    assert configs.make_plan("1", "auto", ["image"]).workers_per_gpu == 1
    cpu = configs.make_plan("0", "auto", ["digits"])
    assert cpu.batch_size == configs.DEFAULT_MAX_BATCH and cpu.workers == configs.default_workers()
