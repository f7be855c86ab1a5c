"""Commands that change what users are served: rollout (and --steps), rollback, retire, scale, split, probe."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from servekit.cli.base import (
    ROLLOUT_DEFAULTS,
    IntList,
    cli,
    console,
    json_option,
    path_option,
    print_json,
    print_table,
    version_option,
    with_server,
)
from servekit.core.errors import UsageError
from servekit.deliver.rollout import RolloutPolicy
from servekit.serve import deployments
from servekit.serve.handle import Server


# rollout (--steps: progressive delivery through the proxy, servekit/deliver/progressive.py) -------------------------
def progressive_options(function):
    """--steps, --step-seconds, --max-p99-ratio, --sticky-header, --resume, gathered as `steps`: what the progressive
    rollout asks for (a ProgressivePolicy), "resume", or None for a rollout without steps."""

    @click.option("--steps", type=IntList(0, "percentages like 5,25,50,100"), default=None,
                  help="Candidate shares in %, e.g. 5,25,50,100 (through the proxy).")  # fmt: skip
    @click.option("--step-seconds", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True)
    @click.option("--max-p99-ratio", type=click.FloatRange(min=0, min_open=True), default=1.5, show_default=True,
                  help="Per step: candidate p99 / current p99 over live traffic.")  # fmt: skip
    @click.option("--sticky-header", default=None, help="Keep each value of this header on one version.")
    @click.option("--resume", is_flag=True, help="Go on with the progressive rollout interrupted in WORKDIR.")
    @functools.wraps(function)
    def wrapper(*args, steps, step_seconds, max_p99_ratio, sticky_header, resume, **kwargs):
        asked = (tuple(steps), step_seconds, max_p99_ratio, sticky_header) if steps else None
        return function(*args, steps="resume" if resume else asked, **kwargs)

    return wrapper


@cli.command()
@click.argument("name", required=False)
@version_option(required=False, help_text="The version to promote.")
@path_option("--samples", "samples_dir", help="Labelled folder for the shadow step [default: the golden samples].")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=ROLLOUT_DEFAULTS.min_agreement, show_default=True)
@click.option("--max-latency-ratio", type=click.FloatRange(min=0, min_open=True),
              default=ROLLOUT_DEFAULTS.max_latency_ratio, show_default=True)  # fmt: skip
@click.option("--max-error-rate", type=click.FloatRange(0, 1), default=ROLLOUT_DEFAULTS.max_error_rate,
              show_default=True)  # fmt: skip
@click.option("--shadow-samples", type=click.IntRange(min=1), default=ROLLOUT_DEFAULTS.shadow_samples,
              show_default=True)  # fmt: skip
@click.option("--watch", "watch_s", type=click.FloatRange(min=0), default=ROLLOUT_DEFAULTS.watch_s, show_default=True,
              help="Seconds to watch live traffic after promotion.")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Workers for the new version.")
@progressive_options
@with_server
@json_option
def rollout(name, version, samples_dir, server, as_json, steps, **policy) -> None:
    """Register VERSION beside the default, smoke-test, shadow-compare, check latency, promote, watch.

    Any failed check, or Ctrl-C, stops the rollout with the previous default in place (restored after promotion).
    With --steps the candidate's share of live traffic grows step by step through the proxy instead.
    Example: servekit rollout digits --version 1.1.0 [--steps 5,25,50,100 --step-seconds 60]
    """
    from servekit.deliver import progressive
    from servekit.deliver.rollout import rollout as roll_out
    from servekit.store.heldout import read_held_out

    checks, samples = RolloutPolicy(**policy), read_held_out(samples_dir) if samples_dir else None
    show = None if as_json else show_step
    if steps is not None:
        asked = None if steps == "resume" else progressive.ProgressivePolicy.from_checks(checks, *steps)
        report = progressive.run_requested(server, name, version, asked, checks, samples, show)
    elif not name or not version:
        raise UsageError("give NAME and --version (or --resume)")
    else:
        report = roll_out(server, name, version, samples, checks, show)
    if as_json:
        print_json(report.to_dict())
        return
    console.print(f"{report.name} default is now {report.version} (was {report.previous or 'none'})")


def show_step(step) -> None:
    mark = "[green]ok[/]" if step.ok else "[bold red]FAILED[/]"
    console.print(f"{step.name:>8} {mark} {step.detail}", highlight=False)


# rollback / retire / scale ----------------------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@with_server
def rollback(name: str, server: Server) -> None:
    """Make the default before the current one (still registered) the default again."""
    current, previous = deployments.rollback(server, name)
    console.print(f"{name} default rolled back from {current} to {previous}")


@cli.command()
@click.argument("name")
@version_option()
@with_server
def retire(name: str, version: str, server: Server) -> None:
    """Unregister a version that is not the default, after moving its split share to 0 and draining it."""
    from servekit.deliver.split import retire_drained

    drained = retire_drained(server, name, version)
    moved = f"its share moved to {drained.moved_to}, " if drained.moved_to else ""
    console.print(f"{name} {version} unregistered ({moved}drained in {drained.drained_s:.1f} s)")


@cli.command()
@click.argument("name")
@version_option(required=False, help_text="[default: the default version]")
@click.option("--min-workers", type=click.IntRange(min=0), required=True)
@click.option("--max-workers", type=click.IntRange(min=1), required=True)
@with_server
def scale(name: str, version: str | None, min_workers: int, max_workers: int, server: Server) -> None:
    """Set a version's worker range and wait until TorchServe applied it."""
    info = deployments.scale(server, name, version, min_workers, max_workers)
    console.print(
        f"{name} {info.version}: {info.ready_workers} worker(s) ready (min {info.min_workers}, max {info.max_workers})"
    )


# split ------------------------------------------------------------------------------------------------------------
@cli.command("split")
@click.argument("name")
@click.argument("shares", nargs=-1)
@click.option("--sticky-header", default=None, help="Requests with the same value of this header stay on one version.")
@click.option("--mirror", default=None, help="VERSION=PERCENT: copy that share to a version; its answers are dropped.")
@click.option("--clear", is_flag=True, help="Remove the split: all traffic to the default version.")
@with_server
@json_option
def split_command(name, shares, sticky_header, mirror, clear, server, as_json) -> None:
    """Set NAME's traffic split (VERSION=PERCENT..., summing to 100), or show it and each version's figures.

    Example: servekit split digits 1.0.0=90 1.1.0=10 --sticky-header X-Request-Key
    """
    from servekit.deliver import progressive
    from servekit.deliver import split as splits

    if (sticky_header or mirror) and not shares:
        raise UsageError("--sticky-header and --mirror go with VERSION=PERCENT shares")
    if clear and shares:
        raise UsageError("--clear removes the split: give either --clear or VERSION=PERCENT shares")
    if clear or shares:
        asked = splits.split_from_arguments(name, shares, sticky_header, mirror) if shares else None
        changed, abandoned = progressive.set_by_hand(server, name, asked)
        show_split_change(name, clear, changed, abandoned)
    if clear:
        return
    split, rows, since = splits.figures(server, name)
    if as_json:
        print_json({"split": split.__dict__, "since": since, "versions": [row.__dict__ for row in rows]})
        return
    console.print(splits.describe(split))
    print_table(splits.TABLE_HEADERS, splits.table_rows(split, rows), title=splits.TABLE_CAPTION)


def show_split_change(name: str, cleared: bool, changed: bool, abandoned) -> None:
    if cleared:
        console.print(f"{name}: split removed" if changed else f"{name} had no split")
    if abandoned is not None:
        console.print(
            f"progressive rollout of {name} {abandoned.version} abandoned; the default is {abandoned.previous}"
        )


# probe ------------------------------------------------------------------------------------------------------------
@cli.command("probe")
@click.argument("name")
@version_option(required=False, help_text="[default: every registered version]")
@click.option("--every", "every_s", type=float, default=None, help="Probe again every SECONDS until Ctrl-C.")
@with_server
@json_option
def probe_command(name: str, version: str | None, every_s: float | None, server: Server, as_json: bool) -> None:
    """Ask each version of NAME its golden samples; write the top-1 agreement as Prometheus gauges.

    The gauges go to WORKDIR/golden_probes.prom, which the proxy serves at /servekit/metrics (deploy/alerts.yml
    alerts on them). A model with no registered version (after `serve start` without --resume) has its gauges
    removed instead. Example: servekit probe digits --every 300
    """
    from servekit.deliver import probes
    from servekit.serve import probe_metrics

    path = probe_metrics.probes_file(server.workdir)
    probes.probe_every(server, name, version, every_s, functools.partial(show_probes, name, path, as_json),
                       functools.partial(show_forgotten, name, path, as_json))  # fmt: skip


def show_probes(name: str, path: Path, as_json: bool, results: list) -> None:
    if as_json:
        print_json({"file": str(path), "versions": [r.to_dict() for r in results]})
        return
    rows = [[r.version, r.samples, r.agreeing, f"{r.agreement:.3f}"] for r in results]
    print_table(["version", "samples", "agreeing", "agreement"], rows, title=f"{name}: golden probes")
    console.print(f"written to {path}")


def show_forgotten(name: str, path: Path, as_json: bool, removed: list[str]) -> None:
    if as_json:
        print_json({"file": str(path), "versions": [], "removed": removed})
    elif removed:
        gone = ", ".join(removed)
        console.print(f"{name} has no registered version: removed its gauges ({gone}) from {path}", soft_wrap=True)
    else:
        console.print(f"{name} has no registered version and no gauges in {path}", soft_wrap=True)
