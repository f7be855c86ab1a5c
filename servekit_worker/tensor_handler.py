"""Requests of models that take one tensor, its shape and dtype declared in model-config.yaml.

JSON `{"input": sample}` answers `{"output": [...]}`; `{"inputs": [sample, ...]}` answers
`{"outputs": [[...], ...]}`. A raw `application/octet-stream` body holds one or more samples as packed
little-endian values of the declared dtype (no JSON parsing: the cheapest way in) and answers `{"outputs": ...}`.
Each sample must have exactly `handler.input_shape` and `handler.input_dtype` (default float32; an integer dtype
such as int64 token ids reaches the model as it is, only floating inputs are cast to the model's dtype); wrong
shape or dtype, NaN and Infinity get 400. KServe v1 instances are samples as nested lists; v2 inputs are numeric
tensors [n, *input_shape], answered by one FP32 tensor `output` [n, *output_shape].
"""

from __future__ import annotations

from typing import Any

import torch

from servekit_worker.base import ServekitHandler
from servekit_worker.errors import RequestError
from servekit_worker.requests import Decoded, as_bytes, check_count, instance_value, json_items, parse_json
from servekit_worker.tensors import dtype_named, finite_tensor, packed_samples


class TensorHandler(ServekitHandler):
    """Tensors in, raw model outputs out."""

    content_types = ("application/json", "application/octet-stream")

    def setup(self) -> None:
        if "input_shape" not in self.config:
            raise RuntimeError("the tensor handler needs handler.input_shape in model-config.yaml")
        self.input_shape = tuple(int(d) for d in self.config["input_shape"])
        dtype_name = self.config.get("input_dtype", "float32")
        self.input_dtype = dtype_named(dtype_name, "handler.input_dtype")
        self.expected = f'{{"input": {list(self.input_shape)} {dtype_name} values}} or {{"inputs": [sample, ...]}}'

    def json_sample(self, value: Any, what: str) -> torch.Tensor:
        tensor = finite_tensor(value, what, self.input_dtype)
        if tuple(tensor.shape) != self.input_shape:
            raise RequestError(
                "invalid_shape", f"{what} has shape {list(tensor.shape)}; expected {list(self.input_shape)}"
            )
        return tensor.unsqueeze(0)

    def decode_request(self, payload: Any, content_type: str) -> Decoded:
        if isinstance(payload, (dict, list)) or content_type == "application/json":
            items, many = json_items(parse_json(payload), "input", "inputs", self.max_inputs, self.expected)
            return Decoded([self.json_sample(item, f"sample {i}") for i, item in enumerate(items)], many)
        tensor = packed_samples(as_bytes(payload), self.input_shape, self.input_dtype)
        check_count(tensor.shape[0], "the body", self.max_inputs)
        return Decoded(list(tensor.split(1)), many=True)

    def decode_instance(self, value: Any, what: str) -> torch.Tensor:
        """Nested lists of `input_shape`, or `{"b64": ...}` holding one packed sample."""
        value = instance_value(value, what)
        if isinstance(value, bytes):
            samples = packed_samples(value, self.input_shape, self.input_dtype)
            if samples.shape[0] != 1:
                raise RequestError("invalid_shape", f"{what} packs {samples.shape[0]} samples; an instance is one")
            return samples
        return self.json_sample(value, what)

    def encode_response(self, outputs: torch.Tensor, many: bool) -> Any:
        return {"outputs": outputs.tolist()} if many else {"output": outputs[0].tolist()}

    def example_samples(self, count: int) -> list:
        return [torch.zeros(1, *self.input_shape, dtype=self.input_dtype)] * count
