"""TorchServe handler for models that take one tensor: shape and dtype declared in model-config.yaml.

JSON `{"input": sample}` answers `{"output": [...]}`; `{"inputs": [sample, ...]}` answers
`{"outputs": [[...], ...]}`. A raw `application/octet-stream` body holds one or more samples as packed
little-endian values of the declared dtype (no JSON parsing: the cheapest way in) and answers `{"outputs": ...}`.
Each sample must have exactly `handler.input_shape`; wrong shape or dtype, NaN and Infinity get 400.
KServe v1 instances are samples as nested lists; v2 inputs are numeric tensors [n, *input_shape], answered by
one FP32 tensor `output` [n, *output_shape].
"""

from __future__ import annotations

import math
from typing import Any

import torch
from servekit_base import (
    Decoded,
    RequestError,
    ServekitHandler,
    as_bytes,
    check_count,
    finite_tensor,
    instance_value,
    json_items,
    parse_json,
)

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}


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


class TensorHandler(ServekitHandler):
    """Tensors in, raw model outputs out."""

    content_types = ("application/json", "application/octet-stream")

    def setup(self) -> None:
        if "input_shape" not in self.config:
            raise RuntimeError("the tensor handler needs handler.input_shape in model-config.yaml")
        self.input_shape = tuple(int(d) for d in self.config["input_shape"])
        dtype_name = self.config.get("input_dtype", "float32")
        if dtype_name not in DTYPES:
            raise RuntimeError(f"handler.input_dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
        self.dtype = DTYPES[dtype_name]
        self.expected = f'{{"input": {list(self.input_shape)} {dtype_name} values}} or {{"inputs": [sample, ...]}}'

    def json_sample(self, value: Any, what: str) -> torch.Tensor:
        tensor = finite_tensor(value, what, self.dtype)
        if tuple(tensor.shape) != self.input_shape:
            raise RequestError(
                "invalid_shape", f"{what} has shape {list(tensor.shape)}; expected {list(self.input_shape)}"
            )
        return tensor.unsqueeze(0)

    def decode_request(self, payload: Any, content_type: str) -> Decoded:
        if isinstance(payload, (dict, list)) or content_type == "application/json":
            items, many = json_items(
                parse_json(payload), "input", "inputs", int(self.config["max_inputs_per_request"]), self.expected
            )
            return Decoded([self.json_sample(item, f"sample {i}") for i, item in enumerate(items)], many)
        tensor = packed_samples(as_bytes(payload), self.input_shape, self.dtype)
        check_count(tensor.shape[0], "the body", int(self.config["max_inputs_per_request"]))
        return Decoded(list(tensor.split(1)), many=True)

    def decode_instance(self, value: Any, what: str) -> torch.Tensor:
        """Nested lists of `input_shape`, or `{"b64": ...}` holding one packed sample."""
        value = instance_value(value, what)
        if isinstance(value, bytes):
            samples = packed_samples(value, self.input_shape, self.dtype)
            if samples.shape[0] != 1:
                raise RequestError("invalid_shape", f"{what} packs {samples.shape[0]} samples; an instance is one")
            return samples
        return self.json_sample(value, what)

    def encode_response(self, outputs: torch.Tensor, many: bool) -> Any:
        return {"outputs": outputs.tolist()} if many else {"output": outputs[0].tolist()}

    def example_samples(self, count: int) -> list:
        return [torch.zeros(1, *self.input_shape, dtype=self.dtype)] * count
