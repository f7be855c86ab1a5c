"""The build defaults are right untuned: workers and threads from the cores, a 1 ms window, batch from cost; and
a timing figure says when it cannot be trusted (no Java)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
from support.handlers import poison_trained_folder

from servekit.build import archive
from servekit.build.archive import BATCH_BUDGET_MS, DEFAULT_MAX_BATCH, BuildOptions, batch_size_for, build_archive
from servekit.core import timing


def test_defaults_use_every_core_without_oversubscribing(monkeypatch):
    for cores, workers, threads in ((1, 1, 1), (2, 2, 1), (4, 4, 1), (16, 4, 4)):
        monkeypatch.setattr(archive, "available_cores", lambda cores=cores: cores)
        options = BuildOptions()
        assert (options.workers, options.threads_per_worker) == (workers, threads)
        assert options.workers * options.threads_per_worker <= cores
    assert BuildOptions(workers=1).threads_per_worker == 16 and BuildOptions(torch_threads=3).threads_per_worker == 3


def test_a_lone_request_waits_at_most_2_ms_for_company_and_0_is_never_the_default():
    assert 1 <= BuildOptions().max_batch_delay_ms <= 2


def test_batch_size_follows_the_models_cost():
    assert batch_size_for(0.2) == DEFAULT_MAX_BATCH == 8  # digits: a batch of 8 costs ~2 ms
    assert batch_size_for(BATCH_BUDGET_MS / 4) == 4
    assert batch_size_for(BATCH_BUDGET_MS / 3) == 2
    assert batch_size_for(45.0) == 4  # resnet18 at 224 px on one thread: batch 4 served 1.3x batch 1 at c=16
    assert batch_size_for(BATCH_BUDGET_MS / 1.5) == 1  # a sample this heavy: batching only adds waiting


def test_a_variant_without_eager_weights_gets_its_batch_size_from_its_own_file(tmp_path):
    """A TorchScript file of a model class servekit does not know (no model.pt beside it) is timed as it is."""
    folder = poison_trained_folder(tmp_path / "poison")
    assert 0 < archive.sample_cost_ms(folder, 1) < 1000
    entry = build_archive("poison", "1.0.0", folder, tmp_path / "store", handler="tensor")
    assert 1 <= entry.config["batchSize"] <= DEFAULT_MAX_BATCH and entry.config["handler"]["format"] == "torchscript"


def test_a_figure_with_a_wide_spread_or_a_busy_machine_says_so():
    clean = timing.Figure.of([10.0, 10.2, 10.1])
    assert clean.trusted and clean.value == 10.1 and clean.describe() == "10.10 ms ±1%"
    wide = timing.Figure.of([10.0, 14.0, 10.5])
    assert not wide.trusted and "repeats spread 38%" in wide.describe()
    busy = timing.Figure.of([10.0, 10.1, 10.0], background_cores=0.9)
    assert "unreliable" in busy.describe() and "other processes used 0.90 cores" in busy.describe()


def test_cpu_monitor_charges_a_labelled_process_tree_not_the_background():
    spin = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        with timing.CpuMonitor({"server": child.pid}) as monitor:
            deadline = time.monotonic() + 30
            while sum(psutil.Process(child.pid).cpu_times()[:2]) < 0.6 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        child.kill()
        child.wait(10)
    use = monitor.use
    assert use.measured_cores["server"] * use.wall_s >= 0.4
    assert use.measured_cores["this process"] < use.measured_cores["server"]
    assert use.cores >= 1 and "server" in use.describe() and "other processes" in use.describe()


def test_an_optimized_variant_is_timed_in_its_own_format_not_as_the_eager_weights_beside_it(
    trained_digits, tmp_path, monkeypatch
):
    """optimize's variant folders keep the eager model.pt beside the variant's file: the batch size must come from
    the model the archive serves (an ONNX int8 resnet18 is ~4x faster than eager; timed as eager it got batch 1)."""
    import json
    import shutil

    import torch

    from servekit.build.formats import export_model, load_trained

    variant = tmp_path / "torchscript"
    shutil.copytree(trained_digits, variant)
    model, trained = load_trained(variant)
    _, added = export_model(model, trained, "torchscript", variant)
    (variant / "handler.json").write_text(json.dumps({**trained, **added, "format": "torchscript"}))
    assert (variant / "model.pt").is_file()
    timed = []

    def record(model, batches, **_):
        timed.append(model)
        return [1.0]

    monkeypatch.setattr(timing, "time_calls", record)
    assert archive.sample_cost_ms(variant, 1) == 0.5
    assert isinstance(timed[-1], torch.jit.ScriptModule), type(timed[-1])
    archive.sample_cost_ms(trained_digits, 1)
    assert not isinstance(timed[-1], torch.jit.ScriptModule)
