"""What makes a model faster on its device without changing its answers' meaning: pinned-memory copies,
channels_last memory format, and CUDA graphs (one captured graph per batch-size bucket, a batch padded to its
bucket). The worker, `servekit build`'s cost timing and `servekit optimize` all ask here, so each lays a model out
and captures it as the worker does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from servekit_worker.loading import FORMATS
from servekit_worker.settings import with_defaults


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` on `device` (floating tensors in `dtype` when given): a CPU tensor bound for CUDA goes through
    pinned memory and a non-blocking copy."""
    dtype = dtype if dtype is not None and tensor.is_floating_point() else None
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, dtype, non_blocking=True)
    return tensor.to(device, dtype)


def runs_channels_last(settings: dict, device_type: str) -> bool:
    """Whether a worker on `device_type` lays an archive's model and image batches out channels_last: the
    handler's `channels_last` (default on) and a format it may lay out. Each caller also tries the model on such a
    batch first (`takes_channels_last`) and keeps a model that raises on it NCHW."""
    settings = with_defaults(settings)
    model_format = FORMATS.get(settings["format"])
    return bool(settings["channels_last"]) and model_format is not None and device_type in model_format.laid_out_on


def takes_channels_last(model: Callable, example: torch.Tensor) -> bool:
    """Whether `model` runs on a channels_last batch. Code written for NCHW tensors (`x.view(n, -1)` after a
    convolution) raises on one; such a model is kept NCHW rather than failing every request."""
    try:
        with torch.inference_mode():
            model(example.contiguous(memory_format=torch.channels_last))
    except RuntimeError:
        return False
    return True


def bucket_for(count: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `count` samples; None when none does."""
    fitting = [bucket for bucket in buckets if bucket >= count]
    return min(fitting) if fitting else None


class StaticBatch:
    """A fixed-size model call (one captured CUDA graph): the batch is copied into the first rows of the static
    input, the rest zeroed, `replay` runs, and the batch's rows of the static output are cloned out."""

    def __init__(self, static_input: torch.Tensor, static_output: torch.Tensor, replay: Callable[[], Any]):
        self.static_input = static_input
        self.static_output = static_output
        self.replay = replay

    @property
    def size(self) -> int:
        return self.static_input.shape[0]

    def fits(self, batch: torch.Tensor) -> bool:
        return (
            batch.shape[0] <= self.size
            and batch.shape[1:] == self.static_input.shape[1:]
            and batch.dtype == self.static_input.dtype
        )

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        count = batch.shape[0]
        self.static_input[:count].copy_(batch)
        self.static_input[count:].zero_()
        self.replay()
        return self.static_output[:count].clone()


class BucketedModel:
    """Runs each batch through the smallest StaticBatch that holds it (padding it), a batch larger than every
    bucket in chunks of the largest, and a batch of another sample shape or dtype through the eager model."""

    def __init__(self, runners: dict[int, StaticBatch], eager: Callable[[torch.Tensor], torch.Tensor]):
        self.runners = runners
        self.eager = eager
        self.largest = max(runners)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] > self.largest:
            return torch.cat([self(chunk) for chunk in batch.split(self.largest)])
        runner = self.runners[bucket_for(batch.shape[0], list(self.runners))]
        return runner(batch) if runner.fits(batch) else self.eager(batch)


def capture_cuda_graphs(
    model: Callable, example: torch.Tensor, buckets: list[int], channels_last: bool
) -> dict[int, StaticBatch]:
    """One CUDA graph per bucket, replaying `model` on a static batch of copies of `example` (one sample, on the
    CUDA device, in the model's dtype). The graphs share one memory pool: they run one at a time and each output
    is cloned as soon as its graph has run, so one graph may reuse another's scratch memory.
    """
    device = example.device
    pool = torch.cuda.graph_pool_handle()
    runners = {}
    for bucket in sorted(set(buckets), reverse=True):  # the largest first: it sizes the shared pool
        static_input = torch.cat([example] * bucket)
        if channels_last:
            static_input = static_input.contiguous(memory_format=torch.channels_last)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():  # warm-up (cuDNN autotuning, lazy init) off the capture
            for _ in range(3):
                model(static_input)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
            static_output = model(static_input)
        runners[bucket] = StaticBatch(static_input, static_output, graph.replay)
    torch.cuda.synchronize(device)
    return runners
