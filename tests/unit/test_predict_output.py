"""`servekit predict`'s output against a stand-in client answering what TorchServe's handlers answer (the documents
of docs/kserve.md): one line per answer whatever its shape, and `--json` the answers as the server sent them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from servekit.cli import cli
from servekit.serve import protocols
from servekit.serve.handle import Server

LABELS = [str(i) for i in range(10)]
LOGITS = [-5.68, -3.1, 0.25, -1.5, -2.0, -4.75, -6.0, 7.5, -0.5, 1.25]  # one tensor-model answer: 10 logits
PROBABILITIES = [0.001, 0.002, 0.02, 0.005, 0.004, 0.001, 0.0005, 0.9, 0.0165, 0.05]  # softmax of a digits answer
TOP3 = {"7": 0.9, "9": 0.05, "2": 0.02}


class StandIn:
    """A client whose routes answer like the handlers: `plain` one request per file, v1/v2 one per call."""

    def __init__(self, model: str):
        self.model = model
        self.documents: list[dict] = []

    def predict_file(self, name: str, path: Path, version: str | None = None):
        if self.model == "tensor":
            return {"output": LOGITS}
        if path.suffix == ".json":  # a document of several inputs: one answer each
            return [{"label": "7", "index": 7, "probabilities": TOP3}] * len(json.loads(path.read_text())["inputs"])
        return {"label": "7", "index": 7, "probabilities": TOP3}

    def post_inference(self, route: str, document: dict) -> dict:
        self.documents.append(document)
        if route.startswith("/v1/"):
            count = len(document["instances"])
            if self.model == "tensor":
                return {"predictions": [LOGITS] * count}
            return {"predictions": [{"label": "7", "index": 7, "probabilities": TOP3}] * count}
        count = sum(tensor["shape"][0] for tensor in document["inputs"])
        if self.model == "tensor":
            outputs = [{"name": "output", "datatype": "FP32", "shape": [count, 10], "data": LOGITS * count}]
        else:
            outputs = [
                {"name": "label", "datatype": "BYTES", "shape": [count], "data": ["7"] * count},
                {"name": "index", "datatype": "INT64", "shape": [count], "data": [7] * count},
                {"name": "probabilities", "datatype": "FP32", "shape": [count, 10], "data": PROBABILITIES * count},
            ]
        return {"model_name": self.model, "model_version": "1.0.0", "id": "1", "outputs": outputs}


@pytest.fixture
def stand_in(monkeypatch):
    def use(model: str) -> StandIn:
        client = StandIn(model)
        monkeypatch.setattr(Server, "connect", lambda workdir: SimpleNamespace(client=client))
        return client

    return use


@pytest.fixture
def files(tmp_path) -> list[str]:
    """A 28x28 tensor as .json (one instance each), two files."""
    paths = [tmp_path / "t.json", tmp_path / "u.json"]
    for path in paths:
        path.write_text(json.dumps([[0.0] * 28] * 28))
    return [str(p) for p in paths]


def predict(*args: str):
    result = CliRunner().invoke(cli, ["predict", *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("protocol", ["plain", "v1", "v2"])
def test_a_tensor_models_answer_is_one_line_per_file_in_every_protocol(stand_in, files, protocol):
    stand_in("tensor")
    lines = predict("tensor", *files, "--protocol", protocol).splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == files, lines
    for line in lines:
        answer = json.loads(line.split(": ", 1)[1])
        assert answer in (LOGITS, {"output": LOGITS}), line


def test_a_plain_document_of_several_inputs_prints_one_line_per_input(stand_in, tmp_path):
    stand_in("digits")
    document = tmp_path / "three.json"
    document.write_text(json.dumps({"inputs": [[[0.0] * 28] * 28] * 3}))
    lines = predict("digits", str(document)).splitlines()
    assert lines == [f"{document}: 7 (90.0%)"] * 3


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_a_classifier_prints_label_and_confidence_in_both_protocols(stand_in, files, protocol):
    stand_in("digits")
    assert predict("digits", *files, "--protocol", protocol).splitlines() == [f"{f}: 7 (90.0%)" for f in files]


def test_json_prints_each_files_answer_as_the_server_sent_it(stand_in, tmp_path):
    png, text = tmp_path / "seven.png", tmp_path / "seven.txt"
    png.write_bytes(b"\x89PNG not decoded here")
    text.write_text("seven")
    paths = [str(png), str(text)]
    stand_in("digits")
    plain = json.loads(predict("digits", *paths, "--json"))
    assert plain == {path: {"label": "7", "index": 7, "probabilities": TOP3} for path in paths}
    v1 = json.loads(predict("digits", *paths, "--protocol", "v1", "--json"))
    assert v1 == {path: {"label": "7", "index": 7, "probabilities": TOP3} for path in paths}
    v2 = json.loads(predict("digits", *paths, "--protocol", "v2", "--json"))
    assert v2 == {path: {"label": "7", "index": 7, "probabilities": PROBABILITIES} for path in paths}


def test_v2_answers_split_every_output_per_instance_and_go_back_to_their_files(stand_in, tmp_path):
    client = stand_in("digits")
    first, text, second = tmp_path / "a.png", tmp_path / "b.txt", tmp_path / "c.png"
    first.write_bytes(b"png")
    text.write_text("a wonderful movie")
    second.write_bytes(b"png")
    document = {
        "outputs": [
            {"name": "output", "shape": [3, 2, 2], "data": list(range(12))},
            {"name": "index", "shape": [3], "data": [5, 6, 7]},
        ]
    }
    client.post_inference = lambda route, request: document
    answers = protocols.predict_files(client, "digits", [first, text, second], "v2")
    # the request holds one input per kind (images, then texts): rows 0 and 1 are the images, row 2 the text
    assert answers == {
        str(first): {"output": [[0, 1], [2, 3]], "index": 5},
        str(text): {"output": [[8, 9], [10, 11]], "index": 7},
        str(second): {"output": [[4, 5], [6, 7]], "index": 6},
    }


def test_a_v2_answer_without_outputs_or_with_mismatched_rows_is_a_server_error():
    from servekit.core.errors import ServerError

    with pytest.raises(ServerError, match="no outputs"):
        protocols.v2_answers({"outputs": []})
    mismatched = {
        "outputs": [{"name": "a", "shape": [2], "data": [1, 2]}, {"name": "b", "shape": [3], "data": [1] * 3}]
    }
    with pytest.raises(ServerError, match=r"different numbers of instances: \[2, 3\]"):
        protocols.v2_answers(mismatched)
