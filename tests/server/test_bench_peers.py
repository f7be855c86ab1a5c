"""`servekit bench --baseline litserve|torchserve` on the session server: real peers, real figures, nothing left."""

from __future__ import annotations

import json

import psutil
import pytest
from click.testing import CliRunner

from servekit.cli import cli
from servekit.core.processes import has_exited
from servekit.measure import peers


@pytest.mark.server
def test_bench_against_litserve_and_torchserve_reports_their_figures_and_stops_them(
    served_digits, torchserve, trained_digits, tmp_path, monkeypatch
):
    started = []  # (label, every PID of the peer once it answered, its folder)
    wait_until_ready = peers.PeerServer.wait_until_ready

    def recording(server):
        wait_until_ready(server)
        started.append((server.label, server.pids(), server.folder))

    monkeypatch.setattr(peers.PeerServer, "wait_until_ready", recording)
    for baseline in ("litserve", "torchserve"):
        result = CliRunner().invoke(
            cli,
            ["bench", "digits", "--version", "1.0.0", "--workdir", str(torchserve.workdir), "--baseline", baseline,
             "--baseline-model", str(trained_digits), "--held-out", str(trained_digits / "heldout"),
             "--concurrency", "1", "--duration", "1s", "--repeats", "1", "--warmup", "0", "--generator", "python",
             "--out", str(tmp_path / baseline), "--json"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        (level,) = json.loads(result.output)["levels"]
        served, peer = level["served"], level["baseline"]
        assert json.loads(result.output)["baseline"] == baseline and peer["concurrency"] == 1
        assert peer["ok"] > 5 and peer["errors"] == 0 and 0 < peer["p50_ms"] <= peer["p99_ms"] < 1000
        assert level["ratio_over_baseline"] == pytest.approx(served["throughput_per_s"] / peer["throughput_per_s"])
        assert level["baseline_cpu"]["measured_cores"]["server"] > 0  # the peer's own process tree did the work
        assert f"| {baseline} req/s |" in (tmp_path / baseline / "bench.md").read_text()
    assert [label for label, _, _ in started] == ["litserve", "torchserve"]
    for label, pids, folder in started:
        assert len(pids) >= 3, f"{label}: a server, its workers"  # LitServe: 2 workers, TorchServe: Java + workers
        running = [pid for pid in pids if psutil.pid_exists(pid) and not has_exited(psutil.Process(pid))]
        assert running == [] and not folder.exists(), f"{label} left {running} running"
