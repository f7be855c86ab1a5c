"""The image, tensor and text handlers on a real TorchServe (batch size 4): parity, a malformed-input corpus
under concurrent traffic, multipart uploads, and the handlers' metrics on the Prometheus endpoint."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from support.bodies import malformed_corpus, one_per_class
from support.handlers import HANDLER_CLASSES, in_process_handlers, plain_answer
from support.http import post_body
from support.servers import worker_pids

from servekit.serve.deployments import register_verified
from servekit.store.heldout import read_held_out

pytestmark = pytest.mark.server
MAX_REQUEST_SIZE = 16 * 1024 * 1024  # config.properties: max_request_size


@pytest.fixture(scope="session")
def served_all(served_digits, torchserve, all_models_store):
    for name in ("image", "tensor", "text"):
        register_verified(served_digits, all_models_store, name, "1.0.0")
    return served_digits


@pytest.fixture(scope="session")
def in_process(all_models_store, tmp_path_factory):
    """Each archive's handler run in this process, to compute the answers TorchServe must give."""
    handlers = in_process_handlers(all_models_store, tmp_path_factory)
    return lambda name, body, content_type: plain_answer(handlers[name], body, content_type)


def post(client, name: str, body: bytes, content_type: str) -> requests.Response:
    return post_body(client, f"/predictions/{name}", body, content_type)


def good_requests(trained_digits, trained_text) -> list[tuple[str, bytes, str]]:
    pngs = [sample.path.read_bytes() for sample in read_held_out(trained_digits / "heldout")[:12]]
    texts = [sample.path.read_bytes() for sample in read_held_out(trained_text / "heldout")[:12]]
    samples = torch.rand(6, 1, 28, 28)
    return (
        [("digits", png, "image/png") for png in pngs]
        + [("image", png, "image/png") for png in pngs]
        + [
            ("image", json.dumps({"image": base64.b64encode(png).decode()}).encode(), "application/json")
            for png in pngs[:4]
        ]
        + [("text", text, "text/plain; charset=utf-8") for text in texts]
        + [("tensor", sample.numpy().astype("<f4").tobytes(), "application/octet-stream") for sample in samples]
        + [("tensor", json.dumps({"input": sample.tolist()}).encode(), "application/json") for sample in samples[:3]]
    )


def test_each_handler_answers_like_the_in_process_model(served_all, in_process, trained_digits, trained_text):
    for name, body, content_type in good_requests(trained_digits, trained_text):
        response = post(served_all, name, body, content_type)
        assert response.status_code == 200, (name, response.text)
        expected = in_process(name, body, content_type.split(";")[0])
        served = response.json()
        if name == "tensor":
            key = "outputs" if "outputs" in expected else "output"
            assert torch.allclose(torch.tensor(served[key]), torch.tensor(expected[key]), atol=1e-4)
        else:
            assert served["index"] == expected["index"], (name, served, expected)


def test_text_classifier_served_accuracy(served_all, trained_text):
    samples = read_held_out(trained_text / "heldout")[:100]
    labels = [post(served_all, "text", s.path.read_bytes(), "text/plain").json()["label"] for s in samples]
    assert sum(label == s.label for label, s in zip(labels, samples, strict=True)) >= 90


def test_malformed_corpus_under_concurrent_traffic(served_all, in_process, trained_digits, trained_text, good_png):
    """8 clients send good and bad requests interleaved: bad ones get 4xx JSON, good ones their right answers."""
    pids_before = worker_pids(served_all, *HANDLER_CLASSES, version="1.0.0")
    # The whole corpus runs in process (tests/unit/test_handlers.py); here one case of each error each handler
    # answers, and the one TorchServe's frontend refuses before any handler sees it.
    corpus = [case for case in malformed_corpus(good_png) if len(case[1]) > MAX_REQUEST_SIZE]
    corpus += one_per_class(
        [case for case in malformed_corpus(good_png) if len(case[1]) <= MAX_REQUEST_SIZE],
        lambda case: (case[0], in_process(case[0], case[1], case[2].split(";")[0])["error"]),
    )
    assert len({name for name, _, _ in corpus}) == 4 and len(corpus) >= 8
    good = good_requests(trained_digits, trained_text)
    jobs = [("bad", *case) for case in corpus] + [("good", *case) for case in good]
    jobs = [jobs[i] for i in sorted(range(len(jobs)), key=lambda i: (i * 7919) % len(jobs))]  # interleave

    def send(job):
        kind, name, body, content_type = job
        return job, post(served_all, name, body, content_type)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(send, jobs))
    for (kind, name, body, content_type), response in results:
        if kind == "bad":
            assert 400 <= response.status_code < 500, (name, content_type, response.status_code, response.text[:200])
            if len(body) > MAX_REQUEST_SIZE:  # refused by TorchServe's frontend itself: a bare 413, no body
                assert response.status_code == 413
                continue
            document = response.json()
            assert document.get("error") and document.get("detail"), document
        else:
            assert response.status_code == 200, (name, response.text)
            expected = in_process(name, body, content_type.split(";")[0])
            if name != "tensor":
                assert response.json()["index"] == expected["index"]
    assert worker_pids(served_all, *HANDLER_CLASSES, version="1.0.0") == pids_before


def test_multipart_upload_to_the_image_classifier(served_all, good_png, in_process):
    response = requests.post(
        f"{served_all.endpoints.inference_url}/predictions/image",
        files={"data": ("digit.png", good_png, "image/png")},
        headers=served_all.auth_headers("inference"),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["index"] == in_process("image", good_png, "image/png")["index"]


def test_handler_metrics_reach_the_prometheus_endpoint(served_all, good_png):
    post(served_all, "digits", good_png, "image/png")
    post(served_all, "digits", b"not an image", "image/png")
    text = served_all.metrics()
    for name in ("ServekitInferenceMs", "ServekitBatchSize", "ServekitRejectedRequests"):
        assert any(line.startswith(name) and 'ModelName="digits"' in line for line in text.splitlines()), name


def test_servekit_predict_prints_one_line_per_tensor_answer_in_every_protocol(served_all, torchserve, tmp_path):
    from click.testing import CliRunner

    from servekit.cli import cli

    def predict(*arguments: str) -> str:
        result = CliRunner().invoke(cli, ["predict", "tensor", *arguments, "--workdir", torchserve.workdir])
        assert result.exit_code == 0, result.output
        return result.output

    samples = [[[[value] * 28] * 28] for value in (0.0, 1.0)]  # input_shape [1, 28, 28]
    bare = [tmp_path / "zeros.json", tmp_path / "ones.json"]  # --protocol v1/v2: one instance as nested lists
    plain = [tmp_path / "zeros-plain.json", tmp_path / "ones-plain.json"]  # servekit's API: {"input": ...}
    for sample, path, document in zip(samples, bare, plain, strict=True):
        path.write_text(json.dumps(sample))
        document.write_text(json.dumps({"input": sample}))
    raw = json.loads(predict(*map(str, bare), "--protocol", "v1", "--json"))
    rows = [raw[str(path)] for path in bare]
    assert [len(row) for row in rows] == [10, 10] and rows[0] != rows[1]  # a v1 answer is the output row
    for protocol, files in (("plain", plain), ("v1", bare), ("v2", bare)):
        lines = predict(*map(str, files), "--protocol", protocol).splitlines()
        assert [line.split(": ", 1)[0] for line in lines] == list(map(str, files)), (protocol, lines)
        for row, line in zip(rows, lines, strict=True):
            answer = json.loads(line.split(": ", 1)[1])
            assert (answer if protocol == "v1" else answer["output"]) == pytest.approx(row, abs=1e-4), (protocol, line)
