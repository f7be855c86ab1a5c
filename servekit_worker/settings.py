"""The `handler:` section of an archive's model-config.yaml: every setting all handlers read, with its default.

Handlers read a few more of their own (`input_shape`, `preprocess`, `max_tokens`, ...); `servekit build` writes the
section from the trained folder's handler.json and the build options.
"""

from __future__ import annotations

DEFAULTS = {
    "format": "state_dict",
    "dtype": "float32",  # the model's weights and floating inputs (float32, bfloat16, float16)
    "max_body_bytes": 10 * 1024 * 1024,
    "max_image_pixels": 4096 * 4096,
    "max_inputs_per_request": 64,
    "top_k": 3,
    "warmup": 0,
    "compile": False,
    # The device type ("cpu", "cuda") the variant was built and gated for; None: any. Workers elsewhere refuse it.
    "device": None,
    # NCHW models and batches in channels_last memory format (faster convolutions on CUDA and on the CPU).
    "channels_last": True,
    # Batch sizes captured as CUDA graphs at start-up (CUDA workers only), e.g. [1, 2, 4, 8, 16, 32, 64].
    "cuda_graphs": [],
    # Image handlers: "batched" (or "auto") decodes a batch's JPEGs in one torchvision call on the worker's device
    # and transforms the batch whole, "pil" decodes and transforms each image alone with Pillow on the CPU.
    "image_decode": "auto",
    # Milliseconds between two emissions of a worker's batch gauges (ServekitInferenceMs, ...); 0: every batch.
    "metrics_interval_ms": 1000,
    # One JSON line per batch in model_log.log (event "servekit_batch", with the request ids): off by default, as
    # every line a worker prints is read and parsed by TorchServe's frontend on the served path.
    "log_batches": False,
}


def with_defaults(section: dict | None) -> dict:
    """An archive's handler settings, each one it leaves out at its default."""
    return {**DEFAULTS, **(section or {})}
