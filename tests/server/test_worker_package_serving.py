"""The servekit_worker package on a real TorchServe: the worker runs the copy its archive carries, and a tensor
archive whose model takes int64 token ids (an embedding lookup) gets them as int64 through JSON, packed bytes, KServe
v1 and v2; only floating inputs are cast to the model's dtype. Before the worker kept `input_dtype` and
`model_dtype` apart, every such request was decoded as float32 (a 500)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import requests
import torch
from support import REPO
from support.http import post_body

from servekit.build.archive import BuildOptions, build_archive
from servekit.serve.client import ServeClient

pytestmark = pytest.mark.server

VOCABULARY, TOKENS, CLASSES = 50, 8, 3
SAMPLES = [[3, 1, 4, 1, 5, 9, 2, 6], [49, 0, 0, 7, 7, 7, 12, 30]]


class BagOfEmbeddings(torch.nn.Module):
    """Token ids -> the mean of their embeddings -> class scores: indexing an embedding takes integers only."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCABULARY, 16)
        self.head = torch.nn.Linear(16, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(dim=1))


@pytest.fixture(scope="module")
def model() -> BagOfEmbeddings:
    torch.manual_seed(0)
    return BagOfEmbeddings().eval()


@pytest.fixture(scope="module")
def served_tokens(tmp_path_factory, model, torchserve, model_store):
    """The session TorchServe with `ids` 1.0.0: the model exported (torch.export) and packed with the tensor
    handler; unregistered at the end of the module."""
    folder = tmp_path_factory.mktemp("ids")
    example = torch.tensor(SAMPLES)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "model.pt2"))
    handler = {"format": "export", "example_input": {"shape": [TOKENS], "dtype": "int64"}}
    (folder / "handler.json").write_text(json.dumps(handler))
    (folder / "metrics.json").write_text(json.dumps({"weights_sha256": "bag-of-embeddings"}))
    entry = build_archive(
        "ids", "1.0.0", folder, model_store, handler="tensor", options=BuildOptions(batch_size=4, workers=1)
    )
    assert entry.config["handler"]["input_dtype"] == "int64"
    client = ServeClient(torchserve.endpoints())
    client.register("ids-1.0.0.mar", initial_workers=1)
    try:
        yield client, Path(torchserve.workdir)
    finally:
        client.unregister("ids", "1.0.0")


def expected_rows(model: BagOfEmbeddings) -> list[list[float]]:
    with torch.inference_mode():
        return model(torch.tensor(SAMPLES)).tolist()


def flat(rows: list[list[float]]) -> list[float]:
    return [value for row in rows for value in row]


def post_json(client: ServeClient, path: str, document: dict) -> requests.Response:
    return post_body(client, path, json.dumps(document).encode(), "application/json")


def test_int64_ids_reach_the_model_as_int64_in_every_encoding(served_tokens, model):
    served_tokens, _ = served_tokens
    expected = expected_rows(model)
    one = post_json(served_tokens, "/predictions/ids", {"input": SAMPLES[0]})
    assert one.status_code == 200, one.text
    assert one.json()["output"] == pytest.approx(expected[0], abs=1e-5)
    several = post_json(served_tokens, "/predictions/ids", {"inputs": SAMPLES})
    assert several.status_code == 200 and flat(several.json()["outputs"]) == pytest.approx(flat(expected), abs=1e-5)
    packed = struct.pack(f"<{TOKENS * 2}q", *SAMPLES[0], *SAMPLES[1])  # little-endian int64, two samples
    raw = post_body(served_tokens, "/predictions/ids", packed, "application/octet-stream")
    assert raw.status_code == 200, raw.text
    assert flat(raw.json()["outputs"]) == pytest.approx(flat(expected), abs=1e-5)
    v1 = post_json(served_tokens, "/v1/models/ids:predict", {"instances": SAMPLES})
    assert v1.status_code == 200 and flat(v1.json()["predictions"]) == pytest.approx(flat(expected), abs=1e-5)
    v2 = post_json(
        served_tokens,
        "/v2/models/ids/infer",
        {"id": "ids", "inputs": [{"name": "ids", "shape": [2, TOKENS], "datatype": "INT64", "data": flat(SAMPLES)}]},
    )
    assert v2.status_code == 200, v2.text
    [output] = v2.json()["outputs"]
    assert output["shape"] == [2, CLASSES] and output["data"] == pytest.approx(flat(expected), abs=1e-5)


def test_floats_sent_to_an_int64_model_get_a_400_naming_integers(served_tokens):
    served_tokens, _ = served_tokens
    answer = post_json(served_tokens, "/predictions/ids", {"input": [0.5] * TOKENS})
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_input" and "integers (torch.int64)" in answer.json()["detail"]
    v2 = post_json(
        served_tokens,
        "/v2/models/ids/infer",
        {"inputs": [{"name": "ids", "shape": [1, TOKENS], "datatype": "FP32", "data": [0.5] * TOKENS}]},
    )
    assert v2.status_code == 400 and "integers" in v2.json()["error"]
    partial = post_body(served_tokens, "/predictions/ids", struct.pack("<3q", 1, 2, 3), "application/octet-stream")
    assert partial.status_code == 400 and partial.json()["error"] == "invalid_shape"


def test_the_worker_runs_the_worker_code_its_archive_carries(served_tokens):
    """TorchServe puts the unpacked archive first on the worker's path: its servekit_worker, not this checkout's."""
    _, workdir = served_tokens
    deadline, lines = time.monotonic() + 30, []
    while not lines and time.monotonic() < deadline:
        log = (workdir / "logs" / "model_log.log").read_text()
        lines = [line for line in log.splitlines() if "TensorHandler ready: export on " in line]
        time.sleep(0.2)
    assert lines, "no worker logged its ready line"
    for line in lines:
        code = Path(line.rsplit("(worker code ", 1)[1].removesuffix(")"))
        assert code.name == "servekit_worker" and (code.parent / "MAR-INF" / "MANIFEST.json").is_file()
        assert REPO not in code.parents
