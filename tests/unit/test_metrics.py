"""Prometheus text as TorchServe 0.12 writes it, parsed the way servekit reads it."""

from __future__ import annotations

from servekit.serve import metrics
from servekit.serve.client import Endpoints, ServeClient
from servekit.serve.metrics import VersionFigures

SCRAPED = """# HELP Requests2XX Torchserve prometheus counter metric with unit: Count
# TYPE Requests2XX counter
Requests2XX{Level="Host",Hostname="vm",} 12.0
# HELP Requests5XX Torchserve prometheus counter metric with unit: Count
# TYPE Requests5XX counter
Requests5XX{Level="Host",Hostname="vm",} 2.0
# HELP ts_inference_requests_total Total number of inference requests received
# TYPE ts_inference_requests_total counter
ts_inference_requests_total{model_name="digits",model_version="1.0.0",hostname="vm",} 3.0
ts_inference_requests_total{model_name="digits",model_version="default",hostname="vm",} 5.0
# HELP ts_inference_latency_microseconds Cumulative inference duration in microseconds
# TYPE ts_inference_latency_microseconds counter
ts_inference_latency_microseconds{model_name="digits",model_version="1.0.0",hostname="vm",} 188786.95
# HELP ts_queue_latency_microseconds Cumulative queue duration in microseconds
# TYPE ts_queue_latency_microseconds counter
ts_queue_latency_microseconds{model_name="digits",model_version="1.0.0",hostname="vm",} 150520.813
# HELP ServekitBatchSize Torchserve prometheus gauge metric with unit: count
# TYPE ServekitBatchSize gauge
ServekitBatchSize{ModelName="digits",Hostname="vm",} 4.0
"""


class Scraped(ServeClient):
    def __init__(self, text: str):
        super().__init__(Endpoints("http://127.0.0.1:1", "http://127.0.0.1:1", "http://127.0.0.1:1"))
        self.text = text

    def metrics(self) -> str:
        return self.text


def test_counters_are_read_with_and_without_the_total_suffix():
    client = Scraped(SCRAPED)
    scrape = metrics.scrape(client)
    assert scrape.responses == {"Requests2XX": 12.0, "Requests4XX": 0.0, "Requests5XX": 2.0}
    assert scrape.version("digits", "1.0.0") == VersionFigures(3.0, 188786.95, 150520.813)
    assert scrape.version("digits", "default").requests == 5.0
    assert scrape.handler == {"digits": {"ServekitBatchSize": 4.0}}
    assert ("ServekitBatchSize", {"ModelName": "digits", "Hostname": "vm"}, 4.0) in client.metric_samples()


def test_a_default_version_counts_its_own_and_the_default_label_and_differences_give_rates():
    scrape = metrics.scrape(Scraped(SCRAPED))
    assert scrape.served("digits", "1.0.0", is_default=True).requests == 8.0
    assert scrape.served("digits", "1.0.0", is_default=False).requests == 3.0
    later = VersionFigures(5.0, 188786.95 + 2000.0, 150520.813 + 1000.0)
    delta = later - scrape.version("digits", "1.0.0")
    assert delta.requests == 2.0 and abs(delta.service_ms - 0.5) < 1e-9 and abs(delta.queue_ms - 0.5) < 1e-9
    assert VersionFigures().mean_ms is None


def test_samples_of_one_version_from_several_hosts_are_summed():
    samples = [
        ("ts_inference_requests", {"model_name": "m", "model_version": "1.0.0"}, 2.0),
        ("ts_inference_requests", {"model_name": "m", "model_version": "1.0.0"}, 3.0),
    ]
    assert metrics.parse(samples).version("m", "1.0.0").requests == 5.0
