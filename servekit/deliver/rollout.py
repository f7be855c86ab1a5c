"""The gated rollout: register a version beside the default, then smoke, shadow, latency, promote and watch.

Every step reports its numbers; a failed check stops the rollout and leaves (or restores) the previous default.
What the server has and every change to it belongs to `registry`; this module only sequences the checks.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

from servekit.core.errors import ServekitError, ServerError, UsageError
from servekit.core.timing import time_alternating
from servekit.serve import metrics
from servekit.serve.client import ServeClient, answer_of
from servekit.serve.deployments import (
    DefaultHistory,
    default_version,
    observe_default,
    register_verified,
    registered_versions,
    set_default,
    version_info,
)
from servekit.serve.handle import Server
from servekit.store.catalog import Catalog, CatalogEntry, verify_archive
from servekit.store.heldout import HeldOutSample, read_held_out
from servekit_worker.answers import answer_index, answer_label
from servekit_worker.telemetry import BATCH_SAMPLES_HEADER, INFERENCE_MS_HEADER


@dataclass
class RolloutPolicy:
    min_agreement: float = 0.95  # top-1 agreement with the default on the shadow sample
    max_latency_ratio: float = 1.5  # candidate / default: handler p50 per batch, both timed in one process
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

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "previous": self.previous,
            "promoted": self.promoted,
            "steps": [step.__dict__ for step in self.steps],
        }


class RolloutFailed(ServekitError):
    def __init__(self, report: RolloutReport):
        self.report = report
        super().__init__(f"rollout of {report.name} {report.version} stopped: {report.reason}")


# What two versions must agree on -----------------------------------------------------------------------------------
def answer_key(answer: Any) -> Any:
    """The top-1 class, or the argmax of raw outputs."""
    if isinstance(answer, list):
        return tuple(answer_key(a) for a in answer)
    if answer_index(answer) is not None:
        return answer_index(answer)
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
    batch_ms, samples = response.headers.get(INFERENCE_MS_HEADER), response.headers.get(BATCH_SAMPLES_HEADER)
    compute = float(batch_ms) / max(1, int(samples)) if batch_ms and samples else None
    return Timed(answer_of(response), round_trip, compute)


# Timing both archives in one fresh process ------------------------------------------------------------------------
@contextlib.contextmanager
def timing_process(wanted: bool = True) -> Iterator[Pool | None]:
    """The fresh process the latency gate times both handlers in (no client threads there competing for the GIL),
    importing torch as soon as it starts: started before the candidate is registered, its ~2 s of imports overlap
    the registration's wait. Stopped on leaving, also on a failure or Ctrl-C; None when not `wanted`."""
    if not wanted:
        yield None
        return
    pool = multiprocessing.get_context("spawn").Pool(1, initializer=import_timing_modules)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def import_timing_modules() -> None:
    """The timing process's initializer. A failed import is left to the timing call to raise: an initializer that
    raises makes the pool start another process, forever."""
    try:
        import servekit.measure.inprocess  # noqa: F401
        import servekit_worker.base  # noqa: F401  (torch, numpy, Pillow: what every handler imports)
    except Exception:
        pass


def compare_in_process(
    pool: Pool,
    store: Path,
    candidate: CatalogEntry,
    previous: CatalogEntry | None,
    samples: list[HeldOutSample],
    batch: int,
) -> tuple[float, float]:
    """p50 handler time per batch of both archives, timed alternately in the timing process."""
    if previous is None:
        raise UsageError("the default version is not in this store's catalog: its latency cannot be compared")
    bodies = [(s.path.read_bytes(), s.content_type) for s in samples]
    archives = (str(store / candidate.archive), str(store / previous.archive))
    return pool.apply(time_handlers, (archives, bodies, batch))


def time_handlers(
    archives: tuple[str, str], bodies: list[tuple[bytes, str]], batch: int, rounds: int = 5
) -> tuple[float, float]:
    """Runs in the child process of compare_in_process."""
    from servekit.measure.inprocess import InProcessHandler

    batches = [bodies[i : i + batch] for i in range(0, len(bodies), batch)]
    with InProcessHandler(Path(archives[0])) as new, InProcessHandler(Path(archives[1])) as old:
        new_ms, old_ms = time_alternating([new.handle, old.handle], batches, rounds)
    return statistics.median(new_ms), statistics.median(old_ms)


@dataclass
class Shadow:
    """The shadow step's traffic: (sample, default's answer, candidate's answer), and TorchServe's own figures."""

    pairs: list[tuple[HeldOutSample, Timed, Timed]]
    batch: int
    served: metrics.VersionFigures
    previous_served: metrics.VersionFigures


# The rollout ------------------------------------------------------------------------------------------------------
class Rollout:
    """One rollout in progress: each check is a method that records a Step; a failed one raises RolloutFailed."""

    def __init__(
        self,
        client: ServeClient,
        store: Path,
        name: str,
        version: str,
        history: DefaultHistory,
        samples: list[HeldOutSample] | None = None,
        policy: RolloutPolicy | None = None,
        on_step: Callable[[Step], None] | None = None,
    ):
        self.client, self.store, self.name, self.version = client, store, name, version
        self.history = history
        self.policy = policy or RolloutPolicy()
        self.on_step = on_step
        self.entry = verify_archive(store, name, version)
        self.golden = read_held_out(store / self.entry.golden_dir) if self.entry.golden_dir else []
        self.shadow_set = (samples or self.golden)[: self.policy.shadow_samples]
        if not self.golden or not self.shadow_set:
            raise UsageError(f"{name} {version} has no golden samples: rebuild it from a folder with heldout/")
        self.previous = observe_default(client, history, name)
        if self.previous == version:
            raise UsageError(f"{name} {version} is already the default")
        self.report = RolloutReport(name, version, self.previous)
        self.registered_here = False

    def run(self) -> RolloutReport:
        try:
            self.check()
            self.promote()
            self.watch()
        except KeyboardInterrupt:
            self.interrupted()
        return self.report

    def check(self) -> None:
        """The checks before the default moves: register and smoke, and beside a previous default shadow and
        latency (its timing process starting first)."""
        with timing_process(self.previous is not None) as timer:
            self.register()
            self.smoke()
            if timer is not None:
                self.latency(self.shadow(), timer)

    def steps(self) -> list[str]:
        checks = ["shadow", "latency"] if self.previous is not None else []
        return ["register", "smoke", *checks, "promote", "watch"]

    def interrupted(self) -> None:
        """Ctrl-C: the step in progress fails, as a failed check would: the previous default is put back and a
        candidate this rollout registered goes; the message says what the server is left with."""
        if len(self.report.steps) == len(self.steps()):  # every step was done: the rollout is over
            raise KeyboardInterrupt
        step = self.steps()[len(self.report.steps)]
        if self.previous is not None and default_version(self.client, self.name) == self.version:
            set_default(self.client, self.history, self.name, self.previous)
        self.report.promoted = default_version(self.client, self.name) == self.version
        if self.report.promoted:
            state = f"{self.version} stays the default (there was no previous default)"
        else:
            kept = "unregistered" if self.registered_here else "still registered"
            state = f"the default is {self.previous or '(none)'}, {self.version} {kept}"
        self.record(step, False, f"interrupted during the {step} step; {state}")

    def record(self, step_name: str, ok: bool, detail: str, **numbers) -> None:
        self.report.steps.append(Step(step_name, ok, detail, numbers))
        if self.on_step:
            self.on_step(self.report.steps[-1])
        if not ok:
            self.clean_up()
            raise RolloutFailed(self.report)

    def clean_up(self) -> None:
        """Leaves the server as the rollout found it: a candidate it registered goes, unless it is the default."""
        if not self.registered_here:
            return
        try:
            if default_version(self.client, self.name) != self.version:
                self.client.unregister(self.name, self.version)
        except ServekitError:
            pass  # the server is unreachable: the failed step already says so

    def register(self) -> None:
        if self.version in registered_versions(self.client, self.name):
            self.record("register", True, f"{self.name} {self.version} was already registered")
            return
        self.registered_here = True  # from the request on: an interrupted registration is undone too
        registration = register_verified(
            self.client, self.store, self.name, self.version, self.policy.workers, verified=self.entry
        )
        ready = registration.info.ready_workers
        self.record(
            "register",
            True,
            f"registered {self.entry.archive} (sha256 verified), {ready} worker(s) ready",
            workers=ready,
        )

    def smoke(self) -> None:
        failures = []
        for sample in self.golden:
            try:
                self.client.predict(
                    self.name, sample.path.read_bytes(), version=self.version, content_type=sample.content_type
                )
            except ServekitError as exc:
                failures.append(f"{sample.path.name}: {exc}")
        answered = len(self.golden) - len(failures)
        self.record(
            "smoke",
            not failures,
            f"{answered}/{len(self.golden)} golden inputs answered"
            + (f"; first failure {failures[0]}" if failures else ""),
            answered=answered,
        )

    def shadow(self) -> Shadow:
        """Both versions answer the shadow inputs, in concurrent groups of one batch, alternating versions."""
        client, name, previous = self.client, self.name, self.previous
        group = version_info(client, name, self.version).batch_size
        pairs: list[tuple[HeldOutSample, Timed, Timed]] = []
        before = metrics.scrape(client)
        with ThreadPoolExecutor(max_workers=group) as pool:
            for start in range(0, len(self.shadow_set), group):
                chunk = self.shadow_set[start : start + group]
                olds = list(pool.map(lambda sample: timed_predict(client, name, previous, sample), chunk))
                news = list(pool.map(lambda sample: timed_predict(client, name, self.version, sample), chunk))
                pairs += zip(chunk, olds, news, strict=True)
        after = metrics.scrape(client)
        shadow = Shadow(
            pairs, group, *((after.version(name, v) - before.version(name, v)) for v in (self.version, previous))
        )
        agreement = sum(answer_key(old.answer) == answer_key(new.answer) for _, old, new in pairs) / len(pairs)
        accuracy_new = sum(answer_label(new.answer) == s.label for s, _, new in pairs) / len(pairs)
        accuracy_old = sum(answer_label(old.answer) == s.label for s, old, _ in pairs) / len(pairs)
        self.record(
            "shadow",
            agreement >= self.policy.min_agreement,
            f"top-1 agreement with {previous} {agreement:.3f} on {len(pairs)} inputs "
            f"(need >= {self.policy.min_agreement}); accuracy {accuracy_new:.3f} vs {accuracy_old:.3f}",
            agreement=agreement,
            accuracy=accuracy_new,
            previous_accuracy=accuracy_old,
        )
        return shadow

    def latency(self, shadow: Shadow, timer: Pool) -> None:
        """The gate times both archives' handlers in one process, alternately, on the shadow inputs in batches of
        the candidate's size: measured through the live server, a freshly loaded candidate always looks slower
        (its batches fill late and its idle threads are scheduled behind the busy default's). The served round
        trips, the handlers' own timing headers and TorchServe's service time are reported beside it."""
        previous_entry = Catalog.load(self.store).get(self.name, self.previous)
        new_ms, old_ms = compare_in_process(
            timer, self.store, self.entry, previous_entry, self.shadow_set, shadow.batch
        )
        ratio = new_ms / old_ms if old_ms else 1.0
        pairs = shadow.pairs
        served_new = [new.compute_ms for _, _, new in pairs if new.compute_ms is not None]
        served_old = [old.compute_ms for _, old, _ in pairs if old.compute_ms is not None]
        p50_new = statistics.median(new.round_trip_ms for _, _, new in pairs)
        p50_old = statistics.median(old.round_trip_ms for _, old, _ in pairs)
        limit = self.policy.max_latency_ratio
        self.record(
            "latency",
            ratio <= limit,
            f"handler p50 per batch of {shadow.batch} in process {new_ms:.2f} ms vs {old_ms:.2f} ms: ratio "
            f"{ratio:.2f} (limit {limit}); served round trip p50 {p50_new:.1f} vs {p50_old:.1f} ms",
            ms=new_ms,
            previous_ms=old_ms,
            ratio=ratio,
            p50_ms=p50_new,
            previous_p50_ms=p50_old,
            served_compute_ms=statistics.median(served_new) if served_new else None,
            previous_served_compute_ms=statistics.median(served_old) if served_old else None,
            service_ms=shadow.served.service_ms,
            previous_service_ms=shadow.previous_served.service_ms,
        )

    def promote(self) -> None:
        set_default(self.client, self.history, self.name, self.version)
        self.report.promoted = True
        self.record("promote", True, f"default {self.previous or '(none)'} -> {self.version}")

    def watch(self) -> None:
        """Probes the new default with golden inputs for `policy.watch_s` while live traffic flows, then reads the
        server's 2xx/4xx/5xx counters; too many 5xx or a failed probe restores the previous default."""
        policy, name = self.policy, self.name
        try:
            before = metrics.scrape(self.client)
            probes, probe_failures = self.probe(policy.watch_s)
            delta = metrics.responses_since(before, metrics.scrape(self.client))
        except ServerError as exc:
            self.report.promoted = False
            self.record(
                "watch",
                False,
                f"lost the server while watching ({exc}); the default could not be checked or restored: after "
                f"`servekit serve start --resume`, `servekit models` shows it and `servekit rollback {name}` "
                f"returns to {self.previous or 'the previous default'}",
            )
        total = sum(delta.values())
        error_rate = delta["Requests5XX"] / total if total else 0.0
        healthy = probe_failures == 0 and error_rate <= policy.max_error_rate
        if not healthy and self.previous is not None:
            set_default(self.client, self.history, name, self.previous)
            self.report.promoted = False
        self.record(
            "watch",
            healthy,
            f"{policy.watch_s:g} s: {int(total)} requests, 5xx rate {error_rate:.4f} (limit {policy.max_error_rate}), "
            f"{probes - probe_failures}/{probes} probes answered"
            + ("" if healthy else f"; default restored to {self.previous}"),
            requests=int(total),
            error_rate=error_rate,
            probes=probes,
            probe_failures=probe_failures,
        )

    def probe(self, seconds: float) -> tuple[int, int]:
        """Golden inputs to the default URL for `seconds`; returns (probes, failures)."""
        deadline = time.monotonic() + seconds
        probes, failures = 0, 0
        while time.monotonic() < deadline:
            sample = self.golden[probes % len(self.golden)]
            probes += 1
            try:
                self.client.predict(self.name, sample.path.read_bytes(), content_type=sample.content_type)
            except ServekitError:
                failures += 1
            time.sleep(0.05)
        return probes, failures


def rollout(
    server: Server,
    name: str,
    version: str,
    samples: list[HeldOutSample] | None = None,
    policy: RolloutPolicy | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> RolloutReport:
    """Moves NAME's default to VERSION only if every check passes; raises RolloutFailed (default kept) if not.

    samples: the shadow step's labelled samples [default: the archive's golden samples]."""
    return Rollout(server.client, server.store, name, version, server.history, samples, policy, on_step).run()
