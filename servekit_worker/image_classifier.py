"""torchvision image classifiers' requests (resnet18, mobilenet_v3, efficientnet, ...).

A request is image bytes (raw body or a multipart upload), or JSON with base64 images: `{"image": "<base64>"}`
answers one prediction, `{"images": ["<base64>", ...]}` a list. Preprocessing (resize, center crop, mean/std)
comes from the archive's model-config.yaml `handler.preprocess`, through torchvision transforms v2.
KServe v1 instances and v2 BYTES elements are base64 images.

`handler.image_decode` picks how images are decoded: "pil" decodes each request's image with Pillow on the CPU
as it arrives, and transforms it alone; "batched" (the default, "auto") only reads each image's header then, and
decodes all JPEGs of a batch in one `torchvision.io.decode_jpeg` call on the worker's device (nvJPEG on CUDA),
resized, cropped and normalised there too, images of one size in one call. Other formats (PNG, ...), JPEGs with an
EXIF orientation and non-RGB JPEGs (grayscale, CMYK) are decoded by Pillow, then transformed with the batch. On
the CPU decode_jpeg and Pillow give the same pixels, and a batch is cheaper transformed whole than image by image
(a 256 px JPEG to 224 px: decode 0.51 vs 0.65 ms, transform ~0.1 vs 0.34 ms per image, one thread): a one-thread
worker served resnet18 int8 3 % faster. The GPU's JPEG decoder (nvJPEG) and libjpeg differ slightly: measured on
an H100, 0.0085 mean and 0.23 max in normalised units per pixel.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from servekit_worker.acceleration import to_device
from servekit_worker.architectures import image_transform
from servekit_worker.base import ClassifierHandler
from servekit_worker.errors import RequestError
from servekit_worker.requests import Decoded, as_bytes, base64_bytes, instance_value, json_items, parse_json
from servekit_worker.vision import batchable_jpeg, decode_image, decode_jpegs

logger = logging.getLogger(__name__)

JSON_FORMAT = '{"image": "<base64 image>"} or {"images": ["<base64 image>", ...]}'
IMAGE_DECODES = ("auto", "batched", "pil")


class ImageClassifierHandler(ClassifierHandler):
    """Any torchvision classification model; labels.json from the archive; top-k answers."""

    content_types = ("image/", "application/json", "application/octet-stream", "multipart/form-data")

    def setup(self) -> None:
        super().setup()
        self.preprocess = dict(self.config.get("preprocess") or {})
        self.transform = image_transform(**self.preprocess)
        image_decode = self.config["image_decode"]
        if image_decode not in IMAGE_DECODES:
            raise RuntimeError(f"handler.image_decode is {image_decode!r}; expected one of {', '.join(IMAGE_DECODES)}")
        self.batched_decode = image_decode != "pil"

    def to_sample(self, raw: bytes) -> torch.Tensor | bytes:
        """One image's sample: its model input (1 x 3 x crop x crop), or in batched mode the JPEG bytes left for
        `finish_decoding` or the uint8 RGB image Pillow decoded (3 x H x W), to transform on the device."""
        if not self.batched_decode:
            return self.transform(decode_image(raw, self.max_pixels)).unsqueeze(0)
        return raw if batchable_jpeg(raw, self.max_pixels) else decode_image(raw, self.max_pixels)

    def finish_decoding(self, requests: list[Decoded]) -> list[Decoded | RequestError]:
        """Batched mode: every JPEG of the batch decoded in one call on the device, then the images transformed
        there, one transform call per image size; a JPEG the decoder refuses is tried with Pillow, and fails only
        its own request (400)."""
        if not self.batched_decode:
            return requests
        jpegs = [sample for decoded in requests for sample in decoded.samples if isinstance(sample, bytes)]
        decoded_jpegs = iter(decode_jpegs(jpegs, self.device))
        per_request: list[list[torch.Tensor] | RequestError] = []
        for decoded in requests:
            images, error = [], None
            for sample in decoded.samples:
                image = next(decoded_jpegs) if isinstance(sample, bytes) else sample  # each JPEG, even after an error
                try:
                    images.append(self.device_image(sample, image))
                except RequestError as exc:
                    error = error or exc
            per_request.append(error or images)
        inputs = iter(self.transform_all([image for item in per_request if isinstance(item, list) for image in item]))
        return [
            item if isinstance(item, RequestError) else dataclasses.replace(d, samples=[next(inputs) for _ in item])
            for d, item in zip(requests, per_request, strict=True)
        ]

    def device_image(self, sample: torch.Tensor | bytes, image: torch.Tensor | Exception) -> torch.Tensor:
        """A batched-mode sample's uint8 RGB image on the device: decode_jpeg's (or, when it refused the JPEG,
        Pillow's) for JPEG bytes, Pillow's for the others."""
        if isinstance(image, Exception):
            logger.info("decode_jpeg refused an image (%s): decoding it with Pillow", image)
            image = decode_image(sample, self.max_pixels)
        return to_device(image, self.device)

    def transform_all(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each image's model input (1 x 3 x crop x crop), in order. Images of one size are stacked and
        transformed in one call: per-image transform calls cost more Python than the GPU work they launch
        (64 images of 256 px: about 0.3 ms each)."""
        inputs: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(index)
        for indices in by_size.values():
            rows = self.transform(torch.stack([images[i] for i in indices]))
            for row, index in enumerate(indices):
                inputs[index] = rows[row : row + 1]
        return inputs

    def decode_request(self, payload: Any, content_type: str) -> Decoded:
        if isinstance(payload, (dict, list)) or content_type == "application/json":
            items, many = json_items(parse_json(payload), "image", "images", self.max_inputs, JSON_FORMAT)
            return Decoded([self.to_sample(base64_bytes(item, f"image {i}")) for i, item in enumerate(items)], many)
        raw = as_bytes(payload)
        if not raw:
            raise RequestError("empty_body", f"the body is empty: send image bytes or {JSON_FORMAT}")
        return Decoded([self.to_sample(raw)])

    def decode_instance(self, value: Any, what: str) -> torch.Tensor | bytes:
        """A base64 image: `"<b64>"`, `{"data": "<b64>"}` or `{"b64": "<b64>"}`."""
        value = instance_value(value, what)
        return self.to_sample(value if isinstance(value, bytes) else base64_bytes(value, what))

    def example_samples(self, count: int) -> list:
        crop = int(self.preprocess.get("crop", 224))
        return [torch.zeros(1, 3, crop, crop)] * count
