"""TorchServe handler for the SimpleCNN digit classifier.

A request is either image bytes (PNG, JPEG, ...; any size, converted to 28x28 grayscale; a white digit on a dark
background as in MNIST, dark-on-light images are inverted) or JSON: `{"input": 28x28 floats in [0, 1]}` answers one
prediction, `{"inputs": [image, ...]}` answers a list. A prediction is
`{"label": "7", "index": 7, "probabilities": {"7": 0.98, "1": 0.01, "9": 0.004}}`.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from servekit_base import (
    Decoded,
    RequestError,
    ServekitHandler,
    as_bytes,
    finite_tensor,
    load_module_from_file,
    open_image,
    parse_json,
    top_k,
)

IMAGE_SIZE = 28
JSON_FORMAT = '{"input": [[28 rows of 28 floats in 0..1]]} or {"inputs": [image, ...]}'


def image_to_tensor(raw: bytes, max_pixels: int) -> torch.Tensor:
    """Image bytes -> a 1x1x28x28 float tensor in [0, 1], white digit on black."""
    image = open_image(raw, max_pixels).convert("L")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
    tensor = pixels.float() / 255.0
    border = torch.cat([tensor[0], tensor[-1], tensor[:, 0], tensor[:, -1]])
    if border.mean() > 0.5:  # dark ink on light paper: flip to the training convention
        tensor = 1.0 - tensor
    return tensor.reshape(1, 1, IMAGE_SIZE, IMAGE_SIZE)


def json_image(value: Any, what: str) -> torch.Tensor:
    """One image from JSON (28x28 or 1x28x28 numbers in [0, 1]) -> 1x1x28x28."""
    tensor = finite_tensor(value, what)
    if tuple(tensor.shape) not in ((IMAGE_SIZE, IMAGE_SIZE), (1, IMAGE_SIZE, IMAGE_SIZE)):
        raise RequestError("invalid_shape", f"{what} has shape {list(tensor.shape)}; expected [28, 28] or [1, 28, 28]")
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
        raise RequestError(
            "invalid_input",
            f"{what} has values in [{tensor.min():g}, {tensor.max():g}]; expected [0, 1] "
            "(divide 0-255 pixel values by 255)",
        )
    return tensor.reshape(1, 1, IMAGE_SIZE, IMAGE_SIZE)


def json_to_decoded(document: Any, max_inputs: int) -> Decoded:
    """`{"input": image}` -> one sample; `{"inputs": [image, ...]}` -> several, answered as a list."""
    if not isinstance(document, dict) or len(document.keys() & {"input", "inputs"}) != 1:
        raise RequestError("invalid_json", f"expected {JSON_FORMAT}")
    if "input" in document:
        return Decoded(json_image(document["input"], '"input"'))
    images = document["inputs"]
    if not isinstance(images, list) or not images:
        raise RequestError("invalid_json", f'"inputs" must be a non-empty list of images; expected {JSON_FORMAT}')
    if len(images) > max_inputs:
        raise RequestError(
            "too_many_inputs", f'"inputs" has {len(images)} images; the limit is {max_inputs}', status=413
        )
    tensors = [json_image(image, f'"inputs"[{i}]') for i, image in enumerate(images)]
    return Decoded(torch.cat(tensors), many=True)


def prediction(logits: torch.Tensor, labels: list[str], k: int = 3) -> dict:
    """One row of logits -> the answer clients get."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    index = int(probabilities.argmax())
    return {"label": labels[index], "index": index, "probabilities": top_k(probabilities, labels, k)}


class DigitsHandler(ServekitHandler):
    """SimpleCNN weights (state_dict) + the model file + labels.json, all from the archive."""

    def load_model(self) -> torch.nn.Module:
        module = load_module_from_file(self.model_file(), "servekit_digits_model")
        model = getattr(module, self.config.get("model_class", "SimpleCNN"))()
        state = torch.load(self.serialized_file(), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self.labels = self.read_labels()
        return model

    def decode_request(self, payload: Any) -> Decoded:
        max_inputs = int(self.config["max_inputs_per_request"])
        if isinstance(payload, (dict, list)):
            return json_to_decoded(payload, max_inputs)
        raw = as_bytes(payload)
        if not raw.strip():
            raise RequestError("empty_body", f"the body is empty: send image bytes or {JSON_FORMAT}")
        if raw.lstrip()[:1] in (b"{", b"["):
            return json_to_decoded(parse_json(raw), max_inputs)
        return Decoded(image_to_tensor(raw, int(self.config["max_image_pixels"])))

    def encode_response(self, outputs: torch.Tensor, many: bool) -> Any:
        k = int(self.config.get("top_k", 3))
        answers = [prediction(row, self.labels, k) for row in outputs]
        return answers if many else answers[0]
