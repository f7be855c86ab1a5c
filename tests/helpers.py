"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
import yaml
from digits import DigitsHandler
from image_classifier import ImageClassifierHandler
from PIL import Image
from tensor_handler import TensorHandler
from text_classifier import TextClassifierHandler
from ts.context import Context, RequestProcessor

from servekit import server
from servekit.archive import build_archive
from servekit.client import ServeClient
from servekit.inprocess import worker_value
from servekit.processes import stop_process_tree

REPO = Path(__file__).resolve().parents[1]


class FakeRequestStatus:
    def __init__(self):
        self.code, self.phrase = None, None


class FakeContext:
    """The parts of ts.context.Context that handlers use, recording per-request statuses."""

    def __init__(self, model_dir: Path, manifest: dict, yaml_config: dict | None = None, gpu_id: int | None = None):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": gpu_id, "batch_size": 4}
        self.manifest = manifest
        self.model_yaml_config = yaml_config or {}
        self.metrics = None
        self.statuses: dict[int, tuple[int, str]] = {}
        self.content_types: dict[int, str] = {}
        self.response_headers: dict[int, dict[str, str]] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.response_headers.setdefault(idx, {})[key] = value

    def get_request_header(self, idx: int, name: str):
        """As TorchServe: each body parameter maps to {"content-type": ...}."""
        if idx in self.content_types and name in ("body", "data"):
            return {"content-type": self.content_types[idx]}
        return None


def extracted_archive(archive: Path, folder: Path) -> FakeContext:
    """Unpacks a .mar as TorchServe does and returns a context with its manifest and model-config.yaml."""
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(folder)
    manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
    return FakeContext(folder, manifest, yaml.safe_load((folder / "model-config.yaml").read_text()))


def requests_for(bodies: list[tuple[bytes, str]], context: FakeContext) -> list[dict]:
    """TorchServe's request list for (body, content type) pairs, with the context knowing the content types."""
    context.content_types = {i: content_type for i, (_, content_type) in enumerate(bodies)}
    return [{"body": worker_value(body, content_type)} for body, content_type in bodies]


def png_header_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height black pixels in about 50 KB: it decodes to `width * height` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_inputs(good_png: bytes) -> dict[str, tuple[bytes, str]]:
    """Each case a body and its content type, all of which must be answered 400 with a JSON error."""
    row = [0.5] * 28
    return {
        "not_an_image": (b"this is not an image at all", "application/octet-stream"),
        "truncated_png": (good_png[: len(good_png) // 2], "image/png"),
        "empty_body": (b"", "application/octet-stream"),
        "png_20000x20000": (png_header_bomb(), "image/png"),
        "json_wrong_shape": (json.dumps({"input": [row] * 27}).encode(), "application/json"),
        "json_ragged": (json.dumps({"input": [row] * 27 + [[0.5]]}).encode(), "application/json"),
        "json_nan": (
            b'{"input": [' + b",".join([json.dumps(row).encode()] * 27) + b", [NaN" + b", 0.5" * 27 + b"]]}",
            "application/json",
        ),
        "json_out_of_range": (json.dumps({"input": [[255.0] * 28] * 28}).encode(), "application/json"),
        "json_strings": (json.dumps({"input": [["a"] * 28] * 28}).encode(), "application/json"),
        "json_wrong_key": (json.dumps({"image": [row] * 28}).encode(), "application/json"),
        "json_empty_inputs": (json.dumps({"inputs": []}).encode(), "application/json"),
        "json_syntax_error": (b'{"input": [[0.1, 0.2', "application/json"),
    }


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def start_server(
    store: Path, workdir: Path, proxy: bool = False, base_config: Path = REPO / "config.properties"
) -> server.ServerState:
    """A TorchServe on free loopback ports; with `proxy`, the traffic-split nginx in front on another one."""
    settings = server.ServerSettings(
        base_config=base_config,
        model_store=store,
        workdir=workdir,
        ports={api: server.free_port() for api in server.DEFAULT_PORTS},
        proxy_port=server.free_port() if proxy else None,
    )
    return server.start(settings)


HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "matplotlib", "sklearn", "torchao")
# Not heavy, but each costs 25-200 ms of start-up that `--help` and the everyday calls must not pay (issue 17).
SLOW_TO_IMPORT = ("requests", "urllib3", "rich", "yaml", "filelock", "prometheus_client", "psutil")
PROBE = "\n".join(
    [
        "import json, sys",
        "from servekit.cli import cli",
        "try:",
        "    cli(sys.argv[1:], standalone_mode=False)",
        "except SystemExit:",
        "    pass",
        # a module servekit.lazy deferred sits in sys.modules as a _LazyModule until its first use
        "loaded = {m.split('.')[0] for m, module in list(sys.modules.items())",
        "          if type(module).__name__ != '_LazyModule'}",
        f"print('\\nIMPORTED=' + json.dumps(sorted(loaded & set({HEAVY + SLOW_TO_IMPORT!r}))))",
    ]
)


def modules_after(*args: str) -> set[str]:
    """Runs `servekit ARGS` in a fresh interpreter and returns which of HEAVY and SLOW_TO_IMPORT it imported."""
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    marker = next(line for line in result.stdout.splitlines() if line.startswith("IMPORTED="))
    return set(json.loads(marker.removeprefix("IMPORTED=")))


def heavy_modules_after(*args: str) -> list[str]:
    """The heavy packages (torch and what pulls it in) `servekit ARGS` imported."""
    return sorted(modules_after(*args) & set(HEAVY))


def slow_modules_after(*args: str) -> list[str]:
    """The packages that are slow to import which `servekit ARGS` imported."""
    return sorted(modules_after(*args) & set(SLOW_TO_IMPORT))


# KServe protocols, EXIF and poison inputs ------------------------------------------------------------------------
POISON = 666.0  # a PoisonModel raises when a sample holds this value
EXIF_ORIENTATION = 0x0112


def worker_context(handler, headers: list[dict]) -> Context:
    """A real ts Context for one batch, each request with its headers (as TorchServe's frontend sends them)."""
    context = Context(handler.model_name, str(handler.model_dir), handler.manifest, len(headers), None, "test")
    context.request_processor = [RequestProcessor(h) for h in headers]
    context.request_ids = {i: f"request-{i}" for i in range(len(headers))}
    return context


# What TorchServe 0.12's frontend adds: the KServe routes set `explain`, /predictions also sets `url_path`.
KSERVE_ROUTE = {"explain": "False", "body": {"content-type": "application/json"}}


def protocol_answers(handler, documents: list[dict]) -> list[tuple[int, dict]]:
    """(status, answer) of each KServe document, sent as one batch on TorchServe's KServe routes."""
    context = worker_context(handler, [KSERVE_ROUTE] * len(documents))
    answers = handler.handle([{"body": document} for document in documents], context)
    return [(context.get_response_status(i)[0], answer) for i, answer in enumerate(answers)]


def rotated_jpeg(png: bytes, orientation: int = 6) -> bytes:
    """The image as a phone writes a portrait photo: pixels stored turned 90 degrees counter-clockwise and
    EXIF Orientation=6 telling viewers to turn them back."""
    image = Image.open(io.BytesIO(png)).convert("L").rotate(90, expand=True)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


class PoisonModel(torch.nn.Module):
    """Doubles its input, and raises inside forward for any batch holding the POISON value."""

    def __init__(self):
        super().__init__()
        self.poison = POISON

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if bool((batch == self.poison).any()):
            raise RuntimeError("poison input")
        return batch.flatten(1) * 2.0


def poison_trained_folder(folder: Path) -> Path:
    """A trained folder (TorchScript variant) for the tensor handler: 4-value samples, PoisonModel inside."""
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch.jit is deprecated; TorchScript is the format that can raise in forward
        warnings.simplefilter("ignore")
        torch.jit.script(PoisonModel()).save(str(folder / "model.torchscript.pt"))
    handler = {
        "format": "torchscript",
        "model_class": "PoisonModel",
        "example_input": {"shape": [4], "dtype": "float32"},
    }
    (folder / "handler.json").write_text(json.dumps(handler))
    (folder / "metrics.json").write_text(json.dumps({"weights_sha256": "poison"}))
    return folder


HANDLER_CLASSES = {
    "digits": DigitsHandler,
    "image": ImageClassifierHandler,
    "tensor": TensorHandler,
    "text": TextClassifierHandler,
}


def in_process_handlers(store: Path, tmp_path_factory) -> dict:
    """Each archive's handler initialised in this process from its .mar, as a worker does."""
    handlers = {}
    for name, handler_class in HANDLER_CLASSES.items():
        handler = handler_class()
        handler.initialize(extracted_archive(store / f"{name}-1.0.0.mar", tmp_path_factory.mktemp(name)))
        handlers[name] = handler
    return handlers


def plain_answer(handler, body: bytes, content_type: str):
    context = FakeContext(handler.model_dir, handler.manifest)
    return handler.handle(requests_for([(body, content_type)], context), context)[0]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def malformed(png: bytes) -> list[tuple[str, str, dict, int]]:
    """(protocol, handler, body, status): each must be refused in the protocol's error shape, never with a 5xx."""
    image = {"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(png)]}
    pixels = {"name": "x", "shape": [1, 27, 28], "datatype": "FP32", "data": [0.0] * 756}
    return [
        ("v1", "digits", {}, 400),
        ("v1", "digits", {"instance": [b64(png)]}, 400),
        ("v1", "digits", {"instances": []}, 400),
        ("v1", "digits", {"instances": [{"data": "%%%not base64%%%"}]}, 400),
        ("v1", "digits", {"instances": [{"b64": b64(b"not an image")}]}, 400),
        ("v1", "digits", {"instances": [{"data": b64(png)}] * 65}, 413),
        ("v1", "digits", {"instances": [{"bytes": b64(png)}]}, 400),
        ("v1", "image", {"instances": [[0.5] * 3]}, 400),
        ("v1", "text", {"instances": [""]}, 400),
        ("v1", "tensor", {"instances": [[[0.5] * 28] * 27]}, 400),
        ("v2", "digits", {}, 400),
        ("v2", "digits", {"input": [image]}, 400),
        ("v2", "digits", {"inputs": []}, 400),
        ("v2", "digits", {"inputs": [{**image, "datatype": "FP32"}]}, 400),
        ("v2", "digits", {"inputs": [{**image, "datatype": "STRING"}]}, 400),
        ("v2", "digits", {"inputs": [{**image, "shape": [2]}]}, 400),
        ("v2", "digits", {"inputs": [{**image, "data": ["%%%"]}]}, 400),
        ("v2", "digits", {"inputs": [{**image, "shape": [65], "data": [b64(png)] * 65}]}, 413),
        ("v2", "digits", {"inputs": [{"name": "images", "datatype": "BYTES", "data": [b64(png)]}]}, 400),
        ("v2", "digits", {"inputs": [image], "outputs": [{"name": "logits"}]}, 400),
        ("v2", "tensor", {"inputs": [image]}, 400),
        ("v2", "tensor", {"inputs": [pixels]}, 400),
        ("v2", "text", {"inputs": [{"name": "t", "shape": [1], "datatype": "INT64", "data": [3]}]}, 400),
    ]


def good_document(protocol: str, name: str, png: bytes) -> dict:
    """One well-formed request to `name` in `protocol`."""
    value = {"text": "a wonderful movie", "tensor": [[[0.0] * 28] * 28]}.get(name, b64(png))
    if protocol == "v1":
        return {"instances": [value]}
    if name == "tensor":
        return {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    return {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [value]}]}


def same_prediction(answer: dict, expected: dict, tolerance: float = 1e-5) -> bool:
    """Same label, index and top-k labels; probabilities within `tolerance` (a sample answered alone or in a batch
    differs in the sixth decimal on a GPU)."""
    return (answer["label"], answer["index"], list(answer["probabilities"])) == (
        expected["label"],
        expected["index"],
        list(expected["probabilities"]),
    ) and answer["probabilities"] == pytest.approx(expected["probabilities"], abs=tolerance)


def assert_same_prediction(answer: dict, expected: dict, tolerance: float = 1e-5) -> None:
    assert same_prediction(answer, expected, tolerance), (answer, expected)


ALERTS = Path(__file__).resolve().parents[1] / "deploy" / "alerts.yml"
PROMQL_WORDS = {"sum", "by", "rate", "on", "group_left", "changes", "time", "m", "model_name", "model_version"}


def alert_rules() -> dict[str, dict]:
    """deploy/alerts.yml's rules by alert name."""
    return {rule["alert"]: rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}


def metric_names(expression: str) -> set[str]:
    """The metrics a PromQL expression reads: identifiers outside label matchers, ranges and quotes."""
    bare = re.sub(r"\[[^\]]*\]", "", re.sub(r"\{[^}]*\}", "", re.sub(r'"[^"]*"', "", expression)))
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", bare)) - PROMQL_WORDS


def alerted_metrics() -> set[str]:
    return {name for rule in alert_rules().values() for name in metric_names(rule["expr"])}


class ClientThreads:
    """`threads` clients, each calling `send(i)` in a loop (i = its offset, then every `threads`-th request) until
    stopped or `limit_s` has passed; a context manager that starts and joins them."""

    def __init__(self, threads: int, limit_s: float):
        self.limit_s = limit_s
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]

    def send(self, i: int) -> None:
        raise NotImplementedError

    def run(self, offset: int) -> None:
        deadline = time.monotonic() + self.limit_s
        i = offset
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.send(i)
            i += len(self.threads)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def stop_everything_from(workdir: Path) -> None:
    """Cleanup that works whatever a test left: the server recorded in `workdir`, then any frontend still running
    from that folder, by PID."""
    server.stop(workdir)
    for process in server.frontends_in(workdir.resolve()):
        stop_process_tree(process, 10)


@contextlib.contextmanager
def digits_server(folder: Path, trained_digits: Path, extra_config: str) -> Iterator[server.ServerState]:
    """A TorchServe whose config.properties adds `extra_config` lines, with digits 1.0.0 registered (one worker)."""
    store = folder / "store"
    build_archive("digits", "1.0.0", trained_digits, store)
    base = folder / "config.properties"
    base.write_text((REPO / "config.properties").read_text() + extra_config)
    workdir = folder / "ts"
    state = start_server(store, workdir, base_config=base)
    try:
        ServeClient(state.endpoints()).register("digits-1.0.0.mar", initial_workers=1)
        yield state
    finally:
        stop_everything_from(workdir)


def post_body(client, path: str, body: bytes, content_type: str) -> requests.Response:
    """A raw POST to the inference address (no retries, any status returned), with the client's inference key."""
    return requests.post(
        f"{client.endpoints.inference_url}{path}",
        data=body,
        headers={**client.auth_headers("inference"), "Content-Type": content_type},
        timeout=60,
    )


# Image handler's decode paths ------------------------------------------------------------------------------
def image_handler_with(model_store, folder, gpu_id: int | None = None, **handler_config) -> ImageClassifierHandler:
    """The image archive's handler (on GPU `gpu_id` when given), its model-config.yaml `handler:` section
    overridden by `handler_config`."""
    context = extracted_archive(model_store / "image-1.0.0.mar", folder)
    context.system_properties["gpu_id"] = gpu_id
    context.model_yaml_config.setdefault("handler", {}).update(handler_config)
    handler = ImageClassifierHandler()
    handler.initialize(context)
    return handler


def answer_batch(handler, bodies: list[tuple[bytes, str]]) -> tuple[list, dict]:
    context = FakeContext(handler.model_dir, handler.manifest)
    return handler.handle(requests_for(bodies, context), context), context.statuses


def jpeg_bytes(image: Image.Image, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save_options)
    return buffer.getvalue()


def batched_test_images(held_out, count: int = 6) -> list[Image.Image]:
    """Held-out digits as RGB photos of odd sizes: tinted, resized to 50x40 up to 75x60."""
    images = []
    for i, sample in enumerate(held_out[:count]):
        gray = Image.open(sample.path).convert("L").resize((50 + 5 * i, 40 + 4 * i), Image.Resampling.BILINEAR)
        tint = Image.new("RGB", gray.size, (40 * i % 256, 255 - 30 * i, 128))
        images.append(Image.composite(tint, Image.new("RGB", gray.size, (10, 20, 30)), gray))
    return images


def corrupt_jpeg(good: bytes) -> bytes:
    """A JPEG whose header Pillow reads (so batched mode defers it) but whose Huffman tables are garbage."""
    counts = good.index(b"\xff\xc4") + 5  # the first DHT segment's 16 code counts, after its length and class
    return good[:counts] + b"\xff" * 16 + good[counts + 16 :]


def rotated_rgb_jpeg(image: Image.Image) -> bytes:
    """`image` stored as a phone stores a portrait photo: turned 90 degrees, EXIF Orientation=6 to undo it."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return jpeg_bytes(image.rotate(90, expand=True), exif=exif.tobytes())


def assert_same_answers(answers: list, expected: list, tolerance: float) -> None:
    """Classifier answers (single or lists) with top-k probabilities within `tolerance` of the expected ones and
    the same label wherever the expected top label leads the next by more than 2 x `tolerance`."""
    for got, want in zip(answers, expected, strict=True):
        got, want = (got, want) if isinstance(got, list) else ([got], [want])
        for one, other in zip(got, want, strict=True):
            assert one["probabilities"] == pytest.approx(other["probabilities"], abs=tolerance), (one, other)
            top = sorted(other["probabilities"].values(), reverse=True) + [0.0]
            if top[0] - top[1] > 2 * tolerance:
                assert one["index"] == other["index"], (one, other)


def ctrl_c_after(seconds: float) -> threading.Timer:
    """SIGINT to this process's main thread (where the CLI runs) after `seconds`, as a terminal's Ctrl-C sends it."""
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    return timer
