"""The README's "Your own handler" example, run exactly as it is written there: built the way the README says, its
archive unpacked as TorchServe unpacks it, and requests answered in process like the digits handler answers them."""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile

import pytest
from click.testing import CliRunner
from digits import DigitsHandler
from support.handlers import answer_batch, extracted_archive, protocol_answers
from support.own_models import readme_example
from ts.utils.util import list_classes_from_module

from servekit.cli import cli
from servekit_worker.digits import image_to_tensor


@pytest.fixture
def flat_pixels(tmp_path, trained_digits):
    """The example handler initialised from an archive built with it as the README says (`build --handler FILE`)."""
    handler_file = tmp_path / "flat_pixels.py"
    handler_file.write_text(readme_example())
    built = CliRunner().invoke(cli, ["build", "digits", "--version", "2.0.0", "--from", str(trained_digits),
                                     "--handler", str(handler_file), "--batch-size", "4",
                                     "--store", str(tmp_path / "store")])  # fmt: skip
    assert built.exit_code == 0, built.output
    archive = tmp_path / "store" / "digits-2.0.0.mar"
    with zipfile.ZipFile(archive) as mar:
        assert {"flat_pixels.py", "flat_pixels_torchserve.py", "servekit_worker/base.py", "labels.json"} <= set(
            mar.namelist()
        )
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
    assert manifest["model"]["handler"] == "flat_pixels_torchserve.py"
    context = extracted_archive(archive, tmp_path / "unpacked")
    sys.path.insert(0, str(tmp_path / "unpacked"))  # TorchServe puts the model's folder on the path
    try:
        spec = importlib.util.spec_from_file_location("entry", tmp_path / "unpacked" / "flat_pixels_torchserve.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(tmp_path / "unpacked"))
    [handler_class] = list_classes_from_module(module)  # TorchServe's loader takes the module's one class
    handler = handler_class()
    handler.initialize(context)
    return handler


def pixel_rows(held_out, count: int) -> list[list[float]]:
    return [image_to_tensor(s.path.read_bytes(), 10**6).flatten().tolist() for s in held_out[:count]]


def test_the_readme_handler_answers_as_the_digits_handler(flat_pixels, model_store, held_out, tmp_path):
    digits = DigitsHandler()
    digits.initialize(extracted_archive(model_store / "digits-1.0.0.mar", tmp_path / "digits"))
    rows = pixel_rows(held_out, 3)
    as_images = [[row[i * 28 : (i + 1) * 28] for i in range(28)] for row in rows]
    expected, _ = answer_batch(
        digits, [(json.dumps({"input": image}).encode(), "application/json") for image in as_images]
    )
    bodies = [(json.dumps({"pixels": row}).encode(), "application/json") for row in rows]
    bodies.insert(1, (json.dumps({"pixels": rows[0][:783]}).encode(), "application/json"))
    bodies.append((json.dumps({"images": rows[:2]}).encode(), "application/json"))
    answers, statuses = answer_batch(flat_pixels, bodies)
    assert statuses == {1: (400, "Bad Request")}
    assert answers[1] == {"code": 400, "error": "invalid_shape", "detail": "image 0 has shape [783]; expected [784]"}
    assert [answers[0], answers[2], answers[3]] == expected and answers[4] == expected[:2]
    assert [answer["label"] for answer in expected] == [s.label for s in held_out[:3]]


def test_the_readme_handler_speaks_kserve_v1_and_v2(flat_pixels, held_out):
    rows = pixel_rows(held_out, 2)
    [(status, v1)] = protocol_answers(flat_pixels, [{"instances": rows}])
    assert status == 200 and [p["label"] for p in v1["predictions"]] == [s.label for s in held_out[:2]]
    flat = [value for row in rows for value in row]
    v2_input = {"name": "pixels", "shape": [2, 784], "datatype": "FP32", "data": flat}
    [(status, v2), (bad_status, bad)] = protocol_answers(
        flat_pixels, [{"inputs": [v2_input]}, {"inputs": [{**v2_input, "shape": [1, 1568]}]}]
    )
    assert status == 200 and v2["outputs"][0]["data"] == [s.label for s in held_out[:2]]
    assert bad_status == 400 and bad == {"error": 'invalid_shape: input "pixels"[0] has shape [1568]; expected [784]'}
