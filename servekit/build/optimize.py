"""`servekit optimize`: one trained model -> measured variants, an accuracy gate, and the fastest one to archive.

Every variant is built, loaded and timed in this one process with the same threads and inputs: latency p50/p95
at batch 1 and 8, throughput, file size, load time, held-out accuracy, and agreement with the eager fp32 reference
(top-1 agreement, max |logit diff|). A variant that torch or ONNX Runtime cannot produce here is reported as
skipped with the error, never dropped silently.

Each accepted variant is saved as a folder `servekit build --from` (or `--variant`) packs as it is.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from servekit.build.formats import dynamic_shapes, example_batch, export_model, load_format, load_trained
from servekit.build.handler_code import Decoder, HandlerChoice, parse_handler
from servekit.core.choices import CPU_ONLY_VARIANTS, CUDA_GRAPH_BUCKETS, QUICK_VARIANTS, VARIANTS, variants_named
from servekit.core.errors import UsageError
from servekit.core.names import check_name
from servekit.core.timing import (
    DEFAULT_REPEATS,
    MAX_BACKGROUND_CORES,
    MAX_SPREAD,
    Figure,
    machine_summary,
    percentile,
    repeated,
    time_alternating,
    time_calls,
)
from servekit.store.catalog import Catalog
from servekit.store.heldout import read_held_out
from servekit.store.workspace import (
    FORMAT_FILES,
    HANDLER_CODE_DIR,
    HANDLER_FILE,
    HELD_OUT_DIR,
    LABELS_FILE,
    METRICS_FILE,
    MODEL_CODE_DIR,
    VOCAB_FILE,
    WEIGHTS_FILE,
)
from servekit_worker.acceleration import BucketedModel, capture_cuda_graphs, runs_channels_last, takes_channels_last
from servekit_worker.loading import onnx_session

CALIBRATION_SAMPLES = 64
MIN_PAIRED_CALLS = 8  # per variant, when timing a speedup against eager
CPU = torch.device("cpu")
EVAL_MAX_PIXELS = 1 << 26  # held-out images are ours: only a sanity bound
COPIED_FILES = (LABELS_FILE, VOCAB_FILE, METRICS_FILE, WEIGHTS_FILE)
COPIED_DIRS = (HELD_OUT_DIR, MODEL_CODE_DIR, HANDLER_CODE_DIR)
# What optimize makes from a file a user brought, without the model's class ("eager" is the file itself).
BROUGHT_VARIANTS = {
    "torchscript": ("eager",),
    "export": ("eager", "aoti", "onnx"),
    "onnx": ("eager", "onnx_int8", "onnx_dynamic_int8"),
    "aoti": ("eager",),
}


# Inputs -------------------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """Held-out inputs as the handler builds them: `calibration` for static quantization, `samples` to score;
    `collate` is the handler's own (stacks images, pads token ids)."""

    calibration: list[torch.Tensor]
    samples: list[torch.Tensor]
    labels: torch.Tensor
    collate: Callable[[list[torch.Tensor]], torch.Tensor] = torch.cat

    def batches(self, size: int):
        for start in range(0, len(self.samples), size):
            yield self.collate(self.samples[start : start + size])


def folder_handler(source_dir: Path, handler: dict) -> HandlerChoice:
    """The handler a trained folder's requests go through: the one it records (servekit import), else the one
    servekit's own trainers imply (text, image with its preprocessing, digits, tensors)."""
    if handler.get("handler"):
        return parse_handler(handler["handler"], base=source_dir)
    if handler.get("model_class") == "TextClassifier":
        return HandlerChoice("text")
    if "preprocess" in handler:
        return HandlerChoice("image")
    digits = handler.get("example_input", {}).get("shape") == [1, 28, 28]
    return HandlerChoice("digits" if digits else "tensor")


def load_eval_set(source_dir: Path, handler: dict) -> EvalSet:
    """Decodes the trained folder's held-out set with the folder's handler, in this process, as the served archive
    decodes each request body (image bytes -> pixels, text -> token ids, a user's handler -> what it makes)."""
    samples = read_held_out(source_dir / HELD_OUT_DIR)
    if len(samples) <= CALIBRATION_SAMPLES + 10:
        raise UsageError(f"{source_dir / HELD_OUT_DIR} has {len(samples)} samples; optimize needs more than 74 "
                         "(servekit import --eval FOLDER)")  # fmt: skip
    labels = json.loads((source_dir / LABELS_FILE).read_text())
    settings = {**handler, "max_image_pixels": EVAL_MAX_PIXELS}  # held-out images are the user's: only a sanity bound
    decoder = Decoder(folder_handler(source_dir, handler), settings, source_dir)
    tensors = [decoder.samples(s.path.read_bytes(), s.content_type, s.path.name)[0] for s in samples]
    unknown = sorted({s.label for s in samples} - set(labels))
    if unknown:
        raise UsageError(
            f"{source_dir / HELD_OUT_DIR} has labels that are not in labels.json: {', '.join(unknown[:5])}"
        )
    targets = torch.tensor([labels.index(s.label) for s in samples])
    return EvalSet(tensors[:CALIBRATION_SAMPLES], tensors[CALIBRATION_SAMPLES:], targets[CALIBRATION_SAMPLES:],
                   decoder.batch)  # fmt: skip


def load_source(source_dir: Path) -> tuple[Callable, dict, str]:
    """The model optimize starts from, its handler settings and its format: the eager model when the folder holds
    its state_dict, else the brought file (TorchScript, torch.export, ONNX) loaded as the worker loads it."""
    handler = json.loads((source_dir / HANDLER_FILE).read_text()) if (source_dir / HANDLER_FILE).is_file() else {}
    brought = handler.get("format", "state_dict")
    if brought == "state_dict" or (source_dir / WEIGHTS_FILE).is_file():
        model, handler = load_trained(source_dir)
        return model, handler, "state_dict"
    return load_format(source_dir / FORMAT_FILES[brought], brought, torch.get_num_threads()), handler, brought


# Variants -------------------------------------------------------------------------------------------------------
@dataclass
class Built:
    """A variant ready to time: `run` maps a batch to float32 logits; `save` writes its archive folder."""

    run: Callable[[torch.Tensor], torch.Tensor]
    files: list[Path]
    handler: dict = field(default_factory=dict)  # handler.json settings for its archive (format, dtype, compile)
    archivable: str = ""  # why it cannot be archived ('' when it can)


class Builder:
    """Builds each variant of one model into `work/NAME/`, to run on `device` the way a worker there runs it
    (images channels_last where `runs_channels_last` says a worker there lays them out so and the model takes
    them; on CUDA: inputs copied from the CPU, outputs copied back)."""

    def __init__(
        self,
        model: torch.nn.Module,
        handler: dict,
        eval_set: EvalSet,
        work: Path,
        threads: int,
        device: torch.device = CPU,
        source: tuple[str, Path | None] = ("state_dict", None),
    ):
        self.model, self.handler, self.eval_set, self.work, self.threads = model, handler, eval_set, work, threads
        self.device = device
        self.source_format, self.source_file = source  # what the user brought: an eager model, or a file of a format
        # Images run channels_last where a worker on the device runs the source's format so (the handler's rule,
        # `channels_last: false` included) and the model takes them (tried as the worker tries it).
        image = len(handler.get("example_input", {}).get("shape", [])) == 3
        self.channels_last = (
            image
            and runs_channels_last({**handler, "format": self.source_format}, device.type)
            and takes_channels_last(model, example_batch(handler, 1))
        )
        self.layout = {"memory_format": torch.channels_last} if self.channels_last else {}

    def on_device(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """A copy of `model` on the device, in `dtype` and the worker's layout. `Module.to` works in place, and the
        variants built after this one start from the same model in its own layout (pruning views it flat)."""
        return copy.deepcopy(model).to(self.device, dtype, **self.layout)

    def place(self, batch: torch.Tensor) -> torch.Tensor:
        """A timing batch where a worker's inputs are when the model runs: on the GPU already (the handler decodes
        and transforms images there), so a GPU variant's time is the model's, not PCIe's."""
        return batch.to(self.device)

    def inputs(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A CPU batch as the model on the device takes it."""
        batch = batch.to(self.device, dtype if batch.is_floating_point() else None, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def device_settings(self, dtype: torch.dtype) -> dict:
        """Handler settings that pin a variant to CUDA workers: half precision gated on the GPU."""
        return {"device": "cuda"} if self.device.type == "cuda" and dtype != torch.float32 else {}

    def folder(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def eager_like(
        self, name: str, model: torch.nn.Module, handler: dict, dtype=torch.float32, wrap: Callable | None = None
    ) -> Built:
        """`model`'s weights archived as a state_dict; timed on the device, through `wrap` (torch.compile) if given."""
        folder = self.folder(name)
        path = folder / FORMAT_FILES["state_dict"]
        torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
        model = self.on_device(model, dtype)
        if wrap is not None:
            model = wrap(model)

        def run(batch):
            return model(self.inputs(batch, dtype)).float().cpu()

        return Built(run, [path], {"format": "state_dict", **handler, **self.device_settings(dtype)})

    def exported(self, name: str, model_format: str, model: torch.nn.Module | None = None) -> Built:
        folder = self.folder(name)
        if self.device.type == "cpu":
            path, settings = export_model(model or self.model, self.handler, model_format, folder)
            return Built(load_format(path, model_format, self.threads), [path], {"format": model_format, **settings})
        # On CUDA: AOTInductor compiles for the device it exports on; ONNX Runtime needs its CUDA provider; the
        # TorchScript and exported programs are moved there as the worker moves them.
        model = copy.deepcopy(model or self.model)
        if model_format == "onnx" and not cuda_onnxruntime():
            raise UsageError("onnxruntime here has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
        on_device = model_format == "aoti"
        path, settings = export_model(self.on_device(model) if on_device else model, self.handler, model_format,
                                      folder, self.device if on_device else None)  # fmt: skip
        if model_format == "onnx":
            runner = onnx_session(path, self.threads, self.device)
            return Built(runner, [path], {"format": "onnx", "device": "cuda"})
        loaded = load_format(path, model_format, self.threads)
        if model_format == "aoti":  # compiled for contiguous inputs; the handler sends them so
            run = lambda b: loaded(self.inputs(b).contiguous()).float().cpu()  # noqa: E731
            return Built(run, [path], {"format": "aoti", **settings})
        loaded = loaded.to(self.device, **self.layout)  # TorchScript, exported program: as a CUDA worker lays them out
        return Built(lambda b: loaded(self.inputs(b)).float().cpu(), [path], {"format": model_format, **settings})

    def build(self, name: str) -> Built:
        model = self.model
        if self.source_format != "state_dict":
            return self.from_brought(name)
        if self.device.type == "cuda" and name in CPU_ONLY_VARIANTS:
            raise UsageError(f"{name} runs on the CPU only (its int8 kernels have no CUDA version here)")
        if name == "cuda_graphs":
            return self.cuda_graphs()
        if name == "eager":
            return self.eager_like(name, model, {})
        if name in ("torchscript", "export", "aoti", "onnx"):
            return self.exported(name, name)
        if name == "compile":
            return self.eager_like(name, model, {"compile": True}, wrap=torch.compile)
        if name == "dynamic_int8":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear, torch.nn.LSTM}, torch.qint8)
            # The Transformer fast path reads `linear.weight` as a tensor; a quantized Linear's is a method.
            # Traced with the fast path off, the TorchScript graph takes the plain path wherever it runs.
            fast_path = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                return self.exported(name, "torchscript", quantized)
            finally:
                torch.backends.mha.set_fastpath_enabled(fast_path)
        if name in ("bf16", "fp16"):
            dtype = torch.bfloat16 if name == "bf16" else torch.float16
            return self.eager_like(name, model, {"dtype": str(dtype).removeprefix("torch.")}, dtype)
        if name == "pruned_l1_50":
            return self.eager_like(name, pruned(copy.deepcopy(model), 0.5), {})
        if name == "pt2e_int8":
            return self.pt2e()
        if name in ("onnx_int8", "onnx_dynamic_int8"):
            return self.onnx_quantized(name)
        raise UsageError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")

    def from_brought(self, name: str) -> Built:
        """A variant of a brought file: the file itself ("eager", the reference), or what can be made from its format
        without the eager class (AOTInductor and ONNX from a torch.export program, int8 from an ONNX model)."""
        makes = BROUGHT_VARIANTS[self.source_format]
        if name not in makes:
            raise UsageError(f"cannot be made from a {self.source_format} file (it needs the model's class and "
                             f"state_dict); from {self.source_format}: {', '.join(makes)}")  # fmt: skip
        if name == "eager":
            path = self.folder(name) / FORMAT_FILES[self.source_format]
            shutil.copy2(self.source_file, path)
            model = self.model if self.device.type == "cpu" else self.model.to(self.device)
            return Built(lambda b: model(self.inputs(b)).float().cpu(), [path], {"format": self.source_format})
        if name in ("onnx_int8", "onnx_dynamic_int8"):
            return self.onnx_quantized(name)
        return self.exported(name, name)

    def cuda_graphs(self) -> Built:
        """fp16 on CUDA with one captured CUDA graph per batch-size bucket (a batch is padded to its bucket): the
        handler's own capture code, so what is gated here is what the worker replays."""
        if self.device.type != "cuda":
            raise UsageError("cuda_graphs needs --device cuda")
        example = self.inputs(example_batch(self.handler, 1), torch.float16)

        def captured(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
            runners = capture_cuda_graphs(model.eval(), example, list(CUDA_GRAPH_BUCKETS), self.channels_last)
            return BucketedModel(runners, model)

        built = self.eager_like("cuda_graphs", self.model, {}, torch.float16, wrap=captured)
        built.handler.update({"dtype": "float16", "cuda_graphs": list(CUDA_GRAPH_BUCKETS)})
        return built

    def pt2e(self) -> Built:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

        example = example_batch(self.handler)
        program = torch.export.export(self.model, (example,), dynamic_shapes=dynamic_shapes(self.handler)).module()
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(program, quantizer)
        for batch in calibration_batches(self.eval_set):
            prepared(batch)
        compiled = torch.compile(convert_pt2e(prepared))
        why = "measured only: the converted program needs torchao's quantized ops and torch.compile in the worker"
        return Built(compiled, [], {}, archivable=why)

    def onnx_quantized(self, name: str) -> Built:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        folder = self.folder(name)
        source = folder / "fp32.onnx"
        if self.source_format == "onnx":
            shutil.copy2(self.source_file, source)
        else:
            export_model(self.model, self.handler, "onnx", folder)[0].rename(source)
        target = folder / FORMAT_FILES["onnx"]
        if name == "onnx_dynamic_int8":
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        else:
            batches = [b.numpy() for b in calibration_batches(self.eval_set)]
            input_name = ort_input_name(source)

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.items = iter([{input_name: b} for b in batches])

                def get_next(self):
                    return next(self.items, None)

            quantize_static(
                str(source),
                str(target),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
        source.unlink()
        return Built(onnx_session(target, self.threads), [target], {"format": "onnx"})


def cuda_onnxruntime() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def ort_input_name(path: Path) -> str:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].name


def calibration_batches(eval_set: EvalSet, size: int = 8):
    for start in range(0, len(eval_set.calibration), size):
        yield eval_set.collate(eval_set.calibration[start : start + size])


def pruned(model: torch.nn.Module, amount: float) -> torch.nn.Module:
    """Magnitude (L1, unstructured) pruning of every conv and linear weight, made permanent."""
    from torch.nn.utils import prune

    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            prune.l1_unstructured(module, "weight", amount)
            prune.remove(module, "weight")
    return model


# Measuring --------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    status: str  # reference (eager fp32) | accepted | rejected | skipped
    reason: str = ""
    size_bytes: int = 0
    load_ms: float = 0.0
    bs1_p50_ms: float = 0.0
    bs1_p95_ms: float = 0.0
    bs8_p50_ms: float = 0.0
    bs8_p95_ms: float = 0.0
    bs64_p50_ms: float = 0.0  # measured on CUDA only, where batches of 64 are what a busy worker runs
    throughput_per_s: float = 0.0  # at batch 64 on CUDA, else at batch 8
    accuracy: float = 0.0
    agreement: float = 0.0
    max_logit_diff: float = 0.0
    speedup_bs1: float = 0.0  # eager's batch-1 p50 over this variant's, timed in turn call by call (paired_speedup)
    size_ratio: float = 0.0
    archive_dir: str = ""
    bs1_repeats_ms: list[float] = field(default_factory=list)  # p50 of each repeat; bs1_p50_ms is their median
    bs1_spread: float = 0.0  # (max - min) / median of the repeats
    background_cores: float = 0.0  # CPU other processes used while this variant was timed
    timing: str = ""  # "±2%", or why the figure is not a clean number

    def set_timing(self, figure: Figure) -> None:
        self.bs1_p50_ms, self.bs1_repeats_ms, self.bs1_spread = figure.value, figure.repeats, figure.spread
        self.background_cores = figure.background_cores
        self.timing = f"±{figure.spread / 2:.0%}" if figure.trusted else "unreliable: " + ", ".join(figure.doubts)


def measure(
    name: str,
    built: Built,
    eval_set: EvalSet,
    reference: dict | None,
    budget_s: float,
    big_batches: bool = False,
    place: Callable[[torch.Tensor], torch.Tensor] = lambda batch: batch,
) -> tuple[Result, dict]:
    """Times and scores one built variant; returns its result and its logits. `reference` is eager's (None while
    eager itself is measured): the logits the variant is compared with, and the model its speedup is timed against.
    `big_batches` (on CUDA) also times batches of 64, and the throughput is theirs; `place` puts each timing batch
    where the worker has it when the model runs."""
    with torch.inference_mode():
        logits = torch.cat([built.run(batch).float() for batch in eval_set.batches(64)])
    predictions = logits.argmax(dim=1)
    singles = [place(eval_set.collate([s])) for s in eval_set.samples[:64]]
    eights = [
        place(eval_set.collate(eval_set.samples[i : i + 8])) for i in range(0, min(64, len(eval_set.samples) - 7), 8)
    ]
    bs1: list[float] = []

    def bs1_round() -> float:
        times = time_calls(built.run, singles, budget_s / DEFAULT_REPEATS, 10, max_iterations=200)
        bs1.extend(times)
        return percentile(times, 50)

    with torch.inference_mode():
        bs1_figure = repeated(bs1_round, DEFAULT_REPEATS)
        bs8 = time_calls(built.run, eights, budget_s, 10, max_iterations=200)
        starts = range(0, len(eval_set.samples) - 63, 64) if big_batches else []
        sixty_fours = [place(eval_set.collate(eval_set.samples[i : i + 64])) for i in starts]
        bs64 = time_calls(built.run, sixty_fours, budget_s, 10, max_iterations=200) if big_batches else []
    result = Result(
        name=name,
        status="reference" if reference is None else "accepted",
        size_bytes=sum(path.stat().st_size for path in built.files),
        bs1_p95_ms=percentile(bs1, 95),
        bs8_p50_ms=percentile(bs8, 50),
        bs8_p95_ms=percentile(bs8, 95),
        bs64_p50_ms=percentile(bs64, 50) if bs64 else 0.0,
        throughput_per_s=64000 / percentile(bs64, 50) if bs64 else 8000 / percentile(bs8, 50),
        accuracy=float((predictions == eval_set.labels).float().mean()),
    )
    result.set_timing(bs1_figure)
    result.speedup_bs1 = 1.0
    if reference is not None:
        with torch.inference_mode():
            eager = reference["built"].run, reference["result"].bs1_p50_ms
            result.speedup_bs1 = paired_speedup(eager, (built.run, result.bs1_p50_ms), singles, budget_s)
    compared = reference or {"logits": logits, "predictions": predictions}
    result.agreement = float((predictions == compared["predictions"]).float().mean())
    result.max_logit_diff = float((logits - compared["logits"]).abs().max())
    return result, {"logits": logits, "predictions": predictions, "built": built}


def paired_speedup(
    eager: tuple[Callable, float], variant: tuple[Callable, float], singles: list[torch.Tensor], budget_s: float
) -> float:
    """Eager's batch-1 p50 ÷ the variant's, the two timed in turn call by call (timing.time_alternating) within
    about `budget_s`. Each is given as (run, its own p50 ms, which sizes the run). Variants are otherwise timed one
    after another, so load that comes or goes in between would pass for a speedup: AOTInductor read 0.59x eager
    timed after it on a shared machine, and 0.95-1.09x timed in turn (issue 14)."""
    (eager_run, eager_ms), (variant_run, variant_ms) = eager, variant
    calls = int(budget_s * 1000 / max(eager_ms + variant_ms, 1e-3))
    inputs = singles[: max(MIN_PAIRED_CALLS, min(len(singles), calls))]
    eager_times, variant_times = time_alternating([eager_run, variant_run], inputs, rounds=1, warmup=2)
    return percentile(eager_times, 50) / percentile(variant_times, 50)


@dataclass
class Report:
    name: str
    source_dir: str
    threads: int
    max_accuracy_drop: float
    results: list[Result]
    best: str = ""
    machine: str = ""
    device: str = "cpu"
    picked_by: str = "latency at batch 1"

    def by_name(self, name: str) -> Result:
        return next(r for r in self.results if r.name == name)


@dataclass
class OptimizePlan:
    """What `servekit optimize` makes and measures: the variants of the model trained in `source_dir`, on `device`,
    each timed for `budget_s` per batch size and gated at `max_accuracy_drop` points below eager fp32."""

    name: str
    source_dir: Path
    out_dir: Path
    variants: tuple[str, ...] | str = QUICK_VARIANTS  # or "quick" (the device's quick set), "all", "a,b,c"
    max_accuracy_drop: float = 1.0
    threads: int | None = None  # torch/ONNX Runtime threads [all cores]
    budget_s: float = 2.0
    student_dir: Path | None = None  # a distilled student, measured beside the variants
    device: torch.device = CPU


def optimize(plan: OptimizePlan, on_result: Callable[[Result], None] | None = None) -> Report:
    """Builds and measures every variant of the plan; writes report files to its out_dir. On the CPU the fastest
    accepted variant at batch 1 is the best; on CUDA the one with the highest throughput at batch 64 (a GPU worker
    serves batches)."""
    name, source_dir, out_dir = plan.name, plan.source_dir, plan.out_dir
    variants = variants_named(plan.variants, plan.device.type)
    max_accuracy_drop, threads, budget_s, device = plan.max_accuracy_drop, plan.threads, plan.budget_s, plan.device
    check_name(name)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if max_accuracy_drop < 0:
        raise UsageError("--max-accuracy-drop is in points and must be >= 0")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model, handler, source_format = load_source(source_dir)
    eval_set = load_eval_set(source_dir, handler)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = (source_format, source_dir / FORMAT_FILES[source_format])
    builder = Builder(model, handler, eval_set, out_dir / "variants", threads, device, source)
    on_cuda = device.type == "cuda"
    ordered = ("eager", *[v for v in variants if v != "eager"])
    reference, results = None, []
    jobs: list[tuple[str, Callable[[], Built]]] = [(v, lambda v=v: builder.build(v)) for v in ordered]
    if plan.student_dir is not None:
        jobs.append(("distilled", lambda: student_variant(plan.student_dir, builder)))
    for variant, build in jobs:
        started = time.perf_counter()
        try:
            built = build()
        except Exception as exc:  # a variant torch cannot make here is reported, not hidden
            result = Result(variant, "skipped", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        else:
            load_ms = (time.perf_counter() - started) * 1000
            result, outputs = measure(variant, built, eval_set, reference, budget_s, on_cuda, builder.place)
            result.load_ms = load_ms
            if reference is None:
                reference = {**outputs, "result": result}
            if result.speedup_bs1 < 1:
                result.reason = f"slower than eager ({result.speedup_bs1:.2f}x)"
            result.size_ratio = result.size_bytes / reference["result"].size_bytes if result.size_bytes else 0.0
            drop = (reference["result"].accuracy - result.accuracy) * 100
            if result.status != "reference" and drop > max_accuracy_drop:
                result.status = "rejected"
                result.reason = "; ".join(filter(None, [f"accuracy drop {drop:.2f} points > {max_accuracy_drop}",
                                                        result.reason]))  # fmt: skip
            if built.archivable:
                result.reason = "; ".join(filter(None, [result.reason, built.archivable]))
            else:
                result.archive_dir = str(save_variant(source_dir, handler, built, builder.work / variant, variant))
        results.append(result)
        if on_result:
            on_result(result)
    report = Report(name, str(source_dir), threads, max_accuracy_drop, results, machine=machine_summary())
    accepted = [r for r in results if r.status in ("reference", "accepted") and r.archive_dir]
    report.best = min(accepted, key=lambda r: r.bs1_p50_ms).name
    if on_cuda:
        report.device, report.picked_by = f"cuda ({torch.cuda.get_device_name(device)})", "throughput at batch 64"
        report.best = max(accepted, key=lambda r: r.throughput_per_s).name
    write_report(report, out_dir)
    return report


def student_variant(student_dir: Path, builder: Builder) -> Built:
    student, handler = load_trained(student_dir)
    folder = builder.folder("distilled")
    for file_name in (*COPIED_FILES, HANDLER_FILE):
        if (student_dir / file_name).is_file():
            shutil.copy2(student_dir / file_name, folder / file_name)
    return Built(student, [folder / FORMAT_FILES["state_dict"]], {"format": "state_dict", **handler})


def save_variant(source_dir: Path, handler: dict, built: Built, folder: Path, variant: str) -> Path:
    """Completes a variant's folder so that `servekit build --from folder` packs it as it is."""
    folder.mkdir(parents=True, exist_ok=True)
    for file_name in (*COPIED_FILES, *handler.get("extra_files", [])):
        if (source_dir / file_name).is_file() and not (folder / file_name).exists():
            shutil.copy2(source_dir / file_name, folder / file_name)
    for dir_name in COPIED_DIRS:
        if (source_dir / dir_name).is_dir() and not (folder / dir_name).exists():
            shutil.copytree(source_dir / dir_name, folder / dir_name)
    if not (folder / HANDLER_FILE).exists() or variant != "distilled":
        settings = {**handler, **built.handler, "variant": variant}
        (folder / HANDLER_FILE).write_text(json.dumps(settings, indent=2))
    return folder


# Reports ---
TABLE = {  # terminal column -> (Result field, format)
    "variant": ("name", "{}"),
    "status": ("status", "{}"),
    "bs1 p50 ms": ("bs1_p50_ms", "{:.3f}"),
    "bs1 p95": ("bs1_p95_ms", "{:.3f}"),
    "bs8 p50": ("bs8_p50_ms", "{:.3f}"),
    "per s": ("throughput_per_s", "{:.0f}"),
    "timing": ("timing", "{}"),
    "speedup": ("speedup_bs1", "{:.2f}x"),
    "size": ("size_ratio", "{:.2f}x"),
    "accuracy": ("accuracy", "{:.4f}"),
    "agree": ("agreement", "{:.3f}"),
    "max |dlogit|": ("max_logit_diff", "{:.2g}"),
    "note": ("reason", "{}"),
}
TABLE_HEADERS = list(TABLE)


def table_rows(report: Report) -> list[list[str]]:
    return [[form.format(getattr(result, key)) for key, form in TABLE.values()] for result in report.results]


# Files ----------------------------------------------------------------------------------------------------------
COLUMNS = (
    "name",
    "status",
    "bs1_p50_ms",
    "timing",
    "background_cores",
    "bs1_p95_ms",
    "bs8_p50_ms",
    "bs64_p50_ms",
    "throughput_per_s",
    "speedup_bs1",
    "size_bytes",
    "size_ratio",
    "load_ms",
    "accuracy",
    "agreement",
    "max_logit_diff",
    "reason",
)


def write_report(report: Report, out_dir: Path) -> None:
    document = {**asdict(report), "results": [asdict(r) for r in report.results]}
    (out_dir / "report.json").write_text(json.dumps(document, indent=2))
    (out_dir / "report.md").write_text(markdown(report))
    chart(report, out_dir / "latency_vs_accuracy.png")


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(report: Report) -> str:
    lines = [
        f"# servekit optimize: {report.name}",
        "",
        f"Source `{report.source_dir}`; on {report.device}, {report.threads} threads; {report.machine}. Accuracy "
        f"gate: at most {report.max_accuracy_drop} points below eager fp32. Best accepted by {report.picked_by}: "
        f"**{report.best}**.",
        f"bs1_p50_ms is the median of {DEFAULT_REPEATS} repeats; `timing` gives half their spread, or says why the "
        f"figure is unreliable (repeats spread more than {MAX_SPREAD:.0%}, or other processes used more than "
        f"{MAX_BACKGROUND_CORES} cores); "
        "background_cores is the CPU other processes used while the variant was timed. speedup_bs1 is eager's "
        "batch-1 p50 over the variant's with the two timed in turn, call by call, in one run of their own (the "
        "bs1_p50_ms of two variants are timed one after the other and may see different load).",
        *[
            f"- **{r.timing.split(':')[0]}**: {r.name}: {r.timing.split(': ', 1)[1]}"
            for r in report.results
            if r.timing.startswith("unreliable")
        ],
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cell(getattr(r, c)) for c in COLUMNS) + " |" for r in report.results]
    return "\n".join(lines) + "\n"


def chart(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    colors = {"reference": "black", "accepted": "tab:green", "rejected": "tab:red"}
    plotted = [result for result in report.results if result.status in colors]
    for rank, result in enumerate(sorted(plotted, key=lambda r: r.bs1_p50_ms)):
        axes.scatter(result.bs1_p50_ms, result.accuracy * 100, color=colors[result.status])
        axes.annotate(
            result.name,
            (result.bs1_p50_ms, result.accuracy * 100),
            fontsize=8,
            xytext=(4, 4 - 10 * (rank % 4)),
            textcoords="offset points",
        )  # staggered: clusters stay legible
    axes.set_xscale("log")
    axes.set_xlabel("latency p50 at batch 1 (ms, log scale)")
    axes.set_ylabel("held-out accuracy (%)")
    axes.set_title(f"{report.name}: variants (green accepted, red rejected, black eager fp32)")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def record_best(store: Path, report: Report, out_dir: Path) -> None:
    """Remembers the fastest accepted variant in the catalog, for `servekit build NAME --variant best`."""
    check_name(report.name)
    with Catalog.locked(store) as catalog:  # a build running meanwhile keeps its entry
        catalog.optimizations[report.name] = {
            "best": report.best,
            "report": str((out_dir / "report.json").resolve()),
            "variants": {r.name: r.archive_dir for r in report.results if r.archive_dir and r.status != "rejected"},
        }
