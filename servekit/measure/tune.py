"""`servekit tune`: the highest throughput that meets every service-level objective, over a grid of serving settings.

Objectives read `p99=25ms@16`: the 99th percentile latency with 16 concurrent clients must be at most 25 ms.
Each setting (workers x torch threads per worker, batchSize, maxBatchDelay) is packed as a throw-away archive
(`NAME-0.0.0-tune.RUN.K`: RUN is unique to each tune, so a run never collides with what another one left),
registered, driven at every concurrency the objectives name, then unregistered and deleted, also on Ctrl-C.
The winner is the setting with the highest throughput at the highest concurrency named among those that meet
every objective without errors; it is written to the trained folder's `serving.json`, which `servekit build` uses
as its defaults. When none meets them all, the closest one (the smallest worst ratio of measured to allowed) is
reported with how far it misses, and nothing is written.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from servekit.build.archive import BuildOptions, available_cores, build_archive
from servekit.core.errors import ApiError, ServekitError, UsageError
from servekit.core.properties import check_max_batch_delay
from servekit.measure.loadgen import LoadResult, run_load
from servekit.serve.client import ServeClient
from servekit.serve.deployments import register_verified
from servekit.serve.handle import Server
from servekit.store.catalog import Catalog
from servekit.store.workspace import SERVING_FILE

MAX_SETTINGS = 36
PERCENTILES = ("p50", "p95", "p99")
SLO_EXAMPLE = "--slo p99=25ms@16 (99th percentile at most 25 ms with 16 concurrent clients)"
SLO_PATTERN = re.compile(r"^(p50|p95|p99)=(\d+(?:\.\d+)?)ms@(\d+)$")


@dataclass(frozen=True)
class Objective:
    percentile: str  # p50, p95 or p99
    limit_ms: float
    concurrency: int

    def __str__(self) -> str:
        return f"{self.percentile}={self.limit_ms:g}ms@{self.concurrency}"


def parse_objective(text: str) -> Objective:
    """`p99=25ms@16` -> Objective("p99", 25.0, 16); anything else is a UsageError with an example."""
    match = SLO_PATTERN.match(text.strip().replace(" ", ""))
    if not match or float(match[2]) <= 0 or int(match[3]) < 1:
        raise UsageError(f"--slo {text!r} is not PERCENTILE=LIMITms@CONCURRENCY, e.g. {SLO_EXAMPLE}")
    return Objective(match[1], float(match[2]), int(match[3]))


@dataclass(frozen=True)
class Setting:
    workers: int
    torch_threads: int
    batch_size: int
    max_batch_delay_ms: int

    def __str__(self) -> str:
        return (
            f"{self.workers} worker(s) x {self.torch_threads} thread(s), batch {self.batch_size}, "
            f"delay {self.max_batch_delay_ms} ms"
        )


def parse_splits(text: str) -> list[tuple[int, int]]:
    """`2x1,1x2` -> [(2, 1), (1, 2)] (workers x torch threads); a bare `2` shares the cores out: (2, cores // 2)."""
    splits = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", part)
        if not match or int(match[1]) < 1 or (match[2] is not None and int(match[2]) < 1):
            raise UsageError(f"--workers {text!r}: give WORKERSxTHREADS or WORKERS, comma separated, e.g. 2x1,1x2")
        workers = int(match[1])
        splits.append((workers, int(match[2]) if match[2] else max(1, available_cores() // workers)))
    return splits


def default_splits() -> str:
    """Every way to share the cores out among 1 to 4 workers, e.g. `1x2,2x1` on two cores."""
    cores = available_cores()
    return ",".join(f"{w}x{max(1, cores // w)}" for w in range(1, min(cores, 4) + 1))


def grid(splits: list[tuple[int, int]], batch_sizes: list[int], delays_ms: list[int]) -> list[Setting]:
    settings = [Setting(w, t, b, d) for (w, t), b, d in itertools.product(splits, batch_sizes, delays_ms)]
    if not settings or len(settings) > MAX_SETTINGS:
        raise UsageError(f"the grid has {len(settings)} settings; keep it between 1 and {MAX_SETTINGS}")
    if min(b for b in batch_sizes) < 1:
        raise UsageError("batch sizes must be >= 1")
    for delay in delays_ms:
        check_max_batch_delay(delay)
    return settings


@dataclass
class Trial:
    setting: Setting
    results: dict[int, LoadResult]  # concurrency -> its run
    objectives: list[Objective] = field(default_factory=list)

    def measured_ms(self, objective: Objective) -> float:
        return getattr(self.results[objective.concurrency], f"{objective.percentile}_ms")

    def misses(self) -> dict[str, float]:
        """Objective -> measured / allowed, for each objective missed (an errored run misses with infinity)."""
        missed = {}
        for objective in self.objectives:
            result = self.results[objective.concurrency]
            ratio = float("inf") if result.errors or not result.ok else self.measured_ms(objective) / objective.limit_ms
            if ratio > 1:
                missed[str(objective)] = ratio
        return missed

    @property
    def meets(self) -> bool:
        return not self.misses()

    @property
    def throughput_per_s(self) -> float:
        """Throughput at the highest concurrency measured: what the setting delivers under the heaviest load."""
        return self.results[max(self.results)].throughput_per_s

    def worst_ratio(self) -> float:
        ratios = [
            float("inf") if self.results[o.concurrency].errors else self.measured_ms(o) / o.limit_ms
            for o in self.objectives
        ]
        return max(ratios)


def choose(trials: list[Trial]) -> tuple[Trial | None, Trial | None]:
    """(winner, closest): the highest throughput among trials meeting every objective, else the trial that
    misses by the least (smallest worst measured/allowed ratio; throughput breaks ties)."""
    meeting = [t for t in trials if t.meets]
    if meeting:
        return max(meeting, key=lambda t: t.throughput_per_s), None
    return None, min(trials, key=lambda t: (t.worst_ratio(), -t.throughput_per_s), default=None)


@dataclass
class TunePlan:
    """What `servekit tune` tries: each setting as a throw-away archive of the model in `source_dir`, loaded with
    `bodies` at every concurrency the objectives name for `duration_s`.

    `placement`: model-config settings every trial archive carries (GPU workers: deviceType, deviceIds).
    `warmup_s`: unmeasured load on each setting first, at the highest concurrency, so neither the frontend's JIT
    nor the new workers' first batches are charged to the settings measured early."""

    name: str
    handler: str
    source_dir: Path
    settings: list[Setting]
    bodies: list[tuple[bytes, str]]
    objectives: list[Objective]
    duration_s: float = 5.0
    generator: str = "python"
    placement: dict | None = None
    warmup_s: float = 0.0


def tune(server: Server, plan: TunePlan, on_trial: Callable[[Trial], None] | None = None) -> list[Trial]:
    """Runs every setting of the plan at every concurrency its objectives name (lowest first); returns the trials."""
    client, store, name, objectives = server.client, server.store, plan.name, plan.objectives
    settings, bodies, generator = plan.settings, plan.bodies, plan.generator
    if not objectives:
        raise UsageError(f"give at least one objective, e.g. {SLO_EXAMPLE}")
    levels = sorted({objective.concurrency for objective in objectives})
    run = f"r{secrets.token_hex(4)}"  # a letter first: an all-digit identifier may not start with 0 in semver
    trials = []
    for index, setting in enumerate(settings):
        version = f"0.0.0-tune.{run}.{index}"
        options = BuildOptions(setting.batch_size, setting.max_batch_delay_ms, setting.workers, setting.torch_threads,
                               model_config=dict(plan.placement or {}))  # fmt: skip
        try:
            try:
                build_archive(name, version, plan.source_dir, store, handler=plan.handler, options=options, force=True,
                              parent_version="")  # fmt: skip
                try:
                    with held_interrupt(f"the registration of {name} {version}"):
                        register_verified(client, store, name, version, setting.workers)
                    url = f"{client.endpoints.inference_url}/predictions/{name}/{version}"
                    if plan.warmup_s:
                        run_load(url, {}, bodies, levels[-1], plan.warmup_s, generator=generator, keys=client.keys)
                    results = {
                        c: run_load(url, {}, bodies, c, plan.duration_s, generator=generator, keys=client.keys)
                        for c in levels
                    }
                finally:  # a trial that fails or is interrupted must not leave its throw-away version on the server
                    discard(client, name, version)
            finally:
                forget(store, name, version)
        except KeyboardInterrupt as interrupt:
            left = (
                f"if `servekit models` still lists {name} {version} once its registration is done, "
                f"`servekit retire {name} --version {version}` removes it"
                if isinstance(interrupt, StoppedNow)
                else f"its throw-away version {name} {version} is unregistered and deleted"
            )
            raise ServekitError(
                f"interrupted at setting {index + 1} of {len(settings)} ({setting}): {left}; nothing was written"
            ) from None
        trials.append(Trial(setting, results, list(objectives)))
        if on_trial:
            on_trial(trials[-1])
    return trials


class StoppedNow(KeyboardInterrupt):
    """A second Ctrl-C while a first one was held: what the held block was doing may not have finished."""


@contextlib.contextmanager
def held_interrupt(what: str) -> Iterator[None]:
    """Holds a first Ctrl-C until the block ends, then raises it; a second one interrupts at once.

    TorchServe goes on registering a version after its client stopped waiting for the answer: an unregister sent
    meanwhile finds nothing (404), and the version then comes up with its workers, out of the clean-up's reach.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame) -> None:
        if held:
            raise StoppedNow
        held.append(signum)
        print(f"interrupted: waiting for {what} to finish, to undo it (Ctrl-C again: stop now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def discard(client: ServeClient, name: str, version: str) -> None:
    """Unregisters a throw-away version; one that never got registered (404) leaves nothing to undo."""
    try:
        client.unregister(name, version)
    except ApiError as exc:
        if exc.status != 404:
            raise


def forget(store: Path, name: str, version: str) -> None:
    """Deletes a throw-away archive, its golden samples and its catalog entry."""
    with Catalog.locked(store) as catalog:
        entry = catalog.models.get(name, {}).pop(version, None)
    if entry is not None:
        (store / entry.archive).unlink(missing_ok=True)
        if entry.golden_dir:
            shutil.rmtree(store / entry.golden_dir, ignore_errors=True)


def miss_message(closest: Trial) -> str:
    missed = closest.misses()
    parts = [
        f"{o} (errors)"
        if missed[str(o)] == float("inf")
        else f"{o}: measured {closest.measured_ms(o):.1f} ms, {missed[str(o)] - 1:.0%} over"
        for o in closest.objectives
        if str(o) in missed
    ]
    return f"no setting meets every objective; the closest, {closest.setting}, misses " + "; ".join(parts)


def save_serving(source_dir: Path, best: Trial) -> Path:
    path = source_dir / SERVING_FILE
    document = {
        **asdict(best.setting),
        "objectives": [str(o) for o in best.objectives],
        "throughput_per_s": round(best.throughput_per_s, 1),
        "measured": {str(o): round(best.measured_ms(o), 2) for o in best.objectives},
    }
    path.write_text(json.dumps(document, indent=2))
    return path


def describe(trial: Trial) -> str:
    figures = ", ".join(f"{o.percentile}@{o.concurrency} {trial.measured_ms(o):.2f} ms" for o in trial.objectives)
    errors = sum(r.errors for r in trial.results.values())
    missed = trial.misses()
    return (
        f"{trial.setting}: {trial.throughput_per_s:8.1f} req/s at {max(trial.results)} clients, {figures}"
        + (f", {errors} errors" if errors else "")
        + ("" if not missed else "  (misses " + ", ".join(missed) + ")")
    )


def why(winner: Trial, trials: list[Trial]) -> list[str]:
    """The reasons the winner won, in words: what it beat, and what would have beaten it but missed."""
    meeting = sorted((t for t in trials if t.meets), key=lambda t: -t.throughput_per_s)
    lines = [
        f"{winner.setting} has the highest throughput ({winner.throughput_per_s:.1f} req/s at "
        f"{max(winner.results)} clients) of the {len(meeting)} of {len(trials)} settings that meet "
        + ", ".join(str(o) for o in winner.objectives)
        + "."
    ]
    if len(meeting) > 1:
        runner_up = meeting[1]
        lines.append(
            f"Runner-up: {runner_up.setting} at {runner_up.throughput_per_s:.1f} req/s "
            f"({runner_up.throughput_per_s / winner.throughput_per_s - 1:+.1%})."
        )
    for faster in (t for t in trials if not t.meets and t.throughput_per_s > winner.throughput_per_s):
        missed = faster.misses()
        lines.append(
            f"Faster but out: {faster.setting} at {faster.throughput_per_s:.1f} req/s misses "
            + ", ".join(f"{o} by {r - 1:+.0%}" if r != float("inf") else f"{o} (errors)" for o, r in missed.items())
            + "."
        )
    return lines


def write_reports(trials: list[Trial], winner: Trial | None, closest: Trial | None, out_dir: Path) -> Path:
    """tune.json, tune.md (every trial, the verdict and why) and frontier.png in out_dir; returns tune.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tune.json").write_text(json.dumps(to_dict(trials, winner, closest), indent=2))
    verdict = why(winner, trials) if winner else [miss_message(closest)] if closest else []
    objectives = trials[0].objectives if trials else []
    headers = (
        ["setting", f"req/s @{max(trials[0].results) if trials else '-'}"] + [str(o) for o in objectives] + ["meets"]
    )
    lines = [
        "# servekit tune",
        "",
        *verdict,
        "",
        "Frontier: frontier.png (throughput against the worst measured/allowed ratio; the dashed line is the limit).",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for trial in trials:
        cells = [str(trial.setting), f"{trial.throughput_per_s:.1f}"]
        cells += [f"{trial.measured_ms(o):.2f}" for o in objectives] + ["yes" if trial.meets else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    path = out_dir / "tune.md"
    path.write_text("\n".join(lines) + "\n")
    plot_frontier(trials, winner, out_dir / "frontier.png")
    return path


def pareto(trials: list[Trial]) -> list[Trial]:
    """The trials no other trial beats on both throughput (higher) and worst objective ratio (lower)."""
    return sorted(
        (
            t
            for t in trials
            if not any(
                o.throughput_per_s >= t.throughput_per_s
                and o.worst_ratio() <= t.worst_ratio()
                and (o.throughput_per_s, o.worst_ratio()) != (t.throughput_per_s, t.worst_ratio())
                for o in trials
            )
        ),
        key=lambda t: t.worst_ratio(),
    )


def plot_frontier(trials: list[Trial], winner: Trial | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [t for t in trials if t.worst_ratio() != float("inf")]
    figure, axes = plt.subplots(figsize=(8, 5))
    for trial in finite:
        axes.scatter(trial.worst_ratio(), trial.throughput_per_s, color="tab:green" if trial.meets else "tab:red")
        axes.annotate(
            f"{trial.setting.workers}x{trial.setting.torch_threads} b{trial.setting.batch_size} "
            f"d{trial.setting.max_batch_delay_ms}",
            (trial.worst_ratio(), trial.throughput_per_s),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    front = pareto(finite)
    axes.plot([t.worst_ratio() for t in front], [t.throughput_per_s for t in front], "k--", alpha=0.5, label="frontier")
    if winner is not None:
        axes.scatter(winner.worst_ratio(), winner.throughput_per_s, s=200, facecolors="none", edgecolors="black",
                     label=f"winner: {winner.setting}")  # fmt: skip
    axes.axvline(1.0, color="gray", linestyle=":", label="objective limit")
    axes.set(xlabel="worst measured / allowed latency over the objectives", ylabel="requests/s at the top concurrency")
    axes.set_title("servekit tune: throughput against the objectives (green meets all)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def to_dict(trials: list[Trial], winner: Trial | None, closest: Trial | None) -> dict:
    return {
        "trials": [
            {
                "setting": asdict(t.setting),
                "results": {str(c): r.to_dict() for c, r in t.results.items()},
                "meets": t.meets,
                "misses": {o: (None if r == float("inf") else round(r, 3)) for o, r in t.misses().items()},
            }
            for t in trials
        ],
        "winner": asdict(winner.setting) if winner else None,
        "closest": asdict(closest.setting) if closest else None,
        "why": why(winner, trials) if winner else [miss_message(closest)] if closest else [],
    }


def finish(source_dir: Path, trials: list[Trial], out_dir: Path) -> tuple[Trial, Path, Path]:
    """Writes the reports; saves the winner's serving.json, or raises with the closest setting's miss."""
    winner, closest = choose(trials)
    report = write_reports(trials, winner, closest, out_dir)
    if winner is None:
        raise ServekitError(miss_message(closest) + f"; report in {report}")
    return winner, save_serving(source_dir, winner), report
