"""KServe v1/v2 in every handler, EXIF orientation and the poison-input retry, on the handlers' plain functions and
in TorchServe's own worker code (model loader, envelope, Service), without Java."""

from __future__ import annotations

import io
import json

import pytest
import torch
from digits import DigitsHandler
from kserve import InferResponse
from PIL import Image
from support.answers import assert_same_prediction
from support.bodies import b64, good_document, malformed, rotated_jpeg
from support.handlers import (
    KSERVE_ROUTE,
    POISON,
    FakeContext,
    extracted_archive,
    in_process_handlers,
    plain_answer,
    poison_trained_folder,
    protocol_answers,
    requests_for,
    worker_context,
)
from tensor_handler import TensorHandler
from ts.model_loader import TsModelLoader
from ts.service import Service

from servekit.build.archive import build_archive
from servekit.build.export import SERVICE_ENVELOPES
from servekit.store.heldout import read_held_out
from servekit_worker.digits import image_to_tensor
from servekit_worker.kserve import v2_request
from servekit_worker.torchserve import request_protocol
from servekit_worker.vision import open_image


@pytest.fixture(scope="module")
def handlers(all_models_store, tmp_path_factory) -> dict:
    return in_process_handlers(all_models_store, tmp_path_factory)


def test_v1_instances_in_every_form_answer_like_the_plain_api(handlers, held_out, trained_text):
    digits = handlers["digits"]
    png = held_out[0].path.read_bytes()
    pixels = image_to_tensor(png, 10**6)[0, 0].tolist()
    expected = plain_answer(digits, png, "image/png")
    [(status, answer)] = protocol_answers(digits, [{"instances": [{"data": b64(png)}, {"b64": b64(png)}, b64(png)]}])
    assert status == 200 and len(answer["predictions"]) == 3
    for prediction in answer["predictions"]:
        assert_same_prediction(prediction, expected)
    [(status, answer)] = protocol_answers(digits, [{"instances": [pixels]}])
    assert status == 200
    assert_same_prediction(
        answer["predictions"][0], plain_answer(digits, json.dumps({"input": pixels}).encode(), "application/json")
    )

    text = read_held_out(trained_text / "heldout")[0].path.read_text()
    [(status, answer)] = protocol_answers(
        handlers["text"], [{"instances": [text, {"data": text}, {"b64": b64(text.encode())}]}]
    )
    assert status == 200
    for prediction in answer["predictions"]:
        assert_same_prediction(prediction, plain_answer(handlers["text"], text.encode(), "text/plain"))

    sample = torch.rand(1, 28, 28)
    [(status, answer)] = protocol_answers(handlers["tensor"], [{"instances": [sample.tolist()]}])
    expected = plain_answer(handlers["tensor"], json.dumps({"input": sample.tolist()}).encode(), "application/json")
    assert status == 200 and torch.allclose(
        torch.tensor(answer["predictions"][0]), torch.tensor(expected["output"]), atol=1e-5
    )


def test_v2_inputs_are_answered_with_tensors_a_v2_client_decodes(handlers, held_out):
    digits = handlers["digits"]
    pngs = [sample.path.read_bytes() for sample in held_out[:3]]
    pixels = image_to_tensor(pngs[2], 10**6)
    document = {
        "id": "my-request",
        "inputs": [
            {"name": "images", "shape": [2], "datatype": "BYTES", "data": [b64(p) for p in pngs[:2]]},
            {"name": "pixels", "shape": [1, 28, 28], "datatype": "FP32", "data": pixels.flatten().tolist()},
        ],
    }
    [(status, answer)] = protocol_answers(digits, [document])
    assert status == 200 and answer["id"] == "my-request" and answer["model_name"] == "digits"
    raw = json.dumps(answer).encode()
    response = InferResponse.from_bytes(raw, len(raw))
    outputs = {output.name: output.as_numpy() for output in response.outputs}
    assert (
        outputs["label"].shape == (3,) and outputs["index"].shape == (3,) and outputs["probabilities"].shape == (3, 10)
    )
    for i, png in enumerate(pngs):
        expected = plain_answer(digits, png, "image/png")
        label = outputs["label"][i]
        assert (label.decode() if isinstance(label, bytes) else label) == expected["label"]
        assert int(outputs["index"][i]) == expected["index"]
        assert float(outputs["probabilities"][i][expected["index"]]) == pytest.approx(
            expected["probabilities"][expected["label"]], abs=1e-5
        )
    [(_, only_labels)] = protocol_answers(digits, [{**document, "outputs": [{"name": "label"}]}])
    assert [o["name"] for o in only_labels["outputs"]] == ["label"]

    samples = torch.rand(2, 1, 28, 28)
    tensor_document = {
        "inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": samples.flatten().tolist()}]
    }
    [(status, answer)] = protocol_answers(handlers["tensor"], [tensor_document])
    [output] = answer["outputs"]
    expected = plain_answer(handlers["tensor"], json.dumps({"inputs": samples.tolist()}).encode(), "application/json")
    assert status == 200 and output["name"] == "output" and output["datatype"] == "FP32" and output["shape"] == [2, 10]
    assert torch.allclose(torch.tensor(output["data"]).reshape(2, 10), torch.tensor(expected["outputs"]), atol=1e-5)


def test_malformed_v1_and_v2_bodies_get_the_protocols_4xx_and_spare_their_neighbours(handlers, good_png):
    for protocol, name, body, status in malformed(good_png):
        good = good_document(protocol, name, good_png)
        handlers[name].envelope = SERVICE_ENVELOPES[protocol]
        answers = protocol_answers(handlers[name], [good, body, good])
        handlers[name].envelope = None
        assert [s for s, _ in answers] == [200, status, 200], (name, body, answers[1])
        assert list(answers[1][1]) == ["error"] and isinstance(answers[1][1]["error"], str), answers[1]
        key = "outputs" if protocol == "v2" else "predictions"
        assert answers[0][1][key] == answers[2][1][key]


def test_v2_request_checks_the_shape_against_the_data():
    request = v2_request(
        {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]}]}, 64, ()
    )
    assert request.inputs[0].data == [1, 2, 3, 4] and request.inputs[0].rows() == [[1, 2], [3, 4]]
    strings = v2_request({"inputs": [{"name": "s", "shape": [2, 1], "datatype": "BYTES", "data": ["a", "b"]}]}, 64, ())
    assert strings.inputs[0].rows() == ["a", "b"]


def test_the_protocol_follows_torchserves_route_headers_and_the_envelope(handlers):
    handler = handlers["digits"]
    context = worker_context(handler, [KSERVE_ROUTE, {**KSERVE_ROUTE, "url_path": ""}, {}])
    v2_body, v1_body = {"inputs": []}, {"instances": []}
    assert request_protocol(context, 0, None, v2_body).name == "v2"
    assert request_protocol(context, 0, None, v1_body).name == "v1"
    assert request_protocol(context, 0, "kserve", v2_body).name == "v1"
    assert request_protocol(context, 0, "kservev2", v1_body).name == "v2"
    assert request_protocol(context, 1, "kservev2", v2_body).name == "plain"  # /predictions
    assert request_protocol(context, 2, "kservev2", v2_body).name == "plain"  # gRPC


@pytest.mark.parametrize("envelope", ["kserve", "kservev2"])
def test_torchserves_envelope_is_taken_over_and_a_batch_is_answered_per_request(
    all_models_store, tmp_path, good_png, envelope
):
    """TorchServe's envelopes answer one response per batch (503 for all at batch size > 1): the handler unwraps
    them in TorchServe's own model loader and Service, and answers each request in its protocol."""
    extracted_archive(all_models_store / "digits-1.0.0.mar", tmp_path)
    service = TsModelLoader().load("digits", str(tmp_path), handler="digits", batch_size=4, envelope=envelope)
    assert isinstance(service._entry_point.__self__, DigitsHandler)
    if envelope == "kserve":
        good, bad = {"instances": [{"data": b64(good_png)}]}, {"instances": [{"data": "%%%"}]}
    else:
        image = {"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [b64(good_png)]}
        good, bad = {"inputs": [image]}, {"inputs": [{**image, "data": ["%%%"]}]}
    batch = [
        {
            "requestId": f"r{i}".encode(),
            "parameters": [{"name": "body", "value": body, "contentType": "application/json"}],
            "headers": [{"name": b"explain", "value": b"False"}],
        }
        for i, body in enumerate([good, bad, good])
    ]
    headers, input_batch, request_ids = Service.retrieve_data_for_inference(batch)
    service.context.request_processor, service.context.request_ids = headers, request_ids
    answers = service._entry_point(input_batch, service.context)
    statuses = [service.context.get_response_status(i)[0] for i in range(3)]
    assert statuses == [200, 400, 200] and list(answers[1]) == ["error"]
    if envelope == "kserve":
        assert answers[0] == answers[2] and answers[0]["predictions"][0]["label"] == read_held_out_label(
            good_png, service
        )
    else:
        assert [o["name"] for o in answers[0]["outputs"]] == ["label", "index", "probabilities"]
        assert (answers[0]["id"], answers[2]["id"]) == ("r0", "r2") and answers[0]["outputs"] == answers[2]["outputs"]


def read_held_out_label(png: bytes, service) -> str:
    handler = service._entry_point.__self__
    return handler.encode_predictions(handler.forward(image_to_tensor(png, 10**6)))[0]["label"]


def test_exif_orientation_is_applied_before_anything_else(handlers, held_out):
    """Sevens stored rotated with Orientation=6 (a phone's portrait photo) are read upright, as 7."""
    digits = handlers["digits"]
    sevens = [s.path.read_bytes() for s in held_out if s.label == "7"][:20]
    assert len(sevens) >= 10
    upright = [plain_answer(digits, png, "image/png")["label"] for png in sevens]
    tagged = [plain_answer(digits, rotated_jpeg(png), "image/jpeg")["label"] for png in sevens]
    untagged = [plain_answer(digits, rotated_jpeg(png, orientation=1), "image/jpeg")["label"] for png in sevens]
    assert tagged.count("7") >= upright.count("7") - 1 >= len(sevens) - 3
    assert untagged.count("7") <= len(sevens) // 2  # the rotation is real: ignoring the tag misreads them
    image = open_image(rotated_jpeg(sevens[0]), 10**6)
    assert image.size == (28, 28)
    v1 = protocol_answers(digits, [{"instances": [{"b64": b64(rotated_jpeg(png))} for png in sevens]}])[0][1]
    assert [p["label"] for p in v1["predictions"]] == tagged
    classifier = handlers["image"]
    wide = Image.new("L", (40, 20), 0)
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    wide.save(buffer, format="JPEG", exif=exif.tobytes())
    assert open_image(buffer.getvalue(), 10**6).size == (20, 40)
    assert plain_answer(classifier, buffer.getvalue(), "image/jpeg")["label"] in classifier.labels


def test_a_poison_input_fails_only_its_own_request(tmp_path):
    store = tmp_path / "store"
    build_archive("poison", "1.0.0", poison_trained_folder(tmp_path / "poison"), store, handler="tensor")
    handler = TensorHandler()
    handler.initialize(extracted_archive(store / "poison-1.0.0.mar", tmp_path / "unpacked"))
    good, poison = [1.0, 2.0, 3.0, 4.0], [1.0, POISON, 3.0, 4.0]
    bodies = [(json.dumps({"input": sample}).encode(), "application/json") for sample in (good, poison, good)]
    context = FakeContext(handler.model_dir, handler.manifest)
    answers = handler.handle(requests_for(bodies, context), context)
    assert answers[0] == answers[2] == {"output": [2.0, 4.0, 6.0, 8.0]}
    assert context.statuses == {1: (500, "Internal Server Error")} and answers[1]["error"] == "inference_failed"
    results = protocol_answers(handler, [{"instances": [good]}, {"instances": [poison]}])
    assert [status for status, _ in results] == [200, 500] and "poison input" in results[1][1]["error"]
