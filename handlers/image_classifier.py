"""TorchServe handler for torchvision image classifiers (resnet18, mobilenet_v3, efficientnet, ...).

A request is image bytes (raw body or a multipart upload), or JSON with base64 images: `{"image": "<base64>"}`
answers one prediction, `{"images": ["<base64>", ...]}` a list. Preprocessing (resize, center crop, mean/std)
comes from the archive's model-config.yaml `handler.preprocess`, through torchvision transforms v2.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import torch
from servekit_base import (
    Decoded,
    RequestError,
    ServekitHandler,
    as_bytes,
    classification,
    json_items,
    open_image,
    parse_json,
)

JSON_FORMAT = '{"image": "<base64 image>"} or {"images": ["<base64 image>", ...]}'


def image_tensor(raw: bytes, max_pixels: int) -> torch.Tensor:
    """Image bytes -> uint8 RGB tensor, 3 x H x W."""
    image = open_image(raw, max_pixels).convert("RGB")
    width, height = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3).permute(2, 0, 1)


def base64_image(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise RequestError("invalid_json", f"{what} must be a base64 string")
    try:
        return base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError("invalid_base64", f"{what} is not valid base64: {exc}") from None


class ImageClassifierHandler(ServekitHandler):
    """Any torchvision classification model; labels.json from the archive; top-k answers."""

    content_types = ("image/", "application/json", "application/octet-stream", "multipart/form-data")

    def setup(self) -> None:
        self.labels = self.read_labels()
        self.preprocess = dict(self.config.get("preprocess") or {})
        self.transform = self.definitions.image_transform(**self.preprocess)

    def to_sample(self, raw: bytes) -> torch.Tensor:
        return self.transform(image_tensor(raw, int(self.config["max_image_pixels"]))).unsqueeze(0)

    def decode_request(self, payload: Any, content_type: str) -> Decoded:
        if isinstance(payload, (dict, list)) or content_type == "application/json":
            document = parse_json(payload)
            items, many = json_items(
                document, "image", "images", int(self.config["max_inputs_per_request"]), JSON_FORMAT
            )
            return Decoded([self.to_sample(base64_image(item, f"image {i}")) for i, item in enumerate(items)], many)
        raw = as_bytes(payload)
        if not raw:
            raise RequestError("empty_body", f"the body is empty: send image bytes or {JSON_FORMAT}")
        return Decoded([self.to_sample(raw)])

    def encode_response(self, outputs: torch.Tensor, many: bool) -> Any:
        answers = [classification(row, self.labels, int(self.config["top_k"])) for row in outputs]
        return answers if many else answers[0]

    def example_samples(self, count: int) -> list:
        crop = int(self.preprocess.get("crop", 224))
        return [torch.zeros(1, 3, crop, crop)] * count
