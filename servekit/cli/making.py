"""Commands that make a model folder: train (digits, image, text), distill, import."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import click

from servekit.build.archive import HANDLERS
from servekit.cli.base import (
    DEFAULTS,
    JsonObject,
    cli,
    console,
    json_option,
    path_option,
    print_json,
    store_option,
)
from servekit.core.choices import IMAGE_ARCHITECTURES
from servekit.core.devices import DEVICE_CHOICES, resolve_device
from servekit.store.workspace import Workspace


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


# import ------------------------------------------------------------------------------------------------------------
@cli.command("import")
@click.argument("name")
@click.option("--model", "model", required=True, metavar="FILE.py:Class|module:Class|FILE",
              help="Your nn.Module class (or a factory), or a TorchScript (.pt/.pth), .pt2 or .onnx file.")  # fmt: skip
@path_option("--weights", help="The class's weights: a state_dict (.pt/.pth) or .safetensors [default: its own init].")
@click.option("--kwargs", type=JsonObject(), default="{}", help="Constructor arguments as a JSON object.")
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
def import_command(name, model, examples, out, resize, crop, store, as_json, **plan) -> None:
    """Bring your own model: check it and write the trained folder `build`, `optimize` and the rest read.

    Example: servekit import mynet --model mynet.py:TinyNet --weights model.pt --example x.npy
    """
    from servekit.build.importer import ImportPlan, import_model

    preprocess = {key: value for key, value in (("resize", resize), ("crop", crop)) if value is not None}
    out = out or Workspace(store).trained(name)
    imported = import_model(ImportPlan(name, model, list(examples), out, preprocess=preprocess, **plan))
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
