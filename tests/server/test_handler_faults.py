"""On the session's real TorchServe (no envelope): photos with EXIF orientation, a model that raises for one
poison input at batch size 4 under concurrent clients, KServe routes without an envelope, and servekit's gRPC
contract tested with a client generated from TorchServe's own inference.proto."""

from __future__ import annotations

import importlib
import importlib.resources
import json
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.bodies import b64, rotated_jpeg
from support.handlers import POISON, poison_trained_folder
from support.http import post_body

from servekit.build.archive import BuildOptions, build_archive
from servekit.serve import torchserve as server
from servekit.serve.client import read_keys

pytestmark = pytest.mark.server


def test_a_phone_photo_of_a_seven_is_read_upright(served_digits, held_out):
    """A held-out seven stored rotated with EXIF Orientation=6 is read as 7, raw and as a KServe v1 instance."""
    sevens = [s.path.read_bytes() for s in held_out if s.label == "7"]
    upright = [
        png
        for png in sevens
        if post_body(served_digits, "/predictions/digits", png, "image/png").json()["label"] == "7"
    ]
    photo = rotated_jpeg(upright[0])
    assert post_body(served_digits, "/predictions/digits", photo, "image/jpeg").json()["label"] == "7"
    v1 = post_body(
        served_digits,
        "/v1/models/digits:predict",
        json.dumps({"instances": [{"b64": b64(photo)}]}).encode(),
        "application/json",
    )
    assert v1.status_code == 200 and v1.json()["predictions"][0]["label"] == "7"


def test_kserve_routes_answer_without_an_envelope(served_digits, held_out):
    """The issue's "none" row: with no TS_SERVICE_ENVELOPE, the body says the protocol."""
    png = held_out[0].path.read_bytes()
    v1 = post_body(
        served_digits,
        "/v1/models/digits:predict",
        json.dumps({"instances": [{"data": b64(png)}]}).encode(),
        "application/json",
    )
    v2_body = {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [b64(png)]}]}
    v2 = post_body(served_digits, "/v2/models/digits/infer", json.dumps(v2_body).encode(), "application/json")
    assert v1.status_code == 200 and v1.json()["predictions"][0]["label"] == held_out[0].label
    assert v2.status_code == 200 and v2.json()["outputs"][0]["data"] == [held_out[0].label]


@pytest.fixture(scope="module")
def served_poison(served_digits, model_store, tmp_path_factory):
    """PoisonModel behind the tensor handler, batch size 4 with a long batch delay so requests share batches."""
    folder = poison_trained_folder(tmp_path_factory.mktemp("poison"))
    options = BuildOptions(batch_size=4, max_batch_delay_ms=300, workers=1)  # pinned, not the serving defaults
    build_archive("poison", "1.0.0", folder, model_store, handler="tensor", options=options)
    served_digits.register("poison-1.0.0.mar", initial_workers=1)
    try:
        yield served_digits
    finally:
        served_digits.unregister("poison", "1.0.0")


def test_a_poison_input_fails_alone_and_the_worker_survives(served_poison):
    pids = [w["pid"] for w in served_poison.describe("poison", "1.0.0")[0]["workers"]]
    samples = [[float(i), 1.0, 2.0, 3.0] for i in range(24)]
    samples[5][1] = samples[13][2] = samples[21][3] = POISON
    bodies = [json.dumps({"input": sample}).encode() for sample in samples]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(
            pool.map(lambda body: post_body(served_poison, "/predictions/poison", body, "application/json"), bodies)
        )
    shared = 0
    for sample, response in zip(samples, responses, strict=True):
        if POISON in sample:
            assert response.status_code == 500 and response.json()["error"] == "inference_failed", response.text
        else:
            assert response.status_code == 200 and response.json() == {"output": [2 * x for x in sample]}
            shared += int(response.headers["X-Servekit-Batch-Samples"]) > 1
    assert shared > 0  # good requests shared batches (with poison ones among them) and were still answered
    assert [w["pid"] for w in served_poison.describe("poison", "1.0.0")[0]["workers"]] == pids


@pytest.fixture(scope="module")
def grpc_stubs(tmp_path_factory):
    """Python stubs generated from the inference.proto inside TorchServe's own frontend jar (never committed)."""
    import ts
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("grpc")
    jar = zipfile.ZipFile(importlib.resources.files(ts) / "frontend" / "model-server.jar")
    for member in ("proto/inference.proto", "google/rpc/status.proto"):
        target = out / "protos" / member.removeprefix("proto/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(jar.read(member))
    include = importlib.resources.files("grpc_tools") / "_proto"
    arguments = ["protoc", f"-I{out / 'protos'}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
    assert (
        protoc.main(
            [*arguments, str(out / "protos" / "inference.proto"), str(out / "protos" / "google/rpc/status.proto")]
        )
        == 0
    )
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")
    finally:
        sys.path.remove(str(out))


def test_grpc_contract_answers_ok_with_the_json_error_and_non_ok_for_server_failures(
    served_digits, torchserve, good_png, grpc_stubs
):
    """servekit's gRPC contract (TorchServe 0.12): a per-request error is status OK with servekit's JSON error
    object (`code` >= 400) as `prediction`, so a bad request never fails the requests batched with it; failures of
    the server itself (unknown model, no worker) are non-OK statuses."""
    import grpc

    messages, services = grpc_stubs
    port = server.read_properties(Path(torchserve.workdir) / "config.properties")["grpc_inference_port"]
    key = read_keys(Path(torchserve.key_file))["inference"]
    metadata = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = services.InferenceAPIsServiceStub(channel)

        def predict(name: str, body: bytes):
            request = messages.PredictionsRequest(model_name=name, input={"data": body})
            return stub.Predictions(request, metadata=metadata, timeout=60)

        bodies = [good_png, b"not an image"] * 4
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = [json.loads(r.prediction) for r in pool.map(lambda body: predict("digits", body), bodies)]
        for body, answer in zip(bodies, answers, strict=True):
            if body == good_png:
                assert "code" not in answer and answer["label"].isdigit()
            else:
                assert answer["code"] == 400 and answer["error"] == "invalid_image"
        with pytest.raises(grpc.RpcError) as failure:
            predict("no-such-model", good_png)
        # TorchServe 0.12 maps ModelNotFoundException to INTERNAL (not NOT_FOUND), naming it in the details.
        assert failure.value.code() == grpc.StatusCode.INTERNAL and "Model not found" in failure.value.details()


def test_servekit_predict_sends_v1_and_v2_requests(served_digits, torchserve, held_out, tmp_path):
    from click.testing import CliRunner

    from servekit.cli import cli

    pixels = tmp_path / "pixels.json"
    pixels.write_text(json.dumps([[0.0] * 28] * 28))
    files = [str(held_out[0].path), str(pixels), str(held_out[1].path)]
    for protocol in ("v1", "v2"):
        result = CliRunner().invoke(
            cli, ["predict", "digits", *files, "--protocol", protocol, "--workdir", torchserve.workdir, "--json"]
        )
        assert result.exit_code == 0, result.output
        answers = json.loads(result.output)
        assert list(answers) == files
        assert answers[files[0]]["label"] == held_out[0].label and answers[files[2]]["label"] == held_out[1].label
        assert answers[files[1]]["label"].isdigit()
        # as the server sent them: v1 the handler's top 3, v2 the whole probabilities output (one per class)
        probabilities = answers[files[0]]["probabilities"]
        assert len(probabilities) == (3 if protocol == "v1" else 10), (protocol, probabilities)
        top = probabilities[answers[files[0]]["label"]] if protocol == "v1" else max(probabilities)
        assert top == max(probabilities.values() if protocol == "v1" else probabilities) > 0.5
    refused = CliRunner().invoke(
        cli, ["predict", "digits", files[0], "--protocol", "v2", "--version", "1.0.0", "--workdir", torchserve.workdir]
    )
    assert refused.exit_code == 2 and "default version only" in refused.output
