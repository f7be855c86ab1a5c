"""The README's "Your own handler" example, run exactly as it is written there: packed the way the README says, its
archive unpacked as TorchServe unpacks it, and requests answered in process like the digits handler answers them."""

from __future__ import annotations

import importlib.util
import json
import zipfile

import pytest
from digits import DigitsHandler
from support import REPO
from support.handlers import answer_batch, extracted_archive, protocol_answers
from ts.utils.util import list_classes_from_module

from servekit import archive
from servekit.archive import BuildOptions, HandlerSpec, build_archive
from servekit_worker.digits import image_to_tensor


def readme_example() -> str:
    """The Python block of the README's "Your own handler" section."""
    section = (REPO / "README.md").read_text().split("### Your own handler\n", 1)[1].split("\n### ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def flat_pixels(tmp_path, trained_digits, monkeypatch):
    """The example handler initialised from an archive built with it (the library route the README names)."""
    handler_file = tmp_path / "flat_pixels.py"
    handler_file.write_text(readme_example())
    monkeypatch.setitem(archive.HANDLERS, "flat", HandlerSpec(str(handler_file)))
    entry = build_archive("digits", "2.0.0", trained_digits, tmp_path / "store", handler="flat",
                          options=BuildOptions(batch_size=4))  # fmt: skip
    with zipfile.ZipFile(tmp_path / "store" / entry.archive) as mar:
        assert {"flat_pixels.py", "servekit_worker/base.py", "labels.json"} <= set(mar.namelist())
    context = extracted_archive(tmp_path / "store" / entry.archive, tmp_path / "unpacked")
    spec = importlib.util.spec_from_file_location("flat_pixels", tmp_path / "unpacked" / "flat_pixels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
