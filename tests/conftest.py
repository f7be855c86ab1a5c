"""Fixtures that build real things: trained models (cached across runs), a model store with their archives.

The servers live in tests/server/conftest.py; helpers, by purpose, in tests/support/."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Handlers import each other as top-level modules, as they do inside a TorchServe worker.
sys.path.insert(0, str(REPO / "handlers"))

from support.processes import stop_leftovers  # noqa: E402
from support.training import trained  # noqa: E402

from servekit.build.archive import BuildOptions, build_archive  # noqa: E402
from servekit.build.train import train_digits, train_image, train_text  # noqa: E402
from servekit.store.heldout import HeldOutSample, read_held_out  # noqa: E402
from servekit.store.workspace import HELD_OUT_DIR  # noqa: E402

GPU_DESELECTED = pytest.StashKey[int]()
LEFTOVERS = pytest.StashKey[list[str]]()


def pytest_configure(config):
    """Ctrl-C reaches the run as it does in a terminal, however pytest was started: a job that a non-interactive
    shell starts in the background (`make test &`, a CI runner's script) inherits SIGINT ignored, Python then keeps
    it ignored, and the tests that press Ctrl-C (rollout, tune, a transport call) would wait out their whole run."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
    for line in config.stash.get(LEFTOVERS, []):
        terminalreporter.write_line(f"left running by a test, stopped at the end of the run: {line}", red=True)


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind(tmp_path_factory, pytestconfig):
    """After the run (a failed or Ctrl-C'd one too), nothing runs from its temp folder: every server's own
    teardown should have stopped it; what one missed is stopped here, named in the summary, and fails the run."""
    yield
    leftovers = stop_leftovers(tmp_path_factory.getbasetemp())
    if leftovers:
        pytestconfig.stash[LEFTOVERS] = leftovers


def pytest_sessionfinish(session, exitstatus):
    if session.config.stash.get(LEFTOVERS, []) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory, pytestconfig) -> Path:
    """A SimpleCNN trained on digits, as `servekit train digits` leaves it."""
    return trained(pytestconfig.cache, tmp_path_factory.mktemp("work") / "digits", train_digits)


@pytest.fixture(scope="session")
def held_out(trained_digits) -> list[HeldOutSample]:
    return read_held_out(trained_digits / HELD_OUT_DIR)


@pytest.fixture(scope="session")
def good_png(held_out) -> bytes:
    return held_out[0].path.read_bytes()


@pytest.fixture(scope="session")
def trained_image(tmp_path_factory, pytestconfig) -> Path:
    """mobilenet_v3_small trained one epoch on 32x32 RGB digits: small and quick, not accurate."""
    out = tmp_path_factory.mktemp("work") / "image"
    return trained(pytestconfig.cache, out, train_image, architecture="mobilenet_v3_small", image_size=32, epochs=1)


@pytest.fixture(scope="session")
def trained_text(tmp_path_factory, pytestconfig) -> Path:
    out = tmp_path_factory.mktemp("work") / "text"
    return trained(pytestconfig.cache, out, train_text, epochs=5, count=4000)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory, trained_digits) -> Path:
    """A model store holding digits 1.0.0 (the session server's store; a digits-only test trains nothing else)."""
    store = tmp_path_factory.mktemp("model_store")
    build_archive("digits", "1.0.0", trained_digits, store, options=fixture_options())
    return store


@pytest.fixture(scope="session")
def all_models_store(model_store, trained_digits, trained_image, trained_text) -> Path:
    """The same store with image, text and tensor (SimpleCNN on tensors) 1.0.0 beside digits: one per handler."""
    build_archive("image", "1.0.0", trained_image, model_store, handler="image", options=fixture_options())
    build_archive("text", "1.0.0", trained_text, model_store, handler="text", options=fixture_options())
    build_archive("tensor", "1.0.0", trained_digits, model_store, handler="tensor", options=fixture_options())
    return model_store


def fixture_options() -> BuildOptions:
    """The session archives' settings, pinned (tests count one worker, batches of 4, and batching within 50 ms)
    rather than following the serving defaults, which tests/server/test_serving_defaults.py pins."""
    return BuildOptions(batch_size=4, max_batch_delay_ms=50, workers=1)
