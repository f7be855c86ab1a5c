"""optimize's speedup is timed against eager call by call, so load that grows during a run cannot pass for one."""

from __future__ import annotations

import itertools
import statistics
import time

from servekit.build.optimize import paired_speedup


def machine_slowing_down(base_ms: float, step_ms: float):
    """A model run that takes `base_ms` on a machine slowing down by `step_ms` per call (another job ramping up)."""
    calls = itertools.count()

    def run(_) -> None:
        time.sleep((base_ms + step_ms * next(calls)) / 1000)

    return run


def median_ms(run, calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        run(None)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def test_equal_variants_time_equal_while_the_machine_slows_down_under_them():
    shared = machine_slowing_down(2.0, step_ms=0.1)  # both run on it: each call of either waits 0.1 ms longer
    speedup = paired_speedup((shared, 2.0), (shared, 2.0), list(range(32)), budget_s=1.0)
    assert 0.85 < speedup < 1.18, speedup
    # the same machine timed one variant after the other (as each variant's own p50 is): the later reads slower
    sequential = machine_slowing_down(2.0, step_ms=0.1)
    early, late = median_ms(sequential, 32), median_ms(sequential, 32)
    assert late / early > 1.4, (early, late)


def test_a_variant_twice_as_fast_reads_about_2x():
    speedup = paired_speedup((machine_slowing_down(2.0, 0.0), 2.0), (machine_slowing_down(1.0, 0.0), 1.0),
                             list(range(16)), budget_s=1.0)  # fmt: skip
    assert 1.4 < speedup < 2.8, speedup
