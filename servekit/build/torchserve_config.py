"""`servekit config`: TorchServe settings for N GPUs (or the CPU), with every setting explained where it is written.

Writes `config.properties` (server-wide) and one `model-config.yaml` per model (`servekit build --model-config`
merges it into the archive). TorchServe hands each worker a `gpu_id` round-robin over `deviceIds`; servekit's
handlers put the model on `cuda:{gpu_id}`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from servekit.build.archive import DEFAULT_MAX_BATCH, default_workers
from servekit.core.errors import UsageError
from servekit.core.names import check_name
from servekit.core.properties import check_max_batch_delay, property_line, store_archives_only
from servekit.store.workspace import DEFAULT_STORE

PARALLEL_TYPES = ("pp", "tp", "pptp")


@dataclass
class Plan:
    gpus: int
    workers_per_gpu: int
    models: list[str]
    device_ids: list[int] = field(default_factory=list)  # [] = every GPU
    batch_size: int = 4
    max_batch_delay_ms: int = 50
    job_queue_size: int = 1000
    parallel_type: str | None = None  # only for one model split across GPUs (torchrun)
    model_store: Path = DEFAULT_STORE  # written absolute: allowed_urls is anchored to it

    @property
    def ids(self) -> list[int]:
        return self.device_ids or list(range(self.gpus))

    @property
    def workers(self) -> int:
        """Workers per model: K per assigned GPU, or K on the CPU."""
        return self.workers_per_gpu * (len(self.ids) if self.gpus else 1)

    @property
    def torch_threads(self) -> int:
        """CPU threads per worker so that all workers of all models share the cores without oversubscription."""
        return max(1, (os.cpu_count() or 1) // max(1, self.workers * len(self.models)))


def detect_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


GPU_WORKERS_PER_GPU = 4  # measured on an H200 with 16 cores: 4 workers served 6,030 req/s, 8 workers 5,742
GPU_CORES_PER_WORKER = 4
GPU_BATCH_SIZE = 64  # a GPU worker under load runs large batches; CUDA graphs pad to buckets up to 64


def make_plan(
    gpus: str | int,
    workers_per_gpu: int | str,
    models: list[str],
    device_ids: list[int] | None = None,
    parallel_type: str | None = None,
    **settings,
) -> Plan:
    """Validates a request for N GPUs ('auto': what torch sees) and K workers per GPU ('auto': 4 per GPU while
    each keeps 4 cores, at least 1; on the CPU, build's default). The batch size defaults to 64 on GPUs."""
    count = detect_gpus() if gpus == "auto" else int(gpus)
    if count < 0:
        raise UsageError(f"--gpus must be >= 0 or auto, got {gpus}")
    if workers_per_gpu == "auto":
        workers_per_gpu = auto_workers(len(device_ids or []) or count)
    if settings.get("batch_size") is None:
        settings["batch_size"] = GPU_BATCH_SIZE if count else DEFAULT_MAX_BATCH
    if workers_per_gpu < 1:
        raise UsageError("--workers-per-gpu must be at least 1: a model with zero workers answers nothing")
    if not models:
        raise UsageError("name at least one model with --models")
    for model in models:  # each names a folder under --out
        check_name(model)
    ids = list(device_ids or [])
    if ids and not count:
        raise UsageError(f"--device-ids {ids} given but there are no GPUs (--gpus 0)")
    if len(set(ids)) != len(ids) or any(i < 0 or i >= count for i in ids):
        raise UsageError(f"--device-ids {ids} must be distinct GPU indices in 0..{count - 1} ({count} GPUs)")
    if parallel_type is not None:
        if parallel_type not in PARALLEL_TYPES:
            raise UsageError(f"--parallel-type must be one of {', '.join(PARALLEL_TYPES)}")
        if count < 2:
            raise UsageError("--parallel-type splits one model across GPUs: it needs at least 2")
    if "max_batch_delay_ms" in settings:
        check_max_batch_delay(settings["max_batch_delay_ms"])
    return Plan(count, workers_per_gpu, models, ids, parallel_type=parallel_type, **settings)


def auto_workers(gpus: int) -> int:
    """Workers per GPU (or on the CPU, with no GPU) when the user does not say."""
    if not gpus:
        return default_workers()
    cores = os.cpu_count() or 1
    return max(1, min(GPU_WORKERS_PER_GPU, cores // (GPU_CORES_PER_WORKER * gpus)))


def properties_text(plan: Plan) -> str:
    """config.properties with a comment above each setting."""
    netty = max(4, (os.cpu_count() or 1))
    store = str(plan.model_store.resolve())
    settings = [
        ("Bind every API to loopback; put a reverse proxy or KServe in front for remote clients.", None),
        ("", "inference_address=http://127.0.0.1:8080"),
        ("", "management_address=http://127.0.0.1:8081"),
        ("", "metrics_address=http://127.0.0.1:8082"),
        ("", "grpc_inference_address=127.0.0.1"),
        ("", "grpc_management_address=127.0.0.1"),
        (
            "GPUs TorchServe may hand to workers (0: CPU only); gpu_id goes round-robin over a model's deviceIds.",
            f"number_of_gpu={plan.gpus}",
        ),
        (
            "Workers per model when an archive does not say (its model-config.yaml minWorkers/maxWorkers win).",
            f"default_workers_per_model={plan.workers}",
        ),
        (
            "Requests each model may queue before TorchServe answers 503: the burst you absorb without errors.",
            f"job_queue_size={plan.job_queue_size}",
        ),
        (
            "Frontend I/O threads: enough to keep HTTP parsing off the critical path.",
            f"number_of_netty_threads={netty}",
        ),
        ("Threads the frontend uses to talk to workers.", f"netty_client_threads={netty}"),
        ("Log asynchronously so logging never stalls a request.", "async_logging=true"),
        (
            "Token authorization on: keys in key_file.json of the server's working folder.",
            "disable_token_authorization=false",
        ),
        ("Register and unregister over the management API.", "enable_model_api=true"),
        ("Prometheus text on the metrics address, with the handlers' own metrics.", "metrics_mode=prometheus"),
        ("", "model_metrics_auto_detect=true"),
        ("Never pip-install per-model requirements at registration.", "install_py_dep_per_model=false"),
        ("Request and response bodies up to 16 MiB (TorchServe answers 413 above).", "max_request_size=16777216"),
        ("", "max_response_size=16777216"),
        (
            "Archives are read from here (servekit serve start passes its own --store).",
            property_line("model_store", store),
        ),
        (
            "Register this store's archives only, by file name: any other URL is refused (docs/security.md).",
            property_line("allowed_urls", store_archives_only(store)),
        ),
    ]
    lines = [f"# Written by servekit config for {plan.gpus} GPU(s), {plan.workers_per_gpu} worker(s) per GPU."]
    for comment, setting in settings:
        if comment:
            lines += ["", f"# {comment}"]
        if setting:
            lines.append(setting)
    return "\n".join(lines) + "\n"


def model_config(plan: Plan) -> dict:
    """The per-model part of model-config.yaml for this plan."""
    config: dict = {
        "minWorkers": plan.workers,
        "maxWorkers": plan.workers,
        "batchSize": plan.batch_size,
        "maxBatchDelay": plan.max_batch_delay_ms,
    }
    # GPU workers need bounded CPU pools too: their decoding, resizing and collation run on the CPU, and two
    # unbounded workers on a 16-core host spent 300-400 ms per resnet18 batch there (8 ms with 2 threads each).
    config.update({"deviceType": "gpu", "deviceIds": plan.ids} if plan.gpus else {"deviceType": "cpu"})
    config["handler"] = {"torch_threads": plan.torch_threads}
    if plan.parallel_type:
        config.update(
            {
                "parallelType": plan.parallel_type,
                "minWorkers": 1,
                "maxWorkers": 1,
                "torchrun": {"nproc-per-node": len(plan.ids)},
            }
        )
    return config


MODEL_CONFIG_COMMENT = """# Written by servekit config; merged into the archive by `servekit build --model-config`.
# minWorkers/maxWorkers: workers for this model ({workers_note}).
# batchSize/maxBatchDelay: TorchServe waits up to maxBatchDelay ms to gather batchSize requests per forward pass.
# deviceType/deviceIds: gpu workers get gpu_id round-robin over deviceIds; the handler runs on cuda:gpu_id.
# handler.torch_threads: the host's cores shared by all workers of all models (CPU and GPU workers alike).
# parallelType/torchrun (only with --parallel-type): one model split over several GPUs with torchrun.
"""


def write(plan: Plan, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "config.properties"]
    written[0].write_text(properties_text(plan))
    note = f"{plan.workers_per_gpu} per GPU x {len(plan.ids)} GPU(s)" if plan.gpus else "CPU workers"
    for model in plan.models:
        path = out_dir / "models" / model / "model-config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            MODEL_CONFIG_COMMENT.format(workers_note=note) + yaml.safe_dump(model_config(plan), sort_keys=False)
        )
        written.append(path)
    return written
