"""`servekit import`: a model a user brings -> the same trained folder `servekit train` writes, so that every command
after it (optimize, build, register, predict, evaluate, rollout, bench) works for it as for servekit's own models.

What a user brings (`ImportPlan.model`):

    path/to/file.py:Class  or  package.module:Class     an nn.Module class (or a factory returning one) with
                                                         `kwargs` and weights: a state_dict (.pt/.pth) or .safetensors
    model.pt / .pth / .ts                                a TorchScript file
    model.pt2                                            a torch.export program
    model.onnx                                           an ONNX model

plus one or more example request bodies (what clients will send: images, texts, JSON or .npy tensors), decoded by
the chosen handler exactly as the worker will decode them; optional labels, an evaluation folder (labelled bodies)
and pip requirements. A class's code travels with the model: its file and the modules it imports from its folder
(or its package folder) are copied into `model_code/` and loaded from there, here and in every worker; an installed
package is a requirement instead. Formats that carry their own graph are kept as brought.

Every input is recorded with its sha256 in metrics.json. Nothing is written unless all of it checks out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import site
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from servekit.build.handler_code import Decoder, HandlerChoice, first_line, parse_handler
from servekit.core.errors import UsageError
from servekit.core.names import check_name
from servekit.core.requirements import parse_requirements
from servekit.store.catalog import sha256_file
from servekit.store.heldout import HELD_OUT_INDEX, HeldOutSample, read_held_out, write_bodies
from servekit.store.workspace import (
    FORMAT_FILES,
    HANDLER_CODE_DIR,
    HANDLER_FILE,
    HELD_OUT_DIR,
    LABELS_FILE,
    METRICS_FILE,
    MODEL_CODE_DIR,
    WEIGHTS_FILE,
)
from servekit_worker.answers import label_list
from servekit_worker.architectures import user_callable
from servekit_worker.loading import FORMATS
from servekit_worker.tensors import DTYPES

# What a brought file is, by its suffix: the formats that carry their own graph.
GRAPH_SUFFIXES = {".pt2": "export", ".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript",
                  ".ts": "torchscript", ".jit": "torchscript"}  # fmt: skip
SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
    r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)"
)
OWN_PACKAGES = ("servekit", "servekit_worker", "servekit_handlers")
TENSOR_BODY = "application/octet-stream"


@dataclass
class ImportPlan:
    """Everything `servekit import` takes (see the module's docstring)."""

    name: str
    model: str
    examples: list[Path]
    out: Path
    weights: Path | None = None
    kwargs: dict = field(default_factory=dict)
    handler: str = "tensor"
    labels: Path | None = None
    eval_dir: Path | None = None
    requirements: Path | None = None
    preprocess: dict = field(default_factory=dict)  # image handler: resize, crop
    extra_files: list[Path] = field(default_factory=list)
    force: bool = False


@dataclass
class Imported:
    out: Path
    kind: str  # "eager" or the brought format
    model: str
    code_files: list[str]
    examples: int
    held_out: int
    example_input: dict
    accuracy: float | None


# The model -----------------------------------------------------------------------------------------------------
def model_kind(spec: str) -> str:
    """'eager' for `file.py:Class` / `module:Class`, else the format of a brought file."""
    path = Path(spec)
    if path.is_file():
        kind = GRAPH_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise UsageError(f"--model {spec}: a {path.suffix or 'suffix-less'} file is not a model servekit reads; "
                             f"bring a .pt/.pth (TorchScript), .pt2, .onnx file or FILE.py:Class")  # fmt: skip
        return kind
    left, colon, attribute = spec.rpartition(":")
    if not colon or not left or not attribute:
        raise UsageError(
            f"--model {spec}: no such file; a class is given as path/file.py:Class or package.module:Class"
        )
    if left.endswith(".py") and not Path(left).is_file():
        raise UsageError(f"--model {spec}: {left} not found")
    return "eager"


def is_installed(file: str) -> bool:
    """A module file of an installed distribution or the standard library (not the user's own code)."""
    roots = {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib", "platstdlib")}
    roots.update(site.getsitepackages() + [site.getusersitepackages()])
    resolved = os.path.realpath(file)
    return any(resolved.startswith(os.path.realpath(root) + os.sep) for root in roots if root)


def capture_code(spec: str, staging: Path) -> tuple[str, list[str]]:
    """Imports the user's class and copies its code into `staging/model_code`: for `file.py:Class` the file and every
    module of its folder it imported (with their packages' __init__); for `package.module:Class` the package folder,
    unless it is installed (then it is a requirement, not code to copy). Returns the class as the worker resolves
    it (module:attribute) and the files copied."""

    left, _, attribute = spec.rpartition(":")
    file_form = left.endswith(".py")
    module_name = Path(left).stem if file_form else left
    search = Path(left).resolve().parent if file_form else Path.cwd().resolve()
    try:
        if file_form:  # fresh from the user's folder, whatever of the same name was imported before
            factory = user_callable(f"{module_name}:{attribute}", search)
        else:
            sys.path.insert(0, str(search))
            factory = user_callable(f"{module_name}:{attribute}")
    except AttributeError:
        raise UsageError(f"--model {spec}: {left} has no {attribute!r}") from None
    except Exception as exc:  # the user's own error while importing, quoted
        raise UsageError(f"--model {spec}: {left} failed to import: {type(exc).__name__}: {first_line(exc)}") from None
    finally:
        while str(search) in sys.path:
            sys.path.remove(str(search))
    if not callable(factory):
        raise UsageError(f"--model {spec}: {attribute} is not a class or a function")
    top = module_name.split(".")[0]
    top_file = Path(getattr(sys.modules[top], "__file__", None) or "")
    if top in OWN_PACKAGES or is_installed(str(top_file)):
        return f"{module_name}:{attribute}", []  # an installed package: a requirement, not code to copy
    if file_form:
        root = search
        files: set[Path] = set()
        for module in list(sys.modules.values()):
            file = getattr(module, "__file__", None)
            if not file or module.__name__.split(".")[0] in OWN_PACKAGES:
                continue
            path = Path(file)  # torch.ops and torch.classes name relative files that are nowhere: not code
            if not path.is_absolute() or not path.is_file():
                continue
            path = path.resolve()
            if path.suffix == ".py" and path.is_relative_to(root) and not is_installed(file):
                files.add(path)
                for parent in path.relative_to(root).parents:  # the packages it sits in
                    if parent != Path(".") and (root / parent / "__init__.py").is_file():
                        files.add(root / parent / "__init__.py")
    elif top_file.name == "__init__.py":  # a package of the user's: all of it
        root = top_file.parent.parent.resolve()
        files = {p.resolve() for p in top_file.parent.rglob("*.py") if "__pycache__" not in p.parts}
    else:
        root, files = top_file.parent.resolve(), {top_file.resolve()}
    code = staging / MODEL_CODE_DIR
    for path in sorted(files):
        target = code / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return f"{module_name}:{attribute}", sorted(str(p.relative_to(root)) for p in files)


def read_state_dict(path: Path) -> dict:
    """Weights as a state_dict, loaded with weights_only=True (a pickled model is refused, with the two fixes)."""
    if not path.is_file():
        raise UsageError(f"--weights {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise UsageError(f"--weights {path} is not a safetensors file: {first_line(exc)}") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UsageError(
                f"--weights {path} holds a whole pickled model, not a state_dict (servekit loads weights with "
                "weights_only=True and runs no pickled code): save torch.save(model.state_dict(), PATH) and import "
                "that with --model file.py:Class, or export the model (torch.export.save / TorchScript / ONNX) and "
                "import the exported file as --model"
            ) from None
        raise UsageError(f"--weights {path} cannot be read: {type(exc).__name__}: {first_line(exc)}") from None
    for key in ("state_dict", "model"):  # a training checkpoint that holds the state_dict
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict) and not torch.is_tensor(loaded.get(key)):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise UsageError(f"--weights {path} is not a state_dict (a mapping of names to tensors)")
    return loaded


def fit_weights(model: torch.nn.Module, state: dict, spec: str) -> None:
    """Loads `state` into `model` strictly; a mismatch is one line naming the keys (at most 5 of each kind)."""

    def named(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")

    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        mismatches = [f"{key} is {weights} in the weights, {model} in the model" for key, weights, model in
                      SIZE_MISMATCH.findall(str(exc))]  # fmt: skip
        raise UsageError(f"the weights do not fit {spec}: {named(mismatches) or first_line(exc)}") from None
    if missing or unexpected:
        parts = [f"missing keys {named(list(missing))}" if missing else "",
                 f"unexpected keys {named(list(unexpected))}" if unexpected else ""]  # fmt: skip
        raise UsageError(f"the weights do not fit {spec}: {'; '.join(p for p in parts if p)}")


def load_brought(path: Path, kind: str):
    """A brought TorchScript / torch.export / ONNX file, loaded as the worker loads it."""
    if kind == "torchscript":
        import zipfile

        if not zipfile.is_zipfile(path) or not any(
            n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()
        ):
            raise UsageError(
                f"--model {path} is not a TorchScript file (a state_dict? then give its class: --model file.py:Class "
                f"--weights {path})"
            )
    try:
        return FORMATS[kind].load(path, torch.device("cpu"), {})
    except Exception as exc:
        raise UsageError(f"--model {path} does not load as {kind}: {type(exc).__name__}: {first_line(exc)}") from None


def onnx_fixed_batch(path: Path) -> bool:
    import onnx

    first = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return bool(first) and first[0].HasField("dim_value") and first[0].dim_value == 1


# Examples and the evaluation folder ------------------------------------------------------------------------------
def example_body(path: Path) -> tuple[bytes, str, dict | None]:
    """A request body for an example file, its media type, and for a .npy tensor its shape and dtype (the tensor is
    sent packed, as the tensor handler takes raw bodies)."""
    if not path.is_file():
        raise UsageError(f"--example {path} not found")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise UsageError(f"--example {path}: {first_line(exc)}") from None
        dtype = str(array.dtype)
        if dtype not in DTYPES:
            raise UsageError(f"--example {path} holds {dtype}; use one of {', '.join(DTYPES)}")
        return array.astype(array.dtype.newbyteorder("<")).tobytes(), TENSOR_BODY, {"shape": list(array.shape),
                                                                                   "dtype": dtype}  # fmt: skip
    return path.read_bytes(), HeldOutSample(path, "").content_type, None


def json_input_shape(body: bytes) -> dict | None:
    """The shape of `{"input": nested lists}` (float32), for the tensor handler's settings."""
    try:
        document = json.loads(body)
        values = np.asarray(document["input"], dtype=np.float32)
    except (ValueError, KeyError, TypeError):
        return None
    return {"shape": list(values.shape), "dtype": "float32"}


def evaluation_samples(folder: Path) -> list[HeldOutSample]:
    """A labelled folder: `index.csv` (file,label), or one subfolder per label (ImageFolder's layout)."""
    if not folder.is_dir():
        raise UsageError(f"--eval {folder} is not a folder")
    if (folder / HELD_OUT_INDEX).is_file():
        samples = read_held_out(folder)
        missing = [s.path.name for s in samples if not s.path.is_file()]
        if missing:
            raise UsageError(f"--eval {folder}: index.csv names files that are not there: {', '.join(missing[:5])}")
        return samples
    samples = [HeldOutSample(file, label.name) for label in sorted(folder.iterdir()) if label.is_dir()
               for file in sorted(label.iterdir()) if file.is_file()]  # fmt: skip
    if not samples:
        raise UsageError(f"--eval {folder} has neither index.csv nor one folder of files per label")
    return samples


def read_labels(path: Path) -> list[str]:
    """labels.json (a list, or {"0": ...} as TorchServe's index_to_name.json), or a text file of one label a line."""
    if not path.is_file():
        raise UsageError(f"--labels {path} not found")
    text = path.read_text()
    if path.suffix != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        return label_list(json.loads(text))
    except (ValueError, KeyError) as exc:
        raise UsageError(f'--labels {path}: a JSON list of labels or {{"0": label, ...}} ({exc})') from None


# The import ------------------------------------------------------------------------------------------------------
def import_model(plan: ImportPlan) -> Imported:
    """Checks everything the plan brings and writes the trained folder `plan.out` (see the module docstring)."""
    check_name(plan.name)
    if not plan.examples:
        raise UsageError("give at least one --example: a request body the model will be asked with")
    if plan.preprocess and plan.handler != "image":
        raise UsageError("--resize and --crop are the image handler's: pass --handler image")
    if plan.out.exists() and not plan.force:
        raise UsageError(f"{plan.out} already exists: pass --force to replace it, or --out another folder")
    kind = model_kind(plan.model)
    if kind != "eager" and (plan.weights or plan.kwargs):
        raise UsageError(f"--model {plan.model} is a {kind} file with its weights inside: drop --weights/--kwargs")
    requirements = parse_requirements(plan.requirements) if plan.requirements else []
    staging = Path(tempfile.mkdtemp(prefix=f"servekit-import-{plan.name}-"))
    try:
        with modules_kept(staging):
            imported = stage(plan, kind, requirements, staging)
        if plan.out.exists():
            shutil.rmtree(plan.out)
        plan.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, plan.out)
        imported.out = plan.out
        return imported
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def modules_kept(staging: Path) -> Iterator[None]:
    """sys.modules and sys.path as they were after the block, but for what the block imported from elsewhere: the
    user's own modules, which the import reloads from its copy in `staging`, are theirs again afterwards."""
    modules, path = dict(sys.modules), list(sys.path)
    try:
        yield
    finally:
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None) or ""
            if name in modules and modules[name] is not module:
                sys.modules[name] = modules[name]
            elif name not in modules and file.startswith(str(staging)):
                del sys.modules[name]
        for name, module in modules.items():
            sys.modules.setdefault(name, module)
        sys.path[:] = path


@dataclass
class Staging:
    """The trained folder as it is written, in a temp folder: the handler settings and the sha256 of each input."""

    plan: ImportPlan
    folder: Path
    settings: dict = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # input path -> sha256

    def record(self, path: Path) -> None:
        self.inputs[str(path)] = sha256_folder(path) if path.is_dir() else sha256_file(path)

    def copy(self, source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        self.record(source)


def stage(plan: ImportPlan, kind: str, requirements: list[str], folder: Path) -> Imported:
    """Writes the trained folder into `folder`, one step a function; each raises UsageError on what it refuses."""
    staging = Staging(plan, folder)
    for extra in plan.extra_files:
        if not extra.is_file():
            raise UsageError(f"--extra-file {extra} not found")
        staging.copy(extra, folder / extra.name)
    model, weights, code_files = stage_eager(staging) if kind == "eager" else stage_brought(staging, kind)
    choice = stage_handler(staging, requirements)
    labels, decoder, bodies, outputs = stage_examples(staging, model, choice)
    stage_held_out(staging, labels, decoder, bodies, outputs)
    accuracy = None
    if plan.eval_dir is not None and decoder.classifier:
        accuracy = held_out_accuracy(model, decoder, folder / HELD_OUT_DIR)
    (folder / HANDLER_FILE).write_text(json.dumps(staging.settings, indent=2))
    metrics = {
        "model": plan.model,
        "imported": True,
        "format": kind if kind != "eager" else "state_dict",
        "weights_sha256": sha256_file(weights),
        "inputs_sha256": staging.inputs,
        "code_files": code_files,
        "held_out_accuracy": accuracy,
        "dataset": str(plan.eval_dir) if plan.eval_dir else "the examples",
    }
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    held_out = len(read_held_out(folder / HELD_OUT_DIR))
    example = staging.settings["example_input"]
    return Imported(folder, kind, plan.model, code_files, len(bodies), held_out, example, accuracy)


def stage_eager(staging: Staging) -> tuple[torch.nn.Module, Path, list[str]]:
    """The user's class built from its copy in model_code/ (what every worker runs), with the weights fitted."""
    from servekit_worker.architectures import build_model

    plan, folder = staging.plan, staging.folder
    model_class, code_files = capture_code(plan.model, folder)
    staging.settings.update(model_class=model_class, model_kwargs=plan.kwargs)
    if code_files:
        staging.settings["model_code"] = MODEL_CODE_DIR
    try:
        model = build_model(model_class, plan.kwargs, folder / MODEL_CODE_DIR if code_files else None)
    except Exception as exc:
        raise UsageError(f"{plan.model}(**{plan.kwargs}) failed: {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{plan.model} returned a {type(model).__name__}, not a torch.nn.Module")
    if plan.weights is not None:
        fit_weights(model, read_state_dict(plan.weights), plan.model)
        staging.record(plan.weights)
    model.eval()
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    return model, folder / WEIGHTS_FILE, code_files


def stage_brought(staging: Staging, kind: str) -> tuple[Any, Path, list[str]]:
    """A TorchScript, torch.export or ONNX file, kept as brought, loaded as the worker loads it."""
    source = Path(staging.plan.model)
    model = load_brought(source, kind)
    if kind == "onnx" and onnx_fixed_batch(source):
        raise UsageError(
            f"{source} fixes the batch dimension at 1: export it with a dynamic first dimension "
            "(torch.onnx.export(..., dynamic_shapes=...) or dynamic_axes={'input': {0: 'batch'}})"
        )
    weights = staging.folder / FORMAT_FILES[kind]
    staging.copy(source, weights)
    staging.settings["format"] = kind
    return model, weights, []


def stage_handler(staging: Staging, requirements: list[str]) -> HandlerChoice:
    """The handler (a user's file is copied into handler_code/) and the settings it and the model need."""
    plan, settings = staging.plan, staging.settings
    choice = parse_handler(plan.handler)
    if choice.custom:
        staging.copy(choice.file, staging.folder / HANDLER_CODE_DIR / choice.file.name)
        settings["handler"] = f"{HANDLER_CODE_DIR}/{choice.file.name}:{choice.class_name}"
    else:
        settings["handler"] = choice.name
    if plan.preprocess:
        settings["preprocess"] = plan.preprocess
    if plan.extra_files:
        settings["extra_files"] = [extra.name for extra in plan.extra_files]
    if requirements:
        settings["requirements"] = requirements
        staging.record(plan.requirements)
    return choice


def stage_examples(staging: Staging, model, choice: HandlerChoice) -> tuple[list[str] | None, Decoder, list, Any]:
    """The examples decoded by the handler and run by the model (example_input comes from them); the labels, checked
    against the model's classes (0..N-1 when none are given)."""
    plan, settings, labels_file = staging.plan, staging.settings, staging.folder / LABELS_FILE
    labels = read_labels(plan.labels) if plan.labels else None
    if labels is not None:
        staging.record(plan.labels)
    labels_file.write_text(json.dumps(labels or ["0"]))  # a classifier's setup reads it; rewritten below
    bodies = []
    for path in plan.examples:
        bodies.append((path, *example_body(path)))
        staging.record(path)
    if choice.name == "tensor":
        spec = bodies[0][3] or json_input_shape(bodies[0][1])
        if spec is None:
            raise UsageError(f'--example {bodies[0][0]}: the tensor handler takes .npy files or JSON {{"input": ...}}')
        settings.setdefault("input_shape", spec["shape"])
        settings.setdefault("input_dtype", spec["dtype"])
    decoder = Decoder(choice, settings, staging.folder)
    samples = [decoder.samples(body, content_type, f"--example {path.name}") for path, body, content_type, _ in bodies]
    outputs = run_examples(model, decoder, samples, plan.model)
    settings["example_input"] = example_input(decoder.batch([s for request in samples for s in request]), choice)
    if not decoder.classifier:
        if labels is None:
            labels_file.unlink()
        return labels, decoder, bodies, outputs
    if outputs.dim() != 2:
        raise UsageError(f"the {choice.describe()} handler answers classes, but the model answers shape "
                         f"{list(outputs.shape)} for {len(samples)} examples: use --handler tensor")  # fmt: skip
    classes = outputs.shape[1]
    if labels is not None and len(labels) != classes:
        raise UsageError(f"--labels {plan.labels} has {len(labels)} labels; the model answers {classes} classes")
    labels = labels or [str(i) for i in range(classes)]
    labels_file.write_text(json.dumps(labels))
    return labels, decoder, bodies, outputs


def stage_held_out(staging: Staging, labels: list[str] | None, decoder: Decoder, bodies: list, outputs) -> None:
    """heldout/: the evaluation folder's labelled bodies, or else the examples labelled with the model's answers."""
    plan, target = staging.plan, staging.folder / HELD_OUT_DIR
    if plan.eval_dir is not None:
        held_out = evaluation_samples(plan.eval_dir)
        staging.record(plan.eval_dir)
        unknown = sorted({s.label for s in held_out} - set(labels or []))
        if labels is not None and unknown:
            raise UsageError(f"--eval {plan.eval_dir} has labels the model does not know: {', '.join(unknown[:5])}")
        write_bodies({f"{i:04d}_{s.path.name}": s.path.read_bytes() for i, s in enumerate(held_out)},
                     [s.label for s in held_out], target)  # fmt: skip
        return
    predicted = [labels[int(row.argmax())] if decoder.classifier else "" for row in outputs]
    names = [f"{i:04d}_{path.stem + '.bin' if spec else path.name}" for i, (path, _, _, spec) in enumerate(bodies)]
    write_bodies({name: body for name, (_, body, _, _) in zip(names, bodies, strict=True)}, predicted, target)


def run_examples(model, decoder: Decoder, samples: list[list], spec: str) -> torch.Tensor:
    """The model's outputs on all examples in one batch; a model that refuses them, or that runs a batch of one but
    not of two (a batch dimension fixed at 1), is refused with the reason."""
    flat = [s for request in samples for s in request]
    with torch.inference_mode():
        try:
            first = model(decoder.batch(flat[:1]))
        except Exception as exc:
            raise UsageError(f"the model rejects the example input: {type(exc).__name__}: {first_line(exc)}") from None
        try:
            outputs = model(decoder.batch(flat if len(flat) > 1 else flat * 2))
        except Exception as exc:
            raise UsageError(
                f"{spec} runs a batch of 1 but not of {max(2, len(flat))} ({type(exc).__name__}: {first_line(exc)}): "
                "its batch dimension is fixed at 1; export it with a dynamic batch dimension "
                "(torch.export.export(..., dynamic_shapes=({0: torch.export.Dim('batch')},)))"
            ) from None
    if not torch.is_tensor(outputs) or torch.is_tensor(first) and first.shape[1:] != outputs.shape[1:]:
        raise UsageError(f"{spec} answers {type(outputs).__name__}; servekit serves models that return one tensor")
    return outputs[: len(flat)].float()


def example_input(batch: torch.Tensor, choice: HandlerChoice) -> dict:
    """handler.json's example_input: one sample's shape and dtype (a text's length is variable)."""
    dtype = str(batch.dtype).removeprefix("torch.")
    spec = {"shape": list(batch.shape[1:]), "dtype": dtype}
    if choice.name == "text":
        from servekit_worker.architectures import Tokenizer

        spec.update(variable_dims=[0], fill=Tokenizer.UNK)
    return spec


def held_out_accuracy(model, decoder: Decoder, folder: Path) -> float:
    """Top-1 accuracy of the model in this process on the held-out bodies, decoded by the handler."""
    labels = decoder.handler.read_labels()
    samples = read_held_out(folder)
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(samples), 32):
            chunk = samples[start : start + 32]
            decoded = [s for sample in chunk for s in decoder.samples(sample.path.read_bytes(), sample.content_type,
                                                                       sample.path.name)]  # fmt: skip
            predicted = model(decoder.batch(decoded)).argmax(dim=1).tolist()
            correct += sum(labels[p] == s.label for p, s in zip(predicted, chunk, strict=True))
    return correct / len(samples) if samples else 0.0


def sha256_folder(folder: Path) -> str:
    """One digest over a folder's files (relative names and contents), in sorted order."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


# From Python ----------------------------------------------------------------------------------------------------
def save_model(
    name: str,
    model: torch.nn.Module,
    examples: list[Path],
    out: Path,
    factory: str | None = None,
    kwargs: dict | None = None,
    **plan_settings,
) -> Imported:
    """An in-memory nn.Module into a trained folder, in the spirit of `bentoml.pytorch.save_model`: its weights are
    saved as a state_dict and its class (or `factory`, as "module:function", with `kwargs`) is recorded so that
    workers rebuild it; its class's code travels with it when it is the user's own."""
    import inspect

    spec = factory or model_spec_of(type(model))
    staging = Path(tempfile.mkdtemp(prefix=".servekit-save-"))
    try:
        weights = staging / "weights.pt"
        torch.save(model.state_dict(), weights)
        plan = ImportPlan(name, spec, list(examples), Path(out), weights=weights, kwargs=dict(kwargs or {}),
                          **plan_settings)  # fmt: skip
        try:
            return import_model(plan)
        except UsageError as exc:
            if factory is None and kwargs is None and inspect.signature(type(model)).parameters:
                raise UsageError(f"{exc}; {spec} takes arguments: pass kwargs=... (or factory=...)") from None
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def model_spec_of(cls: type) -> str:
    """`file.py:Class` for a class of the user's own file, `module:Class` for an installed one."""
    import inspect

    functions = [value for value in vars(cls).values() if inspect.isfunction(value)]
    # the file the class was defined in (its module in sys.modules may since have been reloaded from elsewhere)
    file = functions[0].__code__.co_filename if functions else getattr(sys.modules[cls.__module__], "__file__", None)
    if file and not is_installed(file) and cls.__module__ != "__main__":
        return (
            f"{file}:{cls.__qualname__}" if cls.__module__.count(".") == 0 else f"{cls.__module__}:{cls.__qualname__}"
        )
    if cls.__module__ == "__main__":
        raise UsageError(
            f"{cls.__name__} is defined in __main__: move it to a file of its own so workers can import it"
        )
    return f"{cls.__module__}:{cls.__qualname__}"
