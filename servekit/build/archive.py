"""Building `.mar` archives with torch-model-archiver and verifying them against the catalog."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from servekit import __version__
from servekit.build.handler_code import HandlerChoice, entry_source, parse_handler
from servekit.core.errors import ArchiveError, UsageError
from servekit.core.names import check_name_version
from servekit.core.properties import check_max_batch_delay
from servekit.store.catalog import Catalog, CatalogEntry, sha256_file, utc_now
from servekit.store.heldout import HELD_OUT_INDEX, read_held_out, write_bodies
from servekit.store.workspace import (
    FORMAT_FILES,
    HANDLER_FILE,
    HELD_OUT_DIR,
    LABELS_FILE,
    METRICS_FILE,
    SERVING_FILE,
    VOCAB_FILE,
    Workspace,
    archive_file_name,
)


@dataclass(frozen=True)
class HandlerSpec:
    """A handler file of `handlers/`, the files of a trained folder its archives carry besides the weights, and
    the model inputs it decodes requests into (`feeds(shape, dtype)` of one sample; None: any)."""

    handler_file: str
    extra_files: tuple[str, ...] = (LABELS_FILE,)
    inputs: str = "any tensor"
    feeds: Callable[[list[int], str], bool] | None = None


HANDLERS = {
    "digits": HandlerSpec("digits.py", inputs="1x28x28 float32 (grayscale 28x28 images)",
                          feeds=lambda shape, dtype: shape == [1, 28, 28] and dtype == "float32"),
    "image": HandlerSpec("image_classifier.py", inputs="3xHxW float32 (RGB images)",
                         feeds=lambda shape, dtype: len(shape) == 3 and shape[0] == 3 and dtype == "float32"),
    "tensor": HandlerSpec("tensor_handler.py", extra_files=()),
    "text": HandlerSpec("text_classifier.py", extra_files=(LABELS_FILE, VOCAB_FILE), inputs="int64 token ids",
                        feeds=lambda shape, dtype: len(shape) == 1 and dtype == "int64"),
}  # fmt: skip
WORKER_PACKAGE = "servekit_worker"  # shipped beside the handler file in every archive, as one folder
GOLDEN_SAMPLES = 32


def check_handler_fits(handler: str, trained: dict, source_dir: Path) -> None:
    """Refuses a handler that decodes requests into inputs the trained model does not take (it would answer every
    request with an error): compared with handler.json's `example_input`, when the folder has one."""
    spec, example = HANDLERS[handler], trained.get("example_input")
    if spec.feeds is None or not example:
        return
    shape, dtype = [int(size) for size in example["shape"]], example.get("dtype", "float32")
    if spec.feeds(shape, dtype):
        return
    fitting = [name for name, other in HANDLERS.items() if other.feeds is not None and other.feeds(shape, dtype)]
    instead = f"--handler {' or '.join([*fitting, 'tensor'])}"
    raise UsageError(
        f"the {handler} handler feeds its model {spec.inputs}, but the model in {source_dir} takes "
        f"{'x'.join(map(str, shape))} {dtype}: build it with {instead}"
    )


# Serving defaults that are right untuned (docs/defaults.md): one worker per core, each with the cores
# shared out (never more torch threads than cores across the workers); a 1 ms batch window, so a lone request
# does not wait out a window TorchServe keeps open for company that never comes; batches as large as fit a
# BATCH_BUDGET_MS forward pass of the model on one worker's threads, up to DEFAULT_MAX_BATCH.
MAX_DEFAULT_WORKERS = 4
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_BATCH_DELAY_MS = 1
# 200 ms: resnet18 at 224 px (~45 ms a sample on one thread) gets batch 4, which served 1.30x batch 1's throughput
# at 16 clients with a lower p99 (docs/measurements/2026-12-05-resnet-peers.md); a lone request still runs alone.
BATCH_BUDGET_MS = 200.0


def available_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    return min(available_cores(), MAX_DEFAULT_WORKERS)


def threads_for(workers: int) -> int:
    """torch threads per worker: the cores shared out among the workers, at least one."""
    return max(1, available_cores() // workers)


@dataclass
class BuildOptions:
    """The serving settings written into the archive's model-config.yaml."""

    batch_size: int | None = None  # None: from the model's cost at build time (batch_size_for)
    max_batch_delay_ms: int = DEFAULT_MAX_BATCH_DELAY_MS
    workers: int = field(default_factory=default_workers)
    torch_threads: int | None = None  # None: threads_for(workers)
    response_timeout_s: int = 60
    model_format: str | None = None  # None: the trained folder's own format (an optimized variant), else state_dict
    handler: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)  # merged last, e.g. from `servekit config` (deviceType, ...)

    @property
    def threads_per_worker(self) -> int:
        return self.torch_threads or threads_for(self.workers)

    def validate(self) -> None:
        for label, value in (
            ("batch size", self.batch_size),
            ("workers", self.workers),
            ("torch threads", self.torch_threads),
        ):
            if value is not None and value < 1:
                raise UsageError(f"{label} must be at least 1, got {value}")
        check_max_batch_delay(self.max_batch_delay_ms)
        if self.model_format is not None and self.model_format not in FORMAT_FILES:
            raise UsageError(f"unknown format {self.model_format!r}; choose one of {', '.join(FORMAT_FILES)}")


def batch_size_for(sample_ms: float) -> int:
    """The largest power of two up to DEFAULT_MAX_BATCH whose batch (at `sample_ms` a sample) fits BATCH_BUDGET_MS."""
    size = 1
    while size * 2 <= DEFAULT_MAX_BATCH and size * 2 * sample_ms <= BATCH_BUDGET_MS:
        size *= 2
    return size


def sample_cost_ms(source_dir: Path, threads: int, served: dict | None = None) -> float:
    """Milliseconds per sample of the model the archive will serve, at batch 2 on `threads` torch threads: the
    fastest of the timed calls, the model's own cost, which other work on a busy machine only ever adds to. Images
    are laid out as a CPU worker lays them out under `served`, the archive's handler settings (format,
    `channels_last`; default: the folder's handler.json).
    An optimized variant (an ONNX int8 file, say) is timed in its own format, not as the eager weights its folder
    also keeps: a variant several times faster than eager gets the larger batches its speed affords."""
    import torch

    from servekit.build.formats import example_batch, load_format, load_trained, torch_threads
    from servekit.core.timing import time_calls
    from servekit_worker.acceleration import runs_channels_last, takes_channels_last

    trained = json.loads((source_dir / HANDLER_FILE).read_text())
    prebuilt = trained.get("format")
    packed = (served or {}).get("format") or prebuilt or "state_dict"
    with torch_threads(threads), torch.inference_mode():
        eager = packed == "state_dict" or not (source_dir / FORMAT_FILES[packed]).is_file()  # not yet exported
        if eager:
            model, trained = load_trained(source_dir)
        else:
            model = load_format(source_dir / FORMAT_FILES[packed], packed, threads)
        example = example_batch(trained, batch=2)
        # A CPU worker runs an eager model's images channels_last unless the settings say not, if the model takes them.
        settings = served if served is not None else {"format": packed, **trained}
        if eager and example.dim() == 4 and runs_channels_last(settings, "cpu") and takes_channels_last(model, example):
            model = model.to(memory_format=torch.channels_last)
            example = example.contiguous(memory_format=torch.channels_last)
        times = time_calls(model, [example], budget_s=0.2, min_iterations=5, warmup=2, max_iterations=50)
    return min(times) / 2


# Where each serving setting can come from, weakest first: BuildOptions' defaults, serving.json written by
# `servekit tune`, a --model-config file (from `servekit config`), an explicit flag.
SETTINGS = ("batch_size", "max_batch_delay_ms", "workers")
MODEL_CONFIG_KEYS = {"batchSize": "batch_size", "maxBatchDelay": "max_batch_delay_ms", "minWorkers": "workers"}


@dataclass
class ResolvedOptions:
    options: BuildOptions
    sources: dict[str, str]  # setting -> where its value came from


def resolve_options(
    source_dir: Path,
    flags: dict[str, int | None],
    model_config_path: Path | None = None,
    model_format: str | None = None,
) -> ResolvedOptions:
    """Build settings with one precedence: explicit flag > --model-config > serving.json (tune) > defaults."""
    defaults = BuildOptions()
    values = {setting: getattr(defaults, setting) for setting in SETTINGS}
    sources = dict.fromkeys(SETTINGS, "default")
    tuned = serving_defaults(source_dir)
    extra = read_model_config(model_config_path) if model_config_path is not None else {}
    layers = [
        (SERVING_FILE, {setting: tuned[setting] for setting in SETTINGS if setting in tuned}),
        (
            str(model_config_path),
            {MODEL_CONFIG_KEYS[key]: extra.pop(key) for key in list(extra) if key in MODEL_CONFIG_KEYS},
        ),
        ("flag", {setting: value for setting, value in flags.items() if value is not None}),
    ]
    for source, layer in layers:
        for setting, value in layer.items():
            values[setting], sources[setting] = int(value), source
    if values["batch_size"] is None:
        sources["batch_size"] = "model cost"
    # tune's threads go with tune's workers; any other worker count gets the cores shared out anew
    threads = tuned.get("torch_threads") if sources["workers"] == SERVING_FILE else None
    options = BuildOptions(**values, torch_threads=threads, model_format=model_format, model_config=extra)
    options.validate()
    return ResolvedOptions(options, sources)


def read_model_config(path: Path) -> dict:
    """A model-config.yaml (from `servekit config`), without maxWorkers: minWorkers = maxWorkers covers both."""
    import yaml  # 35 ms: not at the start of every command that imports archive's settings

    try:
        extra = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read --model-config {path}: {exc}") from None
    if not isinstance(extra, dict):
        raise UsageError(f"{path} is not a YAML mapping")
    extra.pop("maxWorkers", None)
    return extra


def placement(path: Path | None) -> dict:
    """What a model-config.yaml says about where workers run (deviceType, deviceIds, handler settings), without
    the settings `servekit tune` varies itself (workers, threads, batch size, delay)."""
    extra = read_model_config(path) if path is not None else {}
    for key in MODEL_CONFIG_KEYS:
        extra.pop(key, None)
    handler = {key: value for key, value in (extra.pop("handler", None) or {}).items() if key != "torch_threads"}
    return {**extra, "handler": handler} if handler else extra


def serving_defaults(source_dir: Path) -> dict:
    """The tuned settings of a trained folder ({} when it was never tuned)."""
    path = source_dir / SERVING_FILE
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text())
    except ValueError as exc:
        raise UsageError(f"{path} is not JSON ({exc}): rerun servekit tune or delete it") from None
    if not isinstance(document, dict):
        raise UsageError(f"{path} is not a JSON object: rerun servekit tune or delete it")
    return document


def handlers_dir() -> Path:
    """The folder of handler files: `handlers/` in a checkout, `servekit_handlers/` when installed."""
    import servekit_handlers

    return Path(servekit_handlers.__file__).resolve().parent


def stage_folder(staging: Path, source: Path, name: str) -> Path:
    """A folder holding a clean copy of `source` as `name` (no bytecode), for torch-model-archiver's --extra-files:
    it copies a folder's contents, so the copy lands as one folder `name` beside the handler file."""
    folder = staging / f"{name}-staged"
    shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return folder


def stage_worker_package(staging: Path) -> Path:
    """The worker package, staged as one folder of the archive."""
    import servekit_worker

    return stage_folder(staging, Path(servekit_worker.__file__).resolve().parent, WORKER_PACKAGE)


def packed_folder(store: Path, name: str, source_dir: Path | None, variant: str | None) -> Path:
    """The folder `servekit build` packs: --from, an optimized variant `optimize --pick` recorded ('best'), or
    STORE/work/NAME."""
    if variant and source_dir:
        raise UsageError("--variant and --from both name the folder to pack: give one")
    if variant:
        return Catalog.load(store).variant_dir(name, variant)
    return source_dir or Workspace(store).trained(name)


def recorded_handler(source_dir: Path) -> str | None:
    """The handler a trained folder records (`servekit import` writes it), None when it records none."""
    path = source_dir / HANDLER_FILE
    return json.loads(path.read_text()).get("handler") if path.is_file() else None


def choose_handler(handler: str | None, source_dir: Path) -> HandlerChoice:
    """--handler (a name or path/handler.py[:Class]), else the handler the folder records, else digits."""
    if handler in HANDLERS:  # servekit's, or a HandlerSpec a library caller added
        return HandlerChoice(handler)
    if handler:
        return parse_handler(handler)
    recorded = recorded_handler(source_dir)
    return parse_handler(recorded, base=source_dir) if recorded else parse_handler("digits")


def handler_files(choice: HandlerChoice, staging: Path, source_dir: Path, trained: dict) -> tuple[Path, list[Path]]:
    """The archive's handler file (TorchServe's entry point) and the extra files the handler and the model need:
    the worker package, the handler's own files, the model's code and the folder's extra files."""
    extra = [stage_worker_package(staging)]
    if choice.custom:
        entry = staging / "entry" / f"{choice.file.stem}_torchserve.py"
        entry.parent.mkdir()
        entry.write_text(entry_source(choice))
        extra.append(choice.file)
        extra += [source_dir / LABELS_FILE] if (source_dir / LABELS_FILE).is_file() else []
    else:
        spec = HANDLERS[choice.name]
        entry = handlers_dir() / spec.handler_file
        extra += [source_dir / f for f in spec.extra_files]
    if trained.get("model_code"):
        extra.append(stage_folder(staging, source_dir / trained["model_code"], trained["model_code"]))
    extra += [source_dir / f for f in trained.get("extra_files", []) if source_dir / f not in extra]
    return entry, extra


def handler_settings(handler_name: str, trained: dict, options: BuildOptions, format_settings: dict) -> dict:
    """The archive's `handler` section, as the worker reads it: the trained folder's handler.json, the format, the
    build options, and last the --model-config file's own `handler:` section."""
    handler = {
        **trained,
        "format": options.model_format,
        **format_settings,
        "torch_threads": options.threads_per_worker,
        **options.handler,
    }
    if handler_name == "tensor" and "example_input" in handler:
        handler.setdefault("input_shape", handler["example_input"]["shape"])
        handler.setdefault("input_dtype", handler["example_input"].get("dtype", "float32"))
    return {**handler, **(options.model_config.get("handler") or {})}


def model_config(handler_name: str, trained: dict, options: BuildOptions, format_settings: dict) -> dict:
    """TorchServe's per-model settings; the `handler` section is read by servekit's handlers."""
    handler = handler_settings(handler_name, trained, options, format_settings)
    extra = {key: value for key, value in options.model_config.items() if key != "handler"}
    return {
        "minWorkers": options.workers,
        "maxWorkers": options.workers,
        "batchSize": options.batch_size,
        "maxBatchDelay": options.max_batch_delay_ms,
        "responseTimeout": options.response_timeout_s,
        **extra,
        "handler": handler,
    }


def build_archive(
    name: str,
    version: str,
    source_dir: Path,
    store: Path,
    handler: str | HandlerChoice | None = None,
    options: BuildOptions | None = None,
    force: bool = False,
    parent_version: str | None = None,
) -> CatalogEntry:
    """Packs a trained folder into `store/NAME-VERSION.mar` (in `options.model_format`) and catalogs it.

    The lineage parent defaults to the highest cataloged version below this one. Up to GOLDEN_SAMPLES held-out
    samples of the trained folder are kept in `store/golden/NAME-VERSION/`: rollouts smoke-test with them.
    """
    import yaml  # 35 ms: not at the start of every command that imports archive's settings

    check_name_version(name, version)
    options = options or BuildOptions()
    options.validate()
    choice = handler if isinstance(handler, HandlerChoice) else choose_handler(handler, source_dir)
    handler = choice.name
    # read once; the handler's fit is checked first, a better hint than the extra files it would need
    trained = json.loads((source_dir / HANDLER_FILE).read_text()) if (source_dir / HANDLER_FILE).is_file() else {}
    if not choice.custom:
        check_handler_fits(handler, trained, source_dir)
    needed = (HANDLER_FILE, *([] if choice.custom else HANDLERS[handler].extra_files))
    missing = [f for f in needed if not (source_dir / f).is_file()]
    if missing:
        raise UsageError(
            f"{source_dir} lacks {', '.join(missing)}: train first (servekit train ... --out {source_dir})"
        )
    store.mkdir(parents=True, exist_ok=True)
    archive_path = store / archive_file_name(name, version)
    catalog = Catalog.load(store)
    refuse_existing(catalog, name, version, archive_path, force)
    if parent_version is None:
        parent_version = catalog.latest_before(name, version)
    elif parent_version and not catalog.get(name, parent_version):
        raise UsageError(f"parent version {name} {parent_version} is not in the catalog of {store}")

    # Each build stages in its own folder, and so does the archiver (it copies the files to TMPDIR/NAME), so builds
    # running together never share a file until the catalog's lock is held.
    metrics_path = source_dir / METRICS_FILE
    with tempfile.TemporaryDirectory(prefix=f".servekit-build-{name}-", dir=store) as tmp:
        staging = Path(tmp)
        prebuilt = trained.get("format")
        if prebuilt and options.model_format not in (None, prebuilt):
            raise UsageError(
                f"{source_dir} holds a {prebuilt} variant: build it without --format {options.model_format}"
            )
        options.model_format = prebuilt or options.model_format or "state_dict"
        if options.batch_size is None:
            served = handler_settings(handler, trained, options, {})
            options.batch_size = batch_size_for(sample_cost_ms(source_dir, options.threads_per_worker, served))
        if prebuilt:  # an optimized variant: its file is packed as it is
            weights, format_settings = source_dir / FORMAT_FILES[prebuilt], {}
        else:
            from servekit.build.formats import export_model, load_trained, torch_threads  # torch: only when exporting

            model, trained = load_trained(source_dir)
            with torch_threads(options.threads_per_worker):
                weights, format_settings = export_model(model, trained, options.model_format, staging)
        config = model_config(handler, trained, options, format_settings)
        config_path = staging / "model-config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        entry, extra_files = handler_files(choice, staging, source_dir, trained)
        command = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            name,
            "--version",
            version,
            "--serialized-file",
            str(weights),
            "--handler",
            str(entry),
            "--extra-files",
            ",".join(str(f) for f in extra_files),
            "--config-file",
            str(config_path),
            "--export-path",
            str(staging),
        ]
        archiver_tmp = staging / "archiver-tmp"
        archiver_tmp.mkdir()
        environment = {**os.environ, "TMPDIR": str(archiver_tmp), "TEMP": str(archiver_tmp), "TMP": str(archiver_tmp)}
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
        built = staging / f"{name}.mar"
        if result.returncode != 0 or not built.is_file():
            raise ArchiveError(f"torch-model-archiver failed: {(result.stderr or result.stdout).strip()}")
        with Catalog.locked(store) as catalog:  # of two builds of one version, the second one stops here
            refuse_existing(catalog, name, version, archive_path, force)
            os.replace(built, archive_path)
            golden_dir = keep_golden_samples(source_dir / HELD_OUT_DIR, Workspace(store).golden(name, version))
            entry = CatalogEntry(
                name=name,
                version=version,
                archive=archive_path.name,
                sha256=sha256_file(archive_path),
                size_bytes=archive_path.stat().st_size,
                created=utc_now(),
                handler=choice.describe(),
                model_format=options.model_format,
                parent_version=parent_version,
                built_by=f"{getpass.getuser()}@{socket.gethostname()}",
                golden_dir=str(golden_dir.relative_to(store)) if golden_dir else "",
                source_dir=str(source_dir.resolve()),
                source_weights_sha256=source_weights_sha256(source_dir),
                metrics=json.loads(metrics_path.read_text()) if metrics_path.is_file() else {},
                config=config,
                servekit_version=__version__,
                requirements=list(trained.get("requirements", [])),
            )
            catalog.add(entry, replace=force)
    return entry


def refuse_existing(catalog: Catalog, name: str, version: str, archive_path: Path, force: bool) -> None:
    """Without `force`, an archive or a catalog entry of the same name and version stops the build."""
    if not force and (archive_path.exists() or catalog.get(name, version)):
        raise ArchiveError(
            f"{archive_path.name} already exists in {archive_path.parent}: pick a new version or pass --force"
        )


def source_weights_sha256(source_dir: Path) -> str:
    """The trained weights an archive descends from (an optimized variant records its original's)."""
    metrics_path = source_dir / METRICS_FILE
    if metrics_path.is_file():
        recorded = json.loads(metrics_path.read_text()).get("weights_sha256")
        if recorded:
            return recorded
    return sha256_file(source_dir / FORMAT_FILES["state_dict"])


def keep_golden_samples(held_out: Path, destination: Path) -> Path | None:
    """Copies the first GOLDEN_SAMPLES held-out samples (and their labels) next to the archive."""
    if not (held_out / HELD_OUT_INDEX).is_file():
        return None
    samples = read_held_out(held_out)[:GOLDEN_SAMPLES]
    shutil.rmtree(destination, ignore_errors=True)
    write_bodies({s.path.name: s.path.read_bytes() for s in samples}, [s.label for s in samples], destination)
    return destination
