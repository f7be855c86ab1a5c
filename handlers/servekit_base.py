"""Shared machinery for servekit's TorchServe handlers.

Runs inside TorchServe workers: imports only torch, the standard library, Pillow and `ts`. Each handler
subclasses `ServekitHandler` and supplies plain hooks, every one callable from a unit test:

    decode_request(payload, content_type) -> Decoded   one request's body -> its samples
    collate(samples) -> Tensor                          samples of the whole batch -> one model input
    encode_response(outputs, many) -> object            one request's rows of outputs -> its JSON answer

`handle` does the rest: a bad request gets its own 4xx JSON answer, the good ones in the same batch are still
answered with one forward pass, and the worker never dies for a client's mistake.

The archive's `model-config.yaml` drives everything under its `handler:` section: the model `format`
(state_dict, torchscript, export, aoti, onnx), limits, allowed content types, `compile`, `warmup`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
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
}
MODEL_FORMATS = ("state_dict", "torchscript", "export", "aoti", "onnx")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """One request's samples, each ready for `collate`; `many` says the client sent a list."""

    samples: list = field(default_factory=list)
    many: bool = False


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


def open_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes fully, refusing decompression bombs before any pixel is allocated."""
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width * height > max_pixels:
            raise RequestError(
                "image_too_large", f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
        image.load()
    except RequestError:
        raise
    except Image.DecompressionBombError as exc:
        raise RequestError("image_too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise RequestError("invalid_image", "the body is not an image Pillow can read (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise RequestError("invalid_image", f"cannot decode the image: {exc}") from None
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
    if len(items) > max_items:
        raise RequestError("too_many_inputs", f'"{many}" has {len(items)} items; the limit is {max_items}', 413)
    return items, True


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
        built_for = config.get("aoti_device", "cpu")
        if built_for != device.type:
            raise RuntimeError(f"this AOTInductor package was built for {built_for}, the worker runs on {device}")
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


# The handler ----------------------------------------------------------------------------------------------------
class ServekitHandler(BaseHandler):
    """Batch loop with per-request errors; subclasses decode, collate and encode."""

    content_types: tuple[str, ...] = ("application/json",)

    def initialize(self, context) -> None:
        properties = context.system_properties
        self.context = context
        self.model_dir = Path(properties["model_dir"])
        self.manifest = context.manifest or {}
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.config = {**DEFAULT_CONFIG, **(yaml_config.get("handler") or {})}
        self.allowed_content_types = list(self.config.get("allowed_content_types") or self.content_types)
        if self.config.get("torch_threads"):
            torch.set_num_threads(int(self.config["torch_threads"]))
        self.device = select_device(properties)
        self.definitions = load_module_from_file(self.archive_file("modelFile"), "servekit_archive_models")
        self.setup()
        model = load_model(
            self.config["format"], self.archive_file("serializedFile"), self.definitions, self.config, self.device
        )
        self.dtype = FLOAT_DTYPES[self.config.get("dtype", "float32")]
        model = model.to(self.device, self.dtype) if self.config["format"] == "state_dict" else model.to(self.device)
        # Exported programs refuse .eval(): they were exported in eval mode.
        self.model = model if self.config["format"] == "export" else model.eval()
        if self.config["compile"]:
            options = self.config["compile"] if isinstance(self.config["compile"], dict) else {}
            self.model = torch.compile(self.model, **options)
        self.model_name = getattr(context, "model_name", None) or self.manifest.get("model", {}).get("modelName", "")
        self.model_version = self.manifest.get("model", {}).get("modelVersion", "")
        self.handler_metrics = HandlerMetrics(getattr(context, "metrics", None), self.model_name)
        self.profile_left = int(os.environ.get("SERVEKIT_PROFILE") or 0)
        for _ in range(int(self.config["warmup"])):
            self.forward(self.collate(self.example_samples(int(properties.get("batch_size") or 1))))
        self.initialized = True
        logger.info("%s ready: %s on %s", type(self).__name__, self.config["format"], self.device)

    # Hooks for subclasses ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Reads what the handler needs besides the model (labels, vocabulary, transforms)."""

    def decode_request(self, payload: Any, content_type: str) -> Decoded:
        raise NotImplementedError

    def encode_response(self, outputs: torch.Tensor, many: bool) -> Any:
        raise NotImplementedError

    def example_samples(self, count: int) -> list:
        """Inputs for warm-up passes."""
        raise NotImplementedError(f"{type(self).__name__} has no example inputs: set handler.warmup to 0")

    def collate(self, samples: list) -> torch.Tensor:
        return torch.cat(samples)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """One pass over the batch on the worker's device (floating inputs in the model's dtype), float32 out."""
        batch = batch.to(self.device, self.dtype) if batch.is_floating_point() else batch.to(self.device)
        with torch.inference_mode():
            return self.model(batch).float().cpu()

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
            try:
                accepted.append((idx, self.decode_one(context, idx, request)))
            except RequestError as exc:
                answers[idx] = self.reject(context, idx, exc)
        decoded_at = time.perf_counter()
        samples = [sample for _, decoded in accepted for sample in decoded.samples]
        outputs = self.forward(self.collate(samples)) if samples else None
        inferred_at = time.perf_counter()
        start = 0
        for idx, decoded in accepted:
            count = len(decoded.samples)
            answers[idx] = self.encode_response(outputs[start : start + count], decoded.many)
            start += count
        timings = {
            "preprocess_ms": round((decoded_at - started) * 1000, 3),
            "inference_ms": round((inferred_at - decoded_at) * 1000, 3),
            "postprocess_ms": round((time.perf_counter() - inferred_at) * 1000, 3),
        }
        metrics = self.handler_metrics
        metrics.record("ServekitPreprocessMs", timings["preprocess_ms"])
        metrics.record("ServekitInferenceMs", timings["inference_ms"])
        metrics.record("ServekitPostprocessMs", timings["postprocess_ms"])
        metrics.record("ServekitBatchSize", len(samples))
        if len(accepted) < len(data):
            metrics.record("ServekitRejectedRequests", len(data) - len(accepted))
        for idx, _ in accepted:  # what this request's batch cost the model, for clients comparing versions
            context.set_response_header(idx, "X-Servekit-Batch-Samples", str(len(samples)))
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
                    "samples": len(samples),
                    "rejected": len(data) - len(accepted),
                    **timings,
                }
            )
        )
        return answers

    def decode_one(self, context, idx: int, request: dict) -> Decoded:
        payload = request_payload(request)
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

    @staticmethod
    def reject(context, idx: int, exc: RequestError) -> dict:
        logger.info("request %s rejected with %s: %s", idx, exc.status, exc.detail)
        context.set_response_status(exc.status, HTTPStatus(exc.status).phrase, idx)
        return exc.body()
