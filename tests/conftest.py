"""Fixtures that build real things: a trained digits model, a model store with its archive, a TorchServe."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Handlers import each other as top-level modules, as they do inside a TorchServe worker.
sys.path.insert(0, str(REPO / "handlers"))

from helpers import start_server  # noqa: E402

from servekit import server  # noqa: E402
from servekit.archive import BuildOptions, build_archive  # noqa: E402
from servekit.client import ServeClient  # noqa: E402
from servekit.heldout import HeldOutSample, read_held_out  # noqa: E402
from servekit.train import train_digits, train_image, train_text  # noqa: E402
from servekit.workspace import HELD_OUT_DIR  # noqa: E402

GPU_DESELECTED = pytest.StashKey[int]()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: without a GPU they are deselected, and the summary says how many."""
    import torch

    if torch.cuda.is_available():
        return
    gpu_only = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_only:
        config.hook.pytest_deselected(items=gpu_only)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.stash[GPU_DESELECTED] = len(gpu_only)


def pytest_terminal_summary(terminalreporter, config):
    count = config.stash.get(GPU_DESELECTED, 0)
    if count:
        terminalreporter.write_line(
            f"{count} gpu-marked test(s) deselected: torch sees no GPU here (run scripts/gpu_check.sh on a GPU host)",
            yellow=True,
        )


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
    build_archive("digits", "1.0.0", trained_digits, store, options=fixture_options())
    build_archive("image", "1.0.0", trained_image, store, handler="image", options=fixture_options())
    build_archive("text", "1.0.0", trained_text, store, handler="text", options=fixture_options())
    build_archive("tensor", "1.0.0", trained_digits, store, handler="tensor", options=fixture_options())
    return store


def fixture_options() -> BuildOptions:
    """The session archives' settings, pinned (tests count one worker, batches of 4, and batching within 50 ms)
    rather than following the serving defaults, which tests/server/test_serving_defaults.py pins."""
    return BuildOptions(batch_size=4, max_batch_delay_ms=50, workers=1)


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
