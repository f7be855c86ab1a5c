"""Fixtures that build real things: a trained digits model, a model store with its archive, a TorchServe."""

from __future__ import annotations

import io
import json
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Handlers import each other as top-level modules, as they do inside a TorchServe worker.
sys.path.insert(0, str(REPO / "handlers"))

from servekit import server  # noqa: E402
from servekit.archive import build_archive  # noqa: E402
from servekit.client import ServeClient  # noqa: E402
from servekit.heldout import HeldOutSample, read_held_out  # noqa: E402
from servekit.inprocess import worker_value  # noqa: E402
from servekit.train import train_digits, train_image, train_text  # noqa: E402
from servekit.workspace import HELD_OUT_DIR  # noqa: E402


class FakeRequestStatus:
    def __init__(self):
        self.code, self.phrase = None, None


class FakeContext:
    """The parts of ts.context.Context that handlers use, recording per-request statuses."""

    def __init__(self, model_dir: Path, manifest: dict, yaml_config: dict | None = None, gpu_id: int | None = None):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": gpu_id, "batch_size": 4}
        self.manifest = manifest
        self.model_yaml_config = yaml_config or {}
        self.metrics = None
        self.statuses: dict[int, tuple[int, str]] = {}
        self.content_types: dict[int, str] = {}
        self.response_headers: dict[int, dict[str, str]] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.response_headers.setdefault(idx, {})[key] = value

    def get_request_header(self, idx: int, name: str):
        """As TorchServe: each body parameter maps to {"content-type": ...}."""
        if idx in self.content_types and name in ("body", "data"):
            return {"content-type": self.content_types[idx]}
        return None


def extracted_archive(archive: Path, folder: Path) -> FakeContext:
    """Unpacks a .mar as TorchServe does and returns a context with its manifest and model-config.yaml."""
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(folder)
    manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
    return FakeContext(folder, manifest, yaml.safe_load((folder / "model-config.yaml").read_text()))


def requests_for(bodies: list[tuple[bytes, str]], context: FakeContext) -> list[dict]:
    """TorchServe's request list for (body, content type) pairs, with the context knowing the content types."""
    context.content_types = {i: content_type for i, (_, content_type) in enumerate(bodies)}
    return [{"body": worker_value(body, content_type)} for body, content_type in bodies]


def png_header_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height black pixels in about 50 KB: it decodes to `width * height` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_inputs(good_png: bytes) -> dict[str, tuple[bytes, str]]:
    """Each case a body and its content type, all of which must be answered 400 with a JSON error."""
    row = [0.5] * 28
    return {
        "not_an_image": (b"this is not an image at all", "application/octet-stream"),
        "truncated_png": (good_png[: len(good_png) // 2], "image/png"),
        "empty_body": (b"", "application/octet-stream"),
        "png_20000x20000": (png_header_bomb(), "image/png"),
        "json_wrong_shape": (json.dumps({"input": [row] * 27}).encode(), "application/json"),
        "json_ragged": (json.dumps({"input": [row] * 27 + [[0.5]]}).encode(), "application/json"),
        "json_nan": (
            b'{"input": [' + b",".join([json.dumps(row).encode()] * 27) + b", [NaN" + b", 0.5" * 27 + b"]]}",
            "application/json",
        ),
        "json_out_of_range": (json.dumps({"input": [[255.0] * 28] * 28}).encode(), "application/json"),
        "json_strings": (json.dumps({"input": [["a"] * 28] * 28}).encode(), "application/json"),
        "json_wrong_key": (json.dumps({"image": [row] * 28}).encode(), "application/json"),
        "json_empty_inputs": (json.dumps({"inputs": []}).encode(), "application/json"),
        "json_syntax_error": (b'{"input": [[0.1, 0.2', "application/json"),
    }


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory) -> Path:
    """A SimpleCNN trained on digits, as `servekit train digits` leaves it."""
    out = tmp_path_factory.mktemp("work") / "digits"
    train_digits(out)
    return out


@pytest.fixture(scope="session")
def held_out(trained_digits) -> list[HeldOutSample]:
    return read_held_out(trained_digits / HELD_OUT_DIR)


@pytest.fixture(scope="session")
def good_png(held_out) -> bytes:
    return held_out[0].path.read_bytes()


@pytest.fixture(scope="session")
def trained_image(tmp_path_factory) -> Path:
    """mobilenet_v3_small trained one epoch on 32x32 RGB digits: small and quick, not accurate."""
    out = tmp_path_factory.mktemp("work") / "image"
    train_image(out, "mobilenet_v3_small", image_size=32, epochs=1)
    return out


@pytest.fixture(scope="session")
def trained_text(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("work") / "text"
    train_text(out, epochs=5, count=4000)
    return out


@pytest.fixture(scope="session")
def model_store(tmp_path_factory, trained_digits, trained_image, trained_text) -> Path:
    """A model store with digits, image, text and tensor (SimpleCNN on tensors) archives, version 1.0.0."""
    store = tmp_path_factory.mktemp("model_store")
    build_archive("digits", "1.0.0", trained_digits, store)
    build_archive("image", "1.0.0", trained_image, store, handler="image")
    build_archive("text", "1.0.0", trained_text, store, handler="text")
    build_archive("tensor", "1.0.0", trained_digits, store, handler="tensor")
    return store


def start_server(
    store: Path, workdir: Path, proxy: bool = False, base_config: Path = REPO / "config.properties"
) -> server.ServerState:
    """A TorchServe on free loopback ports; with `proxy`, the traffic-split nginx in front on another one."""
    settings = server.ServerSettings(
        base_config=base_config,
        model_store=store,
        workdir=workdir,
        ports={api: server.free_port() for api in server.DEFAULT_PORTS},
        proxy_port=server.free_port() if proxy else None,
    )
    return server.start(settings)


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory, model_store):
    """A real TorchServe (token auth on) on free loopback ports, stopped at the end even if tests fail."""
    workdir = tmp_path_factory.mktemp("torchserve")
    state = start_server(model_store, workdir)
    try:
        yield state
    finally:
        server.stop(workdir)


@pytest.fixture(scope="session")
def served_digits(torchserve) -> ServeClient:
    """A client of the session server with digits 1.0.0 registered (batch size 4, one worker)."""
    client = ServeClient(torchserve.endpoints())
    client.register("digits-1.0.0.mar", initial_workers=1)
    return client
