"""deploy/alerts.yml: valid rules (promtool, where installed), the progressive rollout's thresholds."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from support.alerts import ALERTS, alert_rules, alerted_metrics

from servekit.deliver.progressive import ProgressivePolicy
from servekit.serve.probe_metrics import AGREEMENT


def test_alerts_use_the_progressive_rollouts_thresholds():
    policy = ProgressivePolicy()
    expressions = {name: " ".join(rule["expr"].split()) for name, rule in alert_rules().items()}
    assert expressions["ServekitErrorRate"].endswith(f"> {policy.max_error_rate}")
    assert f"{policy.max_p99_ratio} * (" in expressions["ServekitVersionSlow"]
    assert expressions["ServekitGoldenProbesFailing"] == f"{AGREEMENT} < {policy.min_agreement}"
    assert set(expressions) == {
        "ServekitErrorRate",
        "ServekitVersionSlow",
        "ServekitQueueTime",
        "ServekitWorkerRestarted",
        "ServekitGoldenProbesFailing",
        "ServekitGoldenProbesStale",
    }


def test_alerted_metric_names_are_read_from_the_expressions():
    assert alerted_metrics() == {
        "Requests2XX",
        "Requests4XX",
        "Requests5XX",
        "ts_inference_latency_microseconds",
        "ts_inference_requests_total",
        "ts_queue_latency_microseconds",
        "WorkerLoadTime",
        "servekit_golden_probe_agreement",
        "servekit_golden_probe_timestamp_seconds",
    }


def test_promtool_accepts_the_rules():
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed: `make tools` installs it (apt-get install -y prometheus)")
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout
