"""What a worker tells about each batch, through observers of the batch's report: custom metrics (to whatever sink
the runtime keeps them in), two answer headers, and one JSON log line when asked for; and torch.profiler traces of
the first batches when asked for. Standard library only (torch loads when a trace is asked for).

The names below are read by servekit's library (metrics, rollout), deploy/alerts.yml and the Grafana dashboard.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from servekit_worker.requests import Answer

logger = logging.getLogger(__name__)

PREPROCESS_MS = "ServekitPreprocessMs"
INFERENCE_MS = "ServekitInferenceMs"
POSTPROCESS_MS = "ServekitPostprocessMs"
BATCH_SIZE = "ServekitBatchSize"
REJECTED_REQUESTS = "ServekitRejectedRequests"
GAUGES = {PREPROCESS_MS: "ms", INFERENCE_MS: "ms", POSTPROCESS_MS: "ms", BATCH_SIZE: "count"}
COUNTERS = {REJECTED_REQUESTS: "count"}
BATCH_SAMPLES_HEADER = "X-Servekit-Batch-Samples"  # samples in the batch that answered this request
INFERENCE_MS_HEADER = "X-Servekit-Inference-Ms"  # that batch's forward pass


class BatchTimer:
    """Laps of one batch: decoding (its preprocess), the forward pass (inference), encoding (postprocess)."""

    def __init__(self) -> None:
        self.times = [time.perf_counter()]

    def lap(self) -> None:
        self.times.append(time.perf_counter())

    def laps_ms(self) -> list[float]:
        return [round((end - start) * 1000, 3) for start, end in itertools.pairwise(self.times)]


@dataclass
class BatchReport:
    """One answered batch, as its observers see it."""

    model_name: str
    model_version: str
    request_ids: list[str | None]
    accepted: list[int]  # the requests that reached the model (answered, or failed by it)
    samples: int
    preprocess_ms: float
    inference_ms: float
    postprocess_ms: float

    @property
    def rejected(self) -> int:
        return len(self.request_ids) - len(self.accepted)


BatchObserver = Callable[[BatchReport, list[Answer]], None]


class MetricSink:
    """Where a runtime keeps a handler's metrics (TorchServe: its metrics cache); this one, outside any, keeps none."""

    def record(self, name: str, value: float) -> None:
        """Sets the gauge `name` (of GAUGES) to `value`, or adds `value` to the counter `name` (of COUNTERS)."""


class MetricsObserver:
    """A batch's timings and sample count as gauges, at most once every `interval_s` (the first batch always), and
    its rejected requests (when any) as a counter, every time.

    Each gauge is one metric line the worker prints and TorchServe's frontend parses; a gauge holds one batch's
    figures whatever the rate, so sampling them keeps what a scrape reads while a busy worker prints a few lines a
    second instead of four a batch.
    """

    def __init__(self, sink: MetricSink, interval_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.sink = sink
        self.interval_s = interval_s
        self.clock = clock
        self.last_s: float | None = None

    def __call__(self, report: BatchReport, answers: list[Answer]) -> None:
        now = self.clock()
        if self.last_s is None or now - self.last_s >= self.interval_s:
            self.last_s = now
            self.sink.record(PREPROCESS_MS, report.preprocess_ms)
            self.sink.record(INFERENCE_MS, report.inference_ms)
            self.sink.record(POSTPROCESS_MS, report.postprocess_ms)
            self.sink.record(BATCH_SIZE, report.samples)
        if report.rejected:
            self.sink.record(REJECTED_REQUESTS, report.rejected)


def add_timing_headers(report: BatchReport, answers: list[Answer]) -> None:
    """What each request's batch cost the model, for clients comparing versions (`servekit rollout`)."""
    for idx in report.accepted:
        answers[idx].headers[BATCH_SAMPLES_HEADER] = str(report.samples)
        answers[idx].headers[INFERENCE_MS_HEADER] = f"{report.inference_ms:.3f}"


def log_batch(report: BatchReport, answers: list[Answer]) -> None:
    """One structured line per batch: who asked (the runtime's request ids), how much, how long each step took."""
    line = {
        "event": "servekit_batch",
        "model": report.model_name,
        "version": report.model_version,
        "request_ids": report.request_ids,
        "requests": len(report.request_ids),
        "samples": report.samples,
        "rejected": report.rejected,
        "preprocess_ms": report.preprocess_ms,
        "inference_ms": report.inference_ms,
        "postprocess_ms": report.postprocess_ms,
    }
    logger.info(json.dumps(line))


class BatchProfiler:
    """With SERVEKIT_PROFILE=N in the worker's environment, the first N batches run under torch.profiler and each
    writes a Chrome trace (chrome://tracing, Perfetto) to SERVEKIT_PROFILE_DIR (default: the temp dir)."""

    def __init__(self, model_name: str, cuda: bool):
        self.left = int(os.environ.get("SERVEKIT_PROFILE") or 0)
        self.folder = Path(os.environ.get("SERVEKIT_PROFILE_DIR") or tempfile.gettempdir())
        self.model_name = model_name
        self.cuda = cuda

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Profiles the batch run inside the block while batches to profile are left."""
        if self.left <= 0:
            yield
            return
        self.left -= 1
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, record_shapes=True) as profile:
            yield
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.model_name}-{os.getpid()}-{int(time.time() * 1000)}.json"
        profile.export_chrome_trace(str(path))
        logger.info("wrote torch.profiler trace %s", path)
