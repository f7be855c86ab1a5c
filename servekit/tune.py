"""`servekit tune`: sweep workers x batchSize x maxBatchDelay on the running server and keep the best.

Each setting is packed as a throw-away archive (`NAME-0.0.0-tune.K`), registered, driven at one concurrency for a
fixed time, then unregistered and deleted. Workers get `cores // workers` torch threads each, so two workers do
not fight over the same cores. The best throughput whose p95 fits the budget is written to the trained folder's
`serving.json`, which `servekit build` uses as its defaults.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from servekit.archive import BuildOptions, build_archive
from servekit.catalog import Catalog
from servekit.client import ServeClient
from servekit.errors import ApiError, UsageError
from servekit.loadgen import LoadResult, run_load
from servekit.registry import register_verified
from servekit.server import check_max_batch_delay
from servekit.workspace import SERVING_FILE

MAX_SETTINGS = 24


@dataclass(frozen=True)
class Setting:
    workers: int
    batch_size: int
    max_batch_delay_ms: int

    @property
    def torch_threads(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.workers)


@dataclass
class Trial:
    setting: Setting
    result: LoadResult
    within_budget: bool


def grid(workers: list[int], batch_sizes: list[int], delays_ms: list[int]) -> list[Setting]:
    settings = [Setting(w, b, d) for w, b, d in itertools.product(workers, batch_sizes, delays_ms)]
    if not settings or len(settings) > MAX_SETTINGS:
        raise UsageError(f"the grid has {len(settings)} settings; keep it between 1 and {MAX_SETTINGS}")
    if min(min(workers), min(batch_sizes)) < 1:
        raise UsageError("workers and batch sizes must be >= 1")
    for delay in delays_ms:
        check_max_batch_delay(delay)
    return settings


def tune(
    client: ServeClient,
    store: Path,
    name: str,
    handler: str,
    source_dir: Path,
    settings: list[Setting],
    bodies: list[tuple[bytes, str]],
    concurrency: int,
    duration_s: float,
    p95_budget_ms: float,
    on_trial: Callable[[Trial], None] | None = None,
) -> tuple[list[Trial], Trial | None]:
    """Runs every setting; returns the trials and the best one within the p95 budget (None if none fits)."""
    trials = []
    for index, setting in enumerate(settings):
        version = f"0.0.0-tune.{index}"
        options = BuildOptions(setting.batch_size, setting.max_batch_delay_ms, setting.workers,
                               handler={"torch_threads": setting.torch_threads})  # fmt: skip
        entry = build_archive(name, version, source_dir, store, handler=handler, options=options, force=True,
                              parent_version="")  # fmt: skip
        try:
            try:
                register_verified(client, store, name, version, setting.workers)
                url = f"{client.endpoints.inference_url}/predictions/{name}/{version}"
                result = run_load(url, {}, bodies, concurrency, duration_s, keys=client.keys)
            finally:  # a trial that fails must not leave its throw-away version on the server
                discard(client, name, version)
        finally:
            forget(store, entry.name, version)
        trial = Trial(setting, result, result.errors == 0 and result.p95_ms <= p95_budget_ms)
        trials.append(trial)
        if on_trial:
            on_trial(trial)
    fitting = [t for t in trials if t.within_budget]
    return trials, max(fitting, key=lambda t: t.result.throughput_per_s, default=None)


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


def save_serving(source_dir: Path, best: Trial, concurrency: int, p95_budget_ms: float) -> Path:
    path = source_dir / SERVING_FILE
    document = {
        **asdict(best.setting),
        "torch_threads": best.setting.torch_threads,
        "tuned_at_concurrency": concurrency,
        "p95_budget_ms": p95_budget_ms,
        "throughput_per_s": round(best.result.throughput_per_s, 1),
        "p95_ms": round(best.result.p95_ms, 2),
    }
    path.write_text(json.dumps(document, indent=2))
    return path


def describe(trial: Trial) -> str:
    s, r = trial.setting, trial.result
    return (
        f"workers {s.workers} batch {s.batch_size:>2} delay {s.max_batch_delay_ms:>3} ms: "
        f"{r.throughput_per_s:8.1f} req/s, p95 {r.p95_ms:7.2f} ms, {r.errors} errors"
        + ("" if trial.within_budget else "  (over budget)")
    )


def to_dict(trials: list[Trial], best: Trial, serving_json: Path) -> dict:
    return {
        "trials": [{**asdict(t), "result": t.result.to_dict()} for t in trials],
        "best": asdict(best.setting),
        "serving_json": str(serving_json),
    }
