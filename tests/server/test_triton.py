"""A second runtime from the same catalog: the archives exported to Triton (nvidia-pytriton's tritonserver, on
loopback ports) answer the same v2 requests with the same answers as TorchServe and as the handler in process,
over HTTP and gRPC; bad instances fail their own request with 400; two versions answer side by side."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from support.bodies import b64, png_header_bomb
from support.processes import processes_in

from servekit.build.archive import BuildOptions, build_archive
from servekit.build.triton import TritonSpec, export_triton
from servekit.measure.inprocess import InProcessHandler
from servekit.serve.torchserve import free_port
from servekit.serve.triton import start_triton, stop_triton
from servekit.store.heldout import read_held_out
from servekit.store.workspace import HELD_OUT_DIR
from servekit_worker.kserve import V2
from servekit_worker.requests import Request

pytestmark = pytest.mark.server
GROUP = 8  # instances per v2 request
SESSION_OPTIONS = BuildOptions(batch_size=4, max_batch_delay_ms=50, workers=1)  # as the session's archives


@pytest.fixture(scope="module")
def triton_store(tmp_path_factory, trained_digits, trained_image, trained_text):
    """digits 1.0.0 and 1.1.0, image and text 1.0.0, built as the session's archives are."""
    store = tmp_path_factory.mktemp("triton_store")
    for version in ("1.0.0", "1.1.0"):
        build_archive("digits", version, trained_digits, store, options=SESSION_OPTIONS)
    build_archive("image", "1.0.0", trained_image, store, handler="image", options=SESSION_OPTIONS)
    build_archive("text", "1.0.0", trained_text, store, handler="text", options=SESSION_OPTIONS)
    return store


@pytest.fixture(scope="module")
def triton(tmp_path_factory, triton_store):
    folder = tmp_path_factory.mktemp("triton")
    repository = folder / "repository"
    export_triton(triton_store, TritonSpec("digits", ["1.0.0"], repository))
    export_triton(triton_store, TritonSpec("digits", ["1.1.0"], repository))  # added to the same repository
    for name in ("image", "text"):
        export_triton(triton_store, TritonSpec(name, ["1.0.0"], repository))
    workdir = folder / "workdir"
    try:
        yield start_triton(repository, workdir, {"http": free_port(), "grpc": free_port(), "metrics": free_port()})
    finally:
        stop_triton(workdir)
        left = [p.pid for p in processes_in(workdir)]
        assert not left, f"tritonserver or a backend stub outlived stop_triton: {left}"


def v2_document(samples) -> dict:
    """One v2 request: the samples as a BYTES input [n, 1] (base64 images, texts), as a client sends it to either."""
    data = [s.path.read_text() if s.path.suffix == ".txt" else b64(s.path.read_bytes()) for s in samples]
    return {"inputs": [{"name": "input", "shape": [len(data), 1], "datatype": "BYTES", "data": data}]}


def outputs_by_name(answer: dict) -> dict[str, list]:
    return {output["name"]: output["data"] for output in answer["outputs"]}


def triton_answers(triton, name: str, samples, version: str | None = None) -> list[dict]:
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
    groups = [samples[i : i + GROUP] for i in range(0, len(samples), GROUP)]

    def ask(group):
        reply = requests.post(f"{triton.url}{path}", json=v2_document(group), timeout=60)
        assert reply.status_code == 200, reply.text
        return outputs_by_name(reply.json())

    with ThreadPoolExecutor(4) as pool:  # concurrent, so Triton batches requests
        return list(pool.map(ask, groups))


def rows(answers: list[dict]) -> list[tuple[str, int, list[float]]]:
    """(label, index, probabilities) per instance, across the answers of several requests."""
    found = []
    for answer in answers:
        width = len(answer["probabilities"]) // len(answer["label"])
        probabilities = [answer["probabilities"][i * width : (i + 1) * width] for i in range(len(answer["label"]))]
        found += list(zip(answer["label"], answer["index"], probabilities, strict=True))
    return found


def assert_same_rows(got, expected, tolerance: float = 1e-5) -> None:
    assert [(label, index) for label, index, _ in got] == [(label, index) for label, index, _ in expected]
    assert np.allclose([p for *_, p in got], [p for *_, p in expected], atol=tolerance)


def test_the_held_out_digits_score_and_answer_as_on_torchserve_file_by_file(triton, served_digits, trained_digits):
    samples = read_held_out(trained_digits / HELD_OUT_DIR)
    on_triton = rows(triton_answers(triton, "digits", samples, version="1"))
    groups = [samples[i : i + GROUP] for i in range(0, len(samples), GROUP)]
    on_torchserve = []
    for group in groups:  # servekit's KServe v2 path on the session's TorchServe, the same documents
        url, key = (
            f"{served_digits.endpoints.inference_url}/v2/models/digits/infer",
            served_digits.auth_headers("inference"),
        )
        reply = requests.post(url, json=v2_document(group), headers=key, timeout=60)
        assert reply.status_code == 200, reply.text
        on_torchserve.append(outputs_by_name(reply.json()))
    on_torchserve = rows(on_torchserve)
    assert_same_rows(on_triton, on_torchserve)
    correct = sum(label == s.label for (label, _, _), s in zip(on_triton, samples, strict=True))
    assert correct == sum(label == s.label for (label, _, _), s in zip(on_torchserve, samples, strict=True))
    assert correct >= 0.95 * len(samples)


GRPC_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

port, files = sys.argv[1], json.loads(sys.argv[2])
client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
rows = []
for start in range(0, len(files), 8):
    group = files[start : start + 8]
    tensor = grpcclient.InferInput("input", [len(group), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[open(f, "rb").read()] for f in group], dtype=object))  # raw PNG bytes
    result = client.infer("digits", [tensor], model_version="1")
    labels = [label.decode() for label in result.as_numpy("label").reshape(-1)]
    rows += zip(labels, result.as_numpy("index").reshape(-1).tolist(), result.as_numpy("probabilities").tolist())
print(json.dumps(rows))
"""


def test_grpc_clients_get_the_http_answers(triton, trained_digits):
    """tritonclient's gRPC client in a process of its own: its protos and kserve's (imported by other tests) define
    the same Open Inference Protocol messages, and one process's protobuf pool takes only one of them."""
    samples = read_held_out(trained_digits / HELD_OUT_DIR)[:48]
    arguments = [str(triton.grpc_port), json.dumps([str(s.path) for s in samples])]
    result = subprocess.run(
        [sys.executable, "-c", GRPC_CLIENT, *arguments], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    got = [tuple(row) for row in json.loads(result.stdout)]
    assert_same_rows(got, rows(triton_answers(triton, "digits", samples, version="1")))


@pytest.mark.parametrize("name", ["image", "text"])
def test_image_and_text_answer_as_the_archive_in_process(triton, triton_store, trained_image, trained_text, name):
    folder = {"image": trained_image, "text": trained_text}[name]
    samples = read_held_out(folder / HELD_OUT_DIR)[:48]
    documents = [v2_document(samples[i : i + GROUP]) for i in range(0, len(samples), GROUP)]
    with InProcessHandler(triton_store / f"{name}-1.0.0.mar") as archive:  # the KServe v2 path, one batch
        answers = archive.handler.answer_batch([Request(document, "application/json", V2) for document in documents])
    expected = [outputs_by_name(answer.body) for answer in answers]
    assert_same_rows(rows(triton_answers(triton, name, samples)), rows(expected))


def bad_cases(png: bytes) -> dict[str, tuple[dict, str]]:
    """Each bad request and what its 400 says: Triton's own checks first, then the handler's, per instance."""
    good = {"name": "input", "shape": [1, 1], "datatype": "BYTES", "data": [b64(png)]}
    truncated = png[: len(png) // 2]
    return {
        "not base64": ({"inputs": [{**good, "data": ["%%%"]}]}, "invalid_base64"),
        "not an image": ({"inputs": [{**good, "data": [b64(b"not an image")]}]}, "invalid_image"),
        "truncated png": ({"inputs": [{**good, "data": [b64(truncated)]}]}, "invalid_image"),
        "20000x20000 png": ({"inputs": [{**good, "data": [b64(png_header_bomb())]}]}, "image_too_large"),
        "empty element": ({"inputs": [{**good, "data": [""]}]}, ""),
        "wrong datatype": ({"inputs": [{**good, "datatype": "FP32", "data": [0.5]}]}, "data-type is 'FP32'"),
        "unknown input": ({"inputs": [{**good, "name": "images"}]}, "images"),
        "shape and data disagree": ({"inputs": [{**good, "shape": [2, 1]}]}, "expected 2 string elements"),
        "more than 64 instances": ({"inputs": [{**good, "shape": [65, 1], "data": [b64(png)] * 65}]}, "batch"),
        "unknown output": ({"inputs": [good], "outputs": [{"name": "logits"}]}, "logits"),
    }


def test_every_bad_request_fails_alone_with_400_and_the_good_ones_beside_it_are_answered(triton, held_out, good_png):
    url = f"{triton.url}/v2/models/digits/versions/1/infer"
    good = v2_document(held_out[:1])
    cases = bad_cases(good_png)

    def send(document: dict) -> requests.Response:
        return requests.post(url, json=document, timeout=60)

    with ThreadPoolExecutor(8) as pool:  # each bad request among good ones, so they share batches
        futures = {case: pool.submit(send, document) for case, (document, _) in cases.items()}
        goods = [pool.submit(send, good) for _ in range(3 * len(cases))]
        refused = {case: future.result() for case, future in futures.items()}
        wrong = {case: (reply.status_code, reply.text) for case, reply in refused.items()
                 if reply.status_code != 400 or cases[case][1] not in reply.json()["error"]}  # fmt: skip
        assert not wrong, wrong
        for future in goods:
            reply = future.result()
            assert reply.status_code == 200 and outputs_by_name(reply.json())["label"] == [held_out[0].label]
    assert requests.get(f"{triton.url}/v2/health/ready", timeout=10).status_code == 200


def test_two_versions_answer_side_by_side_with_their_semver_recorded(triton, held_out):
    repository = Path(triton.repository)
    recorded = json.loads((repository / "digits" / "servekit.json").read_text())["versions"]
    assert recorded == {"1": "1.0.0", "2": "1.1.0"}
    for number in ("1", "2"):
        metadata = requests.get(f"{triton.url}/v2/models/digits/versions/{number}", timeout=10)
        assert metadata.status_code == 200, metadata.text
        [answer] = triton_answers(triton, "digits", held_out[:4], version=number)
        assert answer["label"] == [s.label for s in held_out[:4]]
    settings = json.loads((repository / "digits" / "2" / "servekit-model.json").read_text())
    assert settings["version"] == "1.1.0"
    ready = requests.get(f"{triton.url}/v2/models/digits/versions/3/ready", timeout=10)
    assert ready.status_code != 200


def test_bench_measures_the_triton_runtime_with_its_own_queue_and_service_times(triton, triton_store, tmp_path):
    from click.testing import CliRunner

    from servekit.cli import cli

    result = CliRunner().invoke(
        cli,
        ["bench", "digits", "--runtime", "triton", "--triton-workdir", triton.workdir, "--store", str(triton_store),
         "--workdir", str(tmp_path / "no-torchserve"), "--concurrency", "1,4", "--duration", "1s", "--repeats", "1",
         "--warmup", "0", "--generator", "python", "--out", str(tmp_path), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["runtime"], report["version"]) == ("triton", "1.1.0")  # the newest exported: Triton's default
    for level in report["levels"]:
        served = level["served"]
        assert served["ok"] > 5 and served["errors"] == 0 and served["p50_ms"] <= served["p99_ms"]
        # Triton's own metrics: its time in queue and in the model, within what the client saw
        assert 0 <= level["queue_ms"] and 0 < level["service_ms"] and level["queue_ms"] + level["service_ms"] < 1000
        assert level["cpu"]["measured_cores"]["server"] > 0  # tritonserver's process tree did the work
    assert "# servekit bench: digits 1.1.0 on Triton" in (tmp_path / "bench.md").read_text()
