"""The one way servekit times code in process: warm up, then time each call; and the percentiles it reports.

optimize (variants), bench (the archive's handler) and rollout (two handlers side by side) all time with these.
A figure a reader can trust is repeated (`repeated`: median and spread of the repeats) and carries the machine's
load while it was measured (`CpuMonitor`: CPU used by the measured processes and by everything else); `Figure`
says in words when its spread or the background load is too high for a clean number.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, TypeVar

from servekit.core.lazy import lazy_module

psutil = lazy_module("psutil")  # 25 ms, for commands that look at processes


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


# A repeated figure whose repeats differ by more than MAX_SPREAD of their median, or measured while other processes
# used more than MAX_BACKGROUND_CORES, is reported with the reason instead of as a clean number.
MAX_SPREAD = 0.10
MAX_BACKGROUND_CORES = 0.25
DEFAULT_REPEATS = 3


@dataclass
class CpuUse:
    """CPU used during a measurement, in cores (CPU seconds per wall second), split by who used it."""

    wall_s: float
    measured_cores: dict[str, float] = field(default_factory=dict)  # label -> cores (client, server, in process)
    background_cores: float = 0.0  # everything else on the machine
    loadavg_1m: float = 0.0
    cores: int = 0

    @classmethod
    def combined(cls, uses: list[CpuUse]) -> CpuUse:
        """Several measurements as one: each user's cores averaged over their wall time, the highest load."""
        wall = sum(use.wall_s for use in uses)

        def average(cores: Callable[[CpuUse], float]) -> float:
            return sum(cores(use) * use.wall_s for use in uses) / wall if wall else 0.0

        labels = dict.fromkeys(label for use in uses for label in use.measured_cores)
        measured = {label: average(lambda use, label=label: use.measured_cores.get(label, 0.0)) for label in labels}
        background = average(lambda use: use.background_cores)
        return cls(wall, measured, background, max(use.loadavg_1m for use in uses), max(use.cores for use in uses))

    def describe(self) -> str:
        parts = [f"{label} {value:.2f}" for label, value in self.measured_cores.items()]
        return (
            f"CPU cores used: {', '.join(parts + [f'other processes {self.background_cores:.2f}'])} "
            f"of {self.cores}; loadavg {self.loadavg_1m:.2f}"
        )


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and its descendants (TorchServe's frontend and its Python workers); [] if it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class CpuMonitor:
    """Measures CPU use while a block runs: of labelled process trees (found again at the end, so workers that
    started meanwhile count), of this process, and of the rest of the machine.

    with CpuMonitor({"server": torchserve_pid}) as monitor:
        ...
    monitor.use.background_cores
    """

    def __init__(self, trees: dict[str, int] | None = None, own_label: str = "this process"):
        self.trees, self.own_label = dict(trees or {}), own_label
        self.extra: dict[str, Callable[[], Iterable[psutil.Process]]] = {}
        self.use = CpuUse(0.0)

    def add(self, label: str, processes: Callable[[], Iterable[psutil.Process]]) -> None:
        """Also account for processes found by `processes()` (e.g. a load generator started inside the block)."""
        self.extra[label] = processes

    def _seconds(self) -> dict[tuple[int, float], tuple[str, float]]:
        seconds = {}
        groups = [(label, process_tree(pid)) for label, pid in self.trees.items()]
        groups += [(label, list(find())) for label, find in self.extra.items()]
        groups.append((self.own_label, [psutil.Process()]))
        for label, processes in groups:
            for process in processes:
                try:
                    times = process.cpu_times()
                    key = (process.pid, process.create_time())
                    seconds[key] = (label, times.user + times.system + times.children_user + times.children_system)
                except psutil.Error:
                    continue
        return seconds

    def __enter__(self) -> CpuMonitor:
        self._start = self._seconds()
        self._machine = busy_seconds()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        wall = time.perf_counter() - self._wall
        end = self._seconds()
        measured: dict[str, float] = {}
        for key, (label, seconds) in end.items():
            before = self._start.get(key, (label, 0.0))[1]
            measured[label] = measured.get(label, 0.0) + max(0.0, seconds - before)
        machine = busy_seconds() - self._machine
        background = max(0.0, machine - sum(measured.values()))
        self.use = CpuUse(
            wall_s=wall,
            measured_cores={label: value / wall for label, value in measured.items()} if wall else {},
            background_cores=background / wall if wall else 0.0,
            loadavg_1m=os.getloadavg()[0],
            cores=psutil.cpu_count() or 1,
        )


def busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle since boot."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


@dataclass
class Figure:
    """A repeated measurement: the median of its repeats, their spread, and the load it was measured under."""

    value: float
    repeats: list[float]
    unit: str = "ms"
    background_cores: float = 0.0

    @classmethod
    def of(cls, values: list[float], unit: str = "ms", background_cores: float = 0.0) -> Figure:
        return cls(statistics.median(values), list(values), unit, background_cores)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats: 0.05 means they differ by 5 %."""
        return (max(self.repeats) - min(self.repeats)) / self.value if self.value and len(self.repeats) > 1 else 0.0

    @property
    def doubts(self) -> list[str]:
        """Why this figure is not a clean number ([] when it is)."""
        reasons = []
        if self.spread > MAX_SPREAD:
            reasons.append(f"repeats spread {self.spread:.0%}")
        if self.background_cores > MAX_BACKGROUND_CORES:
            reasons.append(f"other processes used {self.background_cores:.2f} cores")
        return reasons

    @property
    def trusted(self) -> bool:
        return not self.doubts

    def describe(self, digits: int = 2) -> str:
        text = f"{self.value:.{digits}f} {self.unit} ±{self.spread / 2:.0%}"
        return text if self.trusted else f"{text} (unreliable: {', '.join(self.doubts)})"


def repeated(measure: Callable[[], float], repeats: int = DEFAULT_REPEATS, unit: str = "ms") -> Figure:
    """Runs `measure` `repeats` times under a CpuMonitor; the figure is the median with the spread and the load."""
    with CpuMonitor() as monitor:
        values = [measure() for _ in range(repeats)]
    return Figure.of(values, unit, monitor.use.background_cores)
