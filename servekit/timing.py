"""The one way servekit times code in process: warm up, then time each call; and the percentiles it reports.

optimize (variants), bench (the archive's handler) and rollout (two handlers side by side) all time with these.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any, TypeVar

Input = TypeVar("Input")


def elapsed_ms(run: Callable[[Input], Any], argument: Input) -> float:
    started = time.perf_counter()
    run(argument)
    return (time.perf_counter() - started) * 1000


def time_calls(
    run: Callable[[Input], Any],
    inputs: Sequence[Input],
    budget_s: float,
    min_iterations: int,
    warmup: int = 5,
    max_iterations: int | None = None,
) -> list[float]:
    """Milliseconds per call of `run` over `inputs` in turn, after `warmup` untimed calls: at least
    `min_iterations`, then until `budget_s` seconds have passed (or `max_iterations`)."""
    for argument in inputs[:warmup]:
        run(argument)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_iterations or time.perf_counter() < deadline:
        times.append(elapsed_ms(run, inputs[len(times) % len(inputs)]))
        if max_iterations is not None and len(times) >= max_iterations:
            break
    return times


def time_alternating(
    runs: Sequence[Callable[[Input], Any]], inputs: Sequence[Input], rounds: int, warmup: int = 3
) -> list[list[float]]:
    """Times several callables on the same inputs, interleaved call by call and each one first in turn, so that
    a drift of the machine (another job starting, a frequency change) weighs on all of them alike."""
    for run in runs:
        for argument in inputs[:warmup]:
            run(argument)
    times: list[list[float]] = [[] for _ in runs]
    turn = 0
    for _ in range(rounds):
        for argument in inputs:
            order = [(turn + offset) % len(runs) for offset in range(len(runs))]
            turn += 1
            for which in order:
                times[which].append(elapsed_ms(runs[which], argument))
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks, as numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def machine_summary() -> str:
    """The machine a measurement ran on, for reports."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {version('torch')}"
