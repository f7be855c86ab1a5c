"""One scrape of TorchServe's Prometheus endpoint, read into typed figures; every metric name servekit reads.

TorchServe labels per-model counters by the version in the URL that was called: `/predictions/NAME/1.0.0`
counts under "1.0.0", the unversioned `/predictions/NAME` under "default". Counters are cumulative since start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from servekit.serve.client import ServeClient
from servekit_worker.telemetry import COUNTERS, GAUGES

RESPONSE_COUNTERS = ("Requests2XX", "Requests4XX", "Requests5XX")
REQUESTS = "ts_inference_requests"
INFERENCE_LATENCY_US = "ts_inference_latency_microseconds"
QUEUE_LATENCY_US = "ts_queue_latency_microseconds"
HANDLER_METRICS = (*GAUGES, *COUNTERS)  # the handlers' own metrics, as the worker names them
DEFAULT_LABEL = "default"


@dataclass
class VersionFigures:
    """Cumulative request count and latency sums of one (model, version label)."""

    requests: float = 0.0
    latency_us: float = 0.0  # from arrival to answer
    queue_us: float = 0.0

    def __add__(self, other: VersionFigures) -> VersionFigures:
        return VersionFigures(
            self.requests + other.requests, self.latency_us + other.latency_us, self.queue_us + other.queue_us
        )

    def __sub__(self, other: VersionFigures) -> VersionFigures:
        return VersionFigures(
            self.requests - other.requests, self.latency_us - other.latency_us, self.queue_us - other.queue_us
        )

    @property
    def mean_ms(self) -> float | None:
        return self.latency_us / self.requests / 1000 if self.requests > 0 else None

    @property
    def queue_ms(self) -> float | None:
        return self.queue_us / self.requests / 1000 if self.requests > 0 else None

    @property
    def service_ms(self) -> float | None:
        """Mean time from leaving the queue to the answer."""
        return (self.latency_us - self.queue_us) / self.requests / 1000 if self.requests > 0 else None


COUNTER_FIELDS = {REQUESTS: "requests", INFERENCE_LATENCY_US: "latency_us", QUEUE_LATENCY_US: "queue_us"}


@dataclass
class Scrape:
    responses: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RESPONSE_COUNTERS, 0.0))
    versions: dict[tuple[str, str], VersionFigures] = field(default_factory=dict)  # (model, version label)
    handler: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> Servekit* metric -> value

    def version(self, name: str, label: str) -> VersionFigures:
        return self.versions.get((name, label), VersionFigures())

    def served(self, name: str, version: str, is_default: bool) -> VersionFigures:
        """Everything a version answered: its own label, plus "default" while it is the default."""
        figures = self.version(name, version)
        return figures + self.version(name, DEFAULT_LABEL) if is_default else figures

    def labels(self, name: str) -> dict[str, VersionFigures]:
        return {label: figures for (model, label), figures in self.versions.items() if model == name}


def parse(samples: list[tuple[str, dict[str, str], float]]) -> Scrape:
    """Sums samples by (model, version) (several hosts or workers may report the same pair)."""
    scrape = Scrape()
    for metric, labels, value in samples:
        if metric in scrape.responses:
            scrape.responses[metric] += value
        elif metric in COUNTER_FIELDS:
            key = (labels.get("model_name", ""), labels.get("model_version", ""))
            figures = scrape.versions.setdefault(key, VersionFigures())
            setattr(figures, COUNTER_FIELDS[metric], getattr(figures, COUNTER_FIELDS[metric]) + value)
        elif metric in HANDLER_METRICS and "ModelName" in labels:
            scrape.handler.setdefault(labels["ModelName"], {})[metric] = value
    return scrape


def scrape(client: ServeClient) -> Scrape:
    return parse(client.metric_samples())


def responses_since(before: Scrape, after: Scrape) -> dict[str, float]:
    return {key: after.responses[key] - before.responses[key] for key in RESPONSE_COUNTERS}
