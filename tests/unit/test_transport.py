"""core.transport against a real HTTP/1.1 server on loopback: keep-alive, retries, stale connections, timeouts."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from support.processes import ctrl_c_after

from servekit.core.transport import ConnectFailed, Retries, Session, TimedOut, TransportError
from servekit.serve.client import RetryPolicy
from servekit.serve.torchserve import free_port

RETRY_503 = Retries(connect=1, read=1, status=3, statuses=(503,), methods=frozenset({"GET", "POST"}))


class Script(BaseHTTPRequestHandler):
    """Answers by path: /ok echoes the request, /busy/N answers 503 to its first N calls, /slow sleeps, /drop closes
    the connection without answering, /close answers "Connection: close", /vanish answers as if it kept the
    connection open, then closes it."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.answer()

    def do_POST(self) -> None:  # noqa: N802
        self.answer()

    def answer(self) -> None:
        server = self.server
        path = self.path.split("?", 1)[0]
        with server.lock:
            server.calls[path] += 1
            server.connections.add(self.client_address)
            calls = server.calls[path]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path == "/drop":
            self.close_connection = True
            return
        if path == "/slow":
            time.sleep(1.0)
        status = 503 if path.startswith("/busy/") and calls <= int(path.rsplit("/", 1)[1]) else 200
        document = {"path": self.path, "body": body.decode(), "type": self.headers.get("Content-Type"), "n": calls}
        if path.startswith(("/died/", "/broken/")) and calls <= int(path.rsplit("/", 1)[1]):
            status = 500  # TorchServe's own error document, "Worker died." or another message
            message = "Worker died." if path.startswith("/died/") else "Prediction failed"
            document = {"code": 500, "type": "InternalServerException", "message": message}
        payload = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if path == "/close":
            self.send_header("Connection", "close")
        self.close_connection = path in ("/close", "/vanish")
        self.end_headers()
        self.wfile.write(payload)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that timed out leaves a broken pipe behind: expected here


@pytest.fixture
def http_server():
    server = QuietServer(("127.0.0.1", free_port()), Script)
    server.lock, server.calls, server.connections = threading.Lock(), Counter(), set()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_calls_from_one_thread_share_one_kept_alive_connection(http_server):
    server, url = http_server
    session = Session()
    answers = [session.request("GET", f"{url}/ok", timeout=5, params={"n": i, "v": "a b"}) for i in range(5)]
    assert [a.json()["path"] for a in answers] == [f"/ok?n={i}&v=a+b" for i in range(5)]
    assert len(server.connections) == 1
    posted = session.request("POST", f"{url}/ok", timeout=5, json={"x": [1]})
    assert json.loads(posted.json()["body"]) == {"x": [1]} and posted.json()["type"] == "application/json"
    assert posted.ok and posted.headers["content-type"] == "application/json" and posted.url == f"{url}/ok"


def test_threads_each_get_their_own_connection_and_every_answer(http_server):
    server, url = http_server
    session = Session()
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda i: session.request("POST", f"{url}/ok", timeout=5, data=b"%d" % i), range(80)))
    assert sorted(int(b.json()["body"]) for b in bodies) == list(range(80))
    assert 1 < len(server.connections) <= 8


def test_transient_statuses_are_retried_until_the_budget_is_spent(http_server):
    server, url = http_server
    session = Session(RETRY_503)
    assert session.request("POST", f"{url}/busy/2", timeout=5, data=b"x").status_code == 200
    assert server.calls["/busy/2"] == 3
    exhausted = session.request("GET", f"{url}/busy/9", timeout=5)
    assert exhausted.status_code == 503 and not exhausted.ok and server.calls["/busy/9"] == 4


def test_the_inference_policy_retries_a_dead_workers_500_and_no_other_500(http_server):
    """TorchServe answers a crashed worker's requests 500 "Worker died." when it has not read the exit code yet."""
    server, url = http_server
    session = Session(RetryPolicy(backoff_s=0.0, jitter_s=0.0).inference())
    answered = session.request("POST", f"{url}/died/2", timeout=5, data=b"png")
    assert answered.status_code == 200 and server.calls["/died/2"] == 3
    failed = session.request("POST", f"{url}/broken/9", timeout=5, data=b"png")
    assert failed.status_code == 500 and server.calls["/broken/9"] == 1


def test_a_method_outside_the_retry_set_is_sent_once(http_server):
    server, url = http_server
    management = Session(Retries(connect=2, status=3, statuses=(503,), methods=frozenset({"GET"})))
    assert management.request("POST", f"{url}/busy/1", timeout=5).status_code == 503
    assert server.calls["/busy/1"] == 1
    with pytest.raises(TransportError):
        management.request("POST", f"{url}/drop", timeout=5)
    assert server.calls["/drop"] == 1
    with pytest.raises(TransportError):
        Session(RETRY_503).request("POST", f"{url}/drop", timeout=5)
    assert server.calls["/drop"] == 3  # sent again once: `read=1`


def test_a_kept_connection_the_server_closed_is_replaced_without_an_error(http_server):
    server, url = http_server
    session = Session(Retries())  # no retries at all: a connection closed while idle must not need one
    assert session.request("GET", f"{url}/vanish", timeout=5).ok  # answered as kept alive, then closed
    time.sleep(0.2)
    for method in ("POST", "GET"):
        assert session.request(method, f"{url}/ok", timeout=5).ok
    assert len(server.connections) == 2 and server.calls["/ok"] == 2
    assert session.request("GET", f"{url}/close", timeout=5).ok  # "Connection: close" said so
    assert session.request("GET", f"{url}/ok", timeout=5).ok and len(server.connections) == 3


def test_refused_and_slow_calls_raise_their_own_errors(http_server):
    _, url = http_server
    with pytest.raises(ConnectFailed):
        Session(Retries(connect=2)).request("GET", f"http://127.0.0.1:{free_port()}/ok", timeout=5)
    started = time.perf_counter()
    with pytest.raises(TimedOut):
        Session(RETRY_503).request("GET", f"{url}/slow", timeout=0.2)
    assert time.perf_counter() - started < 0.9  # not retried: one timeout, not two


def test_backoff_grows_and_honours_retry_after():
    retries = Retries(backoff_s=0.25, jitter_s=0.0)
    assert [retries.wait_s(n) for n in range(5)] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert retries.wait_s(1, "3") == 3.0 and retries.wait_s(1, "soon") == 0.5
    jittered = {Retries(backoff_s=0.25, jitter_s=0.5).wait_s(1) for _ in range(20)}
    assert len(jittered) > 1 and all(0.5 <= w <= 1.0 for w in jittered)


def test_a_call_interrupted_by_ctrl_c_leaves_the_next_call_a_fresh_connection(http_server):
    """Ctrl-C while waiting for an answer: the clean-up calls that follow must not reuse the half-used connection."""
    server, url = http_server
    session = Session(Retries())
    ctrl_c = ctrl_c_after(0.3)
    with pytest.raises(KeyboardInterrupt):
        session.request("POST", f"{url}/slow", timeout=5)
    ctrl_c.join()
    assert session.request("POST", f"{url}/ok", timeout=5).ok  # before /slow answers on the old connection
    assert len(server.connections) == 2
