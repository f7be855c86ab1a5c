"""Least privilege on a real TorchServe and nginx (issue #29): the management key registers the store's own
archives by file name and nothing else, and the proxy's workers do not keep root.

Uses the session server (token auth on); the proxy runs in front of it from this module's own folder."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import requests
from click.testing import CliRunner

from servekit.build.archive import BuildOptions, build_archive
from servekit.cli import cli
from servekit.serve import probe_metrics, proxy, worker_dir
from servekit.serve import torchserve as server
from servekit.serve.proxy import ProxyConfig

pytestmark = pytest.mark.server
OUTSIDE_ARCHIVE = "evil-6.6.6.mar"  # a real archive (the digits one, renamed) kept outside the store


class ArchiveServer(BaseHTTPRequestHandler):
    """Serves one archive to whoever asks, and remembers that they asked."""

    archive = b""
    asked: list[str] = []

    def do_GET(self) -> None:
        self.asked.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.archive)))
        self.end_headers()
        self.wfile.write(self.archive)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def outside(model_store, tmp_path_factory) -> Path:
    """A folder beside the store holding a loadable archive under a name the store does not have."""
    folder = tmp_path_factory.mktemp("outside")
    shutil.copy2(model_store / "digits-1.0.0.mar", folder / OUTSIDE_ARCHIVE)
    return folder


@pytest.fixture(scope="module")
def archive_server(outside) -> Iterator[tuple[str, list[str]]]:
    """(URL of the outside archive on a loopback HTTP server, the paths it was asked for)."""
    handler = type("Handler", (ArchiveServer,), {"archive": (outside / OUTSIDE_ARCHIVE).read_bytes(), "asked": []})
    stub = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{stub.server_port}/{OUTSIDE_ARCHIVE}", handler.asked
    finally:
        stub.shutdown()


def store_files(store: Path) -> dict[str, int]:
    return {str(path.relative_to(store)): path.stat().st_size for path in store.rglob("*") if path.is_file()}


def register_raw(client, url: str) -> requests.Response:
    """POST /models as anyone holding the management key can send it (not through servekit's client)."""
    return requests.post(
        f"{client.endpoints.management_url}/models",
        params={"url": url, "model_name": "evil", "initial_workers": 1, "synchronous": "true"},
        headers=client.auth_headers("management"),
        timeout=120,
    )


REFUSALS = {
    # the two requests of the issue, as sent
    "metrics-url": ("http://{metrics}/metrics", "does not match any allowed URL"),
    "etc-passwd": ("file:///etc/passwd", "does not match any allowed URL"),
    # an archive that would load, over http and as a file outside the store
    "http-archive": ("{http}", "does not match any allowed URL"),
    "file-outside": ("file://{outside}/" + OUTSIDE_ARCHIVE, "does not match any allowed URL"),
    # the store's own path, walked out of with .. (plain and percent-encoded), and bare paths
    "store-dotdot": ("file://{store}/../{outside_name}/" + OUTSIDE_ARCHIVE, "Relative path is not allowed"),
    "store-dotdot-encoded": ("file://{store}/..%2F{outside_name}%2F" + OUTSIDE_ARCHIVE, "Relative path is not allowed"),
    "bare-dotdot": ("../{outside_name}/" + OUTSIDE_ARCHIVE, "Relative path is not allowed"),
    "bare-absolute": ("{outside}/" + OUTSIDE_ARCHIVE, "Model not found"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_registration_from_anywhere_but_the_store_is_refused_before_anything_is_fetched(
    case, served_digits, torchserve, model_store, outside, archive_server
):
    http_url, asked = archive_server
    template, message = REFUSALS[case]
    url = template.format(
        metrics=re.sub(r"^\w+://", "", torchserve.metrics_url),
        http=http_url,
        outside=outside,
        outside_name=outside.name,
        store=Path(torchserve.model_store),
    )
    files, models = store_files(model_store), served_digits.list_models()
    answer = register_raw(served_digits, url)
    assert answer.status_code == 404 and message in answer.json()["message"], (url, answer.text)
    assert store_files(model_store) == files  # nothing fetched into the store (the issue saw `metrics`, `passwd`)
    assert served_digits.list_models() == models and not asked


def test_the_stores_own_archives_still_register_by_file_name(
    served_digits, torchserve, model_store, trained_digits, held_out
):
    """`servekit register` (a bare file name, after the sha256 check) works as before; a file URL of the same
    archive matches allowed_urls but TorchServe then refuses to copy it onto itself."""
    build_archive("owned", "1.0.0", trained_digits, model_store, options=BuildOptions(workers=1))
    files = store_files(model_store)
    itself = register_raw(served_digits, f"file://{torchserve.model_store}/owned-1.0.0.mar")
    assert itself.status_code == 500 and "already exists" in itself.json()["message"], itself.text
    assert store_files(model_store) == files
    registered = CliRunner().invoke(cli, ["register", "owned", "--version", "1.0.0", "--workdir", torchserve.workdir])
    try:
        assert registered.exit_code == 0, registered.output
        assert "registered owned 1.0.0: 1 worker(s) ready" in registered.output
        answer = served_digits.predict("owned", held_out[0].path.read_bytes(), content_type="image/png")
        assert answer["label"] == held_out[0].label
    finally:
        served_digits.unregister("owned", "1.0.0")


def test_the_session_servers_config_carries_the_restriction(torchserve):
    written = server.read_properties(Path(torchserve.workdir) / "config.properties")
    assert written["allowed_urls"] == server.store_archives_only(torchserve.model_store)


@pytest.fixture
def proxy_in_front(torchserve, tmp_path) -> Iterator[ProxyConfig]:
    """nginx in front of the session server's inference API, from its own workdir (tmp_path); stopped by PID."""
    upstream = re.sub(r"^\w+://", "", torchserve.inference_url)
    config = ProxyConfig(tmp_path / server.PROXY_DIR, server.free_port(), upstream, max_body_bytes=16 * 1024 * 1024)
    pid = proxy.start(proxy.find_nginx(), config)
    try:
        yield config
    finally:
        proxy.stop(config, pid)
        proxy.stop_masters_in(config.directory)


def test_the_proxys_workers_drop_root_and_still_serve_everything(proxy_in_front, served_digits, held_out, tmp_path):
    """Started as root, the workers run as nobody (otherwise as the invoking user): a prediction whose body nginx
    buffers to a temp file and the golden-probe metrics still go through them; nobody reads the metrics copy but
    not the keys."""
    config, account = proxy_in_front, worker_dir.worker_account()
    master = psutil.Process(int(config.pid_path.read_text()))
    workers = [psutil.Process(pid) for pid in proxy.active_workers(master)]
    assert workers and {worker.username() for worker in workers} == {account[0] if account else master.username()}

    padded = held_out[0].path.read_bytes() + b"\0" * (2 * 1024 * 1024)  # over client_body_buffer_size (1m)
    headers = {**served_digits.auth_headers("inference"), "Content-Type": "image/png"}
    answer = requests.post(f"{config.url}/predictions/digits", data=padded, headers=headers, timeout=60)
    assert answer.status_code == 200 and answer.json()["label"] == held_out[0].label, answer.text
    log = config.error_log.read_text()
    assert f"buffered to a temporary file {config.worker_dir}/client_body_temp/" in log and "denied" not in log

    written = probe_metrics.record(tmp_path, [probe_metrics.ProbeResult("digits", "1.0.0", 32, 31, 1700000000.0)])
    served = requests.get(f"{config.url}{probe_metrics.METRICS_PATH}", timeout=10)
    assert served.status_code == 200 and served.text == written.read_text()
    if account:
        copy = config.worker_dir / probe_metrics.PROBES_FILE
        key_file = Path(served_digits.endpoints.key_file)
        assert json.loads(key_file.read_text())["management"]["key"]  # root reads it
        # as nginx's workers are: the worker user and its group, no other groups (`cat`: servekit's Python may live
        # in root's home, closed to nobody)
        as_worker = {"user": account[0], "group": account[1], "extra_groups": [], "capture_output": True, "text": True}
        cat = shutil.which("cat") or "/bin/cat"
        read_copy = subprocess.run([cat, copy], **as_worker, timeout=30)
        assert read_copy.returncode == 0 and read_copy.stdout == written.read_text(), read_copy.stderr
        read_key = subprocess.run([cat, key_file], **as_worker, timeout=30)
        assert read_key.returncode != 0 and "Permission denied" in read_key.stderr
