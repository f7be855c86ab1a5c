"""Benchmarks of the traffic-split proxy on a running `servekit serve start` with two versions of one model.

    servekit serve start && servekit register digits --version 1.0.0 && servekit register digits --version 1.1.0
    python scripts/split_bench.py digits 1.0.0 1.1.0 --input model_store/work/digits/heldout/0000_7.png

1. split accuracy: KEYS distinct sticky keys at 90/10, counted by TorchServe's per-version counters;
2. overhead at c=1: p50 of the same versioned request, direct to TorchServe and through the proxy, alternated;
3. throughput at c=16 with wrk (apt-get install wrk), direct and through the proxy, alternated.
The split is removed at the end. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from servekit import metrics
from servekit import split as splits
from servekit.client import read_keys
from servekit.proxy import Split
from servekit.timing import machine_summary, percentile
from servekit.workspace import DEFAULT_WORKDIR, Server

WRK_SCRIPT = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "image/png"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
"""


def accuracy(server: Server, name: str, old: str, new: str, body: bytes, token: str, keys: int) -> dict:
    splits.set_split(server.client, server.state, Split(name, {old: 90, new: 10}, sticky_header="X-Request-Key"))
    before = metrics.scrape(server.client)
    url = f"{server.state.proxy_url}/predictions/{name}"
    sessions: dict[int, requests.Session] = {}

    def send(i: int) -> int:
        session = sessions.setdefault(i % 16, requests.Session())
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png", "X-Request-Key": f"user-{i}"}
        return session.post(url, data=body, headers=headers, timeout=60).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(send, range(keys)))
    if statuses.count(200) < keys:
        raise SystemExit(f"{keys - statuses.count(200)} requests failed: {sorted(set(statuses))}")
    after = metrics.scrape(server.client)
    served = {v: int((after.version(name, v) - before.version(name, v)).requests) for v in (old, new)}
    return {"keys": keys, "failed": sum(s != 200 for s in statuses), "served": served, "new_share": served[new] / keys}


def overhead(server: Server, name: str, version: str, body: bytes, token: str, rounds: int) -> dict:
    """The same request to /predictions/NAME/VERSION directly and through the proxy (passthrough), alternated."""
    splits.remove_split(server.state, name)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}
    targets = {"direct": server.state.inference_url, "proxy": server.state.proxy_url}
    times: dict[str, list[float]] = {key: [] for key in targets}
    session = requests.Session()
    for i in range(rounds):
        for key in ("direct", "proxy") if i % 2 == 0 else ("proxy", "direct"):
            started = time.perf_counter()
            session.post(f"{targets[key]}/predictions/{name}/{version}", data=body, headers=headers, timeout=60)
            times[key].append((time.perf_counter() - started) * 1000)
    p50 = {key: percentile(values[10:], 50) for key, values in times.items()}
    return {"rounds": rounds, "p50_ms": p50, "added_p50_ms": p50["proxy"] - p50["direct"]}


def wrk_throughput(server: Server, name: str, version: str, body_path: Path, token: str, seconds: int) -> dict:
    if shutil.which("wrk") is None:
        return {"skipped": "wrk not installed (apt-get install wrk)"}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    environment = {**os.environ, "BENCH_BODY": str(body_path), "BENCH_TOKEN": token}
    results: dict[str, list[float]] = {"direct": [], "proxy": []}
    targets = {"direct": server.state.inference_url, "proxy": server.state.proxy_url}
    for key in ("direct", "proxy", "proxy", "direct"):
        command = [
            "wrk",
            "-t2",
            "-c16",
            f"-d{seconds}s",
            "-s",
            script.name,
            f"{targets[key]}/predictions/{name}/{version}",
        ]
        output = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=seconds + 60).stdout
        if "Non-2xx" in output or "Socket errors" in output:
            raise SystemExit(f"wrk saw errors (an expired token answers 400):\n{output}")
        results[key].append(float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)))
    Path(script.name).unlink()
    mean = {key: sum(values) / len(values) for key, values in results.items()}
    return {"runs": results, "per_s": mean, "loss": 1 - mean["proxy"] / mean["direct"], "command": " ".join(command)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--input", type=Path, required=True, help="A request body (PNG).")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=15)
    args = parser.parse_args()
    server = Server.connect(args.workdir)
    token = read_keys(Path(server.state.key_file))["inference"]
    body = args.input.read_bytes()
    load_before = os.getloadavg()
    try:
        report = {
            "machine": machine_summary(),
            "split_accuracy": accuracy(server, args.name, args.old, args.new, body, token, args.keys),
            "overhead_c1": overhead(server, args.name, args.old, body, token, args.rounds),
            "throughput_c16": wrk_throughput(server, args.name, args.old, args.input, token, args.seconds),
            "load_average": {"before": load_before, "after": os.getloadavg()},
        }
    finally:
        splits.remove_split(server.state, args.name)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
