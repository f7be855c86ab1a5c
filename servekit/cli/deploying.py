"""Commands that write deployments for elsewhere: config (multi-GPU TorchServe), export kserve/docker/triton."""

from __future__ import annotations

from pathlib import Path

import click

from servekit.build.archive import DEFAULT_MAX_BATCH
from servekit.cli.base import (
    BUILD_DEFAULTS,
    AutoOrCount,
    IntList,
    Names,
    cli,
    console,
    errors,
    path_option,
    store_option,
    version_option,
    with_server,
)
from servekit.core.errors import UsageError
from servekit.serve.handle import Server
from servekit.serve.protocols import PROTOCOLS


# config / export ---------------------------------------------------------------------------------------------------
@cli.command("config")
@click.option("--gpus", type=AutoOrCount(), default="auto", show_default=True,
              help="GPUs to use: a number, or 'auto' (what torch sees).")  # fmt: skip
@click.option("--workers-per-gpu", type=AutoOrCount(), default="auto", show_default=True,
              help="Workers per GPU (or CPU); auto: 4 per GPU while each keeps 4 cores, else build's.")  # fmt: skip
@click.option("--models", type=Names(), required=True, help="Comma list of model names.")
@click.option("--device-ids", type=IntList(0, "GPU indices"), default="",
              help="Comma list of GPU indices for the models [default: all].")  # fmt: skip
@click.option("--parallel-type", type=click.Choice(["pp", "tp", "pptp"]), default=None,
              help="Split one model over the GPUs with torchrun (large models only).")  # fmt: skip
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help=f"TorchServe batchSize [64 on GPUs, {DEFAULT_MAX_BATCH} on the CPU].")  # fmt: skip
@click.option("--max-batch-delay", "max_batch_delay_ms", type=int, default=BUILD_DEFAULTS.max_batch_delay_ms,
              show_default=True, help="Milliseconds, at least 1 (TorchServe reads 0 as 100).")  # fmt: skip
@click.option("--job-queue-size", type=click.IntRange(min=1), default=1000, show_default=True)
@path_option("--out", "out_dir", default=Path("deploy/generated"), show_default=True)
@store_option
def config_command(gpus, workers_per_gpu, models, device_ids, parallel_type, out_dir, store, **settings) -> None:
    """Write config.properties and per-model model-config.yaml for N GPUs (or the CPU), every setting explained.

    The model store is written as an absolute path, and allowed_urls lets TorchServe register only its archives.

    Example: servekit config --gpus 4 --workers-per-gpu 2 --models digits,image
    """
    from servekit.build import torchserve_config as configs

    plan = configs.make_plan(gpus, workers_per_gpu, models, device_ids, parallel_type, model_store=store, **settings)
    for path in configs.write(plan, out_dir):
        console.print(f"wrote {path}")
    console.print(
        f"{plan.gpus} GPU(s), {plan.workers} worker(s) per model; build with "
        f"servekit build NAME --version V --model-config {out_dir}/models/NAME/model-config.yaml"
    )


@cli.group("export")
def export_group() -> None:
    """Deploy a cataloged archive beyond this machine: KServe or Docker."""


@export_group.command("kserve")
@click.argument("name")
@version_option(required=False, help_text="The version to deploy (or --from-split).")
@click.option("--storage-uri", required=True, help="Where you will upload the layout, e.g. gs://bucket/models/digits.")
@click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True, help="nvidia.com/gpu per replica.")
@click.option("--min-replicas", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--max-replicas", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--canary-traffic-percent", type=click.IntRange(0, 100), default=None,
              help="Send this share of traffic to this revision (KServe canary rollout).")  # fmt: skip
@path_option("--out", "out_dir", help="[default: deploy/kserve/NAME-VERSION]")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default=None,
              help="KServe protocol [TorchServe: v1, via serviceEnvelope; Triton: v2, its only one].")  # fmt: skip
@click.option("--runtime", type=click.Choice(["torchserve", "triton"]), default="torchserve", show_default=True,
              help="KServe's serving runtime: TorchServe (the .mar) or Triton (a model repository).")  # fmt: skip
@click.option(
    "--image", default=None, help="Predictor image (Triton: the one `export docker --runtime triton` builds)."
)
@click.option("--from-split", is_flag=True, help="Version and canary percent from NAME's split on the WORKDIR server.")
@store_option
@with_server
def export_kserve_command(name, version, storage_uri, out_dir, from_split, store, server, **settings) -> None:
    """Write a KServe InferenceService (TorchServe runtime) and the config/ + model-store/ layout to upload.

    Example: servekit export kserve digits --version 1.1.0 --storage-uri gs://bucket/digits --canary-traffic-percent 10
    """
    from servekit.build.export import KServeSpec, export_kserve

    if from_split:
        version, settings["canary_traffic_percent"] = split_as_canary(server, name, version, settings)
    elif version is None:
        raise UsageError("give --version (or --from-split)")
    spec = KServeSpec(name, version, storage_uri, **settings)
    out_dir = out_dir or Path("deploy/kserve") / f"{name}-{version}"
    for path in export_kserve(store, spec, out_dir):
        console.print(f"wrote {path}")
    upload = (
        f"{out_dir}/model-repository" if spec.runtime == "triton" else f"{out_dir}/config and {out_dir}/model-store"
    )
    console.print(f"upload {upload} to {storage_uri}, then kubectl apply -f {out_dir}/inferenceservice.yaml")


@export_group.command("docker")
@click.argument("name")
@version_option()
@click.option("--gpu", is_flag=True, help="Use the GPU image and one GPU.")
@click.option("--runtime", type=click.Choice(["torchserve", "triton"]), default="torchserve", show_default=True,
              help="TorchServe's official image, or NVIDIA's Triton image with torch added.")  # fmt: skip
@path_option("--out", "out_dir", help="[default: deploy/docker/NAME-VERSION]")
@store_option
def export_docker_command(name, version, gpu, runtime, out_dir, store) -> None:
    """Write a Dockerfile that serves this archive: TorchServe (token auth on) or Triton.

    Example: servekit export docker digits --version 1.1.0 && docker build -t digits deploy/docker/digits-1.1.0
    """
    from servekit.build.export import export_docker

    out_dir = out_dir or Path("deploy/docker") / f"{name}-{version}"
    for path in export_docker(store, name, version, out_dir, gpu, runtime):
        console.print(f"wrote {path}")


@export_group.command("triton")
@click.argument("name")
@click.option("--version", "versions", multiple=True, required=True, help="A version to export; repeat for more.")
@path_option("--out", "out_dir", default=Path("deploy/triton"), show_default=True, help="The model repository.")
@click.option("--instances", type=click.IntRange(min=1), default=None,
              help="Model instances (per GPU with --gpus) [default: the archive's workers].")  # fmt: skip
@click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True, help="0: CPU instances.")
@click.option("--max-queue-delay-us", "queue_delay_us", type=click.IntRange(min=0), default=0, show_default=True,
              help="How long Triton holds a request for a fuller batch (0: none; it batches what waits).")  # fmt: skip
@click.option("--version-policy", type=click.Choice(["all", "latest", "specific"]), default="all", show_default=True,
              help="Which versions Triton loads: all, the newest --latest, or the ones exported now.")  # fmt: skip
@click.option("--latest", "latest_count", type=click.IntRange(min=1), default=1, show_default=True)
@store_option
def export_triton_command(name, versions, out_dir, instances, gpus, queue_delay_us, version_policy, latest_count,
                          store) -> None:  # fmt: skip
    """Write a Triton model repository (Python backend) serving these archives' handlers, same requests and answers.

    Example: servekit export triton digits --version 1.0.0 --version 1.1.0 && servekit serve triton
    """
    from servekit.build.triton import TritonSpec, export_triton

    spec = TritonSpec(name, list(versions), out_dir, instances, gpus, version_policy, latest_count, queue_delay_us)
    for path in export_triton(store, spec):
        console.print(f"wrote {path}")


def split_as_canary(server: Server, name: str, version: str | None, settings: dict) -> tuple[str, int]:
    """`export kserve --from-split`: the split's non-default version and its share, saying what KServe drops."""
    from servekit.deliver import split as splits

    if version is not None or settings["canary_traffic_percent"] is not None:
        raise UsageError("--from-split takes the version and canary share from the split: leave out --version "
                         "and --canary-traffic-percent")  # fmt: skip
    version, percent, dropped = splits.kserve_canary_of(server, name)
    for what in dropped:
        errors.print(f"[yellow]note:[/] KServe cannot carry {what}", highlight=False)
    return version, percent
