"""digits on a real TorchServe 0.12: accuracy, parity with the in-process model, bad input, auth, clean stop."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from click.testing import CliRunner
from digits import DigitsHandler
from support.answers import assert_same_prediction
from support.bodies import bad_inputs, one_per_class
from support.handlers import extracted_archive, plain_answer
from support.servers import worker_pids

from servekit.cli import cli
from servekit.core.errors import ApiError
from servekit.measure.evaluate import evaluate_served
from servekit.serve.handle import Server
from servekit.store.workspace import HELD_OUT_DIR
from servekit_worker.architectures import SimpleCNN
from servekit_worker.digits import image_to_tensor

pytestmark = pytest.mark.server


def in_process_labels(trained_digits, held_out) -> dict[str, str]:
    model = SimpleCNN()
    model.load_state_dict(torch.load(trained_digits / "model.pt", weights_only=True))
    model.eval()
    images = torch.cat([image_to_tensor(sample.path.read_bytes(), 10**6) for sample in held_out])
    with torch.inference_mode():
        indices = model(images).argmax(dim=1).tolist()
    return {sample.path.name: str(index) for sample, index in zip(held_out, indices, strict=True)}


def test_served_accuracy_and_answers_match_the_in_process_model(torchserve, served_digits, trained_digits, held_out):
    evaluation = evaluate_served(
        Server(torchserve, served_digits), "digits", trained_digits / HELD_OUT_DIR, concurrency=8
    )
    assert evaluation.total == len(held_out) >= 0.2 * 1797
    assert evaluation.accuracy >= 0.95
    assert evaluation.predictions == in_process_labels(trained_digits, held_out)


def test_model_is_registered_with_its_archive_settings(served_digits):
    description = served_digits.describe("digits", "1.0.0")[0]
    assert description["batchSize"] == 4 and description["modelVersion"] == "1.0.0"
    assert [w["status"] for w in description["workers"]] == ["READY"]


@pytest.fixture(scope="module")
def bad_input_classes(model_store, tmp_path_factory, good_png) -> dict[str, tuple[bytes, str]]:
    """One bad input per error the digits handler answers in process (tests/unit/test_digits_handler.py runs them
    all there)."""
    handler = DigitsHandler()
    handler.initialize(extracted_archive(model_store / "digits-1.0.0.mar", tmp_path_factory.mktemp("digits")))
    cases = list(bad_inputs(good_png).items())
    kept = one_per_class(cases, lambda case: plain_answer(handler, *case[1])["error"])
    assert len(kept) >= 4, kept
    return dict(kept)


def test_each_bad_input_gets_400_json_and_the_worker_survives(served_digits, good_png, bad_input_classes):
    pids_before = worker_pids(served_digits, "digits", version="1.0.0")
    for case, (body, content_type) in bad_input_classes.items():
        with pytest.raises(ApiError) as info:
            served_digits.predict("digits", body, content_type=content_type)
        assert info.value.status == 400, f"{case}: {info.value}"
        assert info.value.message.split(":")[0] in {
            "invalid_image",
            "image_too_large",
            "empty_body",
            "invalid_shape",
            "invalid_input",
            "invalid_json",
        }, case
    assert worker_pids(served_digits, "digits", version="1.0.0") == pids_before
    assert served_digits.predict("digits", good_png, content_type="image/png")["label"] == "7"


def test_bad_requests_batched_with_good_ones_do_not_spoil_them(served_digits, held_out, bad_input_classes):
    """8 concurrent clients: TorchServe batches good and bad requests together (batch size 4)."""
    pids_before = worker_pids(served_digits, "digits", version="1.0.0")
    bad = list(bad_input_classes.values())
    jobs = [("good", sample.path.read_bytes(), "image/png", sample.label) for sample in held_out[:48]]
    jobs += [("bad", body, content_type, None) for body, content_type in bad * 2]
    jobs.sort(key=lambda job: hash(job[1]))  # interleave good and bad

    def send(job):
        kind, body, content_type, label = job
        url = f"{served_digits.endpoints.inference_url}/predictions/digits"
        response = requests.post(
            url,
            data=body,
            headers={**served_digits.auth_headers("inference"), "Content-Type": content_type},
            timeout=60,
        )
        return kind, label, response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(send, jobs))
    good = [(label, status, body) for kind, label, status, body in results if kind == "good"]
    bad_results = [(status, body) for kind, _, status, body in results if kind == "bad"]
    assert all(status == 200 for _, status, _ in good)
    correct = sum(body["label"] == label for label, _, body in good)
    assert correct >= 0.95 * len(good)
    assert all(status == 400 and body["code"] == 400 and body["detail"] for status, body in bad_results)
    assert worker_pids(served_digits, "digits", version="1.0.0") == pids_before


def test_json_inputs_are_answered_like_images(served_digits, held_out):
    image = image_to_tensor(held_out[3].path.read_bytes(), 10**6)[0, 0].tolist()
    single = served_digits.predict("digits", {"input": image})
    several = served_digits.predict("digits", {"inputs": [image, image]})
    assert single["label"] == held_out[3].label and len(several) == 2
    for answer in several:
        assert_same_prediction(answer, single)


def test_requests_without_or_with_a_wrong_token_are_refused(served_digits, good_png):
    url = served_digits.endpoints.inference_url
    no_token = requests.post(f"{url}/predictions/digits", data=good_png, timeout=10)
    wrong_token = requests.post(
        f"{url}/predictions/digits", data=good_png, headers={"Authorization": "Bearer wrong"}, timeout=10
    )
    management = requests.get(f"{served_digits.endpoints.management_url}/models", timeout=10)
    for response in (no_token, wrong_token, management):
        assert response.status_code in (400, 401, 403)
        assert response.json()["type"] == "InvalidKeyException"


def test_prometheus_metrics_are_served(served_digits, good_png):
    served_digits.predict("digits", good_png, content_type="image/png")
    text = served_digits.metrics()
    assert "ts_inference_requests_total" in text and 'model_name="digits"' in text


def test_a_request_leaves_one_access_line_and_nothing_in_stdout_or_ts_log(torchserve, served_digits, good_png):
    """servekit's log4j2 configuration: TorchServe's own logs ~10 lines a request, stdout (never rolled) too."""
    logs = Path(torchserve.log_dir)
    stdout_size = (logs / "torchserve.out").stat().st_size
    access_lines = (logs / "access_log.log").read_text().count("/predictions/digits")
    for _ in range(20):
        served_digits.predict("digits", good_png, content_type="image/png")
    assert (logs / "access_log.log").read_text().count("/predictions/digits") == access_lines + 20
    assert (logs / "torchserve.out").stat().st_size == stdout_size
    ts_log = (logs / "ts_log.log").read_text()
    assert "[DEBUG]" not in ts_log and "Sending response" not in ts_log and "ACCESS_LOG" not in ts_log
    assert "Backend response time" in ts_log  # the frontend's INFO lines are kept, once each


def test_cli_register_predict_and_models_against_a_running_server(torchserve, trained_digits, served_digits):
    """The CLI commands a user types, pointed at the session server's working folder."""
    workdir = torchserve.workdir
    runner = CliRunner()
    png = trained_digits / HELD_OUT_DIR / "0000_7.png"
    predicted = runner.invoke(cli, ["predict", "digits", str(png), "--workdir", workdir, "--json"])
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.output)[str(png)]["label"] == "7"
    listing = runner.invoke(cli, ["models", "--workdir", workdir, "--json"])
    rows = [row for row in json.loads(listing.output) if row["name"] == "digits"]
    shown = ("name", "version", "default", "workers", "batch_size", "max_batch_delay_ms", "archive")
    assert [{key: row[key] for key in shown} for row in rows] == [
        {
            "name": "digits",
            "version": "1.0.0",
            "default": True,
            "workers": "1/1 ready",
            "batch_size": 4,
            "max_batch_delay_ms": 50,
            "archive": "digits-1.0.0.mar",
        }
    ]
    again = runner.invoke(cli, ["register", "digits", "--version", "1.0.0", "--workdir", workdir])
    assert again.exit_code == 1 and "409" in again.output and "already registered" in again.output
    unknown = runner.invoke(cli, ["register", "digits", "--version", "3.0.0", "--workdir", workdir])
    assert unknown.exit_code == 1 and "not in" in unknown.output
