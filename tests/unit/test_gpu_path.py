"""The GPU serving path's pieces that run on a CPU: batched JPEG decode (decode_jpeg on the CPU here), its
fallbacks and 4xx answers, CUDA-graph bucketing and padding, and refusing a variant built for another device."""

from __future__ import annotations

import base64
import json
import logging
import shutil
import time

import pytest
import torch
from image_classifier import ImageClassifierHandler
from PIL import Image
from support.answers import assert_same_answers
from support.bodies import batched_test_images, corrupt_jpeg, jpeg_bytes, png_bytes, png_header_bomb, rotated_rgb_jpeg
from support.handlers import answer_batch, extracted_archive, image_handler_with

from servekit.build import archive
from servekit.build.archive import BuildOptions
from servekit.build.optimize import Builder
from servekit.core import timing
from servekit.store.workspace import HANDLER_FILE
from servekit_worker.acceleration import (
    BucketedModel,
    StaticBatch,
    bucket_for,
    runs_channels_last,
    takes_channels_last,
    to_device,
)
from servekit_worker.loading import load_model
from servekit_worker.vision import batchable_jpeg

# Pillow and decode_jpeg both use libjpeg on the CPU: their pixels agree, so the answers do too. On CUDA
# (nvJPEG) pixels differ by up to 0.23 (mean 0.0085) in normalised units: see test_gpu_cuda.py.
CPU_PROBABILITY_TOLERANCE = 1e-4


@pytest.fixture
def pil_handler(all_models_store, tmp_path):
    return image_handler_with(all_models_store, tmp_path / "pil", image_decode="pil")


@pytest.fixture
def batched_handler(all_models_store, tmp_path):
    return image_handler_with(all_models_store, tmp_path / "batched", image_decode="batched")


# Batched decode -------------------------------------------------------------------------------------------------
def test_auto_decodes_in_batches_on_a_cpu_worker_too_and_unknown_modes_are_refused(all_models_store, tmp_path):
    assert image_handler_with(all_models_store, tmp_path / "auto").batched_decode is True
    assert image_handler_with(all_models_store, tmp_path / "pil", image_decode="pil").batched_decode is False
    with pytest.raises(RuntimeError, match="handler.image_decode is 'gpu'; expected one of auto, batched, pil"):
        image_handler_with(all_models_store, tmp_path / "bad", image_decode="gpu")


def test_batched_decode_answers_like_pil_for_raw_json_and_png_bodies(pil_handler, batched_handler, held_out):
    images = batched_test_images(held_out)
    jpegs = [jpeg_bytes(image) for image in images]
    assert all(batchable_jpeg(jpeg, 10**6) for jpeg in jpegs)
    encoded = [base64.b64encode(jpeg).decode() for jpeg in jpegs]
    bodies = [
        *[(jpeg, "image/jpeg") for jpeg in jpegs[:3]],
        (json.dumps({"images": encoded[3:]}).encode(), "application/json"),
        (png_bytes(images[0]), "image/png"),  # decoded by Pillow, transformed with the batch
        (jpegs[1], "application/octet-stream"),
    ]
    expected, expected_statuses = answer_batch(pil_handler, bodies)
    answers, statuses = answer_batch(batched_handler, bodies)
    assert statuses == expected_statuses == {}
    assert_same_answers(answers, expected, CPU_PROBABILITY_TOLERANCE)
    assert answers[4]["index"] == answers[0]["index"]  # the PNG and the JPEG of one picture agree


def test_batched_samples_are_transformed_like_pil_ones(pil_handler, batched_handler, held_out):
    """The pixels themselves, not only the answers: batched decode + transform equals Pillow + transform."""
    jpegs = [jpeg_bytes(image) for image in batched_test_images(held_out, 3)]
    pending = [batched_handler.to_sample(jpeg) for jpeg in jpegs]
    assert all(isinstance(sample, bytes) for sample in pending)
    finished = batched_handler.finish_decoding([batched_handler.decode_request(jpeg, "image/jpeg") for jpeg in jpegs])
    for jpeg, request in zip(jpegs, finished, strict=True):
        (sample,) = request.samples
        assert sample.shape == (1, 3, 32, 32)
        assert (sample - pil_handler.to_sample(jpeg)).abs().max() <= 1e-5
    pil_requests = [pil_handler.decode_request(jpeg, "image/jpeg") for jpeg in jpegs]
    assert pil_handler.finish_decoding(pil_requests) is pil_requests  # pil mode decoded them already


def test_bad_inputs_get_the_same_4xx_in_batched_mode_and_their_neighbours_are_answered(
    pil_handler, batched_handler, held_out
):
    good = jpeg_bytes(batched_test_images(held_out, 1)[0])
    big = jpeg_bytes(Image.new("RGB", (1100, 1000), (200, 10, 10)))
    bad = [
        (b"", "image/jpeg"),
        (b"this is not an image at all", "application/octet-stream"),
        (good[: len(good) // 2], "image/jpeg"),  # truncated: no end marker, so Pillow decodes it and refuses it
        (b'{"image": "***not base64***"}', "application/json"),
        (b'{"image": 42}', "application/json"),
        (b'{"images": [1, 2', "application/json"),
        (b"hello", "text/plain"),
        (png_header_bomb(), "image/png"),
        (big, "image/jpeg"),
    ]
    bodies = [(good, "image/jpeg"), *bad, (good, "image/jpeg")]
    pil_handler.config["max_image_pixels"] = batched_handler.config["max_image_pixels"] = 1000 * 1000
    expected, expected_statuses = answer_batch(pil_handler, bodies)
    answers, statuses = answer_batch(batched_handler, bodies)
    assert set(statuses) == set(range(1, len(bad) + 1))
    assert statuses == expected_statuses
    assert [a.get("error") for a in answers] == [e.get("error") for e in expected]
    assert answers[len(bad)]["error"] == "image_too_large" and answers[3]["error"] == "invalid_image"
    assert_same_answers([answers[0], answers[-1]], [expected[0], expected[-1]], CPU_PROBABILITY_TOLERANCE)


def test_a_corrupt_jpeg_in_a_batch_answers_400_alone(pil_handler, batched_handler, held_out, monkeypatch):
    import torchvision.io as vision  # decode_jpegs imports decode_jpeg from here at each call

    jpegs = [jpeg_bytes(image) for image in batched_test_images(held_out, 3)]
    corrupt = corrupt_jpeg(jpegs[1])
    assert batchable_jpeg(corrupt, 10**6)  # its header is fine: only the batched decode finds it bad
    calls = []
    decode = vision.decode_jpeg
    monkeypatch.setattr(vision, "decode_jpeg", lambda data, **kw: calls.append(data) or decode(data, **kw))
    encoded = [base64.b64encode(jpeg).decode() for jpeg in (jpegs[2], corrupt, jpegs[0])]
    bodies = [
        (jpegs[0], "image/jpeg"),
        (corrupt, "image/jpeg"),
        (json.dumps({"images": encoded}).encode(), "application/json"),  # one bad image fails its whole request
        (jpegs[2], "image/jpeg"),
    ]
    answers, statuses = answer_batch(batched_handler, bodies)
    assert len(calls[0]) == 6 and len(calls) == 7  # one batched call, then each JPEG alone
    assert list(statuses) == [1, 2] and {status for status, _ in statuses.values()} == {400}
    assert answers[1]["error"] == answers[2]["error"] == "invalid_image"
    expected, _ = answer_batch(pil_handler, bodies)
    assert expected[1:3] == answers[1:3]
    assert_same_answers([answers[0], answers[3]], [expected[0], expected[3]], CPU_PROBABILITY_TOLERANCE)


def test_a_jpeg_decode_jpeg_refuses_is_decoded_by_pillow(batched_handler, pil_handler, held_out, monkeypatch):
    """nvJPEG refuses some valid JPEGs: Pillow answers them rather than a 400."""
    import torchvision.io as vision  # decode_jpegs imports decode_jpeg from here at each call

    jpegs = [jpeg_bytes(image) for image in batched_test_images(held_out, 2)]
    decode = vision.decode_jpeg

    def refuse_the_second(data, **options):
        if isinstance(data, list) or torch.equal(data, torch.frombuffer(bytearray(jpegs[1]), dtype=torch.uint8)):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return decode(data, **options)

    monkeypatch.setattr(vision, "decode_jpeg", refuse_the_second)
    bodies = [(jpeg, "image/jpeg") for jpeg in jpegs]
    answers, statuses = answer_batch(batched_handler, bodies)
    assert statuses == {}
    assert_same_answers(answers, answer_batch(pil_handler, bodies)[0], CPU_PROBABILITY_TOLERANCE)


def test_rotated_grayscale_and_cmyk_jpegs_are_decoded_by_pillow_and_answered_like_pil(
    pil_handler, batched_handler, held_out
):
    image = batched_test_images(held_out, 1)[0]
    rotated = rotated_rgb_jpeg(image)
    gray = jpeg_bytes(image.convert("L"))
    cmyk = jpeg_bytes(image.convert("CMYK"))
    assert not any(batchable_jpeg(raw, 10**6) for raw in (rotated, gray, cmyk))
    assert all(isinstance(batched_handler.to_sample(raw), torch.Tensor) for raw in (rotated, gray, cmyk))
    bodies = [(jpeg_bytes(image), "image/jpeg"), (rotated, "image/jpeg"), (gray, "image/jpeg"), (cmyk, "image/jpeg")]
    expected, _ = answer_batch(pil_handler, bodies)
    answers, statuses = answer_batch(batched_handler, bodies)
    assert statuses == {}
    assert_same_answers(answers, expected, CPU_PROBABILITY_TOLERANCE)
    assert answers[1]["index"] == answers[0]["index"]  # turned upright before the model sees it


# A decode far slower than one 32 px image's inference, even on a loaded machine (620 ms was seen under load).
SLOW_DECODE_S = 1.5


def test_preprocess_time_includes_the_batched_decode(batched_handler, held_out, monkeypatch):
    recorded = {}
    monkeypatch.setattr(batched_handler.handler_metrics, "record", lambda name, value: recorded.update({name: value}))
    finish = batched_handler.finish_decoding

    def slow_finish(requests):
        time.sleep(SLOW_DECODE_S)
        return finish(requests)

    monkeypatch.setattr(batched_handler, "finish_decoding", slow_finish)
    answer_batch(batched_handler, [(jpeg_bytes(batched_test_images(held_out, 1)[0]), "image/jpeg")])
    assert recorded["ServekitPreprocessMs"] >= SLOW_DECODE_S * 1000 > recorded["ServekitInferenceMs"]


# CUDA graphs' bucketing and padding ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("count", "bucket"), [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, 16), (64, 64), (65, None)]
)
def test_bucket_for_picks_the_smallest_bucket_that_holds_the_batch(count, bucket):
    assert bucket_for(count, [64, 1, 2, 4, 8, 16, 32]) == bucket
    assert bucket_for(count, []) is None


def cpu_buckets(model, sizes: list[int]) -> tuple[BucketedModel, list[int]]:
    """BucketedModel over CPU 'graphs': each replay runs `model` on the whole static input, as a graph would."""
    replayed: list[int] = []
    runners = {}
    for size in sizes:
        static_input = torch.full((size, 4), 7.0)
        static_output = torch.zeros(size, 3)

        def replay(static_input=static_input, static_output=static_output):
            replayed.append(static_input.shape[0])
            static_output.copy_(model(static_input))

        runners[size] = StaticBatch(static_input, static_output, replay)
    return BucketedModel(runners, model), replayed


def test_bucketed_batches_are_padded_to_their_bucket_and_sliced_back():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    bucketed, replayed = cpu_buckets(model, [1, 2, 4, 8])
    with torch.inference_mode():
        for count, bucket in [(1, 1), (3, 4), (5, 8), (8, 8)]:
            batch = torch.randn(count, 4)
            outputs = bucketed(batch)
            assert outputs.shape == (count, 3) and torch.allclose(outputs, model(batch), atol=1e-6)
            assert replayed[-1] == bucket
            runner = bucketed.runners[bucket]
            assert torch.equal(runner.static_input[count:], torch.zeros(bucket - count, 4))  # padding is zeros
            runner.static_output.fill_(-1.0)
            assert torch.allclose(outputs, model(batch), atol=1e-6)  # a clone, not a view of the static output


def test_batches_beyond_the_largest_bucket_run_in_chunks_and_other_shapes_eagerly():
    def model(batch: torch.Tensor) -> torch.Tensor:  # takes any sample shape, as an eager model may
        return batch[:, :3] * 2.0 + 1.0

    bucketed, replayed = cpu_buckets(model, [2, 8])
    batch = torch.randn(19, 4)
    assert torch.equal(bucketed(batch), model(batch))
    assert replayed == [8, 8, 8]  # 8 + 8 + 3 padded to 8
    replayed.clear()
    for other in (torch.randn(3, 5), batch[:3].double()):
        assert torch.equal(bucketed(other), model(other)) and replayed == []


def test_cuda_graphs_are_ignored_on_a_cpu_worker(all_models_store, tmp_path, pil_handler, caplog):
    with caplog.at_level(logging.INFO):
        handler = image_handler_with(all_models_store, tmp_path / "graphs", cuda_graphs=[1, 2, 4])
    assert handler.graphs is None
    assert "handler.cuda_graphs [1, 2, 4] ignored: this worker runs on cpu" in caplog.text
    body = [(png_bytes(Image.new("RGB", (40, 40), (0, 200, 0))), "image/png")]
    assert answer_batch(handler, body)[0] == answer_batch(pil_handler, body)[0]


def test_a_cpu_worker_runs_an_eager_model_channels_last_with_the_nchw_answers(all_models_store, tmp_path, held_out):
    nchw = image_handler_with(all_models_store, tmp_path / "nchw", image_decode="pil", channels_last=False)
    nhwc = image_handler_with(all_models_store, tmp_path / "nhwc", image_decode="pil")
    weight = next(p for p in nhwc.model.parameters() if p.dim() == 4)
    assert nhwc.channels_last and weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.channels_last and weight.shape == next(p for p in nchw.model.parameters() if p.dim() == 4).shape
    assert nhwc.model_input(torch.zeros(2, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    bodies = [(jpeg_bytes(image), "image/jpeg") for image in batched_test_images(held_out, 6)]
    expected, _ = answer_batch(nchw, bodies)
    answers, statuses = answer_batch(nhwc, bodies)
    assert statuses == {}
    assert_same_answers(answers, expected, CPU_PROBABILITY_TOLERANCE)


def viewing_archive(all_models_store, folder, monkeypatch):
    """The image archive extracted to `folder`, its model flattened with `.view` first (NCHW-only code): the
    model definitions the worker builds it from (servekit_worker.architectures, in this process) wrap its forward."""
    from servekit_worker import architectures

    context = extracted_archive(all_models_store / "image-1.0.0.mar", folder)
    build_model = architectures.build_model

    def viewing_model(model_class, model_kwargs=None, code_dir=None):
        model = build_model(model_class, model_kwargs, code_dir)
        forward = model.forward
        model.forward = lambda x: forward(x.view(x.size(0), -1).view(x.shape))
        return model

    monkeypatch.setattr(architectures, "build_model", viewing_model)
    context.model_yaml_config["handler"].update(image_decode="pil")
    return context


def test_a_model_written_for_nchw_is_kept_nchw_and_answers(all_models_store, tmp_path, held_out, caplog, monkeypatch):
    """`x.view(n, -1)` after a convolution raises on a channels_last batch: the worker keeps such a model NCHW
    (and says why) instead of failing every request, and optimize times it NCHW as the worker runs it."""
    nchw = image_handler_with(all_models_store, tmp_path / "nchw", image_decode="pil", channels_last=False)
    viewing = ImageClassifierHandler()
    with caplog.at_level(logging.WARNING):
        viewing.initialize(viewing_archive(all_models_store, tmp_path / "viewing", monkeypatch))
    assert not viewing.channels_last
    assert "ImageClassifierHandler runs NCHW: it raised on a channels_last batch" in caplog.text
    bodies = [(jpeg_bytes(image), "image/jpeg") for image in batched_test_images(held_out, 4)]
    answers, statuses = answer_batch(viewing, bodies)
    assert statuses == {} and answers == answer_batch(nchw, bodies)[0]
    example = torch.zeros(2, 3, 8, 8)
    assert not takes_channels_last(lambda x: x.view(x.size(0), -1), example)
    assert takes_channels_last(lambda x: torch.flatten(x, 1), example)
    images = {"example_input": {"shape": [3, 8, 8]}}
    for flat, expected in ((lambda x: x.view(x.size(0), -1), False), (lambda x: torch.flatten(x, 1), True)):
        assert Builder(FlatteningConv(flat), images, None, tmp_path, 1).channels_last is expected


def test_a_cuda_worker_keeps_an_nchw_model_nchw_too(all_models_store, tmp_path, caplog, monkeypatch):
    """CUDA workers lay images out channels_last as CPU workers do, so they try the model on such a batch too
    (checked without a GPU: the device moves are stubbed and the model runs on the CPU)."""
    from servekit_worker import base

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(base, "to_device", lambda tensor, device, dtype=None: tensor)
    context = viewing_archive(all_models_store, tmp_path / "viewing", monkeypatch)
    context.system_properties["gpu_id"] = 0
    viewing = ImageClassifierHandler()
    with caplog.at_level(logging.WARNING):
        viewing.initialize(context)
    assert viewing.device == torch.device("cuda:0") and not viewing.channels_last
    assert "ImageClassifierHandler runs NCHW: it raised on a channels_last batch" in caplog.text


def test_channels_last_false_is_honoured_by_the_worker_build_timing_and_optimize(trained_image, tmp_path, monkeypatch):
    """One rule (`runs_channels_last`) for every place that lays a model out: a user's `channels_last: false`, and
    formats whose layout is fixed, keep NCHW in build's cost timing and optimize as in the worker."""
    assert runs_channels_last({}, "cpu") and runs_channels_last({"format": "torchscript"}, "cuda")
    assert not runs_channels_last({"channels_last": False}, "cpu")
    assert not runs_channels_last({"format": "torchscript"}, "cpu")
    assert not runs_channels_last({"format": "onnx"}, "cuda")
    images = {"example_input": {"shape": [3, 8, 8]}}
    conv = FlatteningConv(lambda x: torch.flatten(x, 1))
    for settings, expected in (({}, True), ({"channels_last": False}, False)):
        builder = Builder(conv, {**images, **settings}, None, tmp_path, 1)
        weight = builder.on_device(conv).conv.weight
        assert builder.channels_last is expected
        assert weight.is_contiguous(memory_format=torch.channels_last) is expected
        assert builder.inputs(torch.zeros(2, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last) is expected
    layouts = []

    def timed(model, batches, **_):
        layouts.append(batches[0].is_contiguous(memory_format=torch.channels_last))
        return [1.0]

    monkeypatch.setattr(timing, "time_calls", timed)
    nchw = tmp_path / "nchw"
    shutil.copytree(trained_image, nchw)
    settings = json.loads((nchw / HANDLER_FILE).read_text())
    (nchw / HANDLER_FILE).write_text(json.dumps({**settings, "channels_last": False}))
    assert archive.sample_cost_ms(trained_image, 1) == archive.sample_cost_ms(nchw, 1) == 0.5
    assert layouts == [True, False]
    # build times the batch size's cost under the archive's own settings: a --model-config `handler:` section, or
    # a format a CPU worker runs as it was exported
    from_model_config = BuildOptions(model_config={"handler": {"channels_last": False}})
    entry = archive.build_archive("image", "1.0.0", trained_image, tmp_path / "store", "image", from_model_config)
    archive.build_archive(
        "image", "1.0.1", trained_image, tmp_path / "store", "image", BuildOptions(model_format="torchscript")
    )
    archive.build_archive("image", "1.0.2", trained_image, tmp_path / "store", "image", BuildOptions())
    assert entry.config["handler"]["channels_last"] is False
    assert layouts == [True, False, False, False, True]


class FlatteningConv(torch.nn.Module):
    def __init__(self, flatten):
        super().__init__()
        self.conv, self.flatten = torch.nn.Conv2d(3, 4, 3), flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.conv(x))


def test_to_device_casts_floating_tensors_only():
    assert to_device(torch.zeros(2, dtype=torch.uint8), torch.device("cpu"), torch.float16).dtype == torch.uint8
    assert to_device(torch.zeros(2), torch.device("cpu"), torch.float16).dtype == torch.float16
    assert to_device(torch.zeros(2), torch.device("cpu")).dtype == torch.float32


# Variants built for a device --------------------------------------------------------------------------------------
def test_a_cuda_variant_is_refused_by_a_cpu_worker_with_the_fix(all_models_store, tmp_path):
    message = (
        r"^this archive's variant was built for cuda \(float16, CUDA graphs\); this worker runs on cpu: "
        r"serve it with GPU workers \(servekit config --gpus\) or build a CPU variant$"
    )
    with pytest.raises(RuntimeError, match=message):
        image_handler_with(all_models_store, tmp_path / "cuda", device="cuda", dtype="float16", cuda_graphs=[1, 8])
    with pytest.raises(RuntimeError, match="handler.device is 'tpu'; expected one of cpu, cuda or none"):
        image_handler_with(all_models_store, tmp_path / "tpu", device="tpu")
    assert image_handler_with(all_models_store, tmp_path / "cpu", device="cpu").device == torch.device("cpu")


def test_a_cpu_variant_is_refused_by_a_gpu_worker(all_models_store, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    context = extracted_archive(all_models_store / "image-1.0.0.mar", tmp_path)
    context.model_yaml_config["handler"]["device"] = "cpu"
    context.system_properties["gpu_id"] = 0
    with pytest.raises(RuntimeError, match=r"built for cpu \(float32\); this worker runs on cuda: serve it with CPU"):
        ImageClassifierHandler().initialize(context)
    aoti_message = r"built for cpu \(AOTInductor package, float32\); this worker runs on cuda"
    with pytest.raises(RuntimeError, match=aoti_message):
        load_model("aoti", tmp_path / "model.aoti.pt2", {"aoti_device": "cpu"}, torch.device("cuda:0"))
