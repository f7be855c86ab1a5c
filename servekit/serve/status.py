"""What `servekit status` shows: health, models, versions, workers and live figures from the metrics endpoint."""

from __future__ import annotations

from servekit.core.errors import ServekitError
from servekit.serve import metrics
from servekit.serve.deployments import all_versions
from servekit.serve.handle import Server
from servekit.serve.torchserve import running_state


def observe(server: Server) -> dict:
    """What `servekit status` shows, as data; ServekitError when no TorchServe runs from the server's workdir."""
    client, state = server.client, server.state
    if running_state(server.workdir.resolve()) is None:
        raise ServekitError(f"no TorchServe is running from {server.workdir}: servekit serve start")
    scrape = metrics.scrape(client)
    models = []
    for info in all_versions(client):
        figures = scrape.served(info.name, info.version, info.default)
        models.append(
            {
                "name": info.name,
                "version": info.version,
                "default": info.default,
                "workers": info.workers,
                "batch_size": info.batch_size,
                "requests": figures.requests,
                "mean_ms": figures.mean_ms,
                "queue_ms": figures.queue_ms,
                "handler": scrape.handler.get(info.name, {}),
            }
        )
    return {
        "pid": state.pid,
        "health": client.ping().get("status"),
        "inference_url": state.inference_url,
        "proxy_url": state.proxy_url,  # where clients call when the traffic-split proxy runs
        "proxy_pid": state.proxy_pid,
        "management_url": state.management_url,
        "metrics_url": state.metrics_url,
        "responses": scrape.responses,
        "models": models,
    }


HEADERS = ["model", "version", "default", "workers (pid status MB)", "requests", "mean ms", "queue ms", "last batch",
           "rejected"]  # fmt: skip


def rows(report: dict) -> list[list]:
    """The terminal table of `observe`'s report."""
    return [
        [
            row["name"],
            row["version"],
            row["default"],
            ", ".join(f"{w['pid']} {w['status']} {w['memoryUsage'] / 1e6:.0f}" for w in row["workers"]),
            int(row["requests"]),
            "-" if row["mean_ms"] is None else f"{row['mean_ms']:.2f}",
            "-" if row["queue_ms"] is None else f"{row['queue_ms']:.2f}",
            row["handler"].get("ServekitBatchSize", "-"),
            int(row["handler"].get("ServekitRejectedRequests", 0)),
        ]
        for row in report["models"]
    ]
