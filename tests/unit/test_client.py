"""The client's failover and the rollout's bookkeeping, without a server."""

from __future__ import annotations

import email.message
import json

import pytest

from servekit.core.errors import ApiError, ServerError
from servekit.core.transport import Response
from servekit.deliver.rollout import answer_key
from servekit.serve.client import FailoverClient, error_message, read_keys
from servekit.serve.deployments import DefaultHistory


class FakeClient:
    def __init__(self, outcome):
        self.outcome = outcome
        self.calls = 0

    def predict(self, *args):
        self.calls += 1
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def test_failover_skips_a_down_server_and_sticks_to_the_one_that_answered():
    down, up = FakeClient(ServerError("refused")), FakeClient({"label": "3"})
    failover = FailoverClient([down, up])
    assert failover.predict("digits", b"png") == {"label": "3"}
    assert failover.predict("digits", b"png") == {"label": "3"}
    assert (down.calls, up.calls, failover.preferred) == (1, 2, 1)


def test_failover_moves_on_for_503_507_and_a_dead_worker_but_not_for_other_errors():
    assert FailoverClient([FakeClient(ApiError(507, "Worker died.")), FakeClient("ok")]).predict("m", b"") == "ok"
    died = ApiError(500, "InternalServerException: Worker died.")  # TorchServe before it read the exit code
    assert FailoverClient([FakeClient(died), FakeClient("ok")]).predict("m", b"") == "ok"
    with pytest.raises(ApiError, match="400"):
        FailoverClient([FakeClient(ApiError(400, "bad image")), FakeClient("ok")]).predict("m", b"")
    with pytest.raises(ApiError, match="500: model_error"):
        FailoverClient([FakeClient(ApiError(500, "model_error: boom")), FakeClient("ok")]).predict("m", b"")
    with pytest.raises(ServerError, match="no TorchServe answered: .*a; .*b"):
        FailoverClient([FakeClient(ServerError("a")), FakeClient(ServerError("b"))]).predict("m", b"")


def test_key_file_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ServerError, match="not found"):
        read_keys(tmp_path / "key_file.json")
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"nokey": 1}}))
    with pytest.raises(ServerError, match="not a TorchServe key file"):
        read_keys(tmp_path / "key_file.json")


def test_default_history_finds_the_previous_registered_default(tmp_path):
    history = DefaultHistory(tmp_path)
    for version in ("1.0.0", "1.1.0", "1.1.0", "2.0.0"):
        history.record("digits", version)
    assert history.read() == {"digits": ["1.0.0", "1.1.0", "2.0.0"]}
    assert history.previous("digits", "2.0.0", ["1.0.0", "1.1.0", "2.0.0"]) == "1.1.0"
    assert history.previous("digits", "2.0.0", ["1.0.0", "2.0.0"]) == "1.0.0"
    assert history.previous("digits", "1.0.0", ["1.0.0"]) is None


def test_answers_are_compared_by_top1_class_or_output_argmax():
    assert answer_key({"label": "7", "index": 7, "probabilities": {}}) == 7
    assert answer_key({"output": [0.1, 3.0, -1.0]}) == 1
    assert answer_key([{"index": 1}, {"index": 2}]) == (1, 2)


def test_an_html_error_page_is_one_line_and_the_proxys_502_says_torchserve_did_not_answer():
    page = b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
    headers = email.message.Message()
    headers["Content-Type"] = "text/html"
    gateway = error_message(Response(502, "Bad Gateway", headers, page + b"</center>\r\n</body>\r\n</html>", "u"))
    assert gateway.startswith("502 Bad Gateway from the proxy: TorchServe behind it did not answer")
    assert "\n" not in gateway and "<" not in gateway
    other = error_message(Response(413, "Too Large", headers, b"<html><title>413 Too Large</title></html>", "u"))
    assert other == "413 Too Large"
    assert error_message(Response(500, "Internal", headers, b"  plain\n text ", "u")) == "plain text"


class FakeManagement:
    """TorchServe's management API as an unregister racing requests in flight leaves it: the DELETE answers 500
    after the version is gone, and the model stays behind with no versions (`GET /models/NAME/all` is [])."""

    def __init__(self, versions_left: list, register_fails: bool = False):
        self.versions_left, self.register_fails = versions_left, register_fails
        self.calls, self.deletes = [], 0

    def __call__(self, api, method, path, timeout_s=None, **kwargs):
        self.calls.append((method, path, kwargs.get("params", {}).get("initial_workers")))
        if method == "DELETE":
            self.deletes += 1
            if self.deletes == 1:
                raise ApiError(500, "ConcurrentModificationException: null")
        if method == "POST" and self.register_fails:
            raise ApiError(404, "Model not found in model store: digits-1.0.0.mar")
        if method == "GET" and self.versions_left is None:
            raise ApiError(404, "ModelNotFoundException: Model not found: digits")
        body = self.versions_left if method == "GET" else {"status": "done"}
        return Response(200, "OK", email.message.Message(), json.dumps(body).encode(), "http://ts/models")


def test_an_unregister_torchserve_fails_half_way_is_cleared_so_its_ping_answers_again(monkeypatch):
    from servekit.serve.client import Endpoints, ServeClient

    client = ServeClient(Endpoints("http://ts:1", "http://ts:2", "http://ts:3"))
    api = FakeManagement(versions_left=[])
    monkeypatch.setattr(client, "_call", api)
    assert client.unregister("digits", "1.0.0") == {"status": "done"}
    # the same archive registered again without workers, then unregistered: TorchServe drops the empty model
    assert api.calls == [("DELETE", "/models/digits/1.0.0", None), ("GET", "/models/digits/all", None),
                         ("POST", "/models", 0), ("DELETE", "/models/digits/1.0.0", None)]  # fmt: skip
    # another version still registered, or no model at all: no empty model to clear, the 500 is the caller's to see
    for left in ([{"modelVersion": "1.1.0"}], None):
        api = FakeManagement(versions_left=left)
        monkeypatch.setattr(client, "_call", api)
        with pytest.raises(ApiError, match="500: ConcurrentModificationException"):
            client.unregister("digits", "1.0.0")
        assert [method for method, _, _ in api.calls] == ["DELETE", "GET"]
    api = FakeManagement(versions_left=[], register_fails=True)
    monkeypatch.setattr(client, "_call", api)
    with pytest.raises(ServerError, match="left digits without versions.*until it is restarted"):
        client.unregister("digits", "1.0.0")
