"""Models in every format servekit serves, and where they run: one registry of formats (the file each is saved as,
how it loads, which devices the worker lays it out on) and the device rules a worker follows.

torch is imported inside the loaders: the library reads the registry's file names at start-up, where it must not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEVICE_TYPES = ("cpu", "cuda")


class CompiledModel:
    """A compiled artefact (AOTInductor package, ONNX Runtime session) with the nn.Module methods a worker calls:
    it already runs on the device, in the dtype and the layout it was built for."""

    def __init__(self, function: Callable[[Any], Any], description: str):
        self.function = function
        self.description = description

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.function(batch)

    def to(self, *args: Any, **kwargs: Any) -> CompiledModel:
        return self

    def eval(self) -> CompiledModel:
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


def load_state_dict(path: Path, device: torch.device, settings: dict) -> torch.nn.Module:
    """An eager model: `settings["model_class"]` of `architectures` (or torchvision, or the user's own class,
    from the `model_code` folder beside the weights when its code travels with the model), with the weights."""
    import torch

    from servekit_worker.architectures import build_model

    code = settings.get("model_code")
    model = build_model(
        settings["model_class"], settings.get("model_kwargs"), Path(path).parent / code if code else None
    )
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def load_torchscript(path: Path, device: torch.device, settings: dict) -> torch.nn.Module:
    import torch

    with warnings.catch_warnings():  # torch.jit is deprecated; TorchScript archives are still served
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location=device).eval()


def load_export(path: Path, device: torch.device, settings: dict) -> torch.nn.Module:
    """A torch.export program, in eval mode as it was exported (its module refuses `.eval()`)."""
    import torch

    return torch.export.load(str(path)).module()


def load_aoti(path: Path, device: torch.device, settings: dict) -> CompiledModel:
    """An AOTInductor package, refused on a device type other than the one it was compiled for."""
    from torch._inductor import aoti_load_package

    refuse_wrong_device(settings.get("aoti_device", "cpu"), device, {**settings, "format": "aoti"})
    return CompiledModel(aoti_load_package(str(path)), f"AOTInductor package {path.name}")


def load_onnx(path: Path, device: torch.device, settings: dict) -> CompiledModel:
    """An ONNX Runtime session on the worker's torch threads, set before loading: ONNX Runtime's default (every
    core) in each of several workers oversubscribes the cores the way torch's default would."""
    import torch

    return onnx_session(path, torch.get_num_threads(), device)


def onnx_session(path: Path, threads: int, device: torch.device | None = None) -> CompiledModel:
    """An ONNX Runtime session on `threads` intra-op threads (and its CUDA provider for a cuda device), as a
    callable on a batch (CPU tensors out)."""
    import onnxruntime
    import torch

    providers: list = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    input_name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: batch.cpu().numpy()})[0])

    return CompiledModel(run, f"onnxruntime {session.get_providers()}")


@dataclass(frozen=True)
class ModelFormat:
    """One serialized format: the file it is saved as (in a trained folder, a variant folder and an archive), its
    loader (path, device, handler settings -> a model in eval mode), the device types on which the worker chooses
    its memory layout, and whether the worker casts it to handler.dtype (the other formats carry their own)."""

    file: str
    load: Callable[[Path, Any, dict], Any]
    laid_out_on: tuple[str, ...] = ()
    takes_dtype: bool = False


# Compiled artefacts (AOTI, ONNX) keep the layout they were built for; on the CPU, TorchScript and exported programs
# run as `servekit optimize` gated them.
FORMATS = {
    "state_dict": ModelFormat("model.pt", load_state_dict, laid_out_on=DEVICE_TYPES, takes_dtype=True),
    "torchscript": ModelFormat("model.torchscript.pt", load_torchscript, laid_out_on=("cuda",)),
    "export": ModelFormat("model.pt2", load_export, laid_out_on=("cuda",)),
    "aoti": ModelFormat("model.aoti.pt2", load_aoti),
    "onnx": ModelFormat("model.onnx", load_onnx),
}
FORMAT_FILES = {name: model_format.file for name, model_format in FORMATS.items()}


def format_named(name: str) -> ModelFormat:
    if name not in FORMATS:
        raise RuntimeError(f"unknown model format {name!r}; expected one of {tuple(FORMATS)}")
    return FORMATS[name]


def load_model(name: str, path: Path, settings: dict, device: torch.device) -> Any:
    """The model of an archive in format `name`, in eval mode, loaded for `device` (not yet moved there)."""
    return format_named(name).load(path, device, settings)


# Devices ----------------------------------------------------------------------------------------------------------
def select_device(gpu_id: int | str | None) -> torch.device:
    """`cuda:{gpu_id}` when the runtime assigned a GPU and CUDA works here, else the CPU."""
    import torch

    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def variant_summary(settings: dict) -> str:
    """What a variant was built with, in words: "float16, CUDA graphs"."""
    parts = [settings.get("dtype", "float32")]
    if settings.get("format") == "aoti":
        parts.insert(0, "AOTInductor package")
    if settings.get("compile"):
        parts.append("torch.compile")
    if settings.get("cuda_graphs"):
        parts.append("CUDA graphs")
    return ", ".join(parts)


def refuse_wrong_device(built_for: str | None, device: torch.device, settings: dict) -> None:
    """Raises when the variant was built for another device type than the worker's (None: built for any)."""
    if built_for is None:
        return
    if built_for not in DEVICE_TYPES:
        raise RuntimeError(f"handler.device is {built_for!r}; expected one of {', '.join(DEVICE_TYPES)} or none")
    if built_for == device.type:
        return
    fix = (
        "serve it with GPU workers (servekit config --gpus) or build a CPU variant"
        if built_for == "cuda"
        else "serve it with CPU workers or build a cuda variant"
    )
    raise RuntimeError(
        f"this archive's variant was built for {built_for} ({variant_summary(settings)}); "
        f"this worker runs on {device.type}: {fix}"
    )
