"""TorchServe handler for torchvision image classifiers (resnet18, mobilenet_v3, efficientnet, ...).

A request is image bytes (raw body or a multipart upload), or JSON with base64 images: `{"image": "<base64>"}`
answers one prediction, `{"images": ["<base64>", ...]}` a list. Preprocessing (resize, center crop, mean/std)
comes from the archive's model-config.yaml `handler.preprocess`, through torchvision transforms v2.
KServe v1 instances and v2 BYTES elements are base64 images.
"""

from __future__ import annotations

from typing import Any

import torch
from servekit_base import (
    ClassifierHandler,
    Decoded,
    RequestError,
    as_bytes,
    base64_bytes,
    instance_value,
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


class ImageClassifierHandler(ClassifierHandler):
    """Any torchvision classification model; labels.json from the archive; top-k answers."""

    content_types = ("image/", "application/json", "application/octet-stream", "multipart/form-data")

    def setup(self) -> None:
        super().setup()
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
            return Decoded([self.to_sample(base64_bytes(item, f"image {i}")) for i, item in enumerate(items)], many)
        raw = as_bytes(payload)
        if not raw:
            raise RequestError("empty_body", f"the body is empty: send image bytes or {JSON_FORMAT}")
        return Decoded([self.to_sample(raw)])

    def decode_instance(self, value: Any, what: str) -> torch.Tensor:
        """A base64 image: `"<b64>"`, `{"data": "<b64>"}` or `{"b64": "<b64>"}`."""
        value = instance_value(value, what)
        return self.to_sample(value if isinstance(value, bytes) else base64_bytes(value, what))

    def example_samples(self, count: int) -> list:
        crop = int(self.preprocess.get("crop", 224))
        return [torch.zeros(1, 3, crop, crop)] * count
