"""TorchServe's worker API on a servekit handler: the one module that knows TorchServe's context, its request dicts,
the headers its routes set, its KServe envelopes and its metrics cache (`ts` is imported only where those are used).

An archive's handler file subclasses TorchServeHandler and a servekit handler, in this order:

    class DigitsHandler(TorchServeHandler, digits.DigitsHandler):
        '''The digits handler on TorchServe.'''
"""

from __future__ import annotations

import logging
import sys
from http import HTTPStatus
from pathlib import Path
from typing import Any

from servekit_worker.base import ServekitHandler, Worker
from servekit_worker.kserve import ENVELOPES, sniffed
from servekit_worker.requests import PLAIN, Protocol, Request
from servekit_worker.telemetry import COUNTERS, GAUGES, MetricSink

logger = logging.getLogger(__name__)


class TorchServeMetrics(MetricSink):
    """Handler metrics as TorchServe custom metrics (Prometheus with model_metrics_auto_detect), by ModelName."""

    def __init__(self, cache: Any, model_name: str):
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

                kind = MetricTypes.COUNTER if name in COUNTERS else MetricTypes.GAUGE
                metric = self.cache.add_metric_to_cache(name, {**GAUGES, **COUNTERS}[name], ["ModelName"], kind)
                self.metrics[name] = metric
            metric.add_or_update(value, [self.model_name])
        except Exception:  # a metric must never fail a request
            logger.warning("could not record metric %s", name, exc_info=True)


def request_payload(request: dict) -> Any:
    """The body of one TorchServe request (raw bytes, a str, or JSON the worker decoded); None when it has none."""
    for key in ("data", "body"):
        if key in request and request[key] is not None:
            return request[key]
    values = [value for value in request.values() if value]
    return values[0] if len(values) == 1 else None  # a multipart upload with a single field of another name


def request_header(context: Any, idx: int, name: str) -> Any:
    try:
        return context.get_request_header(idx, name)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def request_content_type(context: Any, idx: int, request: dict, payload: Any) -> str:
    """The media type of one request's body ('' when the client sent none), without parameters."""
    if isinstance(payload, (dict, list)):
        return "application/json"
    for name in request:
        header = request_header(context, idx, name)
        if isinstance(header, dict) and header.get("content-type"):
            return header["content-type"].split(";")[0].strip().lower()
    return "text/plain" if isinstance(payload, str) else ""  # the worker decodes only text/* bodies to str


def request_protocol(context: Any, idx: int, envelope: str | None, payload: Any) -> Protocol:
    """servekit's own API, or KServe's v1 or v2.

    TorchServe 0.12's frontend marks `/predictions` requests with a `url_path` header and its KServe routes
    (`/v1/models/NAME:predict`, `/v2/models/NAME/infer`) with an `explain` header alone; gRPC requests carry
    neither and are served as `/predictions`. On a KServe route the envelope names the protocol; without one, a
    body with "inputs" is v2 and anything else v1.
    """
    if request_header(context, idx, "url_path") is not None or request_header(context, idx, "explain") is None:
        return PLAIN
    return ENVELOPES.get(envelope) or sniffed(payload)


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
                if name in ENVELOPES:
                    value._entry_point = envelope._handle_fn
                    logger.info("serving KServe %s without TorchServe's %s envelope", ENVELOPES[name].name, name)
                return name
        frame = frame.f_back
    return None


class TorchServeHandler(ServekitHandler):
    """TorchServe's `initialize(context)` and `handle(data, context)` on a servekit handler: a bad request gets its
    own status and error body, the good ones of its batch are answered by one forward pass."""

    def initialize(self, context: Any) -> None:
        self.envelope = take_over_envelope(self)
        self.manifest = context.manifest or {}
        model = self.manifest.get("model", {})
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        if not model.get("serializedFile"):
            raise RuntimeError("the archive's manifest has no serializedFile: build it with servekit build")
        name = getattr(context, "model_name", None) or model.get("modelName", "")
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        worker = Worker(
            model_dir=model_dir,
            weights=model_dir / model["serializedFile"],
            settings=yaml_config.get("handler") or {},
            model_name=name,
            model_version=model.get("modelVersion", ""),
            gpu_id=properties.get("gpu_id"),
            batch_size=int(properties.get("batch_size") or 1),
            metrics=TorchServeMetrics(getattr(context, "metrics", None), name),
        )
        self.start(worker)

    def handle(self, data: list[dict], context: Any) -> list[Any]:
        """One answer per request, in order; statuses and headers set on the context."""
        request_ids = getattr(context, "request_ids", None) or {}
        requests = []
        for idx, request in enumerate(data):
            payload = request_payload(request)
            protocol = request_protocol(context, idx, self.envelope, request.get("body", request.get("data")))
            content_type = request_content_type(context, idx, request, payload)
            requests.append(Request(payload, content_type, protocol, request_ids.get(idx)))
        answers = self.answer_batch(requests)
        for idx, answer in enumerate(answers):
            if answer.status != HTTPStatus.OK:
                context.set_response_status(answer.status, HTTPStatus(answer.status).phrase, idx)
            for header, value in answer.headers.items():
                context.set_response_header(idx, header, value)
        return [answer.body for answer in answers]
