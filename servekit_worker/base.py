"""The handler every servekit model runs on, whatever the runtime: it gets a model ready in named steps, then answers
each batch of requests with one forward pass, each request in its own protocol and a bad one with its own error.

A subclass supplies plain hooks, each callable from a unit test:

    setup()                                  what it needs besides the model: labels, vocabulary, transforms
    decode_request(payload, content_type)    one plain request's body -> its Decoded samples
    decode_instance(value, what)             one KServe v1 instance (and each v2 instance) -> one sample
    collate(samples) -> Tensor               the samples of the whole batch -> one model input
    encode_response(outputs, many)           one plain request's rows of outputs -> its JSON answer
    encode_predictions(outputs)              ... -> its v1 predictions
    v2_outputs(outputs)                      ... -> its v2 output tensors, named in `v2_output_names`
    example_samples(count)                   inputs for warm-up, the layout check and CUDA-graph capture

A runtime adapter (servekit_worker.torchserve) hands `start` a Worker, turns its requests into Requests, calls
`answer_batch`, and sends each Answer with its status and headers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from servekit_worker.acceleration import (
    BucketedModel,
    capture_cuda_graphs,
    runs_channels_last,
    takes_channels_last,
    to_device,
)
from servekit_worker.answers import CLASSIFIER_OUTPUTS, classification, classifier_v2_outputs, label_list
from servekit_worker.errors import RequestError, model_failure
from servekit_worker.kserve import V2Tensor, v2_tensor
from servekit_worker.loading import format_named, refuse_wrong_device, select_device
from servekit_worker.requests import Answer, Decoded, Protocol, Request
from servekit_worker.settings import with_defaults
from servekit_worker.telemetry import (
    BatchProfiler,
    BatchReport,
    BatchTimer,
    MetricSink,
    MetricsObserver,
    add_timing_headers,
    log_batch,
)
from servekit_worker.tensors import MODEL_DTYPES, dtype_named

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    """What a runtime tells a handler about its model and where it runs."""

    model_dir: Path  # the unpacked archive
    weights: Path  # the serialized model, in the format handler settings name
    settings: dict  # the archive's handler settings (model-config.yaml `handler:`)
    model_name: str = ""
    model_version: str = ""
    gpu_id: int | None = None  # the GPU the runtime assigned (None: the CPU)
    batch_size: int = 1  # the runtime's largest batch (the size of warm-up batches)
    metrics: MetricSink = field(default_factory=MetricSink)


class ServekitHandler:
    """Batch loop with per-request errors; subclasses decode, collate and encode."""

    content_types: tuple[str, ...] = ("application/json",)
    v2_output_names: tuple[str, ...] = ("output",)

    # Getting ready ------------------------------------------------------------------------------------------------
    def start(self, worker: Worker) -> None:
        """Gets the model ready to answer, one step a method."""
        self.read_settings(worker)
        self.place(worker.gpu_id)
        self.setup()
        self.load(worker.weights)
        self.compile_model()
        self.warm_up(worker.batch_size)
        self.graphs = self.capture_graphs([int(size) for size in self.config["cuda_graphs"] or []])
        name, code = type(self).__name__, Path(__file__).resolve().parent  # under a runtime: the archive's own copy
        logger.info("%s ready: %s on %s (worker code %s)", name, self.config["format"], self.device, code)

    def read_settings(self, worker: Worker) -> None:
        """The archive's settings, the model's dtype, torch's threads, and where each batch is reported."""
        self.model_dir, self.model_name, self.model_version = worker.model_dir, worker.model_name, worker.model_version
        self.config = with_defaults(worker.settings)
        self.allowed_content_types = list(self.config.get("allowed_content_types") or self.content_types)
        self.model_dtype = dtype_named(self.config["dtype"], "handler.dtype", MODEL_DTYPES)
        if self.config.get("torch_threads"):
            torch.set_num_threads(int(self.config["torch_threads"]))
        self.handler_metrics = worker.metrics
        metrics = MetricsObserver(worker.metrics, float(self.config["metrics_interval_ms"]) / 1000)
        self.batch_observers = [metrics, add_timing_headers, *([log_batch] if self.config["log_batches"] else [])]
        self.graphs: BucketedModel | None = None

    def place(self, gpu_id: int | None) -> None:
        """The worker's device: the runtime's GPU when CUDA works here; a variant built for another is refused."""
        self.device = select_device(gpu_id)
        refuse_wrong_device(self.config.get("device"), self.device, self.config)
        self.profiler = BatchProfiler(self.model_name, self.device.type == "cuda")

    def load(self, weights: Path) -> None:
        """The model on the device, eager weights in the model's dtype, laid out channels_last where the worker lays
        its format out so and the model runs on such a batch (channels_last speeds up convolutions on CUDA and on
        the CPU: oneDNN ran SimpleCNN 2.0x at batch 8, resnet18 at 224 px 1.3x, one thread)."""
        model_format = format_named(self.config["format"])
        model = model_format.load(weights, self.device, self.config)
        self.channels_last = runs_channels_last(self.config, self.device.type)
        dtype = (self.model_dtype,) if model_format.takes_dtype else ()
        layout = {"memory_format": torch.channels_last} if self.channels_last else {}
        self.model = model.to(self.device, *dtype, **layout)
        if self.channels_last and not self.takes_channels_last():
            logger.warning(
                "%s runs NCHW: it raised on a channels_last batch (e.g. `.view` after a convolution; `.reshape` or "
                "`torch.flatten` take both layouts)",
                type(self).__name__,
            )
            self.channels_last = False
            self.model = self.model.to(memory_format=torch.contiguous_format)

    def compile_model(self) -> None:
        if self.config["compile"]:
            options = self.config["compile"] if isinstance(self.config["compile"], dict) else {}
            self.model = torch.compile(self.model, **options)

    def warm_up(self, batch_size: int) -> None:
        for _ in range(int(self.config["warmup"])):
            self.forward(self.collate(self.example_samples(batch_size)))

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

    def takes_channels_last(self) -> bool:
        """The model runs on an example image batch laid out channels_last (True when there is no example)."""
        try:
            batch = self.collate(self.example_samples(1))
        except NotImplementedError:
            return True
        return batch.dim() != 4 or takes_channels_last(self.model, to_device(batch, self.device, self.model_dtype))

    # Hooks for subclasses -----------------------------------------------------------------------------------------
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
        batch = to_device(batch, self.device, self.model_dtype)
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    # Helpers for subclasses ---------------------------------------------------------------------------------------
    @property
    def max_inputs(self) -> int:
        """handler.max_inputs_per_request: the most samples one request may hold."""
        return int(self.config["max_inputs_per_request"])

    @property
    def max_pixels(self) -> int:
        return int(self.config["max_image_pixels"])

    def read_labels(self, file_name: str = "labels.json") -> list[str]:
        return label_list(json.loads((self.model_dir / file_name).read_text()))

    # The batch loop -----------------------------------------------------------------------------------------------
    def answer_batch(self, requests: list[Request]) -> list[Answer]:
        """One answer per request, in order; one forward pass for all good requests of the batch."""
        with self.profiler.batch():
            timer = BatchTimer()
            answers: list[Answer | None] = [None] * len(requests)
            decoded = self.decode_batch(requests, answers)
            timer.lap()
            results = self.infer([request for _, request in decoded])
            timer.lap()
            for (idx, request), result in zip(decoded, results, strict=True):
                answers[idx] = self.answer(idx, request, result)
            timer.lap()
            ids, accepted = [request.request_id for request in requests], [idx for idx, _ in decoded]
            samples = sum(len(request.samples) for _, request in decoded)
            report = BatchReport(self.model_name, self.model_version, ids, accepted, samples, *timer.laps_ms())
            for observe in self.batch_observers:
                observe(report, answers)
            return answers

    def decode_batch(self, requests: list[Request], answers: list[Answer | None]) -> list[tuple[int, Decoded]]:
        """Each request decoded by its protocol, then the work left for the whole batch done (`finish_decoding`);
        a request that fails either gets its error answer in `answers` and is left out."""
        accepted: list[tuple[int, Decoded]] = []
        for idx, request in enumerate(requests):
            try:
                accepted.append((idx, request.protocol.decode(self, request)))
            except RequestError as exc:
                answers[idx] = self.reject(idx, request.protocol, exc)
        finished = self.finish_decoding([decoded for _, decoded in accepted])
        ready = []
        for (idx, decoded), result in zip(accepted, finished, strict=True):
            if isinstance(result, RequestError):
                answers[idx] = self.reject(idx, decoded.protocol, result)
            else:
                ready.append((idx, result))
        return ready

    def infer(self, requests: list[Decoded]) -> list[torch.Tensor | RequestError]:
        """Each request's rows of outputs, from one forward pass over the batch. When that pass raises, each request
        runs alone: an input the model fails on costs its own request a 500, never its neighbours' answers."""
        samples = [sample for decoded in requests for sample in decoded.samples]
        if not samples:
            return []
        try:
            outputs = self.forward(self.collate(samples))
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise  # the runtime answers the whole batch (TorchServe: 507)
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

    def answer(self, idx: int, decoded: Decoded, result: torch.Tensor | RequestError) -> Answer:
        """A request's answer in its protocol: its rows of outputs encoded, or the error the model failed it with."""
        if isinstance(result, RequestError):
            return self.reject(idx, decoded.protocol, result)
        return Answer(decoded.protocol.encode(self, decoded, result))

    @staticmethod
    def reject(idx: int, protocol: Protocol, error: RequestError) -> Answer:
        logger.info("request %s rejected with %s: %s", idx, error.status, error.detail)
        return Answer(protocol.error_body(error), error.status)


class ClassifierHandler(ServekitHandler):
    """Models whose outputs are logits over the archive's labels.json: each answer is the label, its index and the
    top-k probabilities (`handler.top_k`); in v2, tensors `label` [n], `index` [n] and `probabilities` [n, classes]."""

    v2_output_names = CLASSIFIER_OUTPUTS

    def setup(self) -> None:
        self.labels = self.read_labels()

    def encode_predictions(self, outputs: torch.Tensor) -> list:
        return [classification(row, self.labels, int(self.config["top_k"])) for row in outputs]

    def encode_response(self, outputs: torch.Tensor, many: bool) -> Any:
        answers = self.encode_predictions(outputs)
        return answers if many else answers[0]

    def v2_outputs(self, outputs: torch.Tensor) -> list[dict]:
        return classifier_v2_outputs(outputs, self.labels)
