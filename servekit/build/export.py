"""Beyond one machine: a KServe InferenceService (TorchServe or Triton runtime) or a Docker image for a cataloged
archive.

KServe's TorchServe runtime reads, under the InferenceService's storageUri:
    config/config.properties        TorchServe settings, with model_snapshot naming the archive to load
    model-store/NAME.mar            the archive
`export_kserve` writes that layout plus `inferenceservice.yaml`, built with the kserve package's own models.
The runtime starts TorchServe with TS_SERVICE_ENVELOPE set from the InferenceService's `serviceEnvelope` label
(`kserve`: the v1 protocol, `kservev2`: v2); TorchServe reads it only with `enable_envvars_config=true`.

KServe's Triton runtime (`modelFormat: triton`, the v2 protocol) reads a Triton model repository at storageUri:
`export_kserve` with runtime "triton" writes `model-repository/NAME/...` from `servekit export triton`. The NGC
Triton image's Python backend has no torch: `export_docker(..., runtime="triton")` writes a Dockerfile on it that
installs torch and the rest the worker package imports, and the InferenceService names that image.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from servekit.core.errors import UsageError
from servekit.core.properties import property_line, store_archives_only
from servekit.store.catalog import verify_archive
from servekit_worker.kserve import KSERVE_PROTOCOLS

# KServe protocol -> the TorchServe envelope KServe's runtime asks for through the serviceEnvelope label.
SERVICE_ENVELOPES = {protocol.name: protocol.envelope for protocol in KSERVE_PROTOCOLS}
# Where each runtime finds the model store: KServe mounts storageUri at /mnt/models; the Dockerfile copies it here.
KSERVE_MODEL_STORE = "/mnt/models/model-store"
DOCKER_MODEL_STORE = "/home/model-server/model-store"
RUNTIMES = ("torchserve", "triton")
MODEL_FORMATS = {"torchserve": "pytorch", "triton": "triton"}  # KServe's modelFormat that selects each runtime
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51, as nvidia-pytriton 0.7.0 ships
TRITON_REPOSITORY = "model-repository"


@dataclass
class KServeSpec:
    name: str
    version: str
    storage_uri: str
    gpus: int = 0
    min_replicas: int = 1
    max_replicas: int = 3
    canary_traffic_percent: int | None = None
    cpu: str = "2"
    memory: str = "4Gi"
    protocol: str | None = None  # [TorchServe: v1, Triton: v2, its only one]
    runtime: str = "torchserve"  # or "triton"
    image: str | None = None  # the predictor's image (Triton: one from `export docker --runtime triton`)

    def __post_init__(self) -> None:
        self.protocol = self.protocol or ("v2" if self.runtime == "triton" else "v1")

    def validate(self) -> None:
        if self.runtime not in RUNTIMES:
            raise UsageError(f"--runtime {self.runtime!r} must be one of {', '.join(RUNTIMES)}")
        if self.protocol not in SERVICE_ENVELOPES:
            raise UsageError(f"--protocol {self.protocol!r} must be one of {', '.join(SERVICE_ENVELOPES)}")
        if self.runtime == "triton" and self.protocol != "v2":
            raise UsageError("KServe's Triton runtime speaks the v2 protocol only: use --protocol v2")
        if "://" not in self.storage_uri:
            raise UsageError(f"--storage-uri {self.storage_uri!r} must be a URI such as gs://bucket/path or pvc://...")
        if self.gpus < 0 or self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise UsageError("need --gpus >= 0 and 0 <= --min-replicas <= --max-replicas (>= 1)")
        if self.canary_traffic_percent is not None and not 0 <= self.canary_traffic_percent <= 100:
            raise UsageError("--canary-traffic-percent is a percentage: 0..100")


def kserve_properties(name: str, version: str, archive: str, config: dict) -> str:
    """TorchServe settings inside KServe: KServe's proxy owns auth and routing, so tokens and the model API are
    off, every address listens in the pod, model_snapshot loads the one archive as the default version, and
    environment variables are read (TS_SERVICE_ENVELOPE, set by the runtime). allowed_urls stays limited to the
    store's own archives, should anyone turn the model API on."""
    snapshot = {
        "name": "startup.cfg",
        "modelCount": 1,
        "models": {
            name: {
                version: {
                    "defaultVersion": True,
                    "marName": archive,
                    "minWorkers": config.get("minWorkers", 1),
                    "maxWorkers": config.get("maxWorkers", 1),
                    "batchSize": config.get("batchSize", 1),
                    "maxBatchDelay": config.get("maxBatchDelay", 50),
                    "responseTimeout": config.get("responseTimeout", 120),
                }
            }
        },
    }
    lines = [
        "inference_address=http://0.0.0.0:8085",
        "management_address=http://0.0.0.0:8085",
        "metrics_address=http://0.0.0.0:8082",
        "grpc_inference_port=7070",
        "grpc_management_port=7071",
        "enable_metrics_api=true",
        "metrics_mode=prometheus",
        "model_metrics_auto_detect=true",
        "disable_token_authorization=true",
        "enable_model_api=false",
        "install_py_dep_per_model=false",
        "enable_envvars_config=true",
        f"model_store={KSERVE_MODEL_STORE}",
        property_line("allowed_urls", store_archives_only(KSERVE_MODEL_STORE)),
        f"model_snapshot={json.dumps(snapshot)}",
    ]
    return "\n".join(lines) + "\n"


def inference_service(spec: KServeSpec) -> dict:
    """The InferenceService, built with kserve's models (type-checked) and serialized as Kubernetes sees it."""
    try:
        from kserve import (
            V1beta1InferenceService,
            V1beta1InferenceServiceSpec,
            V1beta1ModelFormat,
            V1beta1ModelSpec,
            V1beta1PredictorSpec,
        )
        from kserve.api_client import ApiClient
        from kubernetes.client import V1ObjectMeta, V1ResourceRequirements
    except ImportError:
        raise UsageError(
            "the kserve package is needed to validate the manifest: pip install 'servekit[kserve]'"
        ) from None
    limits = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus:
        limits["nvidia.com/gpu"] = str(spec.gpus)
    predictor = V1beta1PredictorSpec(
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        canary_traffic_percent=spec.canary_traffic_percent,
        model=V1beta1ModelSpec(
            name="kserve-container",
            model_format=V1beta1ModelFormat(name=MODEL_FORMATS[spec.runtime]),
            protocol_version=spec.protocol,
            storage_uri=spec.storage_uri,
            image=spec.image,
            resources=V1ResourceRequirements(limits=limits, requests=dict(limits)),
        ),
    )
    labels = {"servekit/version": spec.version}
    if spec.runtime == "torchserve":
        labels["serviceEnvelope"] = SERVICE_ENVELOPES[spec.protocol]
    service = V1beta1InferenceService(
        api_version="serving.kserve.io/v1beta1",
        kind="InferenceService",
        metadata=V1ObjectMeta(name=spec.name, labels=labels),
        spec=V1beta1InferenceServiceSpec(predictor=predictor),
    )
    return ApiClient().sanitize_for_serialization(service)


def export_kserve(store: Path, spec: KServeSpec, out_dir: Path) -> list[Path]:
    """Writes inferenceservice.yaml and the storage layout to upload to `spec.storage_uri`."""
    spec.validate()
    entry = verify_archive(store, spec.name, spec.version)
    manifest = inference_service(spec)
    text = yaml.safe_dump(manifest, sort_keys=False)
    if yaml.safe_load(text) != manifest:
        raise UsageError("the InferenceService did not survive a YAML round trip")
    service = out_dir / "inferenceservice.yaml"
    if spec.runtime == "triton":
        from servekit.build.triton import TritonSpec, export_triton

        # KServe downloads storageUri to /mnt/models, Triton's --model-repository; the image provides the packages
        repository = TritonSpec(spec.name, [spec.version], out_dir / TRITON_REPOSITORY, gpus=spec.gpus, python_paths=[])
        written = export_triton(store, repository)
        service.write_text(text)
        return [service, *written]
    (out_dir / "config").mkdir(parents=True, exist_ok=True)
    (out_dir / "model-store").mkdir(parents=True, exist_ok=True)
    archive = out_dir / "model-store" / entry.archive
    shutil.copy2(store / entry.archive, archive)
    properties = out_dir / "config" / "config.properties"
    properties.write_text(kserve_properties(spec.name, spec.version, entry.archive, entry.config))
    service.write_text(text)
    return [service, properties, archive]


DOCKERFILE = """# Written by servekit export docker: {name} {version} on the official TorchServe image.
FROM pytorch/torchserve:0.12.0-{flavour}
# The worker imports yaml without declaring it; servekit's handlers need Pillow and ONNX Runtime for onnx archives.
RUN pip install --no-cache-dir pyyaml pillow onnxruntime
COPY model-store {store}
COPY config.properties /home/model-server/config.properties
EXPOSE 8080 8081 8082
# The image's entrypoint starts TorchServe with /home/model-server/config.properties.
CMD ["serve"]
"""


TRITON_DOCKERFILE = """# Written by servekit export docker --runtime triton: {name} {version} on NVIDIA's Triton image.
FROM {image}
# Triton's Python backend runs servekit's worker package; the image has Python but no torch.
RUN pip install --no-cache-dir torch=={torch} torchvision=={torchvision} pillow pyyaml onnxruntime
COPY {repository} /models
EXPOSE 8000 8001 8002
# KServe's Triton runtime starts tritonserver itself (on /mnt/models); run alone, this image serves /models.
CMD ["tritonserver", "--model-repository=/models"]
"""


def export_docker_triton(store: Path, name: str, version: str, out_dir: Path, gpu: bool = False) -> list[Path]:
    """A Dockerfile on NVIDIA's Triton image with the torch this archive was built with, and the repository."""
    import torch
    import torchvision

    from servekit.build.triton import TritonSpec, export_triton

    written = export_triton(store, TritonSpec(name, [version], out_dir / TRITON_REPOSITORY, gpus=int(gpu),
                                              python_paths=[]))  # fmt: skip
    dockerfile = out_dir / "Dockerfile"
    dockerfile.write_text(TRITON_DOCKERFILE.format(
        name=name, version=version, image=TRITON_IMAGE, repository=TRITON_REPOSITORY,
        torch=torch.__version__.split("+")[0], torchvision=torchvision.__version__.split("+")[0],
    ))  # fmt: skip
    return [dockerfile, *written]


def export_docker(
    store: Path, name: str, version: str, out_dir: Path, gpu: bool = False, runtime: str = "torchserve"
) -> list[Path]:
    """Writes a Dockerfile, config.properties and model-store/ that serve NAME VERSION (token auth on, the model API
    off, allowed_urls limited to the image's own store); with runtime "triton", a Dockerfile on Triton's image."""
    if runtime == "triton":
        return export_docker_triton(store, name, version, out_dir, gpu)
    entry = verify_archive(store, name, version)
    (out_dir / "model-store").mkdir(parents=True, exist_ok=True)
    shutil.copy2(store / entry.archive, out_dir / "model-store" / entry.archive)
    properties = out_dir / "config.properties"
    properties.write_text(
        "\n".join(
            [
                "# Written by servekit export docker. Token auth stays on: keys are in",
                "# /home/model-server/key_file.json inside the container (docker exec ... cat it).",
                "inference_address=http://0.0.0.0:8080",
                "management_address=http://0.0.0.0:8081",
                "metrics_address=http://0.0.0.0:8082",
                f"model_store={DOCKER_MODEL_STORE}",
                property_line("allowed_urls", store_archives_only(DOCKER_MODEL_STORE)),
                f"load_models={entry.archive}",
                "disable_token_authorization=false",
                "enable_model_api=false",
                "metrics_mode=prometheus",
                "model_metrics_auto_detect=true",
                "install_py_dep_per_model=false",
                f"number_of_gpu={1 if gpu else 0}",
            ]
        )
        + "\n"
    )
    dockerfile = out_dir / "Dockerfile"
    flavour = "gpu" if gpu else "cpu"
    dockerfile.write_text(DOCKERFILE.format(name=name, version=version, flavour=flavour, store=DOCKER_MODEL_STORE))
    return [dockerfile, properties, out_dir / "model-store" / entry.archive]
