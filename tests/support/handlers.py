"""Handlers run in this process as a TorchServe worker runs them: fake and real contexts, extracted archives."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import torch
import yaml
from digits import DigitsHandler
from image_classifier import ImageClassifierHandler
from tensor_handler import TensorHandler
from text_classifier import TextClassifierHandler
from ts.context import Context, RequestProcessor

from servekit.measure.inprocess import worker_value


class FakeRequestStatus:
    def __init__(self):
        self.code, self.phrase = None, None


class FakeContext:
    """The parts of ts.context.Context that handlers use, recording per-request statuses."""

    def __init__(self, model_dir: Path, manifest: dict, yaml_config: dict | None = None, gpu_id: int | None = None):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": gpu_id, "batch_size": 4}
        self.manifest = manifest
        self.model_yaml_config = yaml_config or {}
        self.metrics = None
        self.statuses: dict[int, tuple[int, str]] = {}
        self.content_types: dict[int, str] = {}
        self.response_headers: dict[int, dict[str, str]] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.response_headers.setdefault(idx, {})[key] = value

    def get_request_header(self, idx: int, name: str):
        """As TorchServe: each body parameter maps to {"content-type": ...}."""
        if idx in self.content_types and name in ("body", "data"):
            return {"content-type": self.content_types[idx]}
        return None


def extracted_archive(archive: Path, folder: Path) -> FakeContext:
    """Unpacks a .mar as TorchServe does and returns a context with its manifest and model-config.yaml."""
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(folder)
    manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
    return FakeContext(folder, manifest, yaml.safe_load((folder / "model-config.yaml").read_text()))


def requests_for(bodies: list[tuple[bytes, str]], context: FakeContext) -> list[dict]:
    """TorchServe's request list for (body, content type) pairs, with the context knowing the content types."""
    context.content_types = {i: content_type for i, (_, content_type) in enumerate(bodies)}
    return [{"body": worker_value(body, content_type)} for body, content_type in bodies]


def worker_context(handler, headers: list[dict]) -> Context:
    """A real ts Context for one batch, each request with its headers (as TorchServe's frontend sends them)."""
    context = Context(handler.model_name, str(handler.model_dir), handler.manifest, len(headers), None, "test")
    context.request_processor = [RequestProcessor(h) for h in headers]
    context.request_ids = {i: f"request-{i}" for i in range(len(headers))}
    return context


# What TorchServe 0.12's frontend adds: the KServe routes set `explain`, /predictions also sets `url_path`.
KSERVE_ROUTE = {"explain": "False", "body": {"content-type": "application/json"}}


def protocol_answers(handler, documents: list[dict]) -> list[tuple[int, dict]]:
    """(status, answer) of each KServe document, sent as one batch on TorchServe's KServe routes."""
    context = worker_context(handler, [KSERVE_ROUTE] * len(documents))
    answers = handler.handle([{"body": document} for document in documents], context)
    return [(context.get_response_status(i)[0], answer) for i, answer in enumerate(answers)]


POISON = 666.0  # a PoisonModel raises when a sample holds this value


class PoisonModel(torch.nn.Module):
    """Doubles its input, and raises inside forward for any batch holding the POISON value."""

    def __init__(self):
        super().__init__()
        self.poison = POISON

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if bool((batch == self.poison).any()):
            raise RuntimeError("poison input")
        return batch.flatten(1) * 2.0


def poison_trained_folder(folder: Path) -> Path:
    """A trained folder (TorchScript variant) for the tensor handler: 4-value samples, PoisonModel inside."""
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch.jit is deprecated; TorchScript is the format that can raise in forward
        warnings.simplefilter("ignore")
        torch.jit.script(PoisonModel()).save(str(folder / "model.torchscript.pt"))
    handler = {
        "format": "torchscript",
        "model_class": "PoisonModel",
        "example_input": {"shape": [4], "dtype": "float32"},
    }
    (folder / "handler.json").write_text(json.dumps(handler))
    (folder / "metrics.json").write_text(json.dumps({"weights_sha256": "poison"}))
    return folder


HANDLER_CLASSES = {
    "digits": DigitsHandler,
    "image": ImageClassifierHandler,
    "tensor": TensorHandler,
    "text": TextClassifierHandler,
}


def in_process_handlers(store: Path, tmp_path_factory) -> dict:
    """Each archive's handler initialised in this process from its .mar, as a worker does."""
    handlers = {}
    for name, handler_class in HANDLER_CLASSES.items():
        handler = handler_class()
        handler.initialize(extracted_archive(store / f"{name}-1.0.0.mar", tmp_path_factory.mktemp(name)))
        handlers[name] = handler
    return handlers


def plain_answer(handler, body: bytes, content_type: str):
    context = FakeContext(handler.model_dir, handler.manifest)
    return handler.handle(requests_for([(body, content_type)], context), context)[0]


def image_handler_with(model_store, folder, gpu_id: int | None = None, **handler_config) -> ImageClassifierHandler:
    """The image archive's handler (on GPU `gpu_id` when given), its model-config.yaml `handler:` section
    overridden by `handler_config`."""
    context = extracted_archive(model_store / "image-1.0.0.mar", folder)
    context.system_properties["gpu_id"] = gpu_id
    context.model_yaml_config.setdefault("handler", {}).update(handler_config)
    handler = ImageClassifierHandler()
    handler.initialize(context)
    return handler


def answer_batch(handler, bodies: list[tuple[bytes, str]]) -> tuple[list, dict]:
    context = FakeContext(handler.model_dir, handler.manifest)
    return handler.handle(requests_for(bodies, context), context), context.statuses
