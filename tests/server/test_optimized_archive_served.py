"""servekit optimize: variants load, run and match eager fp32; the accuracy gate; reports; the served variant."""

from __future__ import annotations

import json

import pytest
import torch

from servekit.build import optimize as optimizer
from servekit.build.archive import build_archive
from servekit.build.formats import load_trained
from servekit.serve.deployments import register_verified
from servekit.store.catalog import Catalog

# Every variant is checked in tests/unit/test_optimize.py; here two that load differently (a TorchScript file, an
# ONNX Runtime session) compete, and whichever is picked must be served with its in-process answers.
VARIANTS = ("torchscript", "onnx")


@pytest.mark.server
def test_the_fastest_variant_is_built_and_served_with_the_answers_measured_in_process(
    trained_digits, model_store, served_digits, held_out, tmp_path
):
    out = tmp_path / "optimized"
    report = optimizer.optimize(optimizer.OptimizePlan("digitsfast", trained_digits, out, VARIANTS, budget_s=0.1))
    optimizer.record_best(model_store, report, out)
    assert Catalog.load(model_store).optimizations["digitsfast"]["best"] == report.best
    folder = Catalog.load(model_store).variant_dir("digitsfast", "best")
    entry = build_archive("digitsfast", "1.0.0", folder, model_store, handler="digits")
    assert entry.config["handler"]["format"] == json.loads((folder / "handler.json").read_text())["format"]
    assert entry.source_weights_sha256 == json.loads((trained_digits / "metrics.json").read_text())["weights_sha256"]
    register_verified(served_digits, model_store, "digitsfast", "1.0.0")
    try:
        model, handler = load_trained(trained_digits)
        eval_set = optimizer.load_eval_set(trained_digits, handler)
        builder = optimizer.Builder(model, handler, eval_set, out / "again", torch.get_num_threads())
        in_process = builder.build(report.best)
        samples = held_out[optimizer.CALIBRATION_SAMPLES : optimizer.CALIBRATION_SAMPLES + 40]
        with torch.inference_mode():
            expected = in_process.run(eval_set.collate(eval_set.samples[:40])).argmax(1).tolist()
        served = [
            served_digits.predict("digitsfast", s.path.read_bytes(), content_type="image/png")["index"] for s in samples
        ]
        assert served == expected
    finally:
        served_digits.unregister("digitsfast", "1.0.0")
