"""Benchmarks of the traffic-split proxy on a running `servekit serve start` with two versions of one model.

    servekit serve start && servekit register digits --version 1.0.0 && servekit register digits --version 1.1.0
    python scripts/split_bench.py digits 1.0.0 1.1.0 --input model_store/work/digits/heldout/0000_7.png

1. split accuracy: KEYS distinct sticky keys at 90/10, counted by TorchServe's per-version counters;
2. overhead at c=1: p50 of the same versioned request, direct to TorchServe and through the proxy, alternated, from
   Python and from wrk (a C client, which takes less of the CPU the proxy and TorchServe share);
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


def wrk_runs(server: Server, name: str, version: str, body_path: Path, token: str, seconds: int, clients: int) -> dict:
    """wrk at `clients` connections on the same versioned URL, direct and through the proxy, alternated
    (direct/proxy/proxy/direct): requests per second and p50 latency of each run."""
    if shutil.which("wrk") is None:
        return {"skipped": "wrk not installed (apt-get install wrk)"}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    environment = {**os.environ, "BENCH_BODY": str(body_path), "BENCH_TOKEN": token}
    runs: dict[str, dict[str, list[float]]] = {key: {"per_s": [], "p50_ms": []} for key in ("direct", "proxy")}
    targets = {"direct": server.state.inference_url, "proxy": server.state.proxy_url}
    threads = min(2, clients)
    for key in ("direct", "proxy", "proxy", "direct"):
        url = f"{targets[key]}/predictions/{name}/{version}"
        command = ["wrk", f"-t{threads}", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", script.name, url]
        output = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=seconds + 60).stdout
        if "Non-2xx" in output or "Socket errors" in output:
            raise SystemExit(f"wrk saw errors (an expired token answers 400):\n{output}")
        runs[key]["per_s"].append(float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)))
        runs[key]["p50_ms"].append(wrk_ms(re.search(r"^\s+50%\s+([\d.]+\w+)", output, re.MULTILINE).group(1)))
    Path(script.name).unlink()
    mean = {key: {what: sum(v) / len(v) for what, v in figures.items()} for key, figures in runs.items()}
    return {
        "runs": runs,
        "mean": mean,
        "loss": 1 - mean["proxy"]["per_s"] / mean["direct"]["per_s"],
        "added_p50_ms": mean["proxy"]["p50_ms"] - mean["direct"]["p50_ms"],
        "command": " ".join(command),
    }


def wrk_ms(text: str) -> float:
    """wrk's latency figure ("812.00us", "1.23ms", "2.01s") in milliseconds."""
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


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
            "overhead_c1_wrk": wrk_runs(server, args.name, args.old, args.input, token, args.seconds, clients=1),
            "throughput_c16": wrk_runs(server, args.name, args.old, args.input, token, args.seconds, clients=16),
            "load_average": {"before": load_before, "after": os.getloadavg()},
        }
    finally:
        splits.remove_split(server.state, args.name)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
