"""Turning a trained folder's eager model into the serialized formats the handlers load.

Every format keeps the batch dimension dynamic (and the token dimension for text), so TorchServe's batches of
any size go through one artefact. The handler reads the format from model-config.yaml, never from file names.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from servekit.core.errors import UsageError
from servekit.store.workspace import FORMAT_FILES, HANDLER_FILE
from servekit_worker.loading import FORMATS
from servekit_worker.tensors import DTYPES

MAX_BATCH = 1024
CPU = torch.device("cpu")


def load_trained(source_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The eager model of a folder written by `servekit train`, in eval mode, and its handler settings."""
    handler_path = source_dir / HANDLER_FILE
    if not handler_path.is_file():
        raise UsageError(f"{handler_path} not found: train the model with `servekit train` first")
    handler = json.loads(handler_path.read_text())
    return FORMATS["state_dict"].load(source_dir / FORMAT_FILES["state_dict"], CPU, handler), handler


def load_format(path: Path, model_format: str, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A serialized model (not a state_dict) loaded on the CPU as the worker loads it, as a callable on a batch
    (ONNX Runtime on `threads`); TorchScript and the export formats carry their own code, so a model class servekit
    does not know loads too."""
    if model_format == "state_dict" or model_format not in FORMATS:
        raise UsageError(f"{model_format!r} is not a serialized format; choose one of {', '.join(FORMAT_FILES)}")
    with torch_threads(threads):
        return FORMATS[model_format].load(path, CPU, {})


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside the block (unchanged for None), restored after it.

    AOTInductor bakes the thread count current at compile time into its parallel loops, so an archive is
    compiled with the threads of the worker that will run it.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def example_batch(handler: dict, batch: int = 2) -> torch.Tensor:
    """A batch shaped like real inputs, from handler.json's `example_input`."""
    spec = handler.get("example_input")
    if not spec:
        raise UsageError("handler.json has no example_input: it is needed to export this model")
    return torch.full((batch, *spec["shape"]), spec.get("fill", 0), dtype=DTYPES[spec.get("dtype", "float32")])


def dynamic_shapes(handler: dict) -> tuple[dict, ...]:
    """Batch is dynamic; so are the per-sample dims listed in `example_input.variable_dims` (text length)."""
    spec = handler["example_input"]
    dims = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    for dim in spec.get("variable_dims", []):
        dims[dim + 1] = torch.export.Dim(f"dim{dim}", min=2, max=int(handler.get("max_tokens", 512)))
    return (dims,)


def export_model(
    model: torch.nn.Module, handler: dict, model_format: str, out_dir: Path, device: torch.device | None = None
) -> tuple[Path, dict]:
    """Writes `model` in `model_format` into out_dir; returns the file and handler settings the format adds.

    `device`: where the model (already moved there) runs; AOTInductor compiles its kernels for that device."""
    if model_format not in FORMAT_FILES:
        raise UsageError(f"unknown format {model_format!r}; choose one of {', '.join(FORMAT_FILES)}")
    path = out_dir / FORMAT_FILES[model_format]
    example = example_batch(handler).to(device or "cpu")
    if model_format == "state_dict":
        torch.save(model.state_dict(), path)
        return path, {}
    if model_format == "torchscript":
        with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, still widely deployed
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
        traced.save(str(path))
        return path, {}
    if model_format == "onnx":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                dynamic_shapes=dynamic_shapes(handler),
                external_data=False,
                verbose=False,
            )
        return path, {}
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes(handler))
    if model_format == "export":
        torch.export.save(program, str(path))
        return path, {}
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path, {"aoti_device": device.type if device is not None else "cpu"}
