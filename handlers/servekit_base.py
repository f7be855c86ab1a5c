"""Shared machinery for servekit's TorchServe handlers.

Runs inside TorchServe workers: imports only torch, the standard library, Pillow and `ts`. Each handler
subclasses `ServekitHandler` and supplies three plain hooks, every one callable from a unit test:

    decode_request(payload) -> Decoded     one request's body -> a tensor of n samples
    forward(batch) -> Tensor               one forward pass over all good samples of the batch
    encode_response(outputs, many) -> obj  one request's rows of outputs -> its JSON answer

`handle` does the rest: a bad request gets its own 4xx JSON answer, the good ones in the same batch are still
answered, and the worker never dies for a client's mistake.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

DEFAULT_LIMITS = {
    "max_body_bytes": 10 * 1024 * 1024,
    "max_image_pixels": 4096 * 4096,
    "max_inputs_per_request": 64,
}


class RequestError(Exception):
    """A client mistake in one request: answered with `status` and a JSON body, never a crashed worker."""

    def __init__(self, error: str, detail: str, status: int = 400):
        super().__init__(detail)
        self.error = error
        self.detail = detail
        self.status = status

    def body(self) -> dict:
        return {"code": self.status, "error": self.error, "detail": self.detail}


@dataclass
class Decoded:
    """One request's samples: `tensor` has the samples on dim 0; `many` says the client sent a list."""

    tensor: torch.Tensor
    many: bool = False


def request_payload(request: dict) -> Any:
    """The body of one TorchServe request: raw bytes, a str, or JSON already decoded by the worker."""
    for key in ("data", "body"):
        if key in request and request[key] is not None:
            return request[key]
    values = [value for value in request.values() if value]
    if len(values) == 1:  # a multipart upload with a single field of another name
        return values[0]
    raise RequestError(
        "empty_body",
        "the request has no body (form-encoded fields are not read): send image bytes with "
        "Content-Type image/png or image/jpeg, or a JSON document with Content-Type application/json",
    )


def as_bytes(payload: Any) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    raise RequestError("invalid_input", f"expected raw bytes, got {type(payload).__name__}")


def parse_json(payload: Any) -> Any:
    """JSON the worker decoded already, or bytes/str that still need decoding."""
    if isinstance(payload, (dict, list)):
        return payload
    raw = as_bytes(payload)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RequestError("invalid_json", f"the body is not valid UTF-8 JSON: {exc}") from None


def looks_like_image(raw: bytes) -> bool:
    return raw.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF"))


def open_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes fully, refusing decompression bombs before any pixel is allocated."""
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width * height > max_pixels:
            raise RequestError(
                "image_too_large",
                f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            )
        image.load()
    except RequestError:
        raise
    except Image.DecompressionBombError as exc:
        raise RequestError("image_too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise RequestError(
            "invalid_image", "the body is neither an image Pillow can read (PNG, JPEG, ...) nor JSON"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise RequestError("invalid_image", f"cannot decode the image: {exc}") from None
    return image


def finite_tensor(value: Any, what: str) -> torch.Tensor:
    """A float32 tensor from nested JSON lists of numbers, refusing ragged lists, non-numbers, NaN and Inf."""
    if not _is_numeric_tree(value):
        raise RequestError("invalid_input", f"{what} must be nested lists of numbers")
    try:
        tensor = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise RequestError("invalid_input", f"{what} is not a rectangular array of numbers: {exc}") from None
    if not torch.isfinite(tensor).all():
        raise RequestError("invalid_input", f"{what} contains NaN or Infinity")
    return tensor


def _is_numeric_tree(value: Any, depth: int = 0) -> bool:
    if depth > 8:
        return False
    if isinstance(value, list):
        return all(_is_numeric_tree(v, depth + 1) for v in value)
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return True  # NaN/Inf are reported by finite_tensor with a clearer message
    return isinstance(value, int)


def select_device(properties: dict) -> torch.device:
    """`cuda:{gpu_id}` when TorchServe assigned a GPU and CUDA works here, else the CPU."""
    gpu_id = properties.get("gpu_id")
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def load_module_from_file(path: Path, module_name: str):
    """Import a model-definition file shipped inside the archive, without relying on sys.path."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import model file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def top_k(probabilities: torch.Tensor, labels: list[str], k: int) -> dict[str, float]:
    """The k most likely labels, most likely first, as {label: probability}."""
    k = min(k, probabilities.numel())
    values, indices = torch.topk(probabilities, k)
    return {labels[i]: round(float(v), 6) for v, i in zip(values.tolist(), indices.tolist(), strict=True)}


class ServekitHandler(BaseHandler):
    """Batch loop with per-request errors; subclasses load a model and supply the three hooks."""

    def initialize(self, context) -> None:
        properties = context.system_properties
        self.context = context
        self.model_dir = Path(properties["model_dir"])
        self.manifest = context.manifest
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.config = {**DEFAULT_LIMITS, **(yaml_config.get("handler") or {})}
        threads = self.config.get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))
        self.device = select_device(properties)
        self.model = self.load_model().to(self.device).eval()
        self.initialized = True
        logger.info("%s ready on %s", type(self).__name__, self.device)

    # Hooks for subclasses -------------------------------------------------------------------------------------
    def load_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def decode_request(self, payload: Any) -> Decoded:
        raise NotImplementedError

    def encode_response(self, outputs: torch.Tensor, many: bool) -> Any:
        raise NotImplementedError

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()

    # Helpers for subclasses -----------------------------------------------------------------------------------
    def model_file(self) -> Path:
        """The model-definition file named in the archive's manifest."""
        name = (self.manifest or {}).get("model", {}).get("modelFile")
        if not name:
            raise RuntimeError("the archive has no model file: build it with servekit build")
        return self.model_dir / name

    def serialized_file(self) -> Path:
        name = (self.manifest or {}).get("model", {}).get("serializedFile")
        if not name:
            raise RuntimeError("the archive has no serialized weights: build it with servekit build")
        return self.model_dir / name

    def read_labels(self, file_name: str = "labels.json") -> list[str]:
        path = self.model_dir / file_name
        labels = json.loads(path.read_text())
        if isinstance(labels, dict):  # {"0": "zero", ...} as TorchServe's index_to_name.json
            labels = [labels[str(i)] for i in range(len(labels))]
        return [str(label) for label in labels]

    def check_body_size(self, payload: Any) -> None:
        if isinstance(payload, (bytes, bytearray, str)) and len(payload) > self.config["max_body_bytes"]:
            raise RequestError(
                "payload_too_large",
                f"the body has {len(payload)} bytes; the limit is {self.config['max_body_bytes']}",
                status=413,
            )

    # The batch loop -------------------------------------------------------------------------------------------
    def handle(self, data: list[dict], context) -> list[Any]:
        """One answer per request, in order; one forward pass for all good requests of the batch."""
        answers: list[Any] = [None] * len(data)
        accepted: list[tuple[int, Decoded]] = []
        for idx, request in enumerate(data):
            try:
                payload = request_payload(request)
                self.check_body_size(payload)
                accepted.append((idx, self.decode_request(payload)))
            except RequestError as exc:
                answers[idx] = self.reject(context, idx, exc)
        if accepted:
            outputs = self.forward(torch.cat([decoded.tensor for _, decoded in accepted]))
            start = 0
            for idx, decoded in accepted:
                count = decoded.tensor.shape[0]
                answers[idx] = self.encode_response(outputs[start : start + count], decoded.many)
                start += count
        return answers

    @staticmethod
    def reject(context, idx: int, exc: RequestError) -> dict:
        logger.info("request %s rejected with %s: %s", idx, exc.status, exc.detail)
        context.set_response_status(exc.status, HTTPStatus(exc.status).phrase, idx)
        return exc.body()
