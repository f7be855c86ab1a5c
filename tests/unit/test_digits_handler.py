"""The digits handler's plain functions and its batch loop, without Java."""

from __future__ import annotations

import json

import pytest
import torch
from digits import DigitsHandler
from PIL import Image
from support.bodies import bad_inputs, png_bytes
from support.handlers import FakeContext, answer_batch, extracted_archive, requests_for

from servekit.build.datasets import digits_split
from servekit_worker.answers import classification
from servekit_worker.digits import image_to_tensor, json_to_decoded
from servekit_worker.errors import RequestError
from servekit_worker.loading import select_device
from servekit_worker.requests import PLAIN, Request
from servekit_worker.torchserve import request_payload


@pytest.fixture
def handler(model_store, tmp_path) -> DigitsHandler:
    """The digits handler initialised from the files of digits-1.0.0.mar, as a worker would."""
    handler = DigitsHandler()
    handler.initialize(extracted_archive(model_store / "digits-1.0.0.mar", tmp_path))
    return handler


def test_png_decodes_to_the_training_tensor_exactly(held_out):
    split = digits_split()
    assert torch.equal(image_to_tensor(held_out[5].path.read_bytes(), 10_000), split.test_images[5].unsqueeze(0))


def test_any_size_rgb_image_becomes_one_28x28_grayscale_sample():
    tensor = image_to_tensor(png_bytes(Image.new("RGB", (100, 80), (0, 0, 0))), 10**6)
    assert tensor.shape == (1, 1, 28, 28)
    assert tensor.max() == 0


def test_dark_digit_on_white_paper_is_inverted_to_the_training_convention():
    image = Image.new("L", (28, 28), 255)
    image.paste(0, (10, 5, 18, 23))
    tensor = image_to_tensor(png_bytes(image), 10**6)
    assert tensor[0, 0, 0, 0] == 0.0 and tensor[0, 0, 10, 12] == 1.0


def test_json_input_and_inputs_shapes():
    image = [[0.0] * 28 for _ in range(28)]
    assert [s.shape for s in json_to_decoded({"input": image}, 8).samples] == [(1, 1, 28, 28)]
    assert [s.shape for s in json_to_decoded({"input": [image]}, 8).samples] == [(1, 1, 28, 28)]
    decoded = json_to_decoded({"inputs": [image, [image]]}, 8)
    assert decoded.many and [s.shape for s in decoded.samples] == [(1, 1, 28, 28)] * 2


def test_too_many_inputs_in_one_request_is_refused_with_413():
    image = [[0.0] * 28 for _ in range(28)]
    with pytest.raises(RequestError) as info:
        json_to_decoded({"inputs": [image] * 9}, 8)
    assert info.value.status == 413


def test_prediction_gives_label_index_and_top3_sorted():
    logits = torch.tensor([0.0, 1.0, 5.0, 2.0, 0, 0, 0, 0, 0, 0])
    answer = classification(logits, [str(i) for i in range(10)])
    assert answer["label"] == "2" and answer["index"] == 2
    assert list(answer["probabilities"]) == ["2", "3", "1"]
    assert answer["probabilities"]["2"] == pytest.approx(float(torch.softmax(logits, 0)[2]), abs=1e-6)


@pytest.mark.parametrize("case", sorted(bad_inputs(b"\x89PNG\r\n\x1a\n")))
def test_each_bad_input_gets_its_own_400_and_the_good_ones_are_answered(handler, good_png, case):
    context = FakeContext(handler.model_dir, handler.manifest)
    batch = requests_for([(good_png, "image/png"), bad_inputs(good_png)[case], (good_png, "image/png")], context)
    answers = handler.handle(batch, context)
    assert len(answers) == 3
    assert context.statuses == {1: (400, "Bad Request")}
    assert context.response_headers[0]["X-Servekit-Batch-Samples"] == "2" and 1 not in context.response_headers
    assert answers[1]["code"] == 400 and answers[1]["error"] and answers[1]["detail"]
    assert answers[0] == answers[2] and answers[0]["label"] == "7"


def test_a_batch_of_requests_is_one_forward_pass(handler, held_out):
    calls = []
    handler.model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    batch = [{"body": sample.path.read_bytes()} for sample in held_out[:4]]
    answers = handler.handle(batch, FakeContext(handler.model_dir, handler.manifest))
    assert calls == [4]
    assert [a["label"] for a in answers] == [sample.label for sample in held_out[:4]]


def test_handler_answers_equal_the_in_process_model(handler, held_out, trained_digits):
    model = handler.model
    batch = [{"body": sample.path.read_bytes()} for sample in held_out[:16]]
    answers = handler.handle(batch, FakeContext(handler.model_dir, handler.manifest))
    images = torch.cat([image_to_tensor(sample.path.read_bytes(), 10**6) for sample in held_out[:16]])
    with torch.inference_mode():
        expected = model(images).argmax(dim=1).tolist()
    assert [a["index"] for a in answers] == expected


def test_a_list_request_gets_a_list_answer(handler):
    image = [[0.0] * 28 for _ in range(28)]
    answers = handler.handle([{"body": {"inputs": [image, image, image]}}], FakeContext(handler.model_dir, {}))
    assert isinstance(answers[0], list) and len(answers[0]) == 3


def test_body_over_the_configured_limit_gets_413(handler, good_png):
    handler.config["max_body_bytes"] = 100
    context = FakeContext(handler.model_dir, handler.manifest)
    answers = handler.handle([{"body": good_png + b"\0" * 200}], context)
    assert context.statuses[0][0] == 413 and answers[0]["error"] == "payload_too_large"


def test_form_encoded_request_without_a_body_is_a_clear_400():
    with pytest.raises(RequestError, match="no body"):
        Request(request_payload({"garbage": b""}), "", PLAIN).body()


@pytest.mark.parametrize(
    ("gpu_id", "cuda", "expected"), [(1, True, "cuda:1"), (0, True, "cuda:0"), (1, False, "cpu"), (None, True, "cpu")]
)
def test_device_comes_from_gpu_id_when_cuda_is_available(monkeypatch, gpu_id, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert select_device(gpu_id) == torch.device(expected)


def test_a_body_sent_as_an_image_is_read_as_one_even_when_it_starts_like_json(handler):
    """`{` as the first byte made an image/png body JSON (invalid_text); JSON is still sniffed from octet-stream."""
    answers, statuses = answer_batch(handler, [(b"{garbage\x89PNG", "image/png"), (b'{"input": 7}', "image/png")])
    assert {index: status[0] for index, status in statuses.items()} == {0: 400, 1: 400}
    assert [answer["error"] for answer in answers] == ["invalid_image", "invalid_image"]
    image = [[0.0] * 28 for _ in range(28)]
    answers, statuses = answer_batch(handler, [(json.dumps({"input": image}).encode(), "application/octet-stream")])
    assert statuses == {} and "label" in answers[0]
