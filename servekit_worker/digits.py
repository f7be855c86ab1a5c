"""The SimpleCNN digit classifier's requests: images, or 28x28 pixel arrays in JSON.

A request is either image bytes (PNG, JPEG, ...; any size, converted to 28x28 grayscale; a white digit on a
dark background as in MNIST, dark-on-light images are inverted) or JSON: `{"input": 28x28 floats in [0, 1]}`
answers one prediction, `{"inputs": [image, ...]}` answers a list. A prediction is
`{"label": "7", "index": 7, "probabilities": {"7": 0.98, "1": 0.01, "9": 0.004}}`.
KServe v1 instances and v2 BYTES elements are base64 images; nested lists (v2: FP32 [n, 28, 28]) are pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from servekit_worker.base import ClassifierHandler
from servekit_worker.errors import RequestError
from servekit_worker.requests import Decoded, as_bytes, base64_bytes, instance_value, json_items, parse_json
from servekit_worker.tensors import finite_tensor
from servekit_worker.vision import decode_pixels

IMAGE_SIZE = 28
JSON_FORMAT = '{"input": [[28 rows of 28 floats in 0..1]]} or {"inputs": [image, ...]}'


def image_to_tensor(raw: bytes, max_pixels: int) -> torch.Tensor:
    """Image bytes -> a 1x1x28x28 float tensor in [0, 1], white digit on black. In numpy: a lone request's decode
    is a dozen tiny operations, each 2-3x cheaper there than as a torch call."""
    pixels = decode_pixels(raw, max_pixels, "L", (IMAGE_SIZE, IMAGE_SIZE))[:, :, 0]
    tensor = torch.from_numpy(pixels.astype(np.float32) / np.float32(255.0))
    edges = np.concatenate((pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]))  # corners twice, as before
    border = int(edges.sum(dtype=np.int64))
    if 2 * border > 255 * 4 * IMAGE_SIZE:  # mean above 0.5: dark ink on light paper, flip to the training convention
        tensor = 1.0 - tensor
    return tensor.reshape(1, 1, IMAGE_SIZE, IMAGE_SIZE)


def json_image(value: Any, what: str) -> torch.Tensor:
    """One image from JSON (28x28 or 1x28x28 numbers in [0, 1]) -> 1x1x28x28."""
    tensor = finite_tensor(value, what)
    if tuple(tensor.shape) not in ((IMAGE_SIZE, IMAGE_SIZE), (1, IMAGE_SIZE, IMAGE_SIZE)):
        raise RequestError("invalid_shape", f"{what} has shape {list(tensor.shape)}; expected [28, 28] or [1, 28, 28]")
    if tensor.min() < 0 or tensor.max() > 1:
        raise RequestError(
            "invalid_input",
            f"{what} has values in [{tensor.min():g}, {tensor.max():g}]; expected [0, 1] "
            "(divide 0-255 pixel values by 255)",
        )
    return tensor.reshape(1, 1, IMAGE_SIZE, IMAGE_SIZE)


def json_to_decoded(document: Any, max_inputs: int) -> Decoded:
    """`{"input": image}` -> one sample; `{"inputs": [image, ...]}` -> several, answered as a list."""
    images, many = json_items(document, "input", "inputs", max_inputs, JSON_FORMAT)
    name = "inputs" if many else "input"
    return Decoded([json_image(image, f'"{name}"[{i}]' if many else '"input"') for i, image in enumerate(images)], many)


class DigitsHandler(ClassifierHandler):
    """SimpleCNN + labels.json from the archive; images or JSON pixel arrays in."""

    content_types = ("image/", "application/json", "application/octet-stream")

    def decode_request(self, payload: Any, content_type: str) -> Decoded:
        if isinstance(payload, (dict, list)):
            return json_to_decoded(payload, self.max_inputs)
        raw = as_bytes(payload)
        if not raw.strip():
            raise RequestError("empty_body", f"the body is empty: send image bytes or {JSON_FORMAT}")
        # JSON by its type, or by its first byte when the type says nothing (octet-stream); never an image type's body
        sniffed = not content_type.startswith("image/") and raw.lstrip()[:1] in (b"{", b"[")
        if content_type == "application/json" or sniffed:
            return json_to_decoded(parse_json(raw), self.max_inputs)
        return Decoded([image_to_tensor(raw, self.max_pixels)])

    def decode_instance(self, value: Any, what: str) -> torch.Tensor:
        """A base64 image (`"<b64>"`, `{"data": "<b64>"}`, `{"b64": "<b64>"}`) or 28x28 pixels in [0, 1]."""
        value = instance_value(value, what)
        if isinstance(value, list):
            return json_image(value, what)
        raw = value if isinstance(value, bytes) else base64_bytes(value, what)
        return image_to_tensor(raw, self.max_pixels)

    def example_samples(self, count: int) -> list:
        return [torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)] * count
