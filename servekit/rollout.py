"""Putting versions on a running TorchServe safely: verify, register, smoke-test, shadow-compare, promote, watch.

Every step reports its numbers; a failed check stops the rollout and leaves (or restores) the previous default.
The defaults a rollout set are remembered per server in `WORKDIR/defaults.json`, which `rollback` reads.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servekit.archive import verify_archive
from servekit.catalog import Catalog, version_key
from servekit.client import ServeClient, answer_of
from servekit.datasets import HeldOutSample, read_held_out
from servekit.errors import ApiError, ServekitError, UsageError
from servekit.status import RESPONSE_COUNTERS, VERSION_COUNTERS

HISTORY_FILE = "defaults.json"


def ready_workers(description: dict) -> int:
    return sum(worker["status"] == "READY" for worker in description.get("workers", []))


def register_verified(client: ServeClient, store: Path, name: str, version: str, workers: int | None = None) -> dict:
    """Registers NAME VERSION after checking the archive's sha256 against the catalog; returns its description.

    TorchServe lets the archive's model-config.yaml (minWorkers/maxWorkers) win over `initial_workers`, so an
    explicit `workers` is applied with a synchronous scale after registration.
    """
    entry = verify_archive(store, name, version)
    client.register(entry.archive, initial_workers=workers or 1)
    description = client.describe(name, version)[0]
    if workers and (ready_workers(description) != workers or description["minWorkers"] != workers):
        description = scale(client, name, version, workers, workers)
    return description


# What the server has --------------------------------------------------------------------------------------------
def registered_versions(client: ServeClient, name: str) -> list[str]:
    try:
        return sorted((d["modelVersion"] for d in client.describe(name)), key=version_key)
    except ApiError as exc:
        if exc.status == 404:
            return []
        raise


def default_version(client: ServeClient, name: str) -> str | None:
    """The version TorchServe answers /predictions/NAME with (None if NAME is not registered)."""
    for model in client.list_models():
        if model["modelName"] == name:
            return next(d["modelVersion"] for d in client.describe(name) if d["modelUrl"] == model["modelUrl"])
    return None


class DefaultHistory:
    """The defaults set through servekit on one server, oldest first, per model."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / HISTORY_FILE

    def read(self) -> dict[str, list[str]]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def record(self, name: str, version: str) -> None:
        history = self.read()
        versions = history.setdefault(name, [])
        if not versions or versions[-1] != version:
            versions.append(version)
        self.path.write_text(json.dumps(history, indent=2))

    def previous(self, name: str, current: str, registered: list[str]) -> str | None:
        for version in reversed(self.read().get(name, [])):
            if version != current and version in registered:
                return version
        return None


def set_default(client: ServeClient, history: DefaultHistory, name: str, version: str) -> None:
    client.set_default(name, version)
    history.record(name, version)


def rollback(client: ServeClient, history: DefaultHistory, name: str) -> tuple[str, str]:
    """Makes the previous default (still registered) the default again; returns (from, to)."""
    current = default_version(client, name)
    if current is None:
        raise UsageError(f"{name} is not registered on this server")
    previous = history.previous(name, current, registered_versions(client, name))
    if previous is None:
        raise UsageError(f"no earlier default of {name} is registered here: nothing to roll back to from {current}")
    set_default(client, history, name, previous)
    return current, previous


def scale(
    client: ServeClient, name: str, version: str, min_workers: int, max_workers: int, timeout_s: float = 120.0
) -> dict:
    """Resizes a version and waits until `min_workers` workers are READY (TorchServe's synchronous flag returns
    once workers are spawned, not necessarily loaded); returns the description."""
    if min_workers > max_workers:
        raise UsageError(f"min workers {min_workers} is above max workers {max_workers}")
    client.scale(name, version, min_workers, max_workers)
    deadline = time.monotonic() + timeout_s
    while True:
        description = client.describe(name, version)[0]
        if ready_workers(description) >= min_workers or time.monotonic() > deadline:
            return description
        time.sleep(0.25)


def retire(client: ServeClient, name: str, version: str) -> None:
    """Unregisters a version; the current default is refused (promote or roll back first)."""
    registered = registered_versions(client, name)
    if version not in registered:
        raise UsageError(f"{name} {version} is not registered; registered: {', '.join(registered) or 'none'}")
    if default_version(client, name) == version:
        raise UsageError(f"{name} {version} is the default: roll back or promote another version before retiring it")
    client.unregister(name, version)


# The rollout ------------------------------------------------------------------------------------------------------
@dataclass
class RolloutPolicy:
    min_agreement: float = 0.95  # top-1 agreement with the default on the shadow sample
    max_latency_ratio: float = 1.5  # candidate / default: handler p50 per batch, both timed in this process
    max_error_rate: float = 0.01  # 5xx share during the watch window
    shadow_samples: int = 64
    watch_s: float = 10.0
    workers: int | None = None


@dataclass
class Step:
    name: str
    ok: bool
    detail: str
    numbers: dict = field(default_factory=dict)


@dataclass
class RolloutReport:
    name: str
    version: str
    previous: str | None
    promoted: bool = False
    steps: list[Step] = field(default_factory=list)

    @property
    def reason(self) -> str:
        failed = [step for step in self.steps if not step.ok]
        return failed[-1].detail if failed else ""


class RolloutFailed(ServekitError):
    def __init__(self, report: RolloutReport):
        self.report = report
        super().__init__(f"rollout of {report.name} {report.version} stopped: {report.reason}")


def compare_in_process(
    store: Path, candidate, previous, samples: list[HeldOutSample], batch: int, rounds: int = 5
) -> tuple[float, float]:
    """p50 handler time per batch of both archives, timed alternately in a fresh process (no client threads there
    competing for the GIL), each one first in every other pair so neither always pays for going first."""
    if previous is None:
        raise UsageError("the default version is not in this store's catalog: its latency cannot be compared")
    bodies = [(s.path.read_bytes(), s.content_type) for s in samples]
    archives = (str(store / candidate.archive), str(store / previous.archive))
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(time_handlers, (archives, bodies, batch, rounds))


def time_handlers(
    archives: tuple[str, str], bodies: list[tuple[bytes, str]], batch: int, rounds: int
) -> tuple[float, float]:
    """Runs in the child process of compare_in_process."""
    from servekit.inprocess import InProcessHandler

    batches = [bodies[i : i + batch] for i in range(0, len(bodies), batch)]
    times: list[list[float]] = [[], []]
    with InProcessHandler(Path(archives[0])) as new, InProcessHandler(Path(archives[1])) as old:
        handlers = (new, old)
        for handler in handlers:  # warm-up: the first passes of each batch shape are slow on CPU
            for chunk in batches[:3]:
                handler.handle(chunk)
        pair = 0
        for _ in range(rounds):
            for chunk in batches:
                order = (0, 1) if pair % 2 == 0 else (1, 0)
                pair += 1
                for which in order:
                    started = time.perf_counter()
                    handlers[which].handle(chunk)
                    times[which].append((time.perf_counter() - started) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def label_of(answer: Any) -> str | None:
    return str(answer.get("label")) if isinstance(answer, dict) and "label" in answer else None


def answer_key(answer: Any) -> Any:
    """What two versions must agree on: the top-1 class, or the argmax of raw outputs."""
    if isinstance(answer, list):
        return tuple(answer_key(a) for a in answer)
    if isinstance(answer, dict) and "index" in answer:
        return answer["index"]
    if isinstance(answer, dict) and "output" in answer:
        values = answer["output"]
        return max(range(len(values)), key=values.__getitem__) if values else None
    return json.dumps(answer, sort_keys=True)


@dataclass
class Timed:
    answer: Any
    round_trip_ms: float
    compute_ms: float | None  # the model's inference time per sample of the batch this request rode in


def timed_predict(client: ServeClient, name: str, version: str, sample: HeldOutSample) -> Timed:
    started = time.perf_counter()
    response = client.predict_response(
        name, sample.path.read_bytes(), version=version, content_type=sample.content_type
    )
    round_trip = (time.perf_counter() - started) * 1000
    batch_ms, samples = (
        response.headers.get("X-Servekit-Inference-Ms"),
        response.headers.get("X-Servekit-Batch-Samples"),
    )
    compute = float(batch_ms) / max(1, int(samples)) if batch_ms and samples else None
    return Timed(answer_of(response), round_trip, compute)


def version_timings(client: ServeClient, name: str) -> dict[str, dict[str, float]]:
    """Per version label: cumulative request count, and inference and queue latency sums (microseconds)."""
    timings: dict[str, dict[str, float]] = {}
    for metric, labels, value in client.metric_samples():
        if metric in VERSION_COUNTERS and labels.get("model_name") == name:
            version = timings.setdefault(labels["model_version"], dict.fromkeys(VERSION_COUNTERS.values(), 0.0))
            version[VERSION_COUNTERS[metric]] += value
    return timings


def service_ms(before: dict, after: dict, version: str) -> float | None:
    """Mean time from leaving the queue to the answer, per request of `version` between two readings."""
    start, end = before.get(version, {}), after.get(version, {})
    requests = end.get("requests", 0) - start.get("requests", 0)
    if requests <= 0:
        return None
    busy_us = (end["latency_us"] - start.get("latency_us", 0)) - (end["queue_us"] - start.get("queue_us", 0))
    return busy_us / requests / 1000


def server_counters(client: ServeClient) -> dict[str, float]:
    """Host-level response counts by class, from the Prometheus endpoint."""
    counters = dict.fromkeys(RESPONSE_COUNTERS, 0.0)
    for metric, _, value in client.metric_samples():
        if metric in counters:
            counters[metric] += value
    return counters


def rollout(
    client: ServeClient,
    store: Path,
    name: str,
    version: str,
    history: DefaultHistory,
    samples: list[HeldOutSample] | None = None,
    policy: RolloutPolicy | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> RolloutReport:
    """Moves NAME's default to VERSION only if every check passes; raises RolloutFailed (default kept) if not."""
    policy = policy or RolloutPolicy()
    entry = verify_archive(store, name, version)
    golden = read_held_out(store / entry.golden_dir) if entry.golden_dir else []
    shadow = (samples or golden)[: policy.shadow_samples]
    if not golden or not shadow:
        raise UsageError(f"{name} {version} has no golden samples: rebuild it from a folder with heldout/")
    previous = default_version(client, name)
    report = RolloutReport(name, version, previous)
    registered_here = False

    def step(step_name: str, ok: bool, detail: str, **numbers) -> None:
        report.steps.append(Step(step_name, ok, detail, numbers))
        if on_step:
            on_step(report.steps[-1])
        if not ok:
            if registered_here and default_version(client, name) != version:
                client.unregister(name, version)  # leave the server as the rollout found it
            raise RolloutFailed(report)

    if previous == version:
        raise UsageError(f"{name} {version} is already the default")
    if version not in registered_versions(client, name):
        description = register_verified(client, store, name, version, policy.workers)
        registered_here = True
        step(
            "register",
            True,
            f"registered {entry.archive} (sha256 verified), {ready_workers(description)} worker(s) ready",
            workers=ready_workers(description),
        )
    else:
        step("register", True, f"{name} {version} was already registered")

    failures = []
    for sample in golden:
        try:
            client.predict(name, sample.path.read_bytes(), version=version, content_type=sample.content_type)
        except ServekitError as exc:
            failures.append(f"{sample.path.name}: {exc}")
    step(
        "smoke",
        not failures,
        f"{len(golden) - len(failures)}/{len(golden)} golden inputs answered"
        + (f"; first failure {failures[0]}" if failures else ""),
        answered=len(golden) - len(failures),
    )

    if previous is not None:
        pairs: list[tuple[HeldOutSample, Timed, Timed]] = []
        group = int(client.describe(name, version)[0].get("batchSize") or 1)
        timings_before = version_timings(client, name)
        with ThreadPoolExecutor(max_workers=group) as pool:  # concurrent groups of one batch, alternating versions
            for start in range(0, len(shadow), group):
                chunk = shadow[start : start + group]
                olds = list(pool.map(lambda sample: timed_predict(client, name, previous, sample), chunk))
                news = list(pool.map(lambda sample: timed_predict(client, name, version, sample), chunk))
                pairs += zip(chunk, olds, news, strict=True)
        timings_after = version_timings(client, name)
        agreement = sum(answer_key(old.answer) == answer_key(new.answer) for _, old, new in pairs) / len(pairs)
        accuracy_new = sum(label_of(new.answer) == s.label for s, _, new in pairs) / len(pairs)
        accuracy_old = sum(label_of(old.answer) == s.label for s, old, _ in pairs) / len(pairs)
        step(
            "shadow",
            agreement >= policy.min_agreement,
            f"top-1 agreement with {previous} {agreement:.3f} on {len(pairs)} inputs "
            f"(need >= {policy.min_agreement}); accuracy {accuracy_new:.3f} vs {accuracy_old:.3f}",
            agreement=agreement,
            accuracy=accuracy_new,
            previous_accuracy=accuracy_old,
        )
        # The gate times both archives' handlers here, alternately, on the shadow inputs in batches of the
        # candidate's size: measured through the live server, a freshly loaded candidate always looks slower
        # (its batches fill late and its idle threads are scheduled behind the busy default's).
        previous_entry = Catalog.load(store).get(name, previous)
        new_ms, old_ms = compare_in_process(store, entry, previous_entry, shadow, group)
        ratio = new_ms / old_ms if old_ms else 1.0
        served_new = [new.compute_ms for _, _, new in pairs if new.compute_ms is not None]
        served_old = [old.compute_ms for _, old, _ in pairs if old.compute_ms is not None]
        p50_new = statistics.median(new.round_trip_ms for _, _, new in pairs)
        p50_old = statistics.median(old.round_trip_ms for _, old, _ in pairs)
        step(
            "latency",
            ratio <= policy.max_latency_ratio,
            f"handler p50 per batch of {group} in process {new_ms:.2f} ms vs {old_ms:.2f} ms: ratio {ratio:.2f} "
            f"(limit {policy.max_latency_ratio}); served round trip p50 {p50_new:.1f} vs {p50_old:.1f} ms",
            ms=new_ms,
            previous_ms=old_ms,
            ratio=ratio,
            p50_ms=p50_new,
            previous_p50_ms=p50_old,
            served_compute_ms=statistics.median(served_new) if served_new else None,
            previous_served_compute_ms=statistics.median(served_old) if served_old else None,
            service_ms=service_ms(timings_before, timings_after, version),
            previous_service_ms=service_ms(timings_before, timings_after, previous),
        )

    set_default(client, history, name, version)
    report.promoted = True
    step("promote", True, f"default {previous or '(none)'} -> {version}")
    watch(client, history, report, golden, policy, step)
    return report


def watch(
    client: ServeClient,
    history: DefaultHistory,
    report: RolloutReport,
    golden: list[HeldOutSample],
    policy: RolloutPolicy,
    step: Callable[..., None],
) -> None:
    """Probes the new default with golden inputs for `policy.watch_s` while live traffic flows, then reads the
    server's 2xx/4xx/5xx counters; too many 5xx or a failed probe restores the previous default."""
    before = server_counters(client)
    deadline = time.monotonic() + policy.watch_s
    probes, probe_failures, index = 0, 0, 0
    while time.monotonic() < deadline:
        sample = golden[index % len(golden)]
        index += 1
        probes += 1
        try:
            client.predict(report.name, sample.path.read_bytes(), content_type=sample.content_type)
        except ServekitError:
            probe_failures += 1
        time.sleep(0.05)
    after = server_counters(client)
    delta = {key: after[key] - before[key] for key in after}
    total = sum(delta.values())
    error_rate = delta["Requests5XX"] / total if total else 0.0
    healthy = probe_failures == 0 and error_rate <= policy.max_error_rate
    if not healthy and report.previous is not None:
        set_default(client, history, report.name, report.previous)
        report.promoted = False
    step(
        "watch",
        healthy,
        f"{policy.watch_s:g} s: {int(total)} requests, 5xx rate {error_rate:.4f} (limit {policy.max_error_rate}), "
        f"{probes - probe_failures}/{probes} probes answered"
        + ("" if healthy else f"; default restored to {report.previous}"),
        requests=int(total),
        error_rate=error_rate,
        probes=probes,
        probe_failures=probe_failures,
    )
