"""KServe v1 and v2 end to end: a real TorchServe started as KServe's runtime starts it (the exported
config.properties and model-store layout, TS_SERVICE_ENVELOPE in the environment), one server per envelope,
spoken to with the kserve package's own REST client and request models."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
import requests
import torch
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from support.answers import assert_same_prediction
from support.bodies import b64, malformed, one_per_class
from support.handlers import in_process_handlers, plain_answer, protocol_answers
from support.servers import stop_everything_from, worker_pids

from servekit.build.export import SERVICE_ENVELOPES, KServeSpec, export_kserve
from servekit.core.properties import read_properties, write_properties
from servekit.serve import torchserve
from servekit.serve.client import ServeClient
from servekit.store.heldout import read_held_out

pytestmark = pytest.mark.server
NAMES = ("digits", "image", "tensor", "text")
PROTOCOL_OF = {envelope: protocol for protocol, envelope in SERVICE_ENVELOPES.items()}
CHUNK = 48  # instances per request (64 allowed)
SAMPLES = 192  # held-out samples per model: keeps the two servers' runs within the suite's time budget on 2 cores


def kserve_layout(store: Path, protocol: str, out: Path) -> tuple[Path, Path]:
    """`export_kserve` of each archive, merged into one config/ + model-store/ so one server hosts all four.

    Every setting is the exported one but two: model_snapshot lists the four models, and token auth stays on
    (servekit's tests never run an open server; KServe's proxy does that job in a cluster)."""
    models, properties = {}, {}
    for name in NAMES:
        _, properties_path, archive = export_kserve(
            store, KServeSpec(name, "1.0.0", "pvc://models", protocol=protocol), out / "exports" / name
        )
        properties = read_properties(properties_path)
        models.update(json.loads(properties["model_snapshot"])["models"])
        (out / "model-store").mkdir(parents=True, exist_ok=True)
        shutil.copy2(archive, out / "model-store" / archive.name)
    assert properties["enable_envvars_config"] == "true"
    properties["model_snapshot"] = json.dumps({"name": "startup.cfg", "modelCount": len(models), "models": models})
    properties["disable_token_authorization"] = "false"
    (out / "config").mkdir(exist_ok=True)
    write_properties(properties, out / "config" / "config.properties")
    return out / "config" / "config.properties", out / "model-store"


def wait_for_workers(client: ServeClient, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        described = [client.describe(name)[0] for name in NAMES]
        if all(any(w["status"] == "READY" for w in d["workers"]) for d in described):
            return
        time.sleep(0.2)
    raise AssertionError(f"the snapshot's models are not READY after {timeout_s} s")


@pytest.fixture(scope="module", params=["kserve", "kservev2"])
def kserve_server(request, all_models_store, tmp_path_factory):
    """(envelope, client) of a TorchServe started with the exported layout and TS_SERVICE_ENVELOPE=envelope."""
    envelope = request.param
    out = tmp_path_factory.mktemp(f"kserve-{envelope}")
    config, store = kserve_layout(all_models_store, PROTOCOL_OF[envelope], out)
    settings = torchserve.ServerSettings(
        base_config=config,
        model_store=store,
        workdir=out / "torchserve",
        ports={api: torchserve.free_port() for api in torchserve.DEFAULT_PORTS},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TS_SERVICE_ENVELOPE", envelope)
        state = torchserve.start(settings)
    try:
        client = ServeClient(state.endpoints())
        wait_for_workers(client)
        yield envelope, client
    finally:
        stop_everything_from(settings.workdir)


@pytest.fixture(scope="module")
def handlers(all_models_store, tmp_path_factory) -> dict:
    return in_process_handlers(all_models_store, tmp_path_factory)


def v2_infer_request(name: str, document: dict) -> InferRequest:
    """The kserve SDK's request model for a v2 document."""
    inputs = [InferInput(i["name"], i["shape"], i["datatype"], data=i["data"]) for i in document["inputs"]]
    return InferRequest(model_name=name, infer_inputs=inputs, request_id=document.get("id"))


async def kserve_infer(
    client: ServeClient, protocol: str, name: str, document: dict, well_formed: bool = True
) -> tuple[int, dict]:
    """(status, answer as JSON) of one document sent with kserve's InferenceRESTClient; well-formed v2 documents
    go as the SDK's InferRequest, the rest as the dict itself."""
    rest = InferenceRESTClient(RESTConfig(protocol=protocol, timeout=120))
    data = v2_infer_request(name, document) if protocol == "v2" and well_formed else document
    try:
        answer = await rest.infer(
            client.endpoints.inference_url, data, model_name=name, headers=client.auth_headers("inference")
        )
    except httpx.HTTPStatusError as exc:
        return exc.response.status_code, exc.response.json()
    finally:
        await rest._client.aclose()
    if protocol == "v2":
        outputs = [{"name": o.name, "shape": o.shape, "datatype": o.datatype, "data": o.data} for o in answer.outputs]
        return 200, {"outputs": outputs}
    return 200, answer


def instances_of(name: str, trained: dict[str, Path]) -> list[tuple[object, str]]:
    """(v1 instance, true label) of the first SAMPLES held-out samples of the model's set (random tensors for
    `tensor`)."""
    if name == "text":
        return [(s.path.read_text(), s.label) for s in read_held_out(trained["text"] / "heldout")[:SAMPLES]]
    if name == "tensor":
        generator = torch.Generator().manual_seed(0)
        return [(torch.rand(1, 28, 28, generator=generator).tolist(), "") for _ in range(48)]
    return [({"b64": b64(s.path.read_bytes())}, s.label) for s in read_held_out(trained[name] / "heldout")[:SAMPLES]]


def document_for(protocol: str, name: str, instances: list) -> dict:
    """The same instances as a v1 or a v2 document (v2: BYTES for images and texts, FP32 for tensors)."""
    if protocol == "v1":
        return {"instances": instances}
    if name == "tensor":
        data = [x for sample in instances for row in sample[0] for x in row]
        return {"inputs": [{"name": "x", "shape": [len(instances), 1, 28, 28], "datatype": "FP32", "data": data}]}
    values = [v["b64"] if isinstance(v, dict) else v for v in instances]
    return {"inputs": [{"name": "input-0", "shape": [len(values)], "datatype": "BYTES", "data": values}]}


def answers_of(protocol: str, name: str, answer: dict) -> list:
    """One comparable answer per instance: (label, index, winning probability), or the tensor's output row."""
    if protocol == "v1":
        predictions = answer["predictions"]
        if name == "tensor":
            return predictions
        return [(p["label"], p["index"], p["probabilities"][p["label"]]) for p in predictions]
    outputs = {o["name"]: o for o in answer["outputs"]}
    if name == "tensor":
        rows = outputs["output"]["shape"][0]
        data = outputs["output"]["data"]
        return [data[i * 10 : (i + 1) * 10] for i in range(rows)]
    classes = outputs["probabilities"]["shape"][1]
    probabilities = outputs["probabilities"]["data"]
    return [
        (label, index, probabilities[row * classes + index])
        for row, (label, index) in enumerate(zip(outputs["label"]["data"], outputs["index"]["data"], strict=True))
    ]


def assert_same_answers(served: list, expected: list) -> None:
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        if isinstance(want, tuple):
            assert got[:2] == want[:2] and got[2] == pytest.approx(want[2], abs=1e-5), (got, want)
        else:
            assert got == pytest.approx(want, abs=1e-4)


@pytest.fixture(scope="module")
def trained(trained_digits, trained_image, trained_text) -> dict[str, Path]:
    return {"digits": trained_digits, "image": trained_image, "text": trained_text}


def test_the_issue_table_row_of_this_envelope_reads_200_and_the_right_label(kserve_server, handlers, held_out):
    """The requests of issue 18, verbatim: the envelope's protocol answers, the other gets a 400 error object."""
    envelope, client = kserve_server
    sample = held_out[0]
    png = sample.path.read_bytes()
    v1 = requests.post(
        f"{client.endpoints.inference_url}/v1/models/digits:predict",
        json={"instances": [{"data": b64(png)}]},
        headers=client.auth_headers("inference"),
        timeout=60,
    )
    v2 = requests.post(
        f"{client.endpoints.inference_url}/v2/models/digits/infer",
        json={"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [b64(png)]}]},
        headers=client.auth_headers("inference"),
        timeout=60,
    )
    expected = plain_answer(handlers["digits"], png, "image/png")["label"]
    assert expected == sample.label
    served, other = (v1, v2) if envelope == "kserve" else (v2, v1)
    assert served.status_code == 200, served.text
    label = served.json()["predictions"][0]["label"] if envelope == "kserve" else served.json()["outputs"][0]["data"][0]
    assert label == expected
    assert other.status_code == 400 and list(other.json()) == ["error"]


def test_kserve_clients_served_accuracy_equals_in_process(kserve_server, handlers, trained):
    envelope, client = kserve_server
    protocol = PROTOCOL_OF[envelope]
    for name in NAMES:
        samples = instances_of(name, trained)
        served, expected = [], []
        for start in range(0, len(samples), CHUNK):
            document = document_for(protocol, name, [instance for instance, _ in samples[start : start + CHUNK]])
            status, answer = asyncio.run(kserve_infer(client, protocol, name, document))
            assert status == 200, (name, answer)
            served += answers_of(protocol, name, answer)
            [(status, in_process)] = protocol_answers(handlers[name], [document])
            expected += answers_of(protocol, name, in_process)
        assert_same_answers(served, expected)
        if name != "tensor":
            labels = [label for _, label in samples]
            accuracy = sum(a[0] == label for a, label in zip(served, labels, strict=True)) / len(samples)
            in_process = sum(a[0] == label for a, label in zip(expected, labels, strict=True)) / len(samples)
            assert accuracy == in_process, (name, accuracy, in_process)
            assert name == "image" or accuracy > 0.9, (name, accuracy)  # the image model is one quick epoch


def test_malformed_bodies_get_the_protocols_4xx_and_the_workers_survive(kserve_server, good_png):
    envelope, client = kserve_server
    protocol = PROTOCOL_OF[envelope]
    pids = worker_pids(client, *NAMES)
    # All of them run in process (tests/unit/test_kserve_protocol.py); here one per handler and status.
    cases = one_per_class(
        [(name, body, status) for p, name, body, status in malformed(good_png) if p == protocol],
        lambda case: (case[0], case[2]),
    )
    assert len(cases) >= 4 and {status for _, _, status in cases} == {400, 413}
    for name, body, status in cases:
        served_status, answer = asyncio.run(kserve_infer(client, protocol, name, body, well_formed=False))
        assert served_status == status and list(answer) == ["error"], (name, body, served_status, answer)
    bad_json = requests.post(
        f"{client.endpoints.inference_url}/{protocol}/models/digits" + (":predict" if protocol == "v1" else "/infer"),
        data=b'{"instances": [',
        headers={**client.auth_headers("inference"), "Content-Type": "application/json"},
        timeout=60,
    )
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    assert worker_pids(client, *NAMES) == pids


def test_eight_concurrent_kserve_clients_get_the_in_process_answers(kserve_server, handlers, trained, good_png):
    """8 clients at batch size 4: requests of 1-3 instances of every model, and malformed ones, interleaved."""
    envelope, client = kserve_server
    protocol = PROTOCOL_OF[envelope]
    jobs = []
    for name in NAMES:
        samples = [instance for instance, _ in instances_of(name, trained)[:24]]
        for start in range(0, len(samples), 3):
            jobs.append((name, document_for(protocol, name, samples[start : start + 1 + start % 3]), True))
    jobs += [(name, body, False) for p, name, body, _ in malformed(good_png) if p == protocol]
    jobs = [jobs[i] for i in sorted(range(len(jobs)), key=lambda i: (i * 7919) % len(jobs))]  # interleave
    pids = worker_pids(client, *NAMES)

    async def run_all():
        limit = asyncio.Semaphore(8)

        async def one(job):
            async with limit:
                return await kserve_infer(client, protocol, *job)

        return await asyncio.gather(*(one(job) for job in jobs))

    results = asyncio.run(run_all())
    for (name, document, _), (status, answer) in zip(jobs, results, strict=True):
        [(expected_status, expected)] = protocol_answers(handlers[name], [document])
        assert status == expected_status, (name, answer)
        if status == 200:
            assert_same_answers(answers_of(protocol, name, answer), answers_of(protocol, name, expected))
        else:
            assert 400 <= status < 500 and list(answer) == ["error"]
    assert worker_pids(client, *NAMES) == pids


def test_the_plain_predictions_api_answers_as_before_under_the_envelope(kserve_server, handlers, held_out, good_png):
    envelope, client = kserve_server
    bodies = [
        ("digits", good_png, "image/png"),
        ("digits", json.dumps({"inputs": [[[0.0] * 28] * 28]}).encode(), "application/json"),
        ("image", json.dumps({"image": b64(good_png)}).encode(), "application/json"),
        ("text", b"a wonderful movie", "text/plain"),
        ("digits", b"not an image", "image/png"),
    ]
    for name, body, content_type in bodies:
        response = requests.post(
            f"{client.endpoints.inference_url}/predictions/{name}",
            data=body,
            headers={**client.auth_headers("inference"), "Content-Type": content_type},
            timeout=60,
        )
        expected = plain_answer(handlers[name], body, content_type)
        served = response.json()
        if "error" in expected:
            assert response.status_code == 400 and served == expected
        else:
            assert response.status_code == 200
            served, expected = (served, expected) if isinstance(expected, list) else ([served], [expected])
            for got, want in zip(served, expected, strict=True):
                assert_same_prediction(got, want)
