"""Variants of one trained digits folder registered side by side on one TorchServe, driven in turn by wrk.

Each variant is a version: built with its own `--model-config` (model-config keys, `handler:` settings) and `build`
flags (e.g. `["--workers", "1"]`), or
registered through the management API with query parameters (what a model-config cannot say, e.g.
`max_batch_delay=0`). Per round and variant: one client for DUR seconds (wrk's p50, and TorchServe's own
`ts_queue_latency_microseconds` per request over that level), then 16 clients; the order reverses every round.

    VARIANTS='{"1.0.0": {}, "2.0.0": {"model_config": {"continuousBatching": true}},
               "3.0.0": {"register": "batch_size=8&max_batch_delay=0&initial_workers=2"}}' \\
    ROUNDS=3 DUR=5 .venv/bin/python scripts/versions_ab.py TRAINED_FOLDER OUT_FOLDER

Needs wrk. The server is stopped on exit. Used for docs/measurements/2026-12-05-lone-request.md.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVEKIT = str(Path(sys.executable).with_name("servekit"))


def run(*arguments: str) -> str:
    return subprocess.run(list(arguments), check=True, capture_output=True, text=True).stdout


def free_port() -> str:
    from servekit.serve.torchserve import free_port

    return str(free_port())


def milliseconds(text: str) -> float:
    """wrk's latency figure ("812.00us", "3.21ms", "1.02s") in ms."""
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(text)


def per_version(text: str, name: str) -> dict[str, float]:
    """A TorchServe counter from a Prometheus scrape, summed per model_version."""
    totals: dict[str, float] = {}
    for labels, value in re.findall(rf"^{name}{{([^}}]*)}} ([0-9.eE+]+)$", text, re.M):
        version = re.search(r'model_version="([^"]*)"', labels).group(1)
        totals[version] = totals.get(version, 0.0) + float(value)
    return totals


def main(trained: Path, out: Path) -> None:
    variants = json.loads(os.environ["VARIANTS"])
    rounds, duration = int(os.environ.get("ROUNDS", "3")), os.environ.get("DUR", "5")
    store, work = out / "store", out / "ts"
    body = sorted((trained / "heldout").glob("*.png"))[0]
    for version, variant in variants.items():
        build = [SERVEKIT, "build", "digits", "--version", version, "--from", str(trained), "--store", str(store)]
        if variant.get("model_config"):
            config = out / f"model-config-{version}.yaml"
            config.write_text(json.dumps(variant["model_config"]))  # JSON is YAML
            build += ["--model-config", str(config)]
        run(*build, *variant.get("build", []))
    options = ("inference", "management", "metrics", "grpc-inference", "grpc-management", "proxy")
    ports = [item for option in options for item in (f"--{option}-port", free_port())]
    config = str(ROOT / "config.properties")
    run(SERVEKIT, "serve", "start", "--store", str(store), "--workdir", str(work), "--config", config, *ports)
    try:
        state = json.loads((work / "server.json").read_text())
        keys = json.loads((work / "key_file.json").read_text())
        for version, variant in variants.items():
            if variant.get("register"):
                query = f"url=digits-{version}.mar&{variant['register']}&synchronous=true"
                url = f"{state['management_url']}/models?{query}"
                headers = {"Authorization": f"Bearer {keys['management']['key']}"}
                urllib.request.urlopen(urllib.request.Request(url, method="POST", headers=headers), timeout=120).read()
            else:
                run(SERVEKIT, "register", "digits", "--version", version, "--workdir", str(work))
        script = out / "post.lua"
        script.write_text(
            f'local f = io.open("{body}", "rb")\nwrk.body = f:read("*all"); f:close()\nwrk.method = "POST"\n'
            f'wrk.headers["Authorization"] = "Bearer {keys["inference"]["key"]}"\n'
            'wrk.headers["Content-Type"] = "image/png"\n'
        )

        def wrk(clients: int, version: str, seconds: str = duration) -> tuple[float, float, float]:
            url = f"{state['inference_url']}/predictions/digits/{version}"
            threads, connections = f"-t{min(clients, 2)}", f"-c{clients}"
            text = run("wrk", threads, connections, f"-d{seconds}s", "--latency", "-s", str(script), url)
            latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", text, re.M))
            rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", text).group(1))
            return rps, milliseconds(latency["50"]), milliseconds(latency["99"])

        def scrape() -> str:
            return urllib.request.urlopen(state["metrics_url"] + "/metrics", timeout=10).read().decode()

        for version in variants:  # warm-up
            wrk(16, version, "10")
        print("uptime:", run("uptime").strip())
        results = {
            version: {"c1_p50": [], "c1_rps": [], "queue_ms": [], "c16_rps": [], "c16_p99": []} for version in variants
        }
        order = list(variants)
        for index in range(rounds):
            for version in order if index % 2 == 0 else order[::-1]:
                before = scrape()
                rps, p50, _ = wrk(1, version)
                after = scrape()
                requests = (
                    per_version(after, "ts_inference_requests_total")[version]
                    - per_version(before, "ts_inference_requests_total")[version]
                )
                queued = (
                    per_version(after, "ts_queue_latency_microseconds")[version]
                    - per_version(before, "ts_queue_latency_microseconds")[version]
                )
                rps16, _, p99 = wrk(16, version)
                figures = (p50, rps, queued / requests / 1000, rps16, p99)
                for values, value in zip(results[version].values(), figures, strict=True):
                    values.append(value)
                print(
                    f"round {index} {version}: c1 p50 {p50:.2f} ms {rps:.0f} req/s queue {figures[2]:.3f} ms | "
                    f"c16 {rps16:.0f} req/s p99 {p99:.1f} ms",
                    flush=True,
                )
        print("uptime:", run("uptime").strip())
        for version, figures in results.items():
            print(version, {name: round(statistics.median(values), 3) for name, values in figures.items()})
        answers = set()
        for version in variants:
            request = urllib.request.Request(
                f"{state['inference_url']}/predictions/digits/{version}",
                data=body.read_bytes(),
                headers={"Authorization": f"Bearer {keys['inference']['key']}", "Content-Type": "image/png"},
            )
            answers.add(urllib.request.urlopen(request, timeout=10).read())
        print("distinct answers across versions:", len(answers))
    finally:
        subprocess.run([SERVEKIT, "serve", "stop", "--workdir", str(work)], capture_output=True, check=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
