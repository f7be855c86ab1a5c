"""The peers of `servekit bench --baseline`, without their servers: each decodes the image bytes as the Flask baseline
does and answers its class; TorchServe's example files load the trained model; a stopped peer leaves no process."""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
import textwrap

import psutil
import pytest
import torch
from ts.utils.util import list_classes_from_module

from servekit.core.errors import UsageError
from servekit.core.processes import has_exited
from servekit.measure import peers
from servekit.measure.flask_peer import create_app, digits_image
from servekit_worker.architectures import SimpleCNN


def load_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_litserve_peer_decodes_and_answers_as_the_flask_baseline(trained_digits, held_out):
    api = peers.LitClassifierAPI(str(trained_digits), 1, max_batch_size=8, batch_timeout=0.001)
    api.pre_setup()  # what LitServer does before its workers start
    api.setup("cpu")
    flask = create_app(trained_digits).test_client()
    bodies = [sample.path.read_bytes() for sample in held_out[:8]]
    requests = [json.loads(peers.litserve_body(body)[0]) for body in bodies]
    assert [base64.b64decode(request["image"]) for request in requests] == bodies
    samples = [api.decode_request(request) for request in requests]
    assert all(torch.equal(sample, digits_image(body)[0]) for sample, body in zip(samples, bodies, strict=True))
    outputs = api.unbatch(api.predict(api.batch(samples)))  # LitServe's own batch/unbatch: a stack and a split
    for body, output in zip(bodies, outputs, strict=True):
        answer, expected = api.encode_response(output), flask.post("/predict", data=body, content_type="image/png").json
        assert answer["label"] == expected["label"] and answer["probability"] == pytest.approx(expected["probability"])


def test_torchserve_example_files_load_the_trained_model_and_decode_as_flask(trained_digits, held_out, tmp_path):
    (tmp_path / "model.py").write_text(peers.model_file(SimpleCNN))
    model_module = load_file(tmp_path / "model.py", "peer_model")
    # TorchServe's BaseHandler takes the one class of the model file and builds it without arguments
    (model_class,) = list_classes_from_module(model_module)
    model = model_class()
    model.load_state_dict(torch.load(trained_digits / "model.pt", weights_only=True))
    (tmp_path / "mnist_handler.py").write_text(peers.MNIST_HANDLER)
    handler = load_file(tmp_path / "mnist_handler.py", "peer_handler").DigitClassifier()
    handler.device = torch.device("cpu")
    bodies = [sample.path.read_bytes() for sample in held_out[:8]]
    batch = handler.preprocess([{"body": body} for body in bodies])
    assert torch.equal(batch, torch.cat([digits_image(body) for body in bodies]))
    answers = handler.postprocess(model.eval()(batch))
    flask = create_app(trained_digits).test_client()
    assert [str(a) for a in answers] == [
        flask.post("/predict", data=body, content_type="image/png").json["label"] for body in bodies
    ]


def test_peers_refuse_a_model_they_cannot_serve_with_the_fix(tmp_path):
    (tmp_path / "handler.json").write_text(json.dumps({"model_class": "TextClassifier"}))
    with pytest.raises(UsageError, match="digits models and torchvision image models"):
        peers.TorchServePeer(tmp_path, 1)
    with pytest.raises(UsageError, match="servekit train"):
        peers.LitServePeer(tmp_path / "missing", 1)
    assert peers.model_kind({"model_class": "torchvision:resnet18"}) == "image"


# A server that forks a worker which ignores SIGTERM, as a forking peer may leave one.
FORKING_SERVER = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
    worker = subprocess.Popen([sys.executable, "-c", deaf], stdout=subprocess.PIPE)
    worker.stdout.readline()
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_a_stopped_peer_leaves_no_process_of_its_tree():
    server = subprocess.Popen([sys.executable, "-c", FORKING_SERVER], stdout=subprocess.PIPE, start_new_session=True)
    assert server.stdout.readline().strip() == b"ready"
    tree = [server.pid, *(child.pid for child in psutil.Process(server.pid).children(recursive=True))]
    assert len(tree) == 2
    peers.stop_session(server, timeout_s=1)
    # gone, or a zombie init has not reaped yet (the worker's parent was stopped): nothing runs
    assert [has_exited(psutil.Process(pid)) if psutil.pid_exists(pid) else True for pid in tree] == [True, True]
