"""`servekit tune --slo`: parsing objectives and splits, choosing the winner or the closest miss (no Java)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from servekit.cli import cli
from servekit.core.errors import UsageError
from servekit.measure import tune as tuning
from servekit.measure.loadgen import LoadResult


def result(concurrency: int, throughput: float, p50: float, p99: float, errors: int = 0) -> LoadResult:
    return LoadResult(concurrency, 5.0, 100, 100 - errors, errors, throughput_per_s=throughput, p50_ms=p50,
                      p95_ms=p99, p99_ms=p99)  # fmt: skip


GOALS = [tuning.Objective("p99", 25.0, 16), tuning.Objective("p50", 5.0, 1)]


def trial(workers: int, batch: int, at_16: tuple[float, float], p50_at_1: float, errors: int = 0) -> tuning.Trial:
    setting = tuning.Setting(workers, 1, batch, 1)
    results = {1: result(1, 200.0, p50_at_1, p50_at_1 * 2), 16: result(16, at_16[0], 8.0, at_16[1], errors)}
    return tuning.Trial(setting, results, GOALS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("p99=25ms@16", ("p99", 25.0, 16)), ("p50=4.5ms@1", ("p50", 4.5, 1)), (" p95 = 100ms@64 ", ("p95", 100.0, 64))],
)
def test_objectives_parse_percentile_limit_and_concurrency(text, expected):
    objective = tuning.parse_objective(text)
    assert (objective.percentile, objective.limit_ms, objective.concurrency) == expected


@pytest.mark.parametrize("text", ["p99=25@16", "p90=25ms@16", "p99=25ms", "p99<25ms@16", "p99=0ms@16", "p99=5ms@0"])
def test_malformed_objectives_are_usage_errors_with_an_example(text):
    with pytest.raises(UsageError, match=r"e\.g\. --slo p99=25ms@16"):
        tuning.parse_objective(text)


def test_malformed_slo_exits_2_with_an_example_before_touching_a_server(tmp_path):
    result = CliRunner().invoke(cli, ["tune", "digits", "--slo", "p99<25", "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and "e.g. --slo p99=25ms@16" in result.output


def test_splits_pair_workers_with_threads_and_a_bare_count_shares_the_cores(monkeypatch):
    monkeypatch.setattr(tuning, "available_cores", lambda: 4)
    assert tuning.parse_splits("2x1,1x4,4") == [(2, 1), (1, 4), (4, 1)]
    assert tuning.default_splits() == "1x4,2x2,3x1,4x1"
    with pytest.raises(UsageError, match="WORKERSxTHREADS"):
        tuning.parse_splits("2y1")


def test_the_winner_is_the_highest_throughput_that_meets_every_objective():
    fast_but_slow_tail = trial(2, 8, (1900.0, 31.0), 4.0)  # misses p99 at 16
    fast_but_lone_waits = trial(2, 8, (1800.0, 20.0), 12.0)  # misses p50 at 1
    winner = trial(2, 4, (1600.0, 22.0), 4.2)
    meets_slower = trial(1, 4, (900.0, 24.0), 3.0)
    chosen, closest = tuning.choose([fast_but_slow_tail, meets_slower, winner, fast_but_lone_waits])
    assert chosen is winner and closest is None
    reasons = "\n".join(tuning.why(winner, [fast_but_slow_tail, meets_slower, winner, fast_but_lone_waits]))
    assert "highest throughput (1600.0 req/s" in reasons and "2 of 4 settings" in reasons
    assert "misses p99=25ms@16 by +24%" in reasons and "misses p50=5ms@1 by +140%" in reasons


def test_when_nothing_meets_the_closest_setting_is_named_with_its_miss():
    far = trial(1, 1, (500.0, 80.0), 4.0)  # p99 3.2x the limit
    near = trial(2, 8, (1900.0, 30.0), 4.0)  # p99 1.2x
    errored = trial(2, 4, (2000.0, 10.0), 1.0, errors=3)
    chosen, closest = tuning.choose([far, near, errored])
    assert chosen is None and closest is near
    message = tuning.miss_message(closest)
    assert str(near.setting) in message and "p99=25ms@16: measured 30.0 ms, 20% over" in message
    assert "p50" not in message
    assert errored.misses() == {"p99=25ms@16": float("inf")}
