"""Progressive delivery: after the rollout's checks, the candidate's share of live traffic grows step by step.

At each step the proxy splits NAME between the current default and the candidate; over that step's live traffic
(the proxy's access log) the candidate's 5xx rate and p99 latency are compared with the thresholds and with the
current version, while golden probes ask both versions the same questions. Any failed check sends the candidate
back to 0 % (the split is removed: all traffic to the old default, which never changed) and says which check
failed, with the numbers. After the last step the candidate becomes the default and the split is removed.
Each step also records both versions' agreement with the golden labels in the golden-probe gauges
(servekit/deliver/probes.py), which deploy/alerts.yml reads.

The progress is written to `WORKDIR/progressive.json` before each step, so after Ctrl-C or a crash
`servekit rollout --resume` goes on from that step (or `servekit split NAME OLD=100` gives up).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from servekit.core.errors import ServerError, UsageError
from servekit.core.timing import percentile
from servekit.deliver import probes
from servekit.deliver import split as splits
from servekit.deliver.rollout import Rollout, RolloutFailed, RolloutPolicy, RolloutReport, Step, answer_key
from servekit.serve import probe_metrics, proxy
from servekit.serve.client import RetryPolicy, ServeClient
from servekit.serve.deployments import default_version, set_default
from servekit.serve.handle import Server
from servekit.serve.proxy import Split
from servekit.store.catalog import verify_archive, write_atomically
from servekit.store.heldout import HeldOutSample

PROGRESS_FILE = "progressive.json"


@dataclass
class ProgressivePolicy:
    """The steps and the thresholds each step must hold (deploy/alerts.yml alerts on the same numbers)."""

    steps: tuple[int, ...] = (5, 25, 50, 100)
    step_s: float = 60.0
    max_error_rate: float = 0.01  # the candidate's 5xx share of its live requests in the step
    max_p99_ratio: float = 1.5  # candidate p99 / current p99 over the step (TorchServe's answer time)
    min_agreement: float = 0.95  # golden probes: top-1 agreement of candidate and current
    min_requests: int = 50  # below this many answers per version in a step, p99 is not compared (too noisy)
    sticky_header: str | None = None

    @classmethod
    def from_checks(
        cls, checks: RolloutPolicy, steps: tuple[int, ...], step_s: float, max_p99_ratio: float, sticky: str | None
    ) -> ProgressivePolicy:
        """The steps, with the error-rate and agreement thresholds the rollout's own checks use."""
        return cls(steps, step_s, checks.max_error_rate, max_p99_ratio, checks.min_agreement, sticky_header=sticky)

    def validate(self) -> None:
        steps = list(self.steps)
        if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)) or steps[-1] != 100:
            raise UsageError(f"steps {steps} must rise within 1..100 and end at 100, e.g. 5,25,50,100")
        if self.step_s <= 0:
            raise UsageError(f"step seconds must be > 0, got {self.step_s:g}")


@dataclass
class Progress:
    """What `progressive.json` holds: enough to go on after a crash."""

    name: str
    version: str
    previous: str
    policy: dict
    step_index: int = 0
    started: float = field(default_factory=time.time)

    @staticmethod
    def path(workdir: Path) -> Path:
        return Path(workdir) / PROGRESS_FILE

    def save(self, workdir: Path) -> None:
        write_atomically(self.path(workdir), json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, workdir: Path) -> Progress:
        path = cls.path(workdir)
        if not path.is_file():
            raise UsageError(f"no progressive rollout to resume in {workdir}")
        try:
            progress = cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ServerError(f"{path} is unreadable ({exc}): recover with `servekit split NAME OLD=100`") from None
        progress.policy["steps"] = tuple(progress.policy["steps"])
        return progress


@dataclass
class Window:
    """One version's live traffic in one step, from the proxy's access log."""

    requests: int
    errors: int
    p99_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def window(answered: list[proxy.Answered], name: str, version: str) -> Window:
    requests, errors, latencies = splits.window_figures(answered, name, version)
    return Window(requests, errors, percentile(latencies, 99) if latencies else None)


@dataclass
class Probed:
    """Golden probes of one step: answers that agree between the versions, and each version's right answers."""

    asked: int = 0
    agreeing: int = 0
    right: dict[str, int] = field(default_factory=dict)  # version -> answers with the golden label

    @property
    def agreement(self) -> float:
        return self.agreeing / self.asked if self.asked else 0.0

    def results(self, name: str) -> list[probe_metrics.ProbeResult]:
        """Each version's agreement with the golden labels, as `servekit probe` records it."""
        now = time.time()
        return [
            probe_metrics.ProbeResult(name, version, self.asked, right, now) for version, right in self.right.items()
        ]


def probe(
    client: ServeClient, name: str, current: str, candidate: str, golden: list[HeldOutSample], seconds: float
) -> Probed:
    """Asks both versions the golden inputs, in turn, for `seconds`; a failed answer agrees with nothing."""
    deadline = time.monotonic() + seconds
    probed = Probed(right={current: 0, candidate: 0})
    while time.monotonic() < deadline:
        sample = golden[probed.asked % len(golden)]
        probed.asked += 1
        old = probes.answer_or_none(client, name, current, sample)
        new = probes.answer_or_none(client, name, candidate, sample)
        probed.agreeing += old is not None and new is not None and answer_key(old) == answer_key(new)
        probed.right[current] += probes.agrees(old, sample)
        probed.right[candidate] += probes.agrees(new, sample)
        time.sleep(0.05)
    return probed


def progressive_rollout(
    server: Server,
    name: str,
    version: str,
    policy: ProgressivePolicy,
    checks: RolloutPolicy | None = None,
    samples: list[HeldOutSample] | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> RolloutReport:
    """The rollout's own checks (register, smoke, shadow, latency), then the steps; RolloutFailed if any fails."""
    policy.validate()
    splits.running_proxy(server.state)
    if Progress.path(server.workdir).is_file():
        raise UsageError("a progressive rollout is unfinished: `servekit rollout --resume`, or `servekit split` it")
    checked = Rollout(server.client, server.store, name, version, server.history, samples, checks, on_step)
    if checked.previous is None:
        raise UsageError(f"{name} has no default version yet: deploy one with `servekit rollout {name} --version V`")
    checked.check()
    progress = Progress(name, version, checked.previous, asdict(policy))
    return run_steps(server, progress, checked.report, on_step)


def resume(server: Server, on_step: Callable[[Step], None] | None = None) -> RolloutReport:
    """Goes on with the progressive rollout recorded in WORKDIR, from the step it was in."""
    progress = Progress.load(server.workdir)
    default = default_version(server.client, progress.name)
    report = RolloutReport(progress.name, progress.version, progress.previous)
    if default == progress.version:  # it stopped between set-default and removing the split
        splits.remove_split(server, progress.name)
        Progress.path(server.workdir).unlink(missing_ok=True)
        report.promoted = True
        report.steps.append(Step("promote", True, f"default was already {default}; split removed"))
        return report
    if default != progress.previous:
        raise ServerError(
            f"{progress.name}'s default is {default}, not {progress.previous} as when the rollout started: "
            f"delete {Progress.path(server.workdir)} and start again"
        )
    return run_steps(server, progress, report, on_step)


def run_steps(
    server: Server, progress: Progress, report: RolloutReport, on_step: Callable[[Step], None] | None
) -> RolloutReport:
    policy = ProgressivePolicy(**progress.policy)
    name, version, previous = progress.name, progress.version, progress.previous
    workdir = server.workdir
    verify_archive(server.store, name, version)
    golden = probes.golden_samples(server.store, name, version)
    prober = ServeClient(server.client.endpoints, timeout_s=10, retry=RetryPolicy(unavailable=0))
    config = splits.running_proxy(server.state)[1]
    previous_p99: float | None = None  # the current version's last measured p99, for the 100 % step

    def record(step: Step) -> None:
        report.steps.append(step)
        if on_step:
            on_step(step)

    for index in range(progress.step_index, len(policy.steps)):
        share = policy.steps[index]
        progress.step_index = index
        progress.save(workdir)
        splits.set_split(server, Split(name, {previous: 100 - share, version: share}, policy.sticky_header))
        offset, started = proxy.log_size(config), time.time()
        probed = probe(prober, name, previous, version, golden, policy.step_s)
        probe_metrics.record(workdir, probed.results(name))  # the same gauges as `servekit probe`, for the alerts
        answered = proxy.read_access_log(config, offset, started)
        new, old = window(answered, name, version), window(answered, name, previous)
        if old.p99_ms is not None and old.requests >= policy.min_requests:
            previous_p99 = old.p99_ms
        failed = []
        if new.error_rate > policy.max_error_rate:
            failed.append(
                f"error rate {new.error_rate:.3f} ({new.errors}/{new.requests}) > {policy.max_error_rate} "
                f"({previous}: {old.error_rate:.3f})"
            )
        ratio = None
        if new.p99_ms is not None and previous_p99 and new.requests >= policy.min_requests:
            ratio = new.p99_ms / previous_p99
            if ratio > policy.max_p99_ratio:
                failed.append(
                    f"p99 {new.p99_ms:.1f} ms vs {previous_p99:.1f} ms: ratio {ratio:.2f} > {policy.max_p99_ratio}"
                )
        if probed.agreement < policy.min_agreement:
            failed.append(
                f"golden-probe agreement {probed.agreement:.3f} ({probed.agreeing}/{probed.asked}) "
                f"< {policy.min_agreement}"
            )
        numbers = {
            "share": share,
            "requests": new.requests,
            "errors": new.errors,
            "error_rate": new.error_rate,
            "p99_ms": new.p99_ms,
            "previous_requests": old.requests,
            "previous_error_rate": old.error_rate,
            "previous_p99_ms": previous_p99,
            "p99_ratio": ratio,
            "probes": probed.asked,
            "agreement": probed.agreement,
        }
        compared = "" if ratio is not None else f" (not compared: under {policy.min_requests} answers a version)"
        detail = (
            f"{version} at {share} % for {policy.step_s:g} s: {new.requests} requests, "
            f"5xx {new.error_rate:.3f}, p99 {splits_ms(new.p99_ms)} vs {splits_ms(previous_p99)} ms{compared}, "
            f"probes {probed.agreeing}/{probed.asked} agree"
        )
        if failed:
            splits.remove_split(server, name)  # all traffic back to the default, which is still `previous`
            Progress.path(workdir).unlink(missing_ok=True)
            record(Step(f"{share}%", False, "; ".join(failed) + f"; {version} back to 0 %, {previous} kept", numbers))
            raise RolloutFailed(report)
        record(Step(f"{share}%", True, detail, numbers))

    set_default(server.client, server.history, name, version)
    splits.remove_split(server, name)
    Progress.path(workdir).unlink(missing_ok=True)
    report.promoted = True
    record(Step("promote", True, f"default {previous} -> {version}, split removed"))
    return report


def splits_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def abandon(workdir: Path, name: str) -> Progress | None:
    """Forgets NAME's unfinished progressive rollout (someone set its split by hand); returns what it was."""
    try:
        progress = Progress.load(workdir)
    except UsageError:
        return None
    if progress.name != name:
        return None
    Progress.path(workdir).unlink(missing_ok=True)
    return progress


def set_by_hand(server: Server, name: str, split: Split | None) -> tuple[bool, Progress | None]:
    """`servekit split`: sets NAME's split (None removes it). A split set by hand ends NAME's unfinished progressive
    rollout (its default stays the old version). Returns (whether a split was set or removed, the rollout ended)."""
    if split is None:
        changed = splits.remove_split(server, name)
    else:
        splits.set_split(server, split)
        changed = True
    return changed, abandon(server.workdir, name)


def run_requested(
    server: Server,
    name: str | None,
    version: str | None,
    policy: ProgressivePolicy | None,
    checks: RolloutPolicy,
    samples: list[HeldOutSample] | None = None,
    show: Callable[[Step], None] | None = None,
) -> RolloutReport:
    """`servekit rollout --steps ...` (the steps in `policy`), or `--resume` (policy None); Ctrl-C says how to go on
    or give up."""
    try:
        if policy is None:
            return resume(server, show)
        if not name or not version:
            raise UsageError("give NAME and --version (or --resume)")
        return progressive_rollout(server, name, version, policy, checks, samples, show)
    except KeyboardInterrupt:
        raise UsageError(
            "interrupted: `servekit rollout --resume` goes on from this step; "
            f"`servekit split {name or 'NAME'} OLD=100` gives up"
        ) from None
