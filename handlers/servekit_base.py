"""Shared machinery for servekit's TorchServe handlers.

Runs inside TorchServe workers: imports only torch, the standard library, Pillow and `ts`. Each handler
subclasses `ServekitHandler` and supplies plain hooks, every one callable from a unit test:

    decode_request(payload, content_type) -> Decoded   one request's body -> its samples
    collate(samples) -> Tensor                          samples of the whole batch -> one model input
    encode_response(outputs, many) -> object            one request's rows of outputs -> its JSON answer

`handle` does the rest: a bad request gets its own 4xx JSON answer, the good ones in the same batch are still
answered with one forward pass, and the worker never dies for a client's mistake. When the batched forward
pass raises, each request is run alone and only the one the model fails on gets a 500.

Besides servekit's own API (`/predictions`), every handler speaks KServe's v1 and v2 (Open Inference)
protocols on TorchServe's `/v1/models/NAME:predict` and `/v2/models/NAME/infer` routes, through three more hooks:

    decode_instance(value, what) -> sample              one v1 instance (base64 image, nested list, text)
    decode_v2_input(tensor) -> list[sample]             one v2 input (`V2Tensor`: name, datatype, shape, data)
    v2_outputs(outputs) -> list[dict]                   one request's rows of outputs -> its v2 output tensors

TorchServe's own `kserve`/`kservev2` envelopes (TS_SERVICE_ENVELOPE) cannot serve a batch (see
`take_over_envelope`): when the worker wraps a servekit handler in one, the handler unwraps it and does the
envelope's job itself, per request.

The archive's `model-config.yaml` drives everything under its `handler:` section: the model `format`
(state_dict, torchscript, export, aoti, onnx), limits, allowed content types, `compile`, `warmup`, and on GPU
workers `device` (the device the variant was built for: a worker elsewhere refuses it), `channels_last` and
`cuda_graphs` (batch-size buckets, each captured as one CUDA graph; a batch is padded to its bucket).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = {
    "format": "state_dict",
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
    # Image handlers: "batched" decodes a batch's JPEGs in one torchvision call on the worker's device, "pil" one
    # by one with Pillow on the CPU, "auto" batched on CUDA workers and pil on CPU workers.
    "image_decode": "auto",
}
DEVICE_TYPES = ("cpu", "cuda")
MODEL_FORMATS = ("state_dict", "torchscript", "export", "aoti", "onnx")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# TorchServe's TS_SERVICE_ENVELOPE values (KServe sets them from the serviceEnvelope label) -> the protocol spoken.
ENVELOPE_PROTOCOLS = {"kserve": "v1", "kservev2": "v2"}
# Open Inference Protocol datatypes servekit reads, and the JSON values each allows.
V2_INTEGER_TYPES = ("UINT8", "INT8", "INT16", "INT32", "INT64")
V2_FLOAT_TYPES = ("FP16", "FP32", "FP64")
V2_DATATYPES = (*V2_INTEGER_TYPES, *V2_FLOAT_TYPES, "BYTES")


class RequestError(Exception):
    """A client mistake in one request: answered with `status` and a JSON body, never a crashed worker."""

    def __init__(self, error: str, detail: str, status: int = 400):
        super().__init__(detail)
        self.error = error
        self.detail = detail
        self.status = status

    def body(self, protocol: str = "plain") -> dict:
        """servekit's error object, or KServe v1/v2's `{"error": message}`."""
        if protocol != "plain":
            return {"error": f"{self.error}: {self.detail}"}
        return {"code": self.status, "error": self.error, "detail": self.detail}


@dataclass
class V2Tensor:
    """One input of a KServe v2 request, its `data` flattened in row-major order and checked against `shape`."""

    name: str
    datatype: str
    shape: list[int]
    data: list

    def rows(self) -> list:
        """The instances along the first dimension: a string each for BYTES [n] (or [n, 1]), else nested lists."""
        count = self.shape[0] if self.shape else 1
        row_size = len(self.data) // count if count else 0
        rows = [self.data[i * row_size : (i + 1) * row_size] for i in range(count)]
        if self.datatype == "BYTES" and row_size == 1:
            return [row[0] for row in rows]
        return [nested(row, self.shape[1:]) for row in rows]


@dataclass
class V2Request:
    """A parsed KServe v2 request: its inputs, its `id`, and the output names it asked for (None: all)."""

    inputs: list[V2Tensor]
    request_id: str | None = None
    output_names: list[str] | None = None


@dataclass
class Decoded:
    """One request's samples, each ready for `collate`; `many` says the client sent a list; `protocol` is
    "plain" (servekit's API), "v1" or "v2" (KServe's), `v2` the parsed v2 request."""

    samples: list = field(default_factory=list)
    many: bool = False
    protocol: str = "plain"
    v2: V2Request | None = None


# Reading requests ---------------------------------------------------------------------------------------------
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


def request_content_type(context, idx: int, request: dict, payload: Any) -> str:
    """The media type of one request's body ('' when the client sent none), without parameters."""
    if isinstance(payload, (dict, list)):
        return "application/json"
    for name in request:
        try:
            header = context.get_request_header(idx, name)
        except (AttributeError, IndexError, KeyError, TypeError):
            header = None
        if isinstance(header, dict) and header.get("content-type"):
            return header["content-type"].split(";")[0].strip().lower()
    return "text/plain" if isinstance(payload, str) else ""  # the worker decodes only text/* bodies to str


def content_type_allowed(content_type: str, allowed: list[str]) -> bool:
    """`allowed` holds media types (`application/json`) and families (`image/`)."""
    media_type = content_type or "application/octet-stream"
    return any(media_type == a or (a.endswith("/") and media_type.startswith(a)) for a in allowed)


def as_bytes(payload: Any) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    raise RequestError("invalid_input", f"expected raw bytes, got {type(payload).__name__}")


def as_text(payload: Any) -> str:
    if isinstance(payload, str):
        return payload
    try:
        return as_bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError("invalid_text", f"the body is not valid UTF-8: {exc}") from None


def parse_json(payload: Any) -> Any:
    """JSON the worker decoded already, or bytes/str that still need decoding."""
    if isinstance(payload, (dict, list)):
        return payload
    try:
        return json.loads(as_text(payload))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise RequestError("invalid_json", f"the body is not valid JSON: {exc}") from None


@contextlib.contextmanager
def image_errors():
    """Pillow's failures on a client's bytes -> the request's 400."""
    try:
        yield
    except RequestError:
        raise
    except Image.DecompressionBombError as exc:
        raise RequestError("image_too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise RequestError("invalid_image", "the body is not an image Pillow can read (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise RequestError("invalid_image", f"cannot decode the image: {exc}") from None


def image_header(raw: bytes, max_pixels: int) -> Image.Image:
    """Image bytes opened lazily: Pillow reads only the header (format, size, mode, EXIF), and decompression
    bombs are refused before any pixel is allocated."""
    with image_errors():
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width * height > max_pixels:
            raise RequestError(
                "image_too_large", f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
    return image


def open_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes fully and upright (EXIF orientation applied), refusing decompression bombs before any
    pixel is allocated."""
    image = image_header(raw, max_pixels)
    with image_errors():
        image.load()
        # Phones store portrait photos rotated with an EXIF Orientation tag: apply it before anything else.
        ImageOps.exif_transpose(image, in_place=True)
    return image


def json_items(document: Any, one: str, many: str, max_items: int, expected: str) -> tuple[list, bool]:
    """`{one: item}` -> ([item], False); `{many: [items]}` -> (items, True); anything else is a 400."""
    if not isinstance(document, dict) or len(document.keys() & {one, many}) != 1:
        raise RequestError("invalid_json", f"expected {expected}")
    if one in document:
        return [document[one]], False
    items = document[many]
    if not isinstance(items, list) or not items:
        raise RequestError("invalid_json", f'"{many}" must be a non-empty list; expected {expected}')
    check_count(len(items), f'"{many}"', max_items)
    return items, True


def check_count(count: int, what: str, max_items: int) -> None:
    """One request may hold at most `max_items` samples (handler.max_inputs_per_request): 413 beyond."""
    if count > max_items:
        raise RequestError("too_many_inputs", f"{what} has {count} items; the limit is {max_items}", 413)


def base64_bytes(value: Any, what: str) -> bytes:
    """The bytes of a base64 string (a `data:...;base64,` URL prefix is allowed)."""
    if not isinstance(value, str) or not value:
        raise RequestError("invalid_json", f"{what} must be a base64 string")
    try:
        return base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError("invalid_base64", f"{what} is not valid base64: {exc}") from None


def instance_value(value: Any, what: str) -> Any:
    """A KServe v1 instance's content: `{"b64": "<base64>"}` -> the decoded bytes (KServe's binary convention),
    `{"data": x}` -> x (TorchServe's examples), anything else as sent (a string, nested lists)."""
    if not isinstance(value, dict):
        return value
    keys = sorted(value.keys() & {"b64", "data"})
    if len(keys) != 1:
        raise RequestError("invalid_input", f'{what} must be {{"data": ...}}, {{"b64": ...}}, a list or a string')
    return base64_bytes(value["b64"], what) if keys[0] == "b64" else value["data"]


def finite_tensor(value: Any, what: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor from nested JSON lists of numbers, refusing ragged lists, non-numbers, NaN and Inf."""
    floating = dtype.is_floating_point
    if not _is_numeric_tree(value, allow_float=floating):
        kind = "numbers" if floating else "integers"
        raise RequestError("invalid_input", f"{what} must be nested lists of {kind} ({dtype})")
    try:
        tensor = torch.tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise RequestError("invalid_input", f"{what} is not a rectangular array of numbers: {exc}") from None
    if floating and not torch.isfinite(tensor).all():
        raise RequestError("invalid_input", f"{what} contains NaN or Infinity")
    return tensor


def _is_numeric_tree(value: Any, allow_float: bool = True, depth: int = 0) -> bool:
    if depth > 8:
        return False
    if isinstance(value, list):
        return all(_is_numeric_tree(v, allow_float, depth + 1) for v in value)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (allow_float and isinstance(value, float))


# KServe v1 and v2 (Open Inference) protocols -------------------------------------------------------------------
def request_header(context, idx: int, name: str) -> Any:
    try:
        return context.get_request_header(idx, name)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def request_protocol(context, idx: int, envelope: str | None, payload: Any) -> str:
    """ "plain" for servekit's own API, "v1" or "v2" for KServe's routes.

    TorchServe 0.12's frontend marks `/predictions` requests with a `url_path` header and its KServe routes
    (`/v1/models/NAME:predict`, `/v2/models/NAME/infer`) with an `explain` header alone; gRPC requests carry
    neither and are served as `/predictions`. On a KServe route the envelope names the protocol; without one, a
    body with "inputs" is v2 and anything else v1.
    """
    if request_header(context, idx, "url_path") is not None or request_header(context, idx, "explain") is None:
        return "plain"
    if envelope in ENVELOPE_PROTOCOLS:
        return ENVELOPE_PROTOCOLS[envelope]
    return "v2" if isinstance(payload, dict) and "inputs" in payload else "v1"


def v1_instances(document: Any, max_items: int) -> list:
    """The instances of a KServe v1 request `{"instances": [...]}`."""
    instances = document.get("instances") if isinstance(document, dict) else None
    if not isinstance(instances, list) or not instances:
        raise RequestError("invalid_request", 'a v1 request is {"instances": [instance, ...]} with 1 or more instances')
    check_count(len(instances), '"instances"', max_items)
    return instances


def flat_values(data: Any, what: str, depth: int = 0) -> list:
    """A v2 tensor's data in row-major order, whether the client sent it flat or nested."""
    if depth > 8:
        raise RequestError("invalid_input", f"{what} nests data deeper than 8 levels")
    values = []
    for value in data:
        if isinstance(value, list):
            values.extend(flat_values(value, what, depth + 1))
        else:
            values.append(value)
    return values


def nested(values: list, dims: list[int]) -> list:
    """Row-major `values` as nested lists of shape `dims` (the inverse of flat_values)."""
    if len(dims) <= 1:
        return list(values)
    step = len(values) // dims[0] if dims[0] else 0
    return [nested(values[i * step : (i + 1) * step], dims[1:]) for i in range(dims[0])]


def values_match(datatype: str, values: list) -> bool:
    if datatype == "BYTES":
        return all(isinstance(v, str) for v in values)
    if datatype in V2_INTEGER_TYPES:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def v2_input(item: Any, position: int) -> V2Tensor:
    """One element of a v2 request's "inputs", checked: name, a known datatype, a shape its data fills exactly."""
    what = f"inputs[{position}]"
    if not isinstance(item, dict):
        raise RequestError("invalid_request", f'{what} must be {{"name", "shape", "datatype", "data"}}')
    missing = [key for key in ("name", "shape", "datatype", "data") if key not in item]
    if missing:
        raise RequestError("invalid_request", f"{what} lacks {', '.join(missing)}")
    name, datatype, shape, data = item["name"], item["datatype"], item["shape"], item["data"]
    if not isinstance(name, str) or not name:
        raise RequestError("invalid_request", f"{what}.name must be a non-empty string")
    what = f'input "{name}"'
    if datatype not in V2_DATATYPES:
        known = ", ".join(V2_DATATYPES)
        raise RequestError("invalid_datatype", f"{what} has datatype {datatype!r}; servekit reads {known}")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    ):
        raise RequestError("invalid_shape", f"{what} has shape {shape!r}; expected a list of positive integers")
    if not isinstance(data, list):
        raise RequestError("invalid_request", f"{what}.data must be a list")
    values = flat_values(data, what)
    if len(values) != math.prod(shape):
        raise RequestError(
            "invalid_shape", f"{what} has shape {shape} ({math.prod(shape)} values) but {len(values)} values in data"
        )
    if not values_match(datatype, values):
        kind = "strings" if datatype == "BYTES" else "integers" if datatype in V2_INTEGER_TYPES else "numbers"
        raise RequestError("invalid_datatype", f"{what} is {datatype}, so its data must be {kind}")
    return V2Tensor(name, datatype, shape, values)


def v2_request(document: Any, max_items: int, output_names: tuple[str, ...]) -> V2Request:
    """A KServe v2 request `{"id"?, "inputs": [...], "outputs"?: [{"name"}]}`, checked; each input's first
    dimension counts instances, at most `max_items` in all."""
    inputs = document.get("inputs") if isinstance(document, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(
            "invalid_request", 'a v2 request is {"inputs": [{"name", "shape", "datatype", "data"}, ...]}, 1 or more'
        )
    check_count(len(inputs), '"inputs"', max_items)
    tensors = [v2_input(item, i) for i, item in enumerate(inputs)]
    check_count(sum(t.shape[0] for t in tensors), "the request", max_items)
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError("invalid_request", '"id" must be a string')
    requested = document.get("outputs")
    names = None
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) and "name" in o for o in requested):
            raise RequestError("invalid_request", '"outputs" must be a list of {"name": ...}')
        names = [o["name"] for o in requested]
        unknown = [n for n in names if n not in output_names]
        if unknown:
            raise RequestError("invalid_request", f"unknown outputs {unknown}; this model has {list(output_names)}")
    return V2Request(tensors, request_id, names)


def v2_tensor(name: str, datatype: str, data: torch.Tensor | list) -> dict:
    """One v2 output tensor: its data flattened in row-major order, as the protocol sends it."""
    if isinstance(data, torch.Tensor):
        return {"name": name, "datatype": datatype, "shape": list(data.shape), "data": data.flatten().tolist()}
    return {"name": name, "datatype": datatype, "shape": [len(data)], "data": list(data)}


def take_over_envelope(handler: Any) -> str | None:
    """Unwraps TorchServe's kserve/kservev2 envelope from around `handler.handle`; returns the envelope's name.

    TorchServe 0.12 wraps the handler of every model in the TS_SERVICE_ENVELOPE envelope. Those envelopes read
    only the first request of a batch and answer one response for the whole batch (TorchServe then fails every
    request of a batch of 2 or more with 503 "number of batch response mismatched"), fail the batch on one
    malformed body, and reshape answers (kservev2 flattens them into one BYTES tensor). So the handler does the
    envelope's job itself, per request (`request_protocol`), and TorchServe calls its `handle` directly. Called
    from `initialize`, which TorchServe's model loader runs after wrapping: the loader's frame holds the service.
    """
    from ts.torch_handler.request_envelope.base import BaseEnvelope

    frame = sys._getframe(1)
    while frame is not None:
        for value in list(frame.f_locals.values()):
            envelope = getattr(getattr(value, "_entry_point", None), "__self__", None)
            if isinstance(envelope, BaseEnvelope) and getattr(envelope._handle_fn, "__self__", None) is handler:
                name = type(envelope).__module__.rsplit(".", 1)[-1]
                if name in ENVELOPE_PROTOCOLS:
                    value._entry_point = envelope._handle_fn
                    logger.info("serving KServe %s without TorchServe's %s envelope", ENVELOPE_PROTOCOLS[name], name)
                return name
        frame = frame.f_back
    return None


# Answers --------------------------------------------------------------------------------------------------------
def top_k(probabilities: torch.Tensor, labels: list[str], k: int) -> dict[str, float]:
    """The k most likely labels, most likely first, as {label: probability}."""
    k = min(k, probabilities.numel())
    values, indices = torch.topk(probabilities, k)
    return {labels[i]: round(float(v), 6) for v, i in zip(values.tolist(), indices.tolist(), strict=True)}


def classification(logits: torch.Tensor, labels: list[str], k: int = 3) -> dict:
    """One row of logits -> `{"label", "index", "probabilities": top k}`."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    index = int(probabilities.argmax())
    return {"label": labels[index], "index": index, "probabilities": top_k(probabilities, labels, k)}


# Models ---------------------------------------------------------------------------------------------------------
def select_device(properties: dict) -> torch.device:
    """`cuda:{gpu_id}` when TorchServe assigned a GPU and CUDA works here, else the CPU."""
    gpu_id = properties.get("gpu_id")
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def variant_summary(config: dict) -> str:
    """What a variant was built with, in words: "float16, CUDA graphs"."""
    parts = [config.get("dtype", "float32")]
    if config.get("format") == "aoti":
        parts.insert(0, "AOTInductor package")
    if config.get("compile"):
        parts.append("torch.compile")
    if config.get("cuda_graphs"):
        parts.append("CUDA graphs")
    return ", ".join(parts)


def refuse_wrong_device(built_for: str | None, device: torch.device, config: dict) -> None:
    """Raises when the variant was built for another device type than the worker's (None: built for any)."""
    if built_for is None:
        return
    if built_for not in DEVICE_TYPES:
        raise RuntimeError(f"handler.device is {built_for!r}; expected one of {', '.join(DEVICE_TYPES)} or none")
    if built_for == device.type:
        return
    fix = (
        "serve it with GPU workers (servekit config --gpus) or build a CPU variant"
        if built_for == "cuda"
        else "serve it with CPU workers or build a cuda variant"
    )
    raise RuntimeError(
        f"this archive's variant was built for {built_for} ({variant_summary(config)}); "
        f"this worker runs on {device.type}: {fix}"
    )


# Formats whose memory layout the worker chooses, by device type. Compiled artefacts (AOTI, ONNX) keep the layout
# they were built for; on the CPU, TorchScript and exported programs run as `servekit optimize` gated them.
CHANNELS_LAST_FORMATS = {"cuda": ("state_dict", "torchscript", "export"), "cpu": ("state_dict",)}


def runs_channels_last(config: dict, device_type: str) -> bool:
    """Whether a worker on `device_type` lays an archive's model and image batches out channels_last: the
    handler's `channels_last` (default on) and a format it may lay out. The worker, build's cost timing and
    optimize all ask here; each of them also tries the model on such a batch first (`takes_channels_last`) and
    keeps a model that raises on it NCHW."""
    config = {**DEFAULT_CONFIG, **config}
    return bool(config["channels_last"]) and config["format"] in CHANNELS_LAST_FORMATS.get(device_type, ())


def takes_channels_last(model: Callable, example: torch.Tensor) -> bool:
    """Whether `model` runs on a channels_last batch. Code written for NCHW tensors (`x.view(n, -1)` after a
    convolution) raises on one; such a model is kept NCHW rather than failing every request."""
    try:
        with torch.inference_mode():
            model(example.contiguous(memory_format=torch.channels_last))
    except RuntimeError:
        return False
    return True


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` on `device` (floating tensors in `dtype` when given): a CPU tensor bound for CUDA goes through
    pinned memory and a non-blocking copy."""
    dtype = dtype if dtype is not None and tensor.is_floating_point() else None
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, dtype, non_blocking=True)
    return tensor.to(device, dtype)


def bucket_for(count: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `count` samples; None when none does."""
    fitting = [bucket for bucket in buckets if bucket >= count]
    return min(fitting) if fitting else None


class StaticBatch:
    """A fixed-size model call (one captured CUDA graph): the batch is copied into the first rows of the static
    input, the rest zeroed, `replay` runs, and the batch's rows of the static output are cloned out."""

    def __init__(self, static_input: torch.Tensor, static_output: torch.Tensor, replay: Callable[[], Any]):
        self.static_input = static_input
        self.static_output = static_output
        self.replay = replay

    @property
    def size(self) -> int:
        return self.static_input.shape[0]

    def fits(self, batch: torch.Tensor) -> bool:
        return (
            batch.shape[0] <= self.size
            and batch.shape[1:] == self.static_input.shape[1:]
            and batch.dtype == self.static_input.dtype
        )

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        count = batch.shape[0]
        self.static_input[:count].copy_(batch)
        self.static_input[count:].zero_()
        self.replay()
        return self.static_output[:count].clone()


class BucketedModel:
    """Runs each batch through the smallest StaticBatch that holds it (padding it), a batch larger than every
    bucket in chunks of the largest, and a batch of another sample shape or dtype through the eager model."""

    def __init__(self, runners: dict[int, StaticBatch], eager: Callable[[torch.Tensor], torch.Tensor]):
        self.runners = runners
        self.eager = eager
        self.largest = max(runners)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] > self.largest:
            return torch.cat([self(chunk) for chunk in batch.split(self.largest)])
        runner = self.runners[bucket_for(batch.shape[0], list(self.runners))]
        return runner(batch) if runner.fits(batch) else self.eager(batch)


def capture_cuda_graphs(
    model: Callable, example: torch.Tensor, buckets: list[int], channels_last: bool
) -> dict[int, StaticBatch]:
    """One CUDA graph per bucket, replaying `model` on a static batch of copies of `example` (one sample, on the
    CUDA device, in the model's dtype). The graphs share one memory pool: they run one at a time and each output
    is cloned as soon as its graph has run, so one graph may reuse another's scratch memory.
    """
    device = example.device
    pool = torch.cuda.graph_pool_handle()
    runners = {}
    for bucket in sorted(set(buckets), reverse=True):  # the largest first: it sizes the shared pool
        static_input = torch.cat([example] * bucket)
        if channels_last:
            static_input = static_input.contiguous(memory_format=torch.channels_last)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():  # warm-up (cuDNN autotuning, lazy init) off the capture
            for _ in range(3):
                model(static_input)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
            static_output = model(static_input)
        runners[bucket] = StaticBatch(static_input, static_output, graph.replay)
    torch.cuda.synchronize(device)
    return runners


def load_module_from_file(path: Path, module_name: str):
    """Import a file shipped inside the archive, without relying on sys.path."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CallableModule(torch.nn.Module):
    """Gives compiled artefacts (AOTInductor packages, ONNX sessions) the nn.Module face the handlers use."""

    def __init__(self, function, description: str):
        super().__init__()
        self.function = function
        self.description = description

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.function(batch)

    def extra_repr(self) -> str:
        return self.description


def onnx_module(path: Path, device: torch.device) -> CallableModule:
    import onnxruntime

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    options = onnxruntime.SessionOptions()
    # the worker's torch_threads, set before loading: ONNX Runtime's default (every core) in each of several
    # workers oversubscribes the cores the way torch's default would
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    input_name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: batch.cpu().numpy()})[0])

    return CallableModule(run, f"onnxruntime {session.get_providers()}")


def load_model(model_format: str, weights: Path, definitions, config: dict, device: torch.device) -> torch.nn.Module:
    """The model of an archive in any of MODEL_FORMATS; `definitions` is the archive's models.py module."""
    if model_format == "state_dict":
        model = definitions.build_model(config["model_class"], config.get("model_kwargs"))
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model
    if model_format == "torchscript":
        return torch.jit.load(str(weights), map_location=device)
    if model_format == "export":
        return torch.export.load(str(weights)).module()
    if model_format == "aoti":
        refuse_wrong_device(config.get("aoti_device", "cpu"), device, {**config, "format": "aoti"})
        return CallableModule(torch._inductor.aoti_load_package(str(weights)), f"AOTInductor package {weights.name}")
    if model_format == "onnx":
        return onnx_module(weights, device)
    raise RuntimeError(f"unknown model format {model_format!r}; expected one of {MODEL_FORMATS}")


class HandlerMetrics:
    """Per-batch timings and counts as TorchServe custom metrics (Prometheus with model_metrics_auto_detect)."""

    GAUGES = {
        "ServekitPreprocessMs": "ms",
        "ServekitInferenceMs": "ms",
        "ServekitPostprocessMs": "ms",
        "ServekitBatchSize": "count",
    }
    COUNTERS = {"ServekitRejectedRequests": "count"}

    def __init__(self, cache, model_name: str):
        self.cache = cache
        self.model_name = model_name
        self.metrics: dict[str, Any] = {}

    def record(self, name: str, value: float) -> None:
        if self.cache is None:
            return
        try:
            metric = self.metrics.get(name)
            if metric is None:
                from ts.metrics.metric_type_enum import MetricTypes

                kind = MetricTypes.COUNTER if name in self.COUNTERS else MetricTypes.GAUGE
                unit = {**self.GAUGES, **self.COUNTERS}[name]
                metric = self.cache.add_metric_to_cache(name, unit, ["ModelName"], kind)
                self.metrics[name] = metric
            metric.add_or_update(value, [self.model_name])
        except Exception:  # a metric must never fail a request
            logger.warning("could not record metric %s", name, exc_info=True)


def model_failure(exc: Exception) -> RequestError:
    """The answer to a request whose input the model raised on (logged with its traceback)."""
    logger.warning("the model failed on one request's input", exc_info=exc)
    message = (str(exc).strip().splitlines() or [""])[-1]  # TorchScript puts its own traceback first
    detail = f"the model raised {type(exc).__name__} on this input: {message[:200]}"
    return RequestError("inference_failed", detail, 500)


# The handler ----------------------------------------------------------------------------------------------------
class ServekitHandler(BaseHandler):
    """Batch loop with per-request errors; subclasses decode, collate and encode."""

    content_types: tuple[str, ...] = ("application/json",)
    v2_output_names: tuple[str, ...] = ("output",)

    def initialize(self, context) -> None:
        properties = context.system_properties
        self.context = context
        self.envelope = take_over_envelope(self)
        self.model_dir = Path(properties["model_dir"])
        self.manifest = context.manifest or {}
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.config = {**DEFAULT_CONFIG, **(yaml_config.get("handler") or {})}
        self.allowed_content_types = list(self.config.get("allowed_content_types") or self.content_types)
        if self.config.get("torch_threads"):
            torch.set_num_threads(int(self.config["torch_threads"]))
        self.device = select_device(properties)
        refuse_wrong_device(self.config.get("device"), self.device, self.config)
        self.definitions = load_module_from_file(self.archive_file("modelFile"), "servekit_archive_models")
        self.setup()
        model = load_model(
            self.config["format"], self.archive_file("serializedFile"), self.definitions, self.config, self.device
        )
        self.dtype = FLOAT_DTYPES[self.config.get("dtype", "float32")]
        # channels_last speeds up convolutions on CUDA and on the CPU (oneDNN: SimpleCNN 2.0x at batch 8,
        # resnet18 at 224 px 1.3x, one thread).
        self.channels_last = runs_channels_last(self.config, self.device.type)
        layout = {"memory_format": torch.channels_last} if self.channels_last else {}
        if self.config["format"] == "state_dict":
            model = model.to(self.device, self.dtype, **layout)
        else:
            model = model.to(self.device, **layout)
        # Exported programs refuse .eval(): they were exported in eval mode.
        self.model = model if self.config["format"] == "export" else model.eval()
        if self.channels_last and not self.takes_channels_last():
            logger.warning(
                "%s runs NCHW: it raised on a channels_last batch (e.g. `.view` after a convolution; `.reshape` or "
                "`torch.flatten` take both layouts)",
                type(self).__name__,
            )
            self.channels_last = False
            self.model = self.model.to(memory_format=torch.contiguous_format)
        if self.config["compile"]:
            options = self.config["compile"] if isinstance(self.config["compile"], dict) else {}
            self.model = torch.compile(self.model, **options)
        self.graphs: BucketedModel | None = None
        self.model_name = getattr(context, "model_name", None) or self.manifest.get("model", {}).get("modelName", "")
        self.model_version = self.manifest.get("model", {}).get("modelVersion", "")
        self.handler_metrics = HandlerMetrics(getattr(context, "metrics", None), self.model_name)
        self.profile_left = int(os.environ.get("SERVEKIT_PROFILE") or 0)
        for _ in range(int(self.config["warmup"])):
            self.forward(self.collate(self.example_samples(int(properties.get("batch_size") or 1))))
        self.graphs = self.capture_graphs([int(size) for size in self.config["cuda_graphs"] or []])
        self.initialized = True
        logger.info("%s ready: %s on %s", type(self).__name__, self.config["format"], self.device)

    # Hooks for subclasses ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Reads what the handler needs besides the model (labels, vocabulary, transforms)."""

    def decode_request(self, payload: Any, content_type: str) -> Decoded:
        raise NotImplementedError

    def encode_response(self, outputs: torch.Tensor, many: bool) -> Any:
        raise NotImplementedError

    def decode_instance(self, value: Any, what: str) -> Any:
        """One KServe v1 instance (also each instance of a v2 input, see `decode_v2_input`) -> one sample."""
        raise RequestError("unsupported_protocol", f"{type(self).__name__} does not implement decode_instance", 501)

    def decode_v2_input(self, tensor: V2Tensor) -> list:
        """One v2 input -> its samples: each instance along the first dimension, decoded like a v1 instance (a
        BYTES element, or the nested lists of one row of a numeric tensor)."""
        return [self.decode_instance(row, f'input "{tensor.name}"[{i}]') for i, row in enumerate(tensor.rows())]

    def encode_predictions(self, outputs: torch.Tensor) -> list:
        """One answer per row of outputs: the v1 `predictions`."""
        return [row.tolist() for row in outputs]

    def v2_outputs(self, outputs: torch.Tensor) -> list[dict]:
        """One request's rows of outputs -> its v2 output tensors (named in `v2_output_names`)."""
        return [v2_tensor("output", "FP32", outputs.float())]

    def takes_channels_last(self) -> bool:
        """The model runs on an example image batch laid out channels_last (True when there is no example)."""
        try:
            batch = self.collate(self.example_samples(1))
        except NotImplementedError:
            return True
        return batch.dim() != 4 or takes_channels_last(self.model, to_device(batch, self.device, self.dtype))

    def example_samples(self, count: int) -> list:
        """Inputs for warm-up passes."""
        raise NotImplementedError(f"{type(self).__name__} has no example inputs: set handler.warmup to 0")

    def finish_decoding(self, requests: list[Decoded]) -> list[Decoded | RequestError]:
        """The batch's decoded requests, with any work left for the whole batch done (one batched image decode on
        the device); a request that fails it gets its own RequestError. Counted in the batch's preprocess time."""
        return requests

    def collate(self, samples: list) -> torch.Tensor:
        return torch.cat(samples)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """One pass over the batch on the worker's device (floating inputs in the model's dtype), float32 out."""
        batch = self.model_input(batch)
        with torch.inference_mode():
            outputs = self.graphs(batch) if self.graphs is not None else self.model(batch)
            return outputs.float().cpu()

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """The batch on the worker's device, floating inputs in the model's dtype, images channels_last."""
        batch = to_device(batch, self.device, self.dtype)
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def capture_graphs(self, buckets: list[int]) -> BucketedModel | None:
        """The model as CUDA graphs, one per batch-size bucket (handler.cuda_graphs); None when off, on a CPU
        worker, or when the model cannot be captured (logged: the worker then serves eagerly)."""
        if not buckets:
            return None
        if self.device.type != "cuda":
            logger.info("handler.cuda_graphs %s ignored: this worker runs on %s", buckets, self.device)
            return None
        if any(size < 1 for size in buckets):
            raise RuntimeError(f"handler.cuda_graphs is {buckets}; expected positive batch sizes")
        example = self.model_input(self.collate(self.example_samples(1)))
        try:
            runners = capture_cuda_graphs(self.model, example, buckets, self.channels_last)
        except Exception:
            logger.warning("could not capture CUDA graphs for %s: serving eagerly", buckets, exc_info=True)
            return None
        logger.info("captured CUDA graphs for batch sizes %s", sorted(runners))
        return BucketedModel(runners, self.model)

    # Helpers for subclasses -------------------------------------------------------------------------------------
    def archive_file(self, manifest_key: str) -> Path:
        name = self.manifest.get("model", {}).get(manifest_key)
        if not name:
            raise RuntimeError(f"the archive's manifest has no {manifest_key}: build it with servekit build")
        return self.model_dir / name

    def read_labels(self, file_name: str = "labels.json") -> list[str]:
        labels = json.loads((self.model_dir / file_name).read_text())
        if isinstance(labels, dict):  # {"0": "zero", ...} as TorchServe's index_to_name.json
            labels = [labels[str(i)] for i in range(len(labels))]
        return [str(label) for label in labels]

    # The batch loop ---------------------------------------------------------------------------------------------
    def handle(self, data: list[dict], context) -> list[Any]:
        """One answer per request, in order; one forward pass for all good requests of the batch.

        With SERVEKIT_PROFILE=N in the worker's environment, the first N batches run under torch.profiler and each
        writes a Chrome trace (chrome://tracing, Perfetto) to SERVEKIT_PROFILE_DIR (default: the temp dir).
        """
        if self.profile_left > 0:
            self.profile_left -= 1
            return self.profiled(data, context)
        return self.handle_batch(data, context)

    def profiled(self, data: list[dict], context) -> list[Any]:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, record_shapes=True) as profile:
            answers = self.handle_batch(data, context)
        folder = Path(os.environ.get("SERVEKIT_PROFILE_DIR") or tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.model_name}-{os.getpid()}-{int(time.time() * 1000)}.json"
        profile.export_chrome_trace(str(path))
        logger.info("wrote torch.profiler trace %s", path)
        return answers

    def handle_batch(self, data: list[dict], context) -> list[Any]:
        started = time.perf_counter()
        answers: list[Any] = [None] * len(data)
        accepted: list[tuple[int, Decoded]] = []
        for idx, request in enumerate(data):
            protocol = request_protocol(context, idx, self.envelope, request.get("body", request.get("data")))
            try:
                accepted.append((idx, self.decode_one(context, idx, request, protocol)))
            except RequestError as exc:
                answers[idx] = self.reject(context, idx, exc, protocol)
        finished = self.finish_decoding([decoded for _, decoded in accepted])
        ready: list[tuple[int, Decoded]] = []
        for (idx, decoded), result in zip(accepted, finished, strict=True):
            if isinstance(result, RequestError):
                answers[idx] = self.reject(context, idx, result, decoded.protocol)
            else:
                ready.append((idx, result))
        accepted = ready
        decoded_at = time.perf_counter()
        results = self.infer([decoded for _, decoded in accepted])
        inferred_at = time.perf_counter()
        for (idx, decoded), result in zip(accepted, results, strict=True):
            if isinstance(result, RequestError):
                answers[idx] = self.reject(context, idx, result, decoded.protocol)
            else:
                answers[idx] = self.encode(context, idx, decoded, result)
        samples = sum(len(decoded.samples) for _, decoded in accepted)
        timings = {
            "preprocess_ms": round((decoded_at - started) * 1000, 3),
            "inference_ms": round((inferred_at - decoded_at) * 1000, 3),
            "postprocess_ms": round((time.perf_counter() - inferred_at) * 1000, 3),
        }
        metrics = self.handler_metrics
        metrics.record("ServekitPreprocessMs", timings["preprocess_ms"])
        metrics.record("ServekitInferenceMs", timings["inference_ms"])
        metrics.record("ServekitPostprocessMs", timings["postprocess_ms"])
        metrics.record("ServekitBatchSize", samples)
        if len(accepted) < len(data):
            metrics.record("ServekitRejectedRequests", len(data) - len(accepted))
        for idx, _ in accepted:  # what this request's batch cost the model, for clients comparing versions
            context.set_response_header(idx, "X-Servekit-Batch-Samples", str(samples))
            context.set_response_header(idx, "X-Servekit-Inference-Ms", f"{timings['inference_ms']:.3f}")
        request_ids = getattr(context, "request_ids", None) or {}
        logger.info(
            json.dumps(
                {
                    "event": "servekit_batch",
                    "model": self.model_name,
                    "version": self.model_version,
                    "request_ids": [request_ids.get(i) for i in range(len(data))],
                    "requests": len(data),
                    "samples": samples,
                    "rejected": len(data) - len(accepted),
                    **timings,
                }
            )
        )
        return answers

    def infer(self, requests: list[Decoded]) -> list[torch.Tensor | RequestError]:
        """Each request's rows of outputs, from one forward pass over the batch. When that pass raises, each request
        runs alone: an input the model fails on costs its own request a 500, never its neighbours' answers."""
        samples = [sample for decoded in requests for sample in decoded.samples]
        if not samples:
            return []
        try:
            outputs = self.forward(self.collate(samples))
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise  # TorchServe answers 507 for the batch
        except Exception as exc:
            if len(requests) == 1:
                return [model_failure(exc)]
            logger.warning("the forward pass of a batch failed; running its %d requests alone", len(requests))
            return [self.infer_alone(decoded) for decoded in requests]
        return list(outputs.split([len(decoded.samples) for decoded in requests]))

    def infer_alone(self, decoded: Decoded) -> torch.Tensor | RequestError:
        try:
            return self.forward(self.collate(decoded.samples))
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:
            return model_failure(exc)

    def decode_one(self, context, idx: int, request: dict, protocol: str = "plain") -> Decoded:
        payload = request_payload(request)
        max_items = int(self.config["max_inputs_per_request"])
        if protocol == "v1":
            instances = v1_instances(parse_json(payload), max_items)
            samples = [self.decode_instance(value, f"instance {i}") for i, value in enumerate(instances)]
            return Decoded(samples, many=True, protocol="v1")
        if protocol == "v2":
            request_v2 = v2_request(parse_json(payload), max_items, self.v2_output_names)
            samples = [sample for tensor in request_v2.inputs for sample in self.decode_v2_input(tensor)]
            return Decoded(samples, many=True, protocol="v2", v2=request_v2)
        content_type = request_content_type(context, idx, request, payload)
        if not content_type_allowed(content_type, self.allowed_content_types):
            raise RequestError(
                "unsupported_media_type",
                f"Content-Type {content_type!r} is not accepted; send one of {', '.join(self.allowed_content_types)}",
                415,
            )
        if isinstance(payload, (bytes, bytearray, str)) and len(payload) > self.config["max_body_bytes"]:
            raise RequestError(
                "payload_too_large",
                f"the body has {len(payload)} bytes; the limit is {self.config['max_body_bytes']}",
                413,
            )
        return self.decode_request(payload, content_type)

    def encode(self, context, idx: int, decoded: Decoded, outputs: torch.Tensor) -> Any:
        """One request's answer in its protocol."""
        if decoded.protocol == "v1":
            return {"predictions": self.encode_predictions(outputs)}
        if decoded.protocol == "v2":
            tensors = self.v2_outputs(outputs)
            if decoded.v2.output_names is not None:
                tensors = [t for t in tensors if t["name"] in decoded.v2.output_names]
            request_ids = getattr(context, "request_ids", None) or {}
            return {
                "model_name": self.model_name,
                "model_version": self.model_version,
                "id": decoded.v2.request_id or request_ids.get(idx) or "",
                "outputs": tensors,
            }
        return self.encode_response(outputs, decoded.many)

    @staticmethod
    def reject(context, idx: int, exc: RequestError, protocol: str = "plain") -> dict:
        logger.info("request %s rejected with %s: %s", idx, exc.status, exc.detail)
        context.set_response_status(exc.status, HTTPStatus(exc.status).phrase, idx)
        return exc.body(protocol)


class ClassifierHandler(ServekitHandler):
    """Models whose outputs are logits over the archive's labels.json: each answer is the label, its index and the
    top-k probabilities (`handler.top_k`); in v2, tensors `label` [n], `index` [n] and `probabilities` [n, classes]."""

    v2_output_names = ("label", "index", "probabilities")

    def setup(self) -> None:
        self.labels = self.read_labels()

    def encode_predictions(self, outputs: torch.Tensor) -> list:
        return [classification(row, self.labels, int(self.config["top_k"])) for row in outputs]

    def encode_response(self, outputs: torch.Tensor, many: bool) -> Any:
        answers = self.encode_predictions(outputs)
        return answers if many else answers[0]

    def v2_outputs(self, outputs: torch.Tensor) -> list[dict]:
        probabilities = torch.softmax(outputs.float(), dim=-1)
        indices = probabilities.argmax(dim=-1)
        return [
            v2_tensor("label", "BYTES", [self.labels[i] for i in indices.tolist()]),
            v2_tensor("index", "INT64", indices),
            v2_tensor("probabilities", "FP32", probabilities),
        ]
