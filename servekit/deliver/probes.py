"""Golden probes: each version answers its archive's golden samples; the top-1 agreement with their labels goes to
a Prometheus text file in the server's workdir (servekit/serve/probe_metrics.py), which the proxy serves.

TorchServe exposes no metric for answers that are wrong but well-formed, so servekit writes one:
`servekit probe NAME` (once, or `--every` seconds) and each step of a progressive rollout record per version
`servekit_golden_probe_agreement`, `..._samples` and `..._timestamp_seconds`, and deploy/alerts.yml alerts on them.
The file is replaced atomically; probing one model keeps every other model's lines, and probing a model with no
registered version removes its lines (the alerts would otherwise fire for versions that no longer exist).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servekit.core.errors import ServekitError, UsageError
from servekit.serve.client import ServeClient
from servekit.serve.deployments import registered_versions
from servekit.serve.handle import Server
from servekit.serve.probe_metrics import ProbeResult, forget, record
from servekit.store.catalog import Catalog
from servekit.store.heldout import HeldOutSample, read_held_out
from servekit_worker.answers import answer_label


# Asking ----------------------------------------------------------------------------------------------------------
def golden_samples(store: Path, name: str, version: str) -> list[HeldOutSample]:
    """The golden samples the catalog keeps for NAME VERSION; UsageError when it keeps none."""
    entry = Catalog.load(store).get(name, version)
    samples = read_held_out(store / entry.golden_dir) if entry is not None and entry.golden_dir else []
    if not samples:
        raise UsageError(f"{name} {version} has no golden samples in {store}: rebuild it from a folder with heldout/")
    return samples


def answer_or_none(client: ServeClient, name: str, version: str, sample: HeldOutSample) -> Any:
    """The version's answer to one sample, or None when it failed (a failed probe is a miss, not a crash)."""
    try:
        return client.predict(name, sample.path.read_bytes(), version=version, content_type=sample.content_type)
    except ServekitError:
        return None


def agrees(answer: Any, sample: HeldOutSample) -> bool:
    return answer_label(answer) == sample.label


def probe_version(client: ServeClient, name: str, version: str, samples: list[HeldOutSample]) -> ProbeResult:
    agreeing = sum(agrees(answer_or_none(client, name, version, sample), sample) for sample in samples)
    return ProbeResult(name, version, len(samples), agreeing, time.time())


def probe_model(client: ServeClient, store: Path, name: str, version: str | None = None) -> list[ProbeResult]:
    """Probes VERSION (or every registered version) of NAME; checks every version has golden samples first.
    [] when no VERSION is asked and NAME has no registered version (a whole-model probe then forgets NAME's gauges)."""
    registered = registered_versions(client, name)
    if version is None and not registered:
        return []
    if version is not None and version not in registered:
        raise UsageError(
            f"{name} {version} is not registered (registered: {', '.join(registered) or 'none'}): "
            f"`servekit register {name} --version {version}` first"
        )
    wanted = [version] if version is not None else registered
    golden = {v: golden_samples(store, name, v) for v in wanted}
    return [probe_version(client, name, v, golden[v]) for v in wanted]


def probe_every(
    server: Server,
    name: str,
    version: str | None,
    every_s: float | None,
    on_round: Callable[[list[ProbeResult]], None] | None = None,
    on_forget: Callable[[list[str]], None] | None = None,
) -> list[ProbeResult]:
    """Probes and records once, or every `every_s` seconds until Ctrl-C, which ends it with the last round.

    A round that finds NAME with no registered version (and no `version` asked) removes NAME's gauges instead and
    tells `on_forget` which versions it removed; a first round with none to remove is a UsageError (a typo, say)."""
    if every_s is not None and not every_s > 0:
        raise UsageError(f"--every must be > 0 seconds, got {every_s:g}")
    client, store, workdir = server.client, server.store, server.workdir
    results: list[ProbeResult] = []
    first = True
    try:
        while True:
            started = time.monotonic()
            results = probe_model(client, store, name, version)
            if results:
                record(workdir, results, replace_model=name if version is None else None)
                if on_round:
                    on_round(results)
            else:
                removed = forget(workdir, name)
                if first and not removed:
                    raise UsageError(
                        f"{name} is not registered on this server and has no golden-probe gauges to remove: "
                        f"`servekit register {name} --version V` first"
                    )
                if on_forget:
                    on_forget(removed)
            first = False
            if every_s is None:
                return results
            time.sleep(max(0.0, every_s - (time.monotonic() - started)))
    except KeyboardInterrupt:
        if every_s is None:
            raise
        return results
