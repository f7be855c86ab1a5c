"""bench and tune without a server: load summaries, argument checks; the handler's batch log line and profiler."""

from __future__ import annotations

import json
import logging

import pytest
from digits import DigitsHandler
from support.handlers import extracted_archive, requests_for

from servekit.measure.loadgen import summarize


def test_load_summary_counts_add_up_and_only_2xx_count_as_success():
    outcomes = [(10.0, "200"), (20.0, "200"), (30.0, "200"), (5.0, "503"), (1.0, "ClientConnectorError")]
    result = summarize(outcomes, 2.0, concurrency=4, mode="closed")
    assert (result.requests, result.ok, result.errors) == (5, 3, 2)
    assert result.error_statuses == {"503": 1, "ClientConnectorError": 1}
    assert result.throughput_per_s == 1.5 and result.p50_ms == 20.0 and result.p99_ms == pytest.approx(29.8)


@pytest.mark.parametrize("log_batches", [None, True])
def test_each_batch_logs_one_structured_line_when_asked(model_store, tmp_path, good_png, caplog, log_batches):
    handler = DigitsHandler()
    context = extracted_archive(model_store / "digits-1.0.0.mar", tmp_path)
    if log_batches is not None:
        context.model_yaml_config["handler"]["log_batches"] = log_batches
    handler.initialize(context)
    context.request_ids = {0: "req-a", 1: "req-b"}
    with caplog.at_level(logging.INFO, logger="servekit_worker.telemetry"):
        handler.handle(requests_for([(good_png, "image/png"), (b"x", "image/png")], context), context)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith('{"event"')]
    if not log_batches:  # the default: no line per batch on the served path
        assert lines == []
        return
    assert len(lines) == 1
    line = lines[0]
    assert line["event"] == "servekit_batch" and line["model"] == "digits" and line["version"] == "1.0.0"
    assert line["request_ids"] == ["req-a", "req-b"] and (line["samples"], line["rejected"]) == (1, 1)
    assert line["inference_ms"] >= 0 and line["preprocess_ms"] >= 0


def test_servekit_profile_writes_a_chrome_trace_for_n_batches(model_store, tmp_path, good_png, monkeypatch):
    monkeypatch.setenv("SERVEKIT_PROFILE", "2")
    monkeypatch.setenv("SERVEKIT_PROFILE_DIR", str(tmp_path / "traces"))
    handler = DigitsHandler()
    context = extracted_archive(model_store / "digits-1.0.0.mar", tmp_path / "mar")
    handler.initialize(context)
    for _ in range(3):
        handler.handle(requests_for([(good_png, "image/png")], context), context)
    traces = sorted((tmp_path / "traces").glob("digits-*.json"))
    assert len(traces) == 2
    assert json.loads(traces[0].read_text())["traceEvents"]


def test_concurrency_levels_are_a_comma_list_of_clients_each_at_least_one():
    from click.testing import CliRunner

    from servekit.cli import cli
    from servekit.cli.base import LEVELS

    assert LEVELS.convert("1,4,16", None, None) == [1, 4, 16]
    for bad, message in (("1,x", "is not a comma list"), ("0,4", "must be >= 1"), ("", "give at least one")):
        result = CliRunner().invoke(cli, ["bench", "digits", "--concurrency", bad, "--workdir", "/nonexistent"])
        assert result.exit_code == 2 and "Invalid value for '--concurrency'" in result.output, result.output
        assert message in result.output


def test_served_and_peer_alternate_round_by_round_and_each_side_keeps_its_own_runs(monkeypatch):
    from servekit.core.timing import CpuUse, Figure
    from servekit.measure import bench
    from servekit.measure.loadgen import LoadResult, LoadRun

    calls = []

    def fake_measure_load(url, headers, bodies, concurrency, duration_s, pid, rate, generator, keys=None):
        calls.append(url)
        rate_seen = 100.0 * len(calls) if url == "served" else 10.0 * len(calls)
        result = LoadResult(concurrency, duration_s, 1, 1, 0, throughput_per_s=rate_seen, p99_ms=1.0)
        cpu = CpuUse(wall_s=duration_s, measured_cores={"server": 1.0 if url == "served" else 0.5}, cores=2)
        return LoadRun(result, Figure.of([rate_seen], "req/s"), Figure.of([1.0]), cpu)

    monkeypatch.setattr(bench, "measure_load", fake_measure_load)
    plan = bench.BenchPlan("digits", duration_s=2.0, repeats=4)
    served, peer = bench.alternated([bench.Side("served", [], 1), bench.Side("peer", [], 2)], 16, plan)
    assert calls == ["served", "peer", "peer", "served", "served", "peer", "peer", "served"]
    assert served.throughput.repeats == [100.0, 400.0, 500.0, 800.0] and peer.throughput.repeats == [
        20.0,
        30.0,
        60.0,
        70.0,
    ]
    assert served.result.throughput_per_s == 500.0  # the run with the median throughput (upper of the middle two)
    assert served.cpu.wall_s == 8.0 and served.cpu.measured_cores == {"server": 1.0}
    assert peer.cpu.measured_cores == {"server": 0.5}


def test_bench_of_triton_needs_no_torchserve_and_is_not_benched_beside_itself(tmp_path):
    from click.testing import CliRunner

    from servekit.cli import cli
    from servekit.cli.base import ServerOf

    server = ServerOf(tmp_path / "no-server")  # a frame walk in the handler's set-up probes private names
    assert not hasattr(server, "_entry_point") and not hasattr(server, "__deepcopy__")
    common = ["bench", "digits", "--runtime", "triton", "--workdir", str(tmp_path / "no-server"), "--triton-workdir"]
    result = CliRunner().invoke(cli, [*common, str(tmp_path / "no-triton")])
    assert result.exit_code == 2 and f"no Triton recorded in {tmp_path / 'no-triton'}" in result.output, result.output
    result = CliRunner().invoke(cli, [*common, str(tmp_path), "--baseline", "triton"])
    assert result.exit_code == 2 and "not beside itself" in result.output, result.output
