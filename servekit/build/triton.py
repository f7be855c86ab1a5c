"""A second runtime from the same catalog: Triton Inference Server (its Python backend), same requests, same answers.

`export_triton` writes a Triton model repository from cataloged archives:

    NAME/config.pbtxt        Python backend; Triton's dynamic batcher; instances from the archive's workers
    NAME/servekit.json       semver <-> Triton's integer versions, kept stable across exports
    NAME/<n>/model.py        TritonPythonModel: servekit_worker.triton's adapter on the archive's own handler
    NAME/<n>/...             the archive's files as TorchServe unpacks them (weights, labels, servekit_worker/,
                             the model's code) and servekit-model.json (its serving settings)

`servekit.serve.triton` runs it.
"""

from __future__ import annotations

import json
import shutil
import site
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from servekit.build.handler_code import WORKER_CLASSES
from servekit.core.errors import UsageError
from servekit.core.names import check_name
from servekit.store.catalog import CatalogEntry, verify_archive
from servekit_worker.triton import SETTINGS_FILE

VERSIONS_FILE = "servekit.json"
ADAPTER = "servekit_worker/triton.py"  # in every archive built since Triton support: its model.py imports it
# No default_queue_policy (max_queue_size) in the config: with one, Triton 2.51's dynamic batcher held requests to
# the Python backend for ~500 ms now and then (p99 510 ms at 1 client and 29-145 req/s, against p99 59 ms and 221
# req/s without it; wrk, digits, 2 cores, 2026-12-04), so the queue is Triton's default, unbounded.
# No queue delay by default: Triton's dynamic batcher takes every request waiting when an instance frees up, so
# batches form under load without one, and a delay only holds a lone request (digits, 2 cores, 2 instances, wrk,
# 2026-12-06: 1,000 us answered one client in 2.9-3.2 ms, 0 in 1.5-2.0 ms, and served 16 clients 1,607-1,662 req/s
# against 1,897-2,127). The archive's maxBatchDelay is TorchServe's window, which that batcher needs (0 there is
# read as 100 ms, or with the register API's 0 it batches at most 2).
VERSION_POLICIES = ("all", "latest", "specific")
DTYPE_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
               "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}  # fmt: skip


@dataclass
class TritonSpec:
    """What `servekit export triton` writes: versions of one model, instances per version, where."""

    name: str
    versions: list[str]
    out: Path
    instances: int | None = None  # per GPU with gpus [the archive's workers, spread over the GPUs]
    gpus: int = 0
    version_policy: str = "all"  # all | latest (the newest `latest_count`) | specific (the ones exported now)
    latest_count: int = 1
    queue_delay_us: int = 0  # dynamic_batching's max_queue_delay_microseconds
    python_paths: list[str] = field(default_factory=lambda: site.getsitepackages())

    def validate(self) -> None:
        check_name(self.name)
        if not self.versions:
            raise UsageError("give at least one --version")
        if (self.instances is not None and self.instances < 1) or self.gpus < 0 or self.latest_count < 1:
            raise UsageError("need --instances >= 1, --gpus >= 0 and a latest count >= 1")
        if self.queue_delay_us < 0:
            raise UsageError(f"--max-queue-delay-us {self.queue_delay_us}: need >= 0")
        if self.version_policy not in VERSION_POLICIES:
            raise UsageError(f"--version-policy {self.version_policy!r}: one of {', '.join(VERSION_POLICIES)}")

    def instances_of(self, config: dict) -> int:
        """Instances per GPU (or on the CPU): as given, else the archive's workers spread over the GPUs (TorchServe
        gives its workers the GPUs in turn), so both runtimes run the handler as many times at once."""
        if self.instances is not None:
            return self.instances
        workers = int(config.get("minWorkers") or 1)
        return max(1, -(-workers // self.gpus)) if self.gpus else workers


def recorded_versions(model_dir: Path) -> dict[str, int]:
    """semver -> Triton's integer of each version exported to `model_dir` (none when nothing was)."""
    path = model_dir / VERSIONS_FILE
    if not path.is_file():
        return {}
    return {semver: int(n) for n, semver in json.loads(path.read_text())["versions"].items()}


def integer_versions(model_dir: Path, versions: list[str]) -> dict[str, int]:
    """Triton's integer for each semver: those recorded in servekit.json keep theirs; new ones follow the highest."""
    recorded = recorded_versions(model_dir)
    for semver in versions:
        if semver not in recorded:
            recorded[semver] = max(recorded.values(), default=0) + 1
    return recorded


def handler_class_path(entry: CatalogEntry) -> tuple[str, str]:
    """(module, class) of the archive's handler: servekit's worker class, or the user's file's class."""
    if entry.handler in WORKER_CLASSES:
        return tuple(WORKER_CLASSES[entry.handler].split(":"))  # type: ignore[return-value]
    file_name, _, class_name = entry.handler.partition(":")
    return Path(file_name).stem, class_name


def model_source(entry: CatalogEntry, python_paths: list[str]) -> str:
    module, class_name = handler_class_path(entry)
    paths = ", ".join(repr(p) for p in python_paths)
    return (
        f'"""Triton\'s Python backend entry point for {entry.name} {entry.version} (written by servekit export '
        'triton)."""\n\n'
        "import sys\nfrom pathlib import Path\n\n"
        "# this version's files first (its handler, the worker package, the model's code), then the serving\n"
        "# environment's packages (torch, ...), which Triton's Python stub does not see by itself\n"
        f"for path in reversed([str(Path(__file__).resolve().parent), {paths}]):\n"
        "    if path not in sys.path:\n"
        "        sys.path.insert(0, path)\n\n"
        "from servekit_worker.triton import TritonHandler  # noqa: E402\n"
        f"from {module} import {class_name} as Handler  # noqa: E402\n\n\n"
        "class TritonPythonModel(TritonHandler, Handler):\n"
        f'    """{entry.handler} on Triton."""\n'
    )


def io_config(entry: CatalogEntry, labels: list[str] | None) -> tuple[list[dict], list[dict]]:
    """The model's inputs and outputs in Triton's terms: one BYTES input of request bodies (or the tensor handler's
    numeric input) and the handler's v2 outputs. A batching model's tensors have a dimension besides the batch in
    Triton's API, so requests send BYTES [n, 1] (TorchServe's v2 path takes [n, 1] and [n]) and `label` and
    `index` come back [n, 1] where TorchServe answers [n]: the same values."""
    handler = entry.config.get("handler", {})
    if entry.handler == "tensor":
        dtype = handler.get("input_dtype", "float32")
        if dtype not in DTYPE_TYPES:
            raise UsageError(f"the tensor handler's input dtype {dtype} has no Triton type here")
        inputs = [{"name": "input", "data_type": DTYPE_TYPES[dtype], "dims": list(handler["input_shape"])}]
        return inputs, [{"name": "output", "data_type": "TYPE_FP32", "dims": [-1]}]
    inputs = [{"name": "input", "data_type": "TYPE_STRING", "dims": [1]}]
    if labels is None:
        return inputs, [{"name": "output", "data_type": "TYPE_FP32", "dims": [-1]}]
    outputs = [
        {"name": "label", "data_type": "TYPE_STRING", "dims": [1]},
        {"name": "index", "data_type": "TYPE_INT64", "dims": [1]},
        {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [len(labels)]},
    ]
    return inputs, outputs


def pbtxt(value, indent: int = 0) -> str:
    """A dict as protobuf text format (lists of dicts as repeated messages, strings quoted, enums bare)."""
    pad, lines = "  " * indent, []
    for key, item in value.items():
        items = item if isinstance(item, list) and item and isinstance(item[0], dict) else [item]
        for one in items:
            if isinstance(one, dict):
                lines += [f"{pad}{key} {{", pbtxt(one, indent + 1), f"{pad}}}"]
            elif isinstance(one, list):
                lines.append(f"{pad}{key}: [ {', '.join(str(v) for v in one)} ]")
            elif isinstance(one, str) and not (one.isupper() or one.startswith("KIND_")):
                lines.append(f'{pad}{key}: "{one}"')
            else:
                lines.append(f"{pad}{key}: {str(one).lower() if isinstance(one, bool) else one}")
    return "\n".join(line for line in lines if line)


def model_config(spec: TritonSpec, entry: CatalogEntry, labels: list[str] | None, numbers: list[int]) -> dict:
    config, handler = entry.config, entry.config.get("handler", {})
    inputs, outputs = io_config(entry, labels)
    if spec.gpus:
        group = {"kind": "KIND_GPU", "count": spec.instances_of(config), "gpus": list(range(spec.gpus))}
    else:
        group = {"kind": "KIND_CPU", "count": spec.instances_of(config)}
    policy = {"all": {"all": {}}, "latest": {"latest": {"num_versions": spec.latest_count}},
              "specific": {"specific": {"versions": numbers}}}[spec.version_policy]  # fmt: skip
    return {
        "name": spec.name,
        "backend": "python",
        "max_batch_size": int(handler.get("max_inputs_per_request", 64)),
        "version_policy": policy,
        "dynamic_batching": {"max_queue_delay_microseconds": spec.queue_delay_us},
        "input": inputs,
        "output": outputs,
        "instance_group": [group],
    }


def export_version(entry: CatalogEntry, store: Path, version_dir: Path, python_paths: list[str]) -> None:
    """The archive unpacked into `version_dir` with its model.py and its serving settings."""
    if version_dir.exists():
        shutil.rmtree(version_dir)
    with zipfile.ZipFile(store / entry.archive) as mar:
        mar.extractall(version_dir)
    manifest = json.loads((version_dir / "MAR-INF" / "MANIFEST.json").read_text())
    settings = {
        "name": entry.name,
        "version": entry.version,
        "weights": manifest["model"]["serializedFile"],
        "handler": entry.config.get("handler", {}),
        "batch_size": entry.config.get("batchSize", 1),
        "sha256": entry.sha256,
    }
    (version_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    (version_dir / "model.py").write_text(model_source(entry, python_paths))


def export_triton(store: Path, spec: TritonSpec) -> list[Path]:
    """Writes (or adds versions to) spec.out/NAME from the catalog's archives, each checked against its sha256."""
    spec.validate()
    entries = [verify_archive(store, spec.name, version) for version in spec.versions]
    for entry in entries:
        with zipfile.ZipFile(store / entry.archive) as mar:
            if ADAPTER not in mar.namelist():
                built_by = f"servekit {entry.servekit_version}" if entry.servekit_version else "an older servekit"
                raise UsageError(f"{entry.archive} was built by {built_by}, without Triton's adapter ({ADAPTER}): "
                                 "build it again with this servekit, as a new version")  # fmt: skip
    model_dir = spec.out / spec.name
    numbers = integer_versions(model_dir, spec.versions)
    model_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in entries:
        version_dir = model_dir / str(numbers[entry.version])
        export_version(entry, store, version_dir, spec.python_paths)
        written.append(version_dir)
    newest = max(entries, key=lambda e: numbers[e.version])
    labels_path = model_dir / str(numbers[newest.version]) / "labels.json"
    labels = json.loads(labels_path.read_text()) if labels_path.is_file() and newest.handler != "tensor" else None
    exported = sorted(numbers[e.version] for e in entries)
    (model_dir / "config.pbtxt").write_text(pbtxt(model_config(spec, newest, labels, exported)) + "\n")
    versions = {str(n): semver for semver, n in sorted(numbers.items(), key=lambda item: item[1])}
    (model_dir / VERSIONS_FILE).write_text(json.dumps({"name": spec.name, "versions": versions}, indent=2))
    return [model_dir / "config.pbtxt", model_dir / VERSIONS_FILE, *written]
