"""Commands that measure a served model: bench (beside a peer), tune."""

from __future__ import annotations

from pathlib import Path

import click

from servekit.build.archive import HANDLERS, placement
from servekit.cli.base import (
    DEFAULTS,
    LEVELS,
    SECONDS,
    SECONDS_OR_ZERO,
    IntList,
    cli,
    console,
    generator_option,
    handler_for,
    json_option,
    path_option,
    print_json,
    print_table,
    source_option,
    version_option,
    with_server,
)
from servekit.core.choices import PEERS, RUNTIMES
from servekit.serve.handle import Server
from servekit.store.workspace import DEFAULT_STORE, DEFAULT_TRITON_WORKDIR, HELD_OUT_DIR, Workspace


# bench ------------------------------------------------------------------------------------------------------------
@cli.command("bench")
@click.argument("name")
@version_option(required=False, help_text="[default: the server's default version]")
@click.option("--concurrency", type=LEVELS, default="1,4,16", show_default=True, help="Concurrent clients per level.")
@click.option("--duration", "duration_s", type=SECONDS, default="10s", show_default=True, help="Per level, e.g. 20s.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Open loop: requests per second, latency from the scheduled send time.")  # fmt: skip
@path_option("--input", "input_file", help="Send this one file.")
@path_option("--held-out", "held_out", help="Send a labelled folder [default: the archive's golden samples].")
@click.option("--baseline", "peer", type=click.Choice(PEERS), default=None,
              help="Also bench a peer on --baseline-model (Flask, LitServe, TorchServe as its examples document it; "
                   "pip install 'servekit[peers]'), or the Triton of --triton-workdir (both in v2).")  # fmt: skip
@click.option("--runtime", type=click.Choice(RUNTIMES), default="torchserve", show_default=True,
              help="What serves NAME: servekit's TorchServe, or the Triton of --triton-workdir (in v2).")  # fmt: skip
@path_option("--triton-workdir", default=DEFAULT_TRITON_WORKDIR, show_default=True,
             help="Where `servekit serve triton` recorded the Triton to bench or compare with.")  # fmt: skip
@path_option("--store", default=DEFAULT_STORE, show_default=True,
             help="Archives and catalog.json, with --runtime triton (TorchServe's own otherwise).")  # fmt: skip
@path_option("--baseline-model", "peer_model_dir", default=DEFAULTS.trained("digits"), show_default=True,
             help="Trained folder (digits or image) the peer serves eager.")  # fmt: skip
@path_option("--out", "out_dir", help="[default: work/NAME-bench]")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Runs per level.")
@click.option("--warmup", "warmup_s", type=SECONDS_OR_ZERO, default="10s", show_default=True,
              help="Unmeasured load first, at the highest level, so TorchServe's JIT is warm (0: none).")  # fmt: skip
@generator_option
@with_server
@json_option
def bench_command(server: Server, out_dir: Path | None, as_json: bool, **plan) -> None:
    """Drive the inference API with concurrent clients; compare with the handler in process (and a peer).

    Example: servekit bench digits --concurrency 1,4,16 --duration 20s --baseline flask

    On Triton: servekit bench digits --runtime triton --baseline litserve
    """
    from servekit.measure import bench as benchmarks

    plan = benchmarks.BenchPlan(**plan)
    report = benchmarks.bench(server, plan, None if as_json else show_level)
    out_dir = out_dir or Workspace(plan.store if plan.runtime == "triton" else server.store).bench_reports(report.name)
    benchmarks.write_reports(report, out_dir)
    if as_json:
        print_json(report.to_dict())
        return
    title = f"{report.name} {report.version} on {benchmarks.RUNTIME_LABELS[report.runtime]}"
    print_table(benchmarks.headers(report), benchmarks.rows(report), title=title)
    ip = report.in_process
    console.print(
        f"in process on {ip.device}: {ip.throughput_per_s:.1f} samples/s at batch {ip.batch_size}, one request p50 "
        f"{ip.p50_ms:.2f} ms; reports in {out_dir}"
    )


def show_level(kind: str, level) -> None:
    result = level.served if kind == "served" else level.baseline
    console.print(
        f"{kind:>8} concurrency {result.concurrency:>3}: {result.throughput_per_s:8.1f} req/s, "
        f"p50 {result.p50_ms:7.2f} ms, p99 {result.p99_ms:7.2f} ms, {result.errors} errors ({result.generator}); "
        + (level.cpu if kind == "served" else level.baseline_cpu).describe()
    )


# tune -------------------------------------------------------------------------------------------------------------
def objectives(ctx, param, values: tuple[str, ...]) -> list:
    from servekit.measure.tune import parse_objective

    return [parse_objective(text) for text in values]


@cli.command("tune")
@click.argument("name")
@source_option("Trained folder; serving.json is written there")
@click.option("--handler", type=click.Choice(sorted(HANDLERS)), default=None, help="[default: NAME]")
@click.option("--slo", "goals", multiple=True, default=("p95=100ms@16",), show_default=True, callback=objectives,
              help="Objective PERCENTILE=LIMITms@CONCURRENCY (p50/p95/p99); repeat for several.")  # fmt: skip
@click.option("--workers", "splits", default=None, help="WORKERSxTHREADS, e.g. 2x1,1x2 [every split of the cores].")
@click.option("--batch-sizes", type=IntList(1, "batch sizes", False), default="1,4,8", show_default=True)
@click.option("--delays", type=IntList(1, "delays in ms", False), default="1,2,5", show_default=True,
              help="maxBatchDelay values in ms (at least 1).")  # fmt: skip
@click.option("--duration", type=SECONDS, default="5s", show_default=True, help="Per setting and concurrency.")
@click.option("--warmup", type=SECONDS_OR_ZERO, default="3s", show_default=True,
              help="Unmeasured load on each setting first, at the highest concurrency (0: none).")  # fmt: skip
@path_option("--held-out", "held_out_dir", help="Request bodies [default: the trained folder's heldout/].")
@path_option("--out", "out_dir", help="[default: work/NAME-tune]")
@click.option("--model-config", "model_config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A model-config.yaml from `servekit config --gpus`: every trial runs on its devices.")  # fmt: skip
@generator_option
@with_server
@json_option
def tune_command(name, source_dir, handler, goals, splits, batch_sizes, delays, duration, warmup, held_out_dir,
                 out_dir, model_config_path, generator, server, as_json) -> None:  # fmt: skip
    """The highest throughput that meets every objective, over workers x threads x batch size x max batch delay.

    Example: servekit tune digits --slo p99=25ms@16 --slo p50=5ms@1
    """
    from servekit.measure import bench as benchmarks
    from servekit.measure import tune as tuning

    source_dir = source_dir or Workspace(server.store).trained(name)
    grid = tuning.grid(tuning.parse_splits(splits or tuning.default_splits()), batch_sizes, delays)
    bodies = benchmarks.request_bodies(held_out_dir or source_dir / HELD_OUT_DIR, None)
    plan = tuning.TunePlan(name, handler_for(name, handler), source_dir, grid, bodies, goals, duration, generator,
                           placement(model_config_path), warmup)  # fmt: skip
    trials = tuning.tune(server, plan, None if as_json else lambda t: console.print(tuning.describe(t)))
    winner, path, report = tuning.finish(source_dir, trials, out_dir or Workspace(server.store).work / f"{name}-tune")
    if as_json:
        print_json({**tuning.to_dict(trials, winner, None), "serving_json": str(path), "report": str(report)})
        return
    console.print("\n".join(tuning.why(winner, trials)) + f"\nwritten to {path} for the next servekit build; {report}")
