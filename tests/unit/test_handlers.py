"""Image, tensor and text handlers, the shared base's options, and every model format, without Java."""

from __future__ import annotations

import base64
import json
import struct

import pytest
import torch
from digits import DigitsHandler
from image_classifier import ImageClassifierHandler
from PIL import Image
from support.bodies import malformed_corpus, png_bytes, png_header_bomb
from support.handlers import FakeContext, answer_batch, extracted_archive, in_process_handlers, requests_for
from tensor_handler import TensorHandler
from text_classifier import TextClassifierHandler

from servekit.build.archive import BuildOptions, build_archive
from servekit.build.formats import load_trained
from servekit.store.heldout import read_held_out
from servekit_worker.architectures import Tokenizer, image_transform, pad_batch
from servekit_worker.base import ServekitHandler
from servekit_worker.errors import RequestError
from servekit_worker.telemetry import (
    BATCH_SIZE,
    INFERENCE_MS,
    POSTPROCESS_MS,
    PREPROCESS_MS,
    REJECTED_REQUESTS,
    BatchReport,
    MetricSink,
    MetricsObserver,
    add_timing_headers,
    log_batch,
)
from servekit_worker.tensors import finite_tensor
from servekit_worker.vision import decode_image

TEXTS = [
    "The movie was great.",
    "Honestly, the coffee was not at all bland but the staff was rude.",
    "Overall, this phone felt never slow.",
    "The food tasted stale but the concert was incredibly brilliant and everyone in the room loved it.",
]


def handler_from(archive, folder, handler_class) -> ServekitHandler:
    handler = handler_class()
    handler.initialize(extracted_archive(archive, folder))
    return handler


def run(handler: ServekitHandler, bodies: list[tuple[bytes, str]]) -> tuple[list, FakeContext]:
    context = FakeContext(handler.model_dir, handler.manifest)
    return handler.handle(requests_for(bodies, context), context), context


@pytest.fixture
def image_handler(all_models_store, tmp_path):
    return handler_from(all_models_store / "image-1.0.0.mar", tmp_path, ImageClassifierHandler)


@pytest.fixture
def text_handler(all_models_store, tmp_path):
    return handler_from(all_models_store / "text-1.0.0.mar", tmp_path, TextClassifierHandler)


@pytest.fixture
def tensor_handler(all_models_store, tmp_path):
    return handler_from(all_models_store / "tensor-1.0.0.mar", tmp_path, TensorHandler)


# Image ------------------------------------------------------------------------------------------------------------
def test_image_answers_equal_the_in_process_model_for_raw_base64_and_lists(image_handler, trained_image, held_out):
    model, trained = load_trained(trained_image)
    transform = image_transform(**trained["preprocess"])
    pngs = [sample.path.read_bytes() for sample in held_out[:3]]
    with torch.inference_mode():
        expected = model(torch.stack([transform(decode_image(png, 10**6)) for png in pngs])).argmax(1).tolist()
    encoded = [base64.b64encode(png).decode() for png in pngs]
    answers, context = run(
        image_handler,
        [
            (pngs[0], "image/png"),
            (json.dumps({"image": encoded[1]}).encode(), "application/json"),
            (json.dumps({"images": encoded}).encode(), "application/json"),
        ],
    )
    assert context.statuses == {}
    assert [answers[0]["index"], answers[1]["index"]] == expected[:2]
    assert [a["index"] for a in answers[2]] == expected
    assert len(answers[0]["probabilities"]) == 5


def test_image_accepts_a_multipart_field_and_any_size_rgba(image_handler):
    image = Image.new("RGBA", (300, 120), (10, 200, 30, 128))
    context = FakeContext(image_handler.model_dir, image_handler.manifest)
    answers = image_handler.handle([{"file": png_bytes(image)}], context)
    assert context.statuses == {} and answers[0]["label"] in image_handler.labels


@pytest.mark.parametrize(
    ("body", "content_type", "status", "error"),
    [
        (b"GIF89a-not-really", "image/gif", 400, "invalid_image"),
        (b'{"image": "***not base64***"}', "application/json", 400, "invalid_base64"),
        (b'{"image": 42}', "application/json", 400, "invalid_json"),
        (b'{"photo": "aGk="}', "application/json", 400, "invalid_json"),
        (b"hello", "text/plain", 415, "unsupported_media_type"),
        (b"", "image/png", 400, "empty_body"),
    ],
)
def test_image_bad_requests(image_handler, body, content_type, status, error):
    answers, context = run(image_handler, [(body, content_type)])
    assert context.statuses[0][0] == status and answers[0]["error"] == error


def test_image_decompression_bomb_is_refused_before_decoding(image_handler):
    answers, context = run(image_handler, [(png_header_bomb(), "image/png")])
    assert context.statuses[0][0] == 400 and answers[0]["error"] == "image_too_large"


# Tensor -----------------------------------------------------------------------------------------------------------
def test_tensor_outputs_equal_the_model_for_json_and_packed_binary(tensor_handler, trained_digits):
    model, _ = load_trained(trained_digits)
    samples = torch.rand(3, 1, 28, 28)
    with torch.inference_mode():
        expected = model(samples)
    answers, context = run(
        tensor_handler,
        [
            (json.dumps({"input": samples[0].tolist()}).encode(), "application/json"),
            (json.dumps({"inputs": samples.tolist()}).encode(), "application/json"),
            (samples.numpy().astype("<f4").tobytes(), "application/octet-stream"),
        ],
    )
    assert context.statuses == {}
    assert torch.allclose(torch.tensor(answers[0]["output"]), expected[0], atol=1e-4)
    assert torch.allclose(torch.tensor(answers[1]["outputs"]), expected, atol=1e-4)
    assert torch.allclose(torch.tensor(answers[2]["outputs"]), expected, atol=1e-4)


@pytest.mark.parametrize(
    ("body", "content_type", "error"),
    [
        (json.dumps({"input": [[0.0] * 28] * 28}).encode(), "application/json", "invalid_shape"),
        (json.dumps({"input": [[["x"] * 28] * 28]}).encode(), "application/json", "invalid_input"),
        (json.dumps({"input": [[[True] * 28] * 28]}).encode(), "application/json", "invalid_input"),
        (
            json.dumps({"input": [[[float("inf")] + [0.0] * 27] + [[0.0] * 28] * 27]}).encode(),
            "application/json",
            "invalid_input",
        ),
        (struct.pack("<f", float("nan")) * 784, "application/octet-stream", "invalid_input"),
        (b"\0" * (784 * 4 + 3), "application/octet-stream", "invalid_shape"),
        (b"", "application/octet-stream", "invalid_shape"),
    ],
)
def test_tensor_wrong_shape_dtype_nan_inf_are_400(tensor_handler, body, content_type, error):
    answers, context = run(tensor_handler, [(body, content_type)])
    assert context.statuses[0][0] == 400 and answers[0]["error"] == error


def test_integer_tensors_refuse_floats_and_float_tensors_take_integers():
    with pytest.raises(RequestError, match="integers"):
        finite_tensor([1.5, 2.0], "input", torch.int64)
    assert finite_tensor([1, 2], "input", torch.float32).dtype == torch.float32


# Text -------------------------------------------------------------------------------------------------------------
def test_text_batch_with_padding_answers_like_one_text_at_a_time(text_handler, trained_text):
    model, _ = load_trained(trained_text)
    tokenizer = Tokenizer.load(trained_text / "vocab.json")
    with torch.inference_mode():
        alone = [int(model(pad_batch([tokenizer.encode(t)])).argmax()) for t in TEXTS]
        logits = torch.cat([model(pad_batch([tokenizer.encode(t)])) for t in TEXTS])
    answers, context = run(text_handler, [(t.encode(), "text/plain") for t in TEXTS])
    assert context.statuses == {}
    assert [a["index"] for a in answers] == alone
    probabilities = torch.softmax(logits, 1)
    for answer, row in zip(answers, probabilities, strict=True):
        assert answer["probabilities"][answer["label"]] == pytest.approx(float(row.max()), abs=1e-4)


def test_text_json_forms(text_handler):
    answers, context = run(
        text_handler,
        [
            (json.dumps({"text": TEXTS[0]}).encode(), "application/json"),
            (json.dumps({"texts": TEXTS[:2]}).encode(), "application/json"),
        ],
    )
    assert context.statuses == {}
    assert answers[0]["label"] in ("positive", "negative") and len(answers[1]) == 2


def test_text_held_out_accuracy_through_the_handler(text_handler, trained_text):
    samples = read_held_out(trained_text / "heldout")[:200]
    answers, _ = run(text_handler, [(s.path.read_bytes(), "text/plain") for s in samples])
    correct = sum(a["label"] == s.label for a, s in zip(answers, samples, strict=True))
    assert correct / len(samples) >= 0.9


@pytest.mark.parametrize(
    ("body", "content_type", "status", "error"),
    [
        (b"\xff\xfe\xfa broken utf-8", "text/plain", 400, "invalid_text"),
        (b"   ", "text/plain", 400, "empty_text"),
        (json.dumps({"text": ""}).encode(), "application/json", 400, "empty_text"),
        (("word " * 500).encode(), "text/plain", 400, "text_too_long"),
        (("a" * 3000).encode(), "text/plain", 400, "text_too_long"),
        (json.dumps({"text": 5}).encode(), "application/json", 400, "invalid_input"),
        (b"\x89PNG\r\n\x1a\n", "image/png", 415, "unsupported_media_type"),
    ],
)
def test_text_bad_requests(text_handler, body, content_type, status, error):
    answers, context = run(text_handler, [(TEXTS[0].encode(), "text/plain"), (body, content_type)])
    assert context.statuses == {1: (status, context.statuses[1][1])} and answers[1]["error"] == error
    assert answers[0]["label"] in ("positive", "negative")


# The base's options ---------------------------------------------------------------------------------------------
class RecordingMetrics:
    """Stands in for TorchServe's metrics cache."""

    def __init__(self):
        self.values: list[tuple[str, float, list]] = []

    def add_metric_to_cache(self, name, unit, dimension_names, metric_type):
        cache = self

        class Metric:
            def add_or_update(self, value, dimension_values):
                cache.values.append((name, value, dimension_values))

        return Metric()


def test_each_batch_records_timings_batch_size_and_rejections(all_models_store, tmp_path, good_png):
    context = extracted_archive(all_models_store / "digits-1.0.0.mar", tmp_path)
    context.metrics = RecordingMetrics()
    handler = DigitsHandler()
    handler.initialize(context)
    bodies = [(good_png, "image/png"), (b"x", "image/png"), (good_png, "image/png")]
    handler.handle(requests_for(bodies, context), context)
    recorded = {name: (value, dims) for name, value, dims in context.metrics.values}
    assert recorded["ServekitBatchSize"] == (2, ["digits"])
    assert recorded["ServekitRejectedRequests"] == (1, ["digits"])
    assert all(recorded[f"Servekit{stage}Ms"][0] >= 0 for stage in ("Preprocess", "Inference", "Postprocess"))


def test_batch_gauges_are_sampled_once_an_interval_and_rejections_always_counted():
    class Sink(MetricSink):
        def __init__(self):
            self.records: list[tuple[str, float]] = []

        def record(self, name, value):
            self.records.append((name, value))

    now = [100.0]
    sink = Sink()
    observe = MetricsObserver(sink, interval_s=1.0, clock=lambda: now[0])

    def batch(samples: int, rejected: int, at: float) -> list[tuple[str, float]]:
        now[0], before = at, len(sink.records)
        ids = [f"r{i}" for i in range(samples + rejected)]
        observe(BatchReport("digits", "1.0.0", ids, list(range(samples)), samples, 0.5, 0.9, 0.1), [])
        return sink.records[before:]

    first = batch(2, 0, at=100.0)
    assert [name for name, _ in first] == [PREPROCESS_MS, INFERENCE_MS, POSTPROCESS_MS, BATCH_SIZE]
    assert dict(first)[BATCH_SIZE] == 2
    assert batch(3, 1, at=100.5) == [(REJECTED_REQUESTS, 1)]  # within the interval: the counter alone
    assert batch(4, 0, at=100.9) == []
    later = batch(5, 2, at=101.0)
    assert dict(later)[BATCH_SIZE] == 5 and dict(later)[REJECTED_REQUESTS] == 2
    every = MetricsObserver(sink, interval_s=0.0, clock=lambda: 7.0)  # 0: every batch, even at one instant
    before = len(sink.records)
    for _ in range(3):
        every(BatchReport("digits", "1.0.0", ["a"], [0], 1, 0.5, 0.9, 0.1), [])
    assert [name for name, _ in sink.records[before:]].count(BATCH_SIZE) == 3


def test_handler_settings_pick_the_metric_interval_and_the_batch_log_line(all_models_store, tmp_path, good_png):
    context = extracted_archive(all_models_store / "digits-1.0.0.mar", tmp_path)
    context.model_yaml_config["handler"].update(metrics_interval_ms=60_000, log_batches=False)
    context.metrics = RecordingMetrics()
    handler = DigitsHandler()
    handler.initialize(context)
    for bodies in ([(good_png, "image/png")], [(good_png, "image/png"), (b"x", "image/png")]):
        handler.handle(requests_for(bodies, context), context)
    names = [name for name, _, _ in context.metrics.values]
    assert names.count(BATCH_SIZE) == 1 and names.count(REJECTED_REQUESTS) == 1
    assert log_batch not in handler.batch_observers and add_timing_headers in handler.batch_observers


def test_warmup_runs_forward_passes_at_initialisation(all_models_store, tmp_path, monkeypatch):
    context = extracted_archive(all_models_store / "tensor-1.0.0.mar", tmp_path)
    context.model_yaml_config["handler"]["warmup"] = 3
    calls = []
    monkeypatch.setattr(TensorHandler, "forward", lambda self, batch: calls.append(tuple(batch.shape)))
    TensorHandler().initialize(context)
    assert calls == [(4, 1, 28, 28)] * 3


def test_torch_compile_from_config_answers_the_same(all_models_store, tmp_path, good_png):
    context = extracted_archive(all_models_store / "digits-1.0.0.mar", tmp_path / "compiled")
    context.model_yaml_config["handler"]["compile"] = {"dynamic": True}
    compiled = DigitsHandler()
    compiled.initialize(context)
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    plain = handler_from(all_models_store / "digits-1.0.0.mar", tmp_path / "plain", DigitsHandler)
    assert run(compiled, [(good_png, "image/png")])[0] == run(plain, [(good_png, "image/png")])[0]


@pytest.mark.parametrize("model_format", ["torchscript", "export", "onnx", "aoti"])
def test_every_format_serves_the_same_logits_as_the_state_dict(tmp_path, trained_digits, model_format):
    store = tmp_path / "store"
    entry = build_archive(
        "tensor", "1.0.0", trained_digits, store, handler="tensor", options=BuildOptions(model_format=model_format)
    )
    assert entry.model_format == model_format and entry.config["handler"]["format"] == model_format
    handler = handler_from(store / entry.archive, tmp_path / "mar", TensorHandler)
    model, _ = load_trained(trained_digits)
    samples = torch.rand(5, 1, 28, 28)  # a batch size the export never saw
    with torch.inference_mode():
        expected = model(samples)
    answers, _ = run(handler, [(json.dumps({"inputs": samples.tolist()}).encode(), "application/json")])
    assert torch.allclose(torch.tensor(answers[0]["outputs"]), expected, atol=1e-3)


@pytest.mark.parametrize("model_format", ["export", "onnx"])
def test_text_formats_keep_the_token_dimension_dynamic(tmp_path, trained_text, model_format):
    store = tmp_path / "store"
    reference = build_archive("text", "1.0.0", trained_text, store, handler="text")
    exported = build_archive(
        "text", "2.0.0", trained_text, store, handler="text", options=BuildOptions(model_format=model_format)
    )
    bodies = [(t.encode(), "text/plain") for t in TEXTS]
    expected, _ = run(handler_from(store / reference.archive, tmp_path / "a", TextClassifierHandler), bodies)
    answers, _ = run(handler_from(store / exported.archive, tmp_path / "b", TextClassifierHandler), bodies)
    assert [a["index"] for a in answers] == [e["index"] for e in expected]


def test_aoti_package_refuses_a_worker_on_another_device(all_models_store, tmp_path, monkeypatch):
    from servekit_worker.loading import load_model

    with pytest.raises(RuntimeError, match="built for cpu"):
        load_model("aoti", tmp_path / "model.aoti.pt2", {"aoti_device": "cpu"}, torch.device("cuda:0"))
    with pytest.raises(RuntimeError, match="unknown model format"):
        load_model("pickle", tmp_path / "model.pkl", {}, torch.device("cpu"))


def test_workers_are_placed_on_their_gpu_when_cuda_is_available(all_models_store, tmp_path, monkeypatch):
    """TorchServe hands each worker a gpu_id: the model must land there (checked without a GPU by stubbing .to, and
    the example batch a worker tries its model's layout on stays on the CPU)."""
    from servekit_worker import base

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    placed = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, device, *a, **k: placed.append(device) or self)
    monkeypatch.setattr(base, "to_device", lambda tensor, device, dtype=None: tensor)
    for gpu_id in (0, 1, 3):
        context = extracted_archive(all_models_store / "tensor-1.0.0.mar", tmp_path / str(gpu_id))
        context.system_properties["gpu_id"] = gpu_id
        handler = TensorHandler()
        handler.initialize(context)
        assert handler.device == torch.device(f"cuda:{gpu_id}")
    assert placed == [torch.device("cuda:0"), torch.device("cuda:1"), torch.device("cuda:3")]


def test_the_whole_malformed_corpus_gets_4xx_json_in_process_and_spoils_no_neighbour(
    all_models_store, tmp_path_factory, good_png
):
    """Every case of the corpus, each batched between two good requests to the same handler: a 4xx JSON error for
    it alone (the server tests replay one case per error)."""
    handlers = in_process_handlers(all_models_store, tmp_path_factory)
    good = {"digits": (good_png, "image/png"), "image": (good_png, "image/png"), "text": (b"a fine film", "text/plain")}
    good["tensor"] = (json.dumps({"input": [[[0.0] * 28] * 28]}).encode(), "application/json")
    corpus = malformed_corpus(good_png)
    assert len(corpus) >= 20
    for name, body, content_type in corpus:
        answers, statuses = answer_batch(handlers[name], [good[name], (body, content_type), good[name]])
        case = (name, body[:40], content_type)
        assert 400 <= statuses[1][0] < 500 and answers[1]["error"] and answers[1]["detail"], (case, answers[1])
        assert statuses.get(0, (200,))[0] == statuses.get(2, (200,))[0] == 200, (case, statuses)
        assert "error" not in answers[0] and "error" not in answers[2], case
