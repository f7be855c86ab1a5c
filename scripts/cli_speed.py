"""How fast everyday commands answer: `servekit --help`, `servekit models`, and register-to-ready beside
TorchServe's own register-to-ready (a bare management API call), measured in one run, alternating.

    .venv/bin/python scripts/cli_speed.py [--repeats 5] [--image-size 224]

Trains nothing it can reuse: digits from model_store/work/digits (trained if missing), resnet18 with random
weights at --image-size (its load time is the model's own: the report shows it beside TorchServe's).
"""

from __future__ import annotations

import argparse
import compileall
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from servekit.build.archive import build_archive
from servekit.serve import torchserve
from servekit.serve.client import ServeClient
from servekit.serve.deployments import wait_until_ready
from servekit.store.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
SERVEKIT = [str(Path(sys.executable).with_name("servekit"))]


def wall_s(command: list[str]) -> float:
    return timed_run(command)[0]


def timed_run(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - started, result.stdout


def steps_ms(verbose_output: str) -> dict[str, float]:
    """{"verify": ms, "register": ms, "ready": ms} from `servekit register --verbose`."""
    return {step: float(ms) for step, ms in re.findall(r"(\w+) (\d+) ms", verbose_output)}


def bare_register_s(client: ServeClient, archive: str, name: str, version: str) -> float:
    """TorchServe's own register-to-ready: the synchronous management call, then the archive's minWorkers READY as
    TorchServe reports them."""
    started = time.perf_counter()
    client.register(archive)
    wait_until_ready(client, name, version)
    return time.perf_counter() - started


def prepare_store(store: Path, image_size: int) -> list[tuple[str, str]]:
    from servekit.build.train import train_digits, train_image

    digits = Workspace().trained("digits")
    if not (digits / "model.pt").is_file():
        train_digits(digits)
    build_archive("digits", "1.0.0", digits, store)
    image = store / "work" / "image"
    train_image(image, "resnet18", image_size=image_size, epochs=0)
    build_archive("image", "1.0.0", image, store, handler="image")
    return [("digits", "1.0.0"), ("image", "1.0.0")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    # What a regular (non-editable) install does; without it, and with PYTHONDONTWRITEBYTECODE set, every start
    # compiles servekit's modules again.
    compileall.compile_dir(REPO / "servekit", quiet=1)
    folder = Path(tempfile.mkdtemp(prefix="servekit-cli-speed-"))
    store, workdir = folder / "store", folder / "ts"
    models = prepare_store(store, args.image_size)
    ports = {api: torchserve.free_port() for api in torchserve.DEFAULT_PORTS}
    state = torchserve.start(torchserve.ServerSettings(REPO / "config.properties", store, workdir, ports=ports))
    try:
        client = ServeClient(state.endpoints())
        print(f"load before: {Path('/proc/loadavg').read_text().split()[:3]}")
        for label, command in (
            ("servekit --help", [*SERVEKIT, "--help"]),
            ("servekit models --json", [*SERVEKIT, "models", "--workdir", str(workdir), "--json"]),
            ("servekit models (table)", [*SERVEKIT, "models", "--workdir", str(workdir)]),
        ):
            times = [wall_s(command) for _ in range(args.repeats)]
            print(f"{label:<28} median {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})")
        for name, version in models:
            bare, cli, steps = [], [], []
            register = [*SERVEKIT, "register", name, "--version", version, "--workdir", str(workdir), "--verbose"]
            for _ in range(args.repeats):
                bare.append(bare_register_s(client, f"{name}-{version}.mar", name, version))
                client.unregister(name, version)
                seconds, output = timed_run(register)
                cli.append(seconds)
                steps.append(steps_ms(output))
                client.unregister(name, version)
            b, c = statistics.median(bare), statistics.median(cli)
            inside = {step: statistics.median(s[step] for s in steps) for step in steps[0]}
            where = ", ".join(f"{step} {ms:.0f} ms" for step, ms in inside.items())
            print(
                f"register {name}: servekit {c:.2f} s, bare TorchServe {b:.2f} s, "
                f"servekit - bare {c - b:+.2f} s (medians of {args.repeats}, alternating); inside servekit: {where}, "
                f"start-up and the rest {c * 1000 - sum(inside.values()):.0f} ms"
            )
        print(f"load after: {Path('/proc/loadavg').read_text().split()[:3]}")
    finally:
        torchserve.stop(workdir)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
