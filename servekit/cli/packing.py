"""Commands that pack a model: build an archive, optimize its variants."""

from __future__ import annotations

import json
from pathlib import Path

import click

from servekit.build.archive import BATCH_BUDGET_MS, DEFAULT_MAX_BATCH, HANDLERS, MAX_DEFAULT_WORKERS
from servekit.cli.base import (
    BUILD_DEFAULTS,
    cli,
    console,
    handler_for,
    json_option,
    path_option,
    print_json,
    print_table,
    progress_line,
    source_option,
    store_option,
    version_option,
)
from servekit.core.choices import VARIANTS
from servekit.core.devices import DEVICE_CHOICES, resolve_device
from servekit.store.workspace import FORMAT_FILES, Workspace


# build -------------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@version_option()
@source_option()
@click.option("--handler", default=None, metavar="NAME|FILE.py[:Class]",
              help=f"{', '.join(sorted(HANDLERS))} or your handler file [default: the folder's or NAME]")  # fmt: skip
@click.option("--format", "model_format", type=click.Choice(list(FORMAT_FILES)), default=None,
              help="How the model is serialized [default: state_dict, or an optimized variant's own].")  # fmt: skip
@click.option("--batch-size", type=int, default=None,
              help=f"batchSize [what a worker runs in {BATCH_BUDGET_MS:g} ms, up to {DEFAULT_MAX_BATCH}].")  # fmt: skip
@click.option("--max-batch-delay", type=int, default=None,
              help=f"ms, at least 1 (TorchServe reads 0 as 100) [{BUILD_DEFAULTS.max_batch_delay_ms}].")  # fmt: skip
@click.option(
    "--workers", type=int, default=None, help=f"minWorkers = maxWorkers [one per core, up to {MAX_DEFAULT_WORKERS}]."
)
@click.option("--variant", default=None, help="Pack an optimized variant recorded by `optimize --pick` ('best').")
@click.option("--model-config", "model_config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A model-config.yaml from `servekit config` (devices, workers) to merge in.")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace an existing archive of this version.")
@click.option("--parent", "parent_version", default=None, help="Lineage parent [default: the highest below].")
@store_option
@json_option
def build(name, version, source_dir, handler, model_format, variant, model_config_path, force, parent_version,
          store, as_json, **flags):  # fmt: skip
    """Pack a trained model into STORE/NAME-VERSION.mar and record it in the catalog.

    Serving settings, strongest first: a flag, --model-config, serving.json from `servekit tune`, the defaults.
    Example: servekit build digits --version 1.0.0
    """
    from servekit.build.archive import build_archive, packed_folder, recorded_handler, resolve_options

    source_dir = packed_folder(store, name, source_dir, variant)
    flags["max_batch_delay_ms"] = flags.pop("max_batch_delay")
    resolved = resolve_options(source_dir, flags, model_config_path, model_format)
    handler = handler or (None if recorded_handler(source_dir) else handler_for(name, None))
    entry = build_archive(name, version, source_dir, store, handler, resolved.options, force, parent_version)
    if as_json:
        print_json({**entry.__dict__, "settings_from": resolved.sources})
        return
    settings = ", ".join(f"{key} {getattr(resolved.options, key)} ({how})" for key, how in resolved.sources.items())
    console.print(
        f"built {store / entry.archive} ({entry.handler} handler, {entry.model_format}, "
        f"{entry.size_bytes / 1e6:.1f} MB, sha256 {entry.sha256[:12]}...); {settings}"
        + (f"; parent {entry.parent_version}" if entry.parent_version else "")
    )


# optimize ----------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@source_option()
@path_option("--out", "out_dir", help="[default: work/NAME-optimized]")
@click.option("--variants", default="quick", show_default=True, help=f"'quick', 'all', or of: {', '.join(VARIANTS)}.")
@click.option("--max-accuracy-drop", type=float, default=1.0, show_default=True, help="Points below eager fp32.")
@click.option("--pick", type=click.Choice(["fastest"]), default=None, help="Record the fastest accepted variant.")
@path_option("--student", "student_dir", help="A distilled student.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch/ONNX Runtime threads [all cores].")
@click.option(
    "--device",
    type=click.Choice(DEVICE_CHOICES),
    default="cpu",
    show_default=True,
    help="Where the variants run and are gated: the workers' device (cuda: fp16, bf16, CUDA graphs, ...).",
)
@click.option("--budget", "budget_s", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds of timing per variant and batch size.")  # fmt: skip
@store_option
@json_option
def optimize(name, source_dir, out_dir, pick, device, store, as_json, **plan) -> None:
    """Build, time and score every variant of a trained model; gate on accuracy; report table, JSON, Markdown, PNG.

    Example: servekit optimize digits --variants all --pick fastest
    """
    from servekit.build import optimize as optimizer

    workspace = Workspace(store)
    out_dir, source_dir = out_dir or workspace.optimized(name), source_dir or workspace.trained(name)
    with progress_line(f"optimizing {name}") as show:
        plan = optimizer.OptimizePlan(name, source_dir, out_dir, device=resolve_device(device), **plan)
        report = optimizer.optimize(plan, lambda result: show(result.name))
    if pick:
        optimizer.record_best(store, report, out_dir)
    if as_json:
        print_json(json.loads((out_dir / "report.json").read_text()))
        return
    print_table(optimizer.TABLE_HEADERS, optimizer.table_rows(report), title=f"{name} on {report.device}")
    console.print(
        f"best accepted by {report.picked_by}: [bold]{report.best}[/]; "
        f"report in {out_dir}/report.md and latency_vs_accuracy.png"
        + (f"; recorded in {store}/catalog.json" if pick else "")
    )
