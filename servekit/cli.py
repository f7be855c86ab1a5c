"""The `servekit` command line: a thin layer over the library; every command's logic lives in a module."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from servekit import __version__, server
from servekit import optimize as optimizer
from servekit import rollout as rollouts
from servekit.archive import HANDLERS, BuildOptions, build_archive
from servekit.catalog import Catalog
from servekit.client import Endpoints, FailoverClient, ServeClient
from servekit.datasets import read_held_out
from servekit.errors import ServekitError, UsageError
from servekit.evaluate import evaluate_served
from servekit.formats import FORMAT_FILES
from servekit.optimize import QUICK_VARIANTS, VARIANTS, variant_dir
from servekit.rollout import ready_workers, register_verified
from servekit.status import observe
from servekit.train import (
    HELD_OUT_DIR,
    IMAGE_ARCHITECTURES,
    OnEpoch,
    TrainResult,
    distill_digits,
    train_digits,
    train_image,
    train_text,
)
from servekit.tune import serving_defaults

console = Console()
errors = Console(stderr=True)

DEFAULT_STORE = Path("model_store")
DEFAULT_WORKDIR = Path(".servekit")
DEFAULT_WORK = DEFAULT_STORE / "work"


class ServekitGroup(click.Group):
    """Prints a ServekitError as one red line (exit 2 for usage errors, else 1) instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ServekitError as exc:
            errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            ctx.exit(2 if isinstance(exc, UsageError) else 1)


def store_option(function):
    return click.option(
        "--store",
        type=click.Path(path_type=Path),
        default=DEFAULT_STORE,
        show_default=True,
        help="Model store: the .mar archives and catalog.json.",
    )(function)


def workdir_option(function):
    return click.option(
        "--workdir",
        type=click.Path(path_type=Path),
        default=DEFAULT_WORKDIR,
        show_default=True,
        help="The server's working folder (logs, key_file.json, server.json).",
    )(function)


def json_option(function):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(function)


def connect(workdir: Path) -> ServeClient:
    return ServeClient(server.ServerState.load(workdir.resolve()).endpoints())


def failover_client(urls: tuple[str, ...], key_files: tuple[Path, ...]) -> FailoverClient:
    if len(key_files) != len(urls):
        raise UsageError(f"{len(urls)} --url but {len(key_files)} --key-file: give one key_file.json per server")
    return FailoverClient(
        [ServeClient(Endpoints(url.rstrip("/"), "", "", key)) for url, key in zip(urls, key_files, strict=True)]
    )


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


@click.group(cls=ServekitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="servekit")
def cli() -> None:
    """servekit: train, archive, serve and query PyTorch models on TorchServe."""


# train --------------------------------------------------------------------------------------------------------
@cli.group()
def train() -> None:
    """Train a model on data that ships inside installed packages."""


def run_training(description: str, epochs: int, train: Callable[[OnEpoch], TrainResult], out: Path) -> None:
    """Runs a trainer under a progress bar and prints its held-out accuracy."""
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(description, total=max(epochs, 1))

        def on_epoch(epoch: int, loss: float) -> None:
            progress.update(task, advance=1, description=f"{description}: epoch {epoch}/{epochs} loss {loss:.4f}")

        result = train(on_epoch)
    console.print(
        f"{description} in {result.seconds:.1f} s: held-out accuracy [bold]{result.accuracy:.4f}[/] "
        f"on {result.test_size} samples; wrote {out}"
    )


def out_option(default: str):
    return click.option(
        "--out",
        type=click.Path(path_type=Path),
        default=DEFAULT_WORK / default,
        show_default=True,
        help="Folder for model.pt, labels.json, handler.json, metrics.json and heldout/.",
    )


@train.command("digits")
@out_option("digits")
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def train_digits_command(out: Path, epochs: int, seed: int) -> None:
    """SimpleCNN on scikit-learn's digits (8x8 upscaled to 28x28), 20 % held out.

    Example: servekit train digits --out model_store/work/digits
    """
    run_training("training SimpleCNN", epochs, lambda cb: train_digits(out, epochs, seed, on_epoch=cb), out)


@train.command("image")
@out_option("image")
@click.option("--arch", type=click.Choice(IMAGE_ARCHITECTURES), default="resnet18", show_default=True)
@click.option("--image-size", type=click.IntRange(min=16), default=64, show_default=True)
@click.option(
    "--epochs", type=click.IntRange(min=0), default=4, show_default=True, help="0 keeps the random initialisation."
)
@click.option("--seed", type=int, default=0, show_default=True)
def train_image_command(out: Path, arch: str, image_size: int, epochs: int, seed: int) -> None:
    """A torchvision classifier trained from scratch on the digits as RGB images (no pretrained download).

    Example: servekit train image --arch resnet18 --image-size 64 --epochs 4
    """
    run_training(
        f"training {arch}", epochs, lambda cb: train_image(out, arch, image_size, epochs, seed, on_epoch=cb), out
    )


@train.command("text")
@out_option("text")
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True)
@click.option(
    "--samples",
    type=click.IntRange(min=500),
    default=6000,
    show_default=True,
    help="Size of the generated review corpus (20 % held out).",
)
@click.option("--seed", type=int, default=0, show_default=True)
def train_text_command(out: Path, epochs: int, samples: int, seed: int) -> None:
    """The Transformer text classifier on generated sentiment reviews (rule: servekit.datasets.sentiment_corpus).

    Example: servekit train text --out model_store/work/text
    """
    run_training("training TextClassifier", epochs, lambda cb: train_text(out, epochs, seed, samples, on_epoch=cb), out)


# build --------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@click.option("--version", "version", required=True, help="Semantic version, e.g. 1.0.0.")
@click.option(
    "--from",
    "source_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Trained model folder [default: model_store/work/NAME].",
)
@click.option(
    "--handler",
    type=click.Choice(sorted(HANDLERS)),
    default=None,
    help="Handler to pack [default: NAME when it is a handler's name].",
)
@click.option(
    "--format",
    "model_format",
    type=click.Choice(list(FORMAT_FILES)),
    default=None,
    help="How the model is serialized in the archive, exported at build time [default: state_dict, or the "
    "format of an optimized variant].",
)
@click.option("--batch-size", type=int, default=None, help="TorchServe batchSize [serving.json from tune, else 4].")
@click.option("--max-batch-delay", type=int, default=None, help="maxBatchDelay in ms [serving.json, else 50].")
@click.option("--workers", type=int, default=None, help="minWorkers = maxWorkers [serving.json, else 1].")
@click.option(
    "--variant",
    default=None,
    help="Pack an optimized variant recorded by `servekit optimize --pick fastest` ('best' or its name).",
)
@click.option(
    "--model-config",
    "model_config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A model-config.yaml from `servekit config` (devices, workers) to merge in.",
)
@click.option("--force", is_flag=True, help="Replace an existing archive of this version.")
@click.option(
    "--parent",
    "parent_version",
    default=None,
    help="Lineage parent version [default: the highest cataloged version below this one].",
)
@store_option
@json_option
def build(
    name,
    version,
    source_dir,
    handler,
    model_format,
    batch_size,
    max_batch_delay,
    workers,
    variant,
    model_config_path,
    force,
    parent_version,
    store,
    as_json,
):
    """Pack a trained model into STORE/NAME-VERSION.mar and record it in the catalog.

    Example: servekit build digits --version 1.0.0
    """
    handler = handler or name
    if handler not in HANDLERS:
        raise UsageError(f"no handler named {name!r}: pass --handler ({', '.join(sorted(HANDLERS))})")
    if variant and source_dir:
        raise UsageError("--variant and --from both name the folder to pack: give one")
    if variant:
        source_dir = variant_dir(store, name, variant)
    source_dir = source_dir or DEFAULT_WORK / name
    tuned = serving_defaults(source_dir)
    batch_size = batch_size or tuned.get("batch_size", 4)
    max_batch_delay = tuned.get("max_batch_delay_ms", 50) if max_batch_delay is None else max_batch_delay
    workers = workers or tuned.get("workers", 1)
    threads = {"torch_threads": tuned["torch_threads"]} if tuned.get("torch_threads") else {}
    extra = yaml.safe_load(model_config_path.read_text()) or {} if model_config_path else {}
    if not isinstance(extra, dict):
        raise UsageError(f"{model_config_path} is not a YAML mapping")
    if model_config_path:  # the generated file's worker counts and batching win over the defaults
        batch_size = extra.pop("batchSize", batch_size)
        max_batch_delay = extra.pop("maxBatchDelay", max_batch_delay)
        workers = extra.pop("minWorkers", workers)
        extra.pop("maxWorkers", None)
    options = BuildOptions(
        batch_size, max_batch_delay, workers, model_format=model_format, handler=threads, model_config=extra
    )
    entry = build_archive(
        name,
        version,
        source_dir,
        store,
        handler=handler,
        options=options,
        force=force,
        parent_version=parent_version,
    )
    if as_json:
        print_json(entry.__dict__)
        return
    console.print(
        f"built {store / entry.archive} ({entry.handler} handler, {entry.model_format}, "
        f"{entry.size_bytes / 1e6:.1f} MB, sha256 {entry.sha256[:12]}...), batch size {batch_size}, {workers} worker(s)"
        + (f", parent {entry.parent_version}" if entry.parent_version else "")
    )


# serve --------------------------------------------------------------------------------------------------------
@cli.group()
def serve() -> None:
    """Start, stop and inspect the TorchServe that servekit runs."""


@serve.command("start")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=Path("config.properties"),
    show_default=True,
    help="Base TorchServe config.properties.",
)
@click.option("--inference-port", type=int, default=None, help="Overrides the config's inference port.")
@click.option("--management-port", type=int, default=None, help="Overrides the config's management port.")
@click.option("--metrics-port", type=int, default=None, help="Overrides the config's metrics port.")
@click.option("--grpc-inference-port", type=int, default=None, help="Overrides the gRPC inference port.")
@click.option("--grpc-management-port", type=int, default=None, help="Overrides the gRPC management port.")
@click.option("--no-snapshots", is_flag=True, help="Start without config snapshots (torchserve --ncs).")
@click.option(
    "--resume",
    is_flag=True,
    help="Restart from WORKDIR's newest snapshot: the same models, versions, defaults and ports.",
)
@store_option
@workdir_option
def serve_start(config_path, no_snapshots, resume, store, workdir, **port_options) -> None:
    """Start TorchServe in the background and wait until it is healthy.

    Every address binds 127.0.0.1. Example: servekit serve start --config config.properties
    """
    ports = {name.removesuffix("_port"): port for name, port in port_options.items() if port is not None}
    settings = server.ServerSettings(
        base_config=config_path,
        model_store=store,
        workdir=workdir,
        ports=ports,
        snapshots=not no_snapshots,
        resume=resume,
    )
    state = server.start(settings)
    console.print(
        f"TorchServe is up (pid {state.pid}): inference {state.inference_url}, "
        f"management {state.management_url}, metrics {state.metrics_url}; keys in {state.key_file}"
    )


@serve.command("stop")
@workdir_option
def serve_stop(workdir: Path) -> None:
    """Stop the TorchServe started from WORKDIR, and its workers."""
    if server.stop(workdir):
        console.print("TorchServe stopped")
    else:
        console.print(f"no TorchServe was running from {workdir}")


@serve.command("status")
@workdir_option
@json_option
@click.pass_context
def serve_status(ctx: click.Context, workdir: Path, as_json: bool) -> None:
    """Same as `servekit status`."""
    ctx.invoke(status_command, workdir=workdir, as_json=as_json)


# register / models / predict / evaluate ---------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@click.option("--version", "version", required=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Workers for this version [default: the archive's minWorkers].",
)
@workdir_option
def register(name: str, version: str, workers: int | None, workdir: Path) -> None:
    """Register STORE/NAME-VERSION.mar with the running server (after checking its sha256) and wait until ready.

    Example: servekit register digits --version 1.0.0 --workers 1
    """
    state = server.ServerState.load(workdir.resolve())
    description = register_verified(ServeClient(state.endpoints()), Path(state.model_store), name, version, workers)
    console.print(
        f"registered {name} {version}: {ready_workers(description)} worker(s) ready, "
        f"batch size {description['batchSize']}"
    )


@cli.command()
@click.option("--store", "from_store", is_flag=True, help="List the catalog of built archives instead.")
@click.option(
    "--store-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_STORE,
    show_default=True,
    help="Model store read with --store.",
)
@workdir_option
@json_option
def models(from_store: bool, store_dir: Path, workdir: Path, as_json: bool) -> None:
    """List the models the server has (versions, default, workers), or with --store the built archives."""
    if from_store:
        rows = [entry.__dict__ for entry in Catalog.load(store_dir).entries()]
        columns = ("name", "version", "parent_version", "model_format", "archive", "size_bytes", "sha256", "created")
    else:
        client = connect(workdir)
        rows = []
        for model in client.list_models():
            for version in client.describe(model["modelName"]):
                workers = version.get("workers", [])
                rows.append(
                    {
                        "name": version["modelName"],
                        "version": version["modelVersion"],
                        "default": model["modelUrl"] == version["modelUrl"],
                        "workers": f"{sum(w['status'] == 'READY' for w in workers)}/{len(workers)} ready",
                        "batch_size": version["batchSize"],
                        "archive": version["modelUrl"],
                    }
                )
        columns = ("name", "version", "default", "workers", "batch_size", "archive")
    if as_json:
        print_json(rows)
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*(str(row[c])[:16] if c == "sha256" else str(row[c]) for c in columns))
    console.print(table)


@cli.command()
@click.argument("name")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--version", "version", default=None, help="A specific version [default: the server's default].")
@click.option(
    "--url",
    "urls",
    multiple=True,
    help="Inference URL of a TorchServe; repeat for failover (needs --key-file for each, in order).",
)
@click.option(
    "--key-file",
    "key_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="key_file.json of the server at the --url in the same position.",
)
@workdir_option
@json_option
def predict(name, files, version, urls, key_files, workdir, as_json) -> None:
    """Send each FILE (an image, a .txt text or a .json document) to NAME and print the answer.

    Inference is retried on 503 with backoff; with several --url, a server that is down is failed over.

    Example: servekit predict digits model_store/work/digits/heldout/0000_7.png
    """
    client = failover_client(urls, key_files) if urls else connect(workdir)
    answers = {str(path): client.predict_file(name, path, version=version) for path in files}
    if as_json:
        print_json(answers)
        return
    for path, answer in answers.items():
        for item in answer if isinstance(answer, list) else [answer]:
            if isinstance(item, dict) and "label" in item:
                confidence = item["probabilities"].get(item["label"], 0.0)
                console.print(f"{path}: [bold]{item['label']}[/] ({confidence:.1%})")
            else:
                console.print(f"{path}: {json.dumps(item)}")


@cli.command()
@click.argument("name")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    default=None,
    help=f"Labelled images with index.csv [default: model_store/work/NAME/{HELD_OUT_DIR}].",
)
@click.option("--version", "version", default=None)
@click.option("--concurrency", type=click.IntRange(min=1, max=64), default=4, show_default=True)
@workdir_option
@json_option
def evaluate(name: str, data_dir: Path | None, version: str | None, concurrency: int, workdir: Path, as_json) -> None:
    """Accuracy of a served classifier on a labelled folder (index.csv), through the inference API.

    Example: servekit evaluate digits
    """
    client = connect(workdir)
    folder = data_dir or DEFAULT_WORK / name / HELD_OUT_DIR
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"predicting with {name}", total=None)
        result = evaluate_served(client, name, folder, version, concurrency, lambda: progress.advance(task))
    if as_json:
        print_json(
            {"accuracy": result.accuracy, "total": result.total, "correct": result.correct, "mistakes": result.mistakes}
        )
        return
    console.print(f"served accuracy of {name}: [bold]{result.accuracy:.4f}[/] ({result.correct}/{result.total})")


# optimize / distill ------------------------------------------------------------------------------------------------
def variant_list(value: str) -> tuple[str, ...]:
    if value == "all":
        return VARIANTS
    if value == "quick":
        return QUICK_VARIANTS
    return tuple(v.strip() for v in value.split(",") if v.strip())


@cli.command()
@click.argument("name")
@click.option(
    "--from",
    "source_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Trained model folder [default: model_store/work/NAME].",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Report and variant folders [default: model_store/work/NAME-optimized].",
)
@click.option(
    "--variants", default="quick", show_default=True, help=f"'quick', 'all', or a comma list of: {', '.join(VARIANTS)}."
)
@click.option(
    "--max-accuracy-drop",
    type=float,
    default=1.0,
    show_default=True,
    help="Points of held-out accuracy a variant may lose against eager fp32.",
)
@click.option(
    "--pick",
    type=click.Choice(["fastest"]),
    default=None,
    help="Record the fastest accepted variant in the catalog (for build --variant best).",
)
@click.option(
    "--student",
    "student_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="A distilled student (servekit distill) to measure beside the variants.",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch/ONNX Runtime threads [all cores].")
@click.option(
    "--budget",
    "budget_s",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds of timing per variant and batch size.",
)
@store_option
@json_option
def optimize(
    name, source_dir, out_dir, variants, max_accuracy_drop, pick, student_dir, threads, budget_s, store, as_json
) -> None:
    """Build, time and score every variant of a trained model; gate on accuracy; report table, JSON, Markdown, PNG.

    Example: servekit optimize digits --variants all --pick fastest
    """
    source_dir = source_dir or DEFAULT_WORK / name
    out_dir = out_dir or DEFAULT_WORK / f"{name}-optimized"
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"optimizing {name}", total=None)
        report = optimizer.optimize(
            name,
            source_dir,
            out_dir,
            variant_list(variants),
            max_accuracy_drop,
            threads,
            budget_s,
            student_dir,
            lambda r: progress.update(task, description=r.name),
        )
    if pick:
        optimizer.record_best(store, report, out_dir)
    if as_json:
        print_json(json.loads((out_dir / "report.json").read_text()))
        return
    table = Table(
        "variant",
        "status",
        "bs1 p50 ms",
        "bs1 p95",
        "bs8 p50",
        "speedup",
        "size",
        "accuracy",
        "agree",
        "max |dlogit|",
        "note",
        title=f"{name}: {report.threads} threads",
    )
    for r in report.results:
        table.add_row(
            r.name,
            r.status,
            f"{r.bs1_p50_ms:.3f}",
            f"{r.bs1_p95_ms:.3f}",
            f"{r.bs8_p50_ms:.3f}",
            f"{r.speedup_bs1:.2f}x",
            f"{r.size_ratio:.2f}x",
            f"{r.accuracy:.4f}",
            f"{r.agreement:.3f}",
            f"{r.max_logit_diff:.2g}",
            r.reason,
        )
    console.print(table)
    console.print(
        f"fastest accepted: [bold]{report.best}[/]; report in {out_dir}/report.md and "
        f"latency_vs_accuracy.png" + (f"; recorded in {store}/catalog.json" if pick else "")
    )


@cli.group()
def distill() -> None:
    """Knowledge distillation into a smaller student."""


@distill.command("digits")
@click.option(
    "--teacher", "teacher_dir", type=click.Path(path_type=Path), default=DEFAULT_WORK / "digits", show_default=True
)
@out_option("digits-student")
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1),
    default=0.7,
    show_default=True,
    help="Weight of the teacher's soft targets (the rest: the labels).",
)
def distill_digits_command(teacher_dir: Path, out: Path, epochs: int, temperature: float, alpha: float) -> None:
    """SimpleCNN teacher -> SmallCNN student (about 40x fewer weights), on the same digits split.

    Example: servekit distill digits && servekit optimize digits --student model_store/work/digits-student
    """
    run_training(
        "distilling SmallCNN",
        epochs,
        lambda cb: distill_digits(teacher_dir, out, epochs, temperature, alpha, on_epoch=cb),
        out,
    )


# bench / tune / status -------------------------------------------------------------------------------------------
def int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a comma list of integers") from None


def levels_option(text: str) -> list[int]:
    levels = int_list(text, "--concurrency")
    if not levels or min(levels) < 1:
        raise UsageError("--concurrency levels must be integers >= 1")
    return levels


def seconds_option(text: str) -> float:
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise UsageError(f"duration {text!r} is not seconds like 20 or 20s") from None
    if value <= 0:
        raise UsageError("the duration must be positive")
    return value


@cli.command("bench")
@click.argument("name")
@click.option("--version", "version", default=None, help="[default: the server's default version]")
@click.option("--concurrency", default="1,4,16", show_default=True, help="Concurrent clients per level.")
@click.option("--duration", default="10s", show_default=True, help="Per level, e.g. 20s.")
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Open loop: requests per second, latency from the scheduled send time.",
)
@click.option("--input", "input_file", type=click.Path(path_type=Path), default=None, help="Send this one file.")
@click.option(
    "--held-out",
    "held_out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Send a labelled folder [default: the archive's golden samples].",
)
@click.option("--baseline", type=click.Choice(["flask"]), default=None, help="Also bench the Flask baseline.")
@click.option(
    "--baseline-model",
    type=click.Path(path_type=Path),
    default=DEFAULT_WORK / "digits",
    show_default=True,
    help="Trained SimpleCNN folder the Flask baseline serves.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="bench.json, bench.md, bench.png [default: model_store/work/NAME-bench].",
)
@workdir_option
@json_option
def bench_command(
    name,
    version,
    concurrency,
    duration,
    rate,
    input_file,
    held_out_dir,
    baseline,
    baseline_model,
    out_dir,
    workdir,
    as_json,
) -> None:
    """Drive the inference API with concurrent clients; compare with the handler in process (and Flask).

    Example: servekit bench digits --concurrency 1,4,16 --duration 20s --baseline flask
    """
    from servekit import bench as benchmarks

    state = server.ServerState.load(workdir.resolve())
    client = ServeClient(state.endpoints())
    store = Path(state.model_store)
    version = version or rollouts.default_version(client, name)
    if version is None:
        raise UsageError(f"{name} is not registered on this server: servekit register {name} --version V")
    if held_out_dir is None and input_file is None:
        entry = Catalog.load(store).get(name, version)
        if entry is None or not entry.golden_dir:
            raise UsageError(
                f"{name} {version} has no golden samples in the catalog: pass --held-out DIR or --input FILE"
            )
        held_out_dir = store / entry.golden_dir
    bodies = benchmarks.request_bodies(held_out_dir, input_file)

    def show(kind: str, level) -> None:
        result = level.served if kind == "served" else level.baseline
        if not as_json:
            console.print(
                f"{kind:>8} concurrency {result.concurrency:>3}: {result.throughput_per_s:8.1f} req/s, "
                f"p50 {result.p50_ms:7.2f} ms, p99 {result.p99_ms:7.2f} ms, {result.errors} errors"
            )

    port = server.free_port() if baseline else None
    report = benchmarks.bench(
        client,
        store,
        name,
        version,
        bodies,
        levels_option(concurrency),
        seconds_option(duration),
        rate,
        baseline_model if baseline else None,
        port,
        show,
    )
    out_dir = out_dir or DEFAULT_WORK / f"{name}-bench"
    benchmarks.write_reports(report, out_dir)
    if as_json:
        print_json(report.to_dict())
        return
    table = Table(*benchmarks.HEADERS, title=f"{name} {version}")
    for row in benchmarks.rows(report):
        table.add_row(*row)
    console.print(table)
    ip = report.in_process
    console.print(
        f"in process: {ip.throughput_per_s:.1f} samples/s at batch {ip.batch_size}, one request p50 "
        f"{ip.p50_ms:.2f} ms; reports in {out_dir}"
    )


@cli.command("tune")
@click.argument("name")
@click.option(
    "--from",
    "source_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Trained folder [default: model_store/work/NAME]; serving.json is written there.",
)
@click.option("--handler", type=click.Choice(sorted(HANDLERS)), default=None, help="[default: NAME]")
@click.option("--workers", "workers_grid", default="1,2", show_default=True)
@click.option("--batch-sizes", default="1,4,8", show_default=True)
@click.option("--delays", default="5,20", show_default=True, help="maxBatchDelay values in ms.")
@click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--duration", default="10s", show_default=True)
@click.option(
    "--p95-budget",
    "p95_budget_ms",
    type=click.FloatRange(min=0, min_open=True),
    default=100.0,
    show_default=True,
    help="Milliseconds.",
)
@click.option(
    "--held-out",
    "held_out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Request bodies [default: the trained folder's heldout/].",
)
@workdir_option
@json_option
def tune_command(
    name,
    source_dir,
    handler,
    workers_grid,
    batch_sizes,
    delays,
    concurrency,
    duration,
    p95_budget_ms,
    held_out_dir,
    workdir,
    as_json,
) -> None:
    """Sweep workers x batch size x max batch delay on the running server; keep the best within a p95 budget.

    Example: servekit tune digits --batch-sizes 1,4,8 --delays 5,20 --concurrency 16 --duration 10s
    """
    from servekit import bench as benchmarks
    from servekit import tune as tuning

    state = server.ServerState.load(workdir.resolve())
    client = ServeClient(state.endpoints())
    source_dir = source_dir or DEFAULT_WORK / name
    handler = handler or name
    if handler not in HANDLERS:
        raise UsageError(f"no handler named {name!r}: pass --handler")
    settings = tuning.grid(
        int_list(workers_grid, "--workers"), int_list(batch_sizes, "--batch-sizes"), int_list(delays, "--delays")
    )
    bodies = benchmarks.request_bodies(held_out_dir or source_dir / HELD_OUT_DIR, None)

    def show(trial) -> None:
        if not as_json:
            s, r = trial.setting, trial.result
            console.print(
                f"workers {s.workers} batch {s.batch_size:>2} delay {s.max_batch_delay_ms:>3} ms: "
                f"{r.throughput_per_s:8.1f} req/s, p95 {r.p95_ms:7.2f} ms, {r.errors} errors"
                + ("" if trial.within_budget else "  (over budget)")
            )

    trials, best = tuning.tune(
        client,
        Path(state.model_store),
        name,
        handler,
        source_dir,
        settings,
        bodies,
        concurrency,
        seconds_option(duration),
        p95_budget_ms,
        show,
    )
    if best is None:
        raise ServekitError(f"no setting kept p95 under {p95_budget_ms} ms without errors: raise --p95-budget")
    path = tuning.save_serving(source_dir, best, concurrency, p95_budget_ms)
    if as_json:
        print_json(
            {
                "trials": [
                    {"setting": t.setting.__dict__, "result": t.result.to_dict(), "within_budget": t.within_budget}
                    for t in trials
                ],
                "best": best.setting.__dict__,
                "serving_json": str(path),
            }
        )
        return
    console.print(
        f"best: workers {best.setting.workers}, batch {best.setting.batch_size}, delay "
        f"{best.setting.max_batch_delay_ms} ms ({best.result.throughput_per_s:.1f} req/s, p95 "
        f"{best.result.p95_ms:.1f} ms); written to {path} for the next servekit build"
    )


@cli.command("status")
@workdir_option
@json_option
def status_command(workdir: Path, as_json: bool) -> None:
    """Server health, models, versions, default, workers (PID, status, memory) and live figures from /metrics."""
    state = server.running_state(workdir.resolve())
    if state is None:
        raise ServekitError(f"no TorchServe is running from {workdir}: servekit serve start")
    report = observe(ServeClient(state.endpoints()), state)
    if as_json:
        print_json(report)
        return
    console.print(
        f"TorchServe pid {report['pid']}: {report['health']} at {state.inference_url}; responses "
        + ", ".join(f"{k} {int(v)}" for k, v in report["responses"].items())
    )
    table = Table(
        "model",
        "version",
        "default",
        "workers (pid status MB)",
        "requests",
        "mean ms",
        "queue ms",
        "last batch",
        "rejected",
    )
    for row in report["models"]:
        workers = ", ".join(f"{w['pid']} {w['status']} {w['memoryUsage'] / 1e6:.0f}" for w in row["workers"])
        table.add_row(
            row["name"],
            row["version"],
            str(row["default"]),
            workers,
            str(int(row["requests"])),
            fmt_ms(row["mean_ms"]),
            fmt_ms(row["queue_ms"]),
            str(row["handler"].get("ServekitBatchSize", "-")),
            str(int(row["handler"].get("ServekitRejectedRequests", 0))),
        )
    console.print(table)


def fmt_ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


# config / export --------------------------------------------------------------------------------------------------
@cli.command("config")
@click.option("--gpus", default="auto", show_default=True, help="GPUs to use: a number, or 'auto' (what torch sees).")
@click.option("--workers-per-gpu", type=int, default=1, show_default=True, help="Workers per GPU (or on the CPU).")
@click.option("--models", "models_text", required=True, help="Comma list of model names.")
@click.option("--device-ids", default="", help="Comma list of GPU indices for the models [default: all].")
@click.option(
    "--parallel-type",
    type=click.Choice(["pp", "tp", "pptp"]),
    default=None,
    help="Split one model over the GPUs with torchrun (large models only).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--max-batch-delay", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--job-queue-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("deploy/generated"), show_default=True)
def config_command(
    gpus, workers_per_gpu, models_text, device_ids, parallel_type, batch_size, max_batch_delay, job_queue_size, out_dir
) -> None:
    """Write config.properties and per-model model-config.yaml for N GPUs (or the CPU), every setting explained.

    Example: servekit config --gpus 4 --workers-per-gpu 2 --models digits,image
    """
    from servekit import config as configs

    if gpus != "auto" and not gpus.isdigit():
        raise UsageError(f"--gpus {gpus!r} must be a number or auto")
    plan = configs.make_plan(
        gpus,
        workers_per_gpu,
        [m.strip() for m in models_text.split(",") if m.strip()],
        int_list(device_ids, "--device-ids"),
        parallel_type,
        batch_size=batch_size,
        max_batch_delay_ms=max_batch_delay,
        job_queue_size=job_queue_size,
    )
    for path in configs.write(plan, out_dir):
        console.print(f"wrote {path}")
    console.print(
        f"{plan.gpus} GPU(s), {plan.workers} worker(s) per model; build with "
        f"servekit build NAME --version V --model-config {out_dir}/models/NAME/model-config.yaml"
    )


@cli.group("export")
def export_group() -> None:
    """Deploy a cataloged archive beyond this machine: KServe or Docker."""


@export_group.command("kserve")
@click.argument("name")
@click.option("--version", "version", required=True)
@click.option("--storage-uri", required=True, help="Where you will upload the layout, e.g. gs://bucket/models/digits.")
@click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True, help="nvidia.com/gpu per replica.")
@click.option("--min-replicas", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--max-replicas", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--canary-traffic-percent",
    type=click.IntRange(0, 100),
    default=None,
    help="Send this share of traffic to this revision (KServe canary rollout).",
)
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), default=None, help="[default: deploy/kserve/NAME-VERSION]"
)
@store_option
def export_kserve_command(
    name, version, storage_uri, gpus, min_replicas, max_replicas, canary_traffic_percent, out_dir, store
) -> None:
    """Write a KServe InferenceService (TorchServe runtime) and the config/ + model-store/ layout to upload.

    Example: servekit export kserve digits --version 1.1.0 --storage-uri gs://bucket/digits --canary-traffic-percent 10
    """
    from servekit.export import KServeSpec, export_kserve

    spec = KServeSpec(name, version, storage_uri, gpus, min_replicas, max_replicas, canary_traffic_percent)
    out_dir = out_dir or Path("deploy/kserve") / f"{name}-{version}"
    for path in export_kserve(store, spec, out_dir):
        console.print(f"wrote {path}")
    console.print(
        f"upload {out_dir}/config and {out_dir}/model-store to {storage_uri}, then "
        f"kubectl apply -f {out_dir}/inferenceservice.yaml"
    )


@export_group.command("docker")
@click.argument("name")
@click.option("--version", "version", required=True)
@click.option("--gpu", is_flag=True, help="Use the GPU image and one GPU.")
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), default=None, help="[default: deploy/docker/NAME-VERSION]"
)
@store_option
def export_docker_command(name, version, gpu, out_dir, store) -> None:
    """Write a Dockerfile on the official TorchServe image that serves this archive with token auth on.

    Example: servekit export docker digits --version 1.1.0 && docker build -t digits deploy/docker/digits-1.1.0
    """
    from servekit.export import export_docker

    out_dir = out_dir or Path("deploy/docker") / f"{name}-{version}"
    for path in export_docker(store, name, version, out_dir, gpu):
        console.print(f"wrote {path}")


# rollout / rollback / retire / scale ------------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@click.option("--version", "version", required=True, help="The version to promote.")
@click.option(
    "--samples",
    "samples_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Labelled held-out folder for the shadow comparison [default: the archive's golden samples].",
)
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.95, show_default=True)
@click.option("--max-latency-ratio", type=click.FloatRange(min=0, min_open=True), default=1.5, show_default=True)
@click.option("--max-error-rate", type=click.FloatRange(0, 1), default=0.01, show_default=True)
@click.option("--shadow-samples", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--watch",
    "watch_s",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds to watch live traffic after promotion.",
)
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Workers for the new version.")
@workdir_option
@json_option
def rollout(
    name,
    version,
    samples_dir,
    min_agreement,
    max_latency_ratio,
    max_error_rate,
    shadow_samples,
    watch_s,
    workers,
    workdir,
    as_json,
) -> None:
    """Register VERSION beside the default, smoke-test, shadow-compare, check latency, promote, watch.

    Any failed check stops the rollout with the previous default in place (restored if the watch fails).
    Example: servekit rollout digits --version 1.1.0
    """
    state = server.ServerState.load(workdir.resolve())
    client = ServeClient(state.endpoints())
    policy = rollouts.RolloutPolicy(min_agreement, max_latency_ratio, max_error_rate, shadow_samples, watch_s, workers)
    samples = read_held_out(samples_dir) if samples_dir else None

    def show(step: rollouts.Step) -> None:
        if not as_json:
            mark = "[green]ok[/]" if step.ok else "[bold red]FAILED[/]"
            console.print(f"{step.name:>8} {mark} {step.detail}", highlight=False)

    history = rollouts.DefaultHistory(Path(state.workdir))
    report = rollouts.rollout(client, Path(state.model_store), name, version, history, samples, policy, show)
    if as_json:
        print_json(
            {
                "name": name,
                "version": version,
                "previous": report.previous,
                "promoted": report.promoted,
                "steps": [step.__dict__ for step in report.steps],
            }
        )
        return
    console.print(f"{name} default is now {version} (was {report.previous or 'none'})")


@cli.command()
@click.argument("name")
@workdir_option
def rollback(name: str, workdir: Path) -> None:
    """Make the previous default (set through servekit, still registered) the default again."""
    state = server.ServerState.load(workdir.resolve())
    current, previous = rollouts.rollback(
        ServeClient(state.endpoints()), rollouts.DefaultHistory(Path(state.workdir)), name
    )
    console.print(f"{name} default rolled back from {current} to {previous}")


@cli.command()
@click.argument("name")
@click.option("--version", "version", required=True)
@workdir_option
def retire(name: str, version: str, workdir: Path) -> None:
    """Unregister a version that is not the default."""
    rollouts.retire(connect(workdir), name, version)
    console.print(f"{name} {version} unregistered")


@cli.command()
@click.argument("name")
@click.option("--version", "version", default=None, help="[default: the default version]")
@click.option("--min-workers", type=click.IntRange(min=0), required=True)
@click.option("--max-workers", type=click.IntRange(min=1), required=True)
@workdir_option
def scale(name: str, version: str | None, min_workers: int, max_workers: int, workdir: Path) -> None:
    """Set a version's worker range and wait until TorchServe applied it."""
    client = connect(workdir)
    version = version or rollouts.default_version(client, name)
    if version is None:
        raise UsageError(f"{name} is not registered on this server")
    description = rollouts.scale(client, name, version, min_workers, max_workers)
    console.print(
        f"{name} {version}: {ready_workers(description)} worker(s) ready "
        f"(min {description['minWorkers']}, max {description['maxWorkers']})"
    )


def main() -> None:
    cli()
