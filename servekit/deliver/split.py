"""Weighted, sticky traffic splits across a model's versions, applied to the proxy (servekit/serve/proxy.py).

A split is validated against the server (model and versions registered) before anything is written; applying it
renders nginx.conf atomically, checks it with `nginx -t` and reloads nginx, so a bad split never reaches the
running proxy. When a split is set, servekit notes TorchServe's per-version counters and the access log's size,
so `servekit split NAME` can show each version's traffic, errors and latency since then.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from servekit.core.errors import ServerError, UsageError
from servekit.core.timing import percentile
from servekit.serve import metrics, proxy
from servekit.serve.client import ServeClient
from servekit.serve.deployments import default_version, registered_versions, retire
from servekit.serve.handle import Server
from servekit.serve.proxy import ProxyConfig, Split
from servekit.serve.torchserve import ServerState
from servekit.store.catalog import write_atomically

MARKS_FILE = "marks.json"


def parse_shares(texts: list[str] | tuple[str, ...]) -> dict[str, int]:
    """["1.0.0=90", "1.1.0=10"] -> {"1.0.0": 90, "1.1.0": 10} (UsageError naming the bad item)."""
    shares: dict[str, int] = {}
    for text in texts:
        version, _, weight = text.partition("=")
        if not version or not weight.strip().isdigit():
            raise UsageError(f"{text!r} is not VERSION=PERCENT, e.g. 1.0.0=90")
        if version in shares:
            raise UsageError(f"version {version} is given twice")
        shares[version] = int(weight)
    return shares


def running_proxy(state: ServerState) -> tuple[Path, ProxyConfig, int]:
    """(nginx binary, the proxy's config, its master PID) of a running proxy; ServerError when there is none."""
    if state.proxy_pid is None or state.nginx is None:
        raise ServerError("this server runs without the proxy: restart it with `servekit serve start` (no --no-proxy)")
    config = ProxyConfig.load(state.proxy_dir)
    if proxy.nginx_process(state.proxy_pid, config) is None:
        raise ServerError(f"the proxy (nginx pid {state.proxy_pid}) is not running: `servekit serve start --resume`")
    return Path(state.nginx), config, state.proxy_pid


def validate_against(client: ServeClient, split: Split) -> None:
    """Every version of the split (and its mirror) must be registered on the server."""
    registered = registered_versions(client, split.name)
    wanted = [*split.branches, *([split.mirror_version] if split.mirror_version else [])]
    if not registered:
        raise UsageError(
            f"{split.name} is not registered on this server: `servekit register {split.name} --version {wanted[0]}` "
            "first"
        )
    for version in wanted:
        if version not in registered:
            raise UsageError(
                f"{split.name} {version} is not registered (registered: {', '.join(registered)}): "
                f"`servekit register {split.name} --version {version}` first"
            )


class Marks:
    """Where each split's counting starts: time, access log offset, TorchServe per-version counters."""

    def __init__(self, directory: Path):
        self.path = directory / MARKS_FILE

    def read(self) -> dict[str, dict]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def record(self, name: str, config: ProxyConfig, client: ServeClient) -> None:
        marks = self.read()
        served = {label: asdict(figures) for label, figures in metrics.scrape(client).labels(name).items()}
        marks[name] = {"set_at": time.time(), "log_offset": proxy.log_size(config), "served": served}
        write_atomically(self.path, json.dumps(marks, indent=2))

    def forget(self, name: str) -> None:
        marks = self.read()
        if marks.pop(name, None) is not None:
            write_atomically(self.path, json.dumps(marks, indent=2))


def apply(state: ServerState, splits: dict[str, Split]) -> ProxyConfig:
    """Writes nginx.conf for these splits (checked with nginx -t), reloads the proxy, then saves proxy.json."""
    binary, config, pid = running_proxy(state)
    config = replace(config, splits=splits)
    proxy.reload(binary, config, pid)
    config.save()
    # Old workers still answer on their open keep-alive connections (keepalive_min_timeout) and finish what they
    # routed: once they are gone, every request follows the new split.
    proxy.wait_old_workers_gone(config, pid)
    return config


def set_split(server: Server, split: Split) -> Split:
    """Validates SPLIT (arguments, then the server), applies it and starts counting from now."""
    split.validate()
    validate_against(server.client, split)
    _, config, _ = running_proxy(server.state)
    config = apply(server.state, {**config.splits, split.name: split})
    Marks(server.state.proxy_dir).record(split.name, config, server.client)
    return split


def current_split(server: Server, name: str) -> Split | None:
    return ProxyConfig.load(server.state.proxy_dir).splits.get(name)


def remove_split(server: Server, name: str) -> bool:
    """Sends all of NAME's traffic to its default version again; False if NAME had no split."""
    _, config, _ = running_proxy(server.state)
    if name not in config.splits:
        return False
    apply(server.state, {key: split for key, split in config.splits.items() if key != name})
    Marks(server.state.proxy_dir).forget(name)
    return True


@dataclass
class BranchFigures:
    """One version's traffic since the split was set: through the proxy (status, upstream latency) and as
    TorchServe counted it (requests, mean latency and queue time)."""

    version: str
    weight: int
    proxied: int
    errors: int  # 5xx answers through the proxy
    error_rate: float
    p50_ms: float | None
    p99_ms: float | None
    served: int  # TorchServe's per-version request counter
    mean_ms: float | None
    queue_ms: float | None


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def window_figures(answered: list[proxy.Answered], name: str, version: str) -> tuple[int, int, list[float]]:
    """(requests, 5xx answers, upstream latencies in ms) of one version among logged requests."""
    mine = [a for a in answered if a.model == name and a.version == version]
    latencies = [a.upstream_ms for a in mine if a.upstream_ms is not None and a.status < 500]
    return len(mine), sum(a.status >= 500 for a in mine), latencies


def figures(server: Server, name: str) -> tuple[Split, list[BranchFigures], float]:
    """NAME's split, each version's figures since it was set, and when it was set (epoch seconds)."""
    state, split = server.state, current_split(server, name)
    if split is None:
        raise UsageError(f"{name} has no traffic split: set one with `servekit split {name} 1.0.0=90 1.1.0=10`")
    mark = Marks(state.proxy_dir).read().get(name, {"set_at": 0.0, "log_offset": 0, "served": {}})
    answered = proxy.read_access_log(ProxyConfig.load(state.proxy_dir), mark["log_offset"], mark["set_at"])
    now = metrics.scrape(server.client)
    rows = []
    for version in [*split.branches, *([split.mirror_version] if split.mirror_version else [])]:
        proxied, errors, latencies = window_figures(answered, name, version)
        # The proxy always calls versioned URLs, so this label counts exactly what it sent to VERSION.
        served = now.version(name, version) - metrics.VersionFigures(**mark["served"].get(version, {}))
        rows.append(
            BranchFigures(
                version=version,
                weight=split.branches.get(version, 0),
                proxied=proxied,
                errors=errors,
                error_rate=errors / proxied if proxied else 0.0,
                p50_ms=percentile(latencies, 50) if latencies else None,
                p99_ms=percentile(latencies, 99) if latencies else None,
                served=int(served.requests),
                mean_ms=served.mean_ms,
                queue_ms=served.queue_ms,
            )
        )
    return split, rows, mark["set_at"]


def split_from_arguments(
    name: str, shares: tuple[str, ...], sticky_header: str | None = None, mirror: str | None = None
) -> Split:
    """The split `servekit split NAME 1.0.0=90 1.1.0=10 [--sticky-header H] [--mirror 1.2.0=5]` asks for."""
    mirror_version, mirror_percent = None, 0
    if mirror:
        ((mirror_version, mirror_percent),) = parse_shares([mirror]).items()
    return Split(name, parse_shares(shares), sticky_header, mirror_version, mirror_percent)


# Drain before retire ----------------------------------------------------------------------------------------------
@dataclass
class Drained:
    """What retiring a version took: where its share went, how long it took to go quiet."""

    name: str
    version: str
    moved_to: str | None  # the branch that took over its share (None: it had no share)
    drained_s: float


def without_version(split: Split, version: str, default: str | None) -> Split:
    """The split with VERSION gone: its share moves to the default version when that is a branch, else to the
    largest other branch; a mirror of VERSION is dropped."""
    if split.mirror_version == version:
        split = replace(split, mirror_version=None, mirror_percent=0)
    weight = split.branches.get(version, 0)
    others = {v: w for v, w in split.branches.items() if v != version}
    if weight and not any(others.values()) and default not in others:
        raise UsageError(
            f"{split.name} {version} gets all of the split's traffic: give another version its share first, "
            f"e.g. servekit split {split.name} {default or 'OTHER'}=100"
        )
    if not weight:
        return replace(split, branches=others)
    heir = default if default in others else max(others, key=others.__getitem__)
    return replace(split, branches={v: w + (weight if v == heir else 0) for v, w in others.items()})


def wait_idle(client: ServeClient, name: str, version: str, timeout_s: float, quiet_s: float = 1.0) -> None:
    """Waits until VERSION has no queued request and its request and latency counters stood still for `quiet_s`
    (TorchServe adds a request's latency when it answers it, so a still counter means nothing is in flight)."""
    deadline = time.monotonic() + timeout_s
    last: tuple | None = None
    quiet_since = time.monotonic()
    while True:
        description = client.describe(name, version)[0]
        pending = description.get("jobQueueStatus", {}).get("pendingRequests", 0)
        counters = metrics.scrape(client).version(name, version)
        reading = (counters.requests, counters.latency_us)
        now = time.monotonic()
        if pending or reading != last:
            quiet_since, last = now, reading
        elif now - quiet_since >= quiet_s:
            return
        if now > deadline:
            raise ServerError(
                f"{name} {version} still gets requests after {timeout_s:g} s ({pending} queued): something calls "
                f"its versioned URL directly; stop that, then retire again"
            )
        time.sleep(0.1)


def retire_drained(server: Server, name: str, version: str, timeout_s: float = 120.0) -> Drained:
    """Moves VERSION's share to 0, waits until it has answered everything it was given, then unregisters it.

    TorchServe 0.12 never answers requests still queued for a version it unregisters; draining first means
    retiring under load loses nothing.
    """
    client, state = server.client, server.state
    registered = registered_versions(client, name)
    if version not in registered:
        raise UsageError(f"{name} {version} is not registered; registered: {', '.join(registered) or 'none'}")
    default = default_version(client, name)
    if default == version:
        raise UsageError(f"{name} {version} is the default: roll back or promote another version before retiring it")
    started = time.monotonic()
    split = current_split(server, name) if state.proxy_pid is not None else None
    moved_to = None
    if split is not None and (version in split.branches or split.mirror_version == version):
        smaller = without_version(split, version, default)
        moved_to = next((v for v, w in smaller.branches.items() if w > split.branches.get(v, 0)), None)
        _, config, _ = running_proxy(state)
        apply(state, {**config.splits, name: smaller})  # returns once no nginx worker routes to VERSION
    wait_idle(client, name, version, timeout_s)
    retire(client, name, version)
    return Drained(name, version, moved_to, time.monotonic() - started)


# KServe ------------------------------------------------------------------------------------------------------------
def kserve_canary(split: Split, default: str | None) -> tuple[str, int, list[str]]:
    """(candidate version, its canaryTrafficPercent, what KServe cannot carry) for a split between the default
    and one other version: KServe sends canaryTrafficPercent to the newest revision, the rest to the previous one."""
    live = split.live
    others = [version for version in live if version != default]
    if len(live) > 2 or len(others) != 1 or default not in split.branches:
        raise UsageError(
            f"KServe's canaryTrafficPercent splits two revisions; {split.name}'s split "
            f"({' '.join(f'{v}={w}' for v, w in split.branches.items())}) is not the default {default} and one other"
        )
    dropped = []
    if split.sticky_header:
        dropped.append(f"stickiness on {split.sticky_header} (Knative routes each request on its own)")
    if split.mirror_version:
        dropped.append(f"the {split.mirror_percent} % mirror to {split.mirror_version} (KServe has no mirroring)")
    return others[0], live[others[0]], dropped


# What `servekit split NAME` prints ----------------------------------------------------------------------------------
TABLE_HEADERS = ["version", "share", "proxied", "5xx", "err", "p50", "p99", "served", "mean", "queue"]
TABLE_CAPTION = "proxied/5xx/p50/p99 (ms): nginx access log; served/mean/queue (ms): TorchServe's counters"


def kserve_canary_of(server: Server, name: str) -> tuple[str, int, list[str]]:
    """`kserve_canary` of NAME's split on this server; UsageError when it has none."""
    split = current_split(server, name)
    if split is None:
        raise UsageError(f"{name} has no traffic split on this server")
    return kserve_canary(split, default_version(server.client, name))


def describe(split: Split) -> str:
    return (
        f"{split.name}: {' '.join(f'{v}={w}' for v, w in split.branches.items())}"
        + (f", sticky on {split.sticky_header}" if split.sticky_header else ", spread by request id")
        + (f", mirror {split.mirror_version}={split.mirror_percent}" if split.mirror_version else "")
    )


def table_rows(split: Split, rows: list[BranchFigures]) -> list[list[str]]:
    return [
        [
            row.version,
            f"{row.weight}%" if row.version in split.branches else f"m{split.mirror_percent}%",
            str(row.proxied),
            str(row.errors),
            f"{row.error_rate:.1%}",
            *(fmt_ms(value) for value in (row.p50_ms, row.p99_ms)),
            str(row.served),
            *(fmt_ms(value) for value in (row.mean_ms, row.queue_ms)),
        ]
        for row in rows
    ]
