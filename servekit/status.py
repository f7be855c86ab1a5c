"""What `servekit status` shows: health, models, versions, workers and live figures from the metrics endpoint."""

from __future__ import annotations

from servekit.client import ServeClient

RESPONSE_COUNTERS = ("Requests2XX", "Requests4XX", "Requests5XX")
VERSION_COUNTERS = {
    "ts_inference_requests": "requests",
    "ts_inference_latency_microseconds": "latency_us",
    "ts_queue_latency_microseconds": "queue_us",
}


def observe(client: ServeClient, state) -> dict:
    """What `servekit status` shows, as data."""
    samples = client.metric_samples()
    responses = dict.fromkeys(RESPONSE_COUNTERS, 0.0)
    per_version: dict[tuple[str, str], dict[str, float]] = {}
    handler: dict[str, dict[str, float]] = {}
    for metric, labels, value in samples:
        if metric in responses:
            responses[metric] += value
        elif metric in VERSION_COUNTERS:
            key = (labels.get("model_name", ""), labels.get("model_version", ""))
            per_version.setdefault(key, {})[VERSION_COUNTERS[metric]] = value
        elif metric.startswith("Servekit") and "ModelName" in labels:
            handler.setdefault(labels["ModelName"], {})[metric] = value
    models = []
    for model in client.list_models():
        for description in client.describe(model["modelName"]):
            name, version = description["modelName"], description["modelVersion"]
            default = description["modelUrl"] == model["modelUrl"]
            figures = {}
            for label in (version, "default") if default else (version,):
                for key, value in per_version.get((name, label), {}).items():
                    figures[key] = figures.get(key, 0.0) + value
            requests_seen = figures.get("requests", 0.0)
            models.append(
                {
                    "name": name,
                    "version": version,
                    "default": default,
                    "workers": description.get("workers", []),
                    "batch_size": description.get("batchSize"),
                    "requests": requests_seen,
                    "mean_ms": figures["latency_us"] / requests_seen / 1000 if requests_seen else None,
                    "queue_ms": figures["queue_us"] / requests_seen / 1000 if requests_seen else None,
                    "handler": handler.get(name, {}),
                }
            )
    return {
        "pid": state.pid,
        "health": client.ping().get("status"),
        "inference_url": state.inference_url,
        "management_url": state.management_url,
        "metrics_url": state.metrics_url,
        "responses": responses,
        "models": models,
    }
