"""Prometheus text as TorchServe 0.12 writes it, parsed the way servekit reads it."""

from __future__ import annotations

from servekit.client import Endpoints, ServeClient
from servekit.rollout import server_counters, version_timings

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
    assert server_counters(client) == {"Requests2XX": 12.0, "Requests4XX": 0.0, "Requests5XX": 2.0}
    timings = version_timings(client, "digits")
    assert timings["1.0.0"] == {"requests": 3.0, "latency_us": 188786.95, "queue_us": 150520.813}
    assert timings["default"]["requests"] == 5.0
    assert ("ServekitBatchSize", {"ModelName": "digits", "Hostname": "vm"}, 4.0) in client.metric_samples()
