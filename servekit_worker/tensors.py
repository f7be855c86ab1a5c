"""Numbers from requests as tensors: the dtypes servekit names, nested JSON lists, and packed little-endian bytes."""

from __future__ import annotations

import math
from typing import Any

import torch

from servekit_worker.errors import RequestError
from servekit_worker.requests import MAX_NESTING

# Every dtype an archive may name: an input's (handler.input_dtype, example_input.dtype) or the model's (handler.dtype).
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
MODEL_DTYPES = ("float32", "bfloat16", "float16")  # what a model's weights and floating inputs may be cast to


def dtype_named(name: str, setting: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype:
    """The dtype a setting names; a clear error for any other name."""
    if name not in allowed:
        raise RuntimeError(f"{setting} {name!r} is not one of {sorted(allowed)}")
    return DTYPES[name]


def finite_tensor(value: Any, what: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor from nested JSON lists of numbers, refusing ragged lists, non-numbers, NaN and Inf."""
    floating = dtype.is_floating_point
    if not is_numeric_tree(value, allow_float=floating):
        kind = "numbers" if floating else "integers"
        raise RequestError("invalid_input", f"{what} must be nested lists of {kind} ({dtype})")
    try:
        tensor = torch.tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise RequestError("invalid_input", f"{what} is not a rectangular array of numbers: {exc}") from None
    if floating and not torch.isfinite(tensor).all():
        raise RequestError("invalid_input", f"{what} contains NaN or Infinity")
    return tensor


def is_numeric_tree(value: Any, allow_float: bool = True, depth: int = 0) -> bool:
    """Numbers (integers only unless `allow_float`), or lists of them nested at most MAX_NESTING deep."""
    if depth > MAX_NESTING:
        return False
    if isinstance(value, list):
        return all(is_numeric_tree(v, allow_float, depth + 1) for v in value)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (allow_float and isinstance(value, float))


def packed_samples(raw: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Little-endian packed values -> (n, *shape), refusing partial samples and non-finite floats."""
    sample_bytes = math.prod(shape) * dtype.itemsize
    if not raw or len(raw) % sample_bytes:
        raise RequestError(
            "invalid_shape",
            f"the body has {len(raw)} bytes; a {list(shape)} {dtype} sample is {sample_bytes} bytes, "
            "so send a whole, non-zero number of them",
        )
    tensor = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(-1, *shape)
    if dtype.is_floating_point and not torch.isfinite(tensor).all():
        raise RequestError("invalid_input", "the body contains NaN or Infinity")
    return tensor
