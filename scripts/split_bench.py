"""Benchmarks of the traffic-split proxy on a running `servekit serve start` with two versions of one model.

    servekit serve start && servekit register digits --version 1.0.0 && servekit register digits --version 1.1.0
    python scripts/split_bench.py digits 1.0.0 1.1.0 --input model_store/work/digits/heldout/0000_7.png

1. split accuracy: KEYS distinct sticky keys at 90/10, counted by TorchServe's per-version counters;
2. overhead at c=1 from Python: p50 of the same versioned request, direct to TorchServe and through the proxy,
   alternated request by request;
3. with wrk (a C client, which takes less of the CPU the proxy and TorchServe share; apt-get install wrk), after a
   warm-up: c=1 p50 added and c=16 throughput lost, each from PAIRS pairs of runs direct and through the proxy in
   turn (median pair, min and max), on the split path (the model's URL at 90/10) and on passthrough (the versioned
   URL), with nginx's CPU per request.
The split is removed at the end. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from servekit.core.timing import CpuMonitor, machine_summary, percentile
from servekit.core.transport import Session
from servekit.deliver import split as splits
from servekit.serve import metrics
from servekit.serve.client import read_keys
from servekit.serve.handle import Server
from servekit.serve.proxy import Split
from servekit.store.workspace import DEFAULT_WORKDIR

WRK_SCRIPT = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "image/png"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
-- Mixed paths: each request goes to BENCH_NEW_PATH with probability BENCH_NEW_SHARE, else to BENCH_OLD_PATH.
local old_path, new_path = os.getenv("BENCH_OLD_PATH"), os.getenv("BENCH_NEW_PATH")
if old_path and old_path ~= "" then
  local share = tonumber(os.getenv("BENCH_NEW_SHARE"))
  request = function()
    return wrk.format(nil, math.random() < share and new_path or old_path)
  end
end
"""


def accuracy(server: Server, name: str, old: str, new: str, body: bytes, token: str, keys: int) -> dict:
    splits.set_split(server, Split(name, {old: 90, new: 10}, sticky_header="X-Request-Key"))
    before = metrics.scrape(server.client)
    url = f"{server.state.proxy_url}/predictions/{name}"
    session = Session()  # kept-alive connections per thread

    def send(i: int) -> int:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png", "X-Request-Key": f"user-{i}"}
        return session.request("POST", url, data=body, headers=headers, timeout=60).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(send, range(keys)))
    if statuses.count(200) < keys:
        raise SystemExit(f"{keys - statuses.count(200)} requests failed: {sorted(set(statuses))}")
    after = metrics.scrape(server.client)
    served = {v: int((after.version(name, v) - before.version(name, v)).requests) for v in (old, new)}
    return {"keys": keys, "failed": sum(s != 200 for s in statuses), "served": served, "new_share": served[new] / keys}


def overhead(server: Server, name: str, version: str, body: bytes, token: str, rounds: int) -> dict:
    """The same request to /predictions/NAME/VERSION directly and through the proxy (passthrough), alternated."""
    splits.remove_split(server, name)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}
    targets = {"direct": server.state.inference_url, "proxy": server.state.proxy_url}
    times: dict[str, list[float]] = {key: [] for key in targets}
    session = Session()
    for i in range(rounds):
        for key in ("direct", "proxy") if i % 2 == 0 else ("proxy", "direct"):
            started = time.perf_counter()
            url = f"{targets[key]}/predictions/{name}/{version}"
            session.request("POST", url, data=body, headers=headers, timeout=60)
            times[key].append((time.perf_counter() - started) * 1000)
    p50 = {key: percentile(values[10:], 50) for key, values in times.items()}
    return {"rounds": rounds, "p50_ms": p50, "added_p50_ms": p50["proxy"] - p50["direct"]}


@dataclass(frozen=True)
class Mix:
    old_path: str
    new_path: str
    share: float  # of requests sent to new_path


class Wrk:
    """wrk (apt-get install wrk) POSTing one body with the inference key; also reads the proxy's CPU."""

    def __init__(self, body_path: Path, token: str, proxy_pid: int | None):
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(WRK_SCRIPT)
        self.script = Path(script.name)
        self.environment = {**os.environ, "BENCH_BODY": str(body_path), "BENCH_TOKEN": token}
        self.proxy_pid = proxy_pid

    def run(self, url: str, clients: int, seconds: float, mix: Mix | None = None) -> dict:
        """One wrk run: requests per second, p50 ms, and the CPU seconds nginx (master and workers) used.
        `mix`: the paths on `url`'s server each request picks between (wrk's Lua picks one per request)."""
        threads = min(2, clients)
        command = ["wrk", f"-t{threads}", f"-c{clients}", f"-d{seconds:g}s", "--latency", "-s", str(self.script), url]
        environment = {**self.environment}
        if mix:
            environment.update(BENCH_OLD_PATH=mix.old_path, BENCH_NEW_PATH=mix.new_path, BENCH_NEW_SHARE=str(mix.share))
        with CpuMonitor({"nginx": self.proxy_pid} if self.proxy_pid else {}) as monitor:
            output = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=seconds + 60)
        if "Non-2xx" in output.stdout or "Socket errors" in output.stdout or output.returncode != 0:
            raise SystemExit(f"wrk saw errors (an expired token answers 400):\n{output.stdout}{output.stderr}")
        per_s = float(re.search(r"Requests/sec:\s+([\d.]+)", output.stdout).group(1))
        p50 = wrk_ms(re.search(r"^\s+50%\s+([\d.]+\w+)", output.stdout, re.MULTILINE).group(1))
        nginx_cpu_s = monitor.use.measured_cores.get("nginx", 0.0) * monitor.use.wall_s
        return {"per_s": per_s, "p50_ms": p50, "nginx_cpu_s": nginx_cpu_s}

    def close(self) -> None:
        self.script.unlink(missing_ok=True)


def alternated(wrk: Wrk, sides: dict[str, tuple[str, Mix | None]], clients: int, seconds: float, pairs: int) -> dict:
    """`pairs` pairs of wrk runs, `sides["direct"]` and `sides["proxy"]` (URL, mix) in turn (the order flips every
    pair, so a server still warming up or a neighbour's load does not favour one side): per pair the p50 the proxy
    added and the throughput it lost; the median pair is the figure, min and max its spread."""
    pair_figures = []
    for index in range(pairs):
        order = ("direct", "proxy") if index % 2 == 0 else ("proxy", "direct")
        runs = {key: wrk.run(sides[key][0], clients, seconds, sides[key][1]) for key in order}
        pair_figures.append(
            {
                "direct": runs["direct"],
                "proxy": runs["proxy"],
                "added_p50_ms": runs["proxy"]["p50_ms"] - runs["direct"]["p50_ms"],
                "loss": 1 - runs["proxy"]["per_s"] / runs["direct"]["per_s"],
                "nginx_cpu_ms_per_request": 1000
                * runs["proxy"]["nginx_cpu_s"]
                / max(1.0, runs["proxy"]["per_s"] * seconds),
            }
        )

    def spread(key: str) -> dict:
        values = sorted(pair[key] for pair in pair_figures)
        return {"median": statistics.median(values), "min": values[0], "max": values[-1]}

    return {
        "clients": clients,
        "seconds_per_run": seconds,
        "pairs": pair_figures,
        "added_p50_ms": spread("added_p50_ms"),
        "loss": spread("loss"),
        "nginx_cpu_ms_per_request": spread("nginx_cpu_ms_per_request"),
    }


def proxy_runs(
    server: Server, name: str, old: str, new: str, wrk: Wrk, seconds: float, pairs: int, warmup_s: float
) -> dict:
    """wrk at c=1 and c=16, TorchServe directly against the proxy, on both proxy paths: split (the model's URL
    split 90/10, against the versioned URLs called directly in the same 90/10 mix: both sides' Lua picks a path per
    request) and passthrough (the versioned URL, no split involved)."""
    direct = f"{server.state.inference_url}/predictions/{name}/{old}"
    passthrough = f"{server.state.proxy_url}/predictions/{name}/{old}"
    model_path = f"/predictions/{name}"
    split_sides = {
        "direct": (direct, Mix(f"{model_path}/{old}", f"{model_path}/{new}", 0.1)),
        "proxy": (f"{server.state.proxy_url}{model_path}", Mix(model_path, model_path, 0.0)),
    }
    splits.set_split(server, Split(name, {old: 90, new: 10}))
    # TorchServe's frontend is Java: until its JIT has compiled the request path, every run is faster than the one
    # before it (digits, 16 clients: 324 req/s in the first 5 s, ~590 from 30 s on).
    for url, mix in (*split_sides.values(), (passthrough, None)):
        wrk.run(url, 16, warmup_s / 3, mix)
    report = {"warmup_s": warmup_s}
    for clients in (1, 16):
        report[f"c{clients}"] = {
            "split": alternated(wrk, split_sides, clients, seconds, pairs),
            "passthrough": alternated(
                wrk, {"direct": (direct, None), "proxy": (passthrough, None)}, clients, seconds, pairs
            ),  # fmt: skip
        }
    return report


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
    parser.add_argument("--rounds", type=int, default=500, help="Python requests at c=1, alternated.")
    parser.add_argument("--seconds", type=float, default=5, help="Per wrk run.")
    parser.add_argument("--pairs", type=int, default=6, help="wrk runs per side and path, alternated.")
    parser.add_argument("--warmup", type=float, default=30, help="Seconds of unmeasured wrk load first.")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    server = Server.connect(args.workdir)
    token = read_keys(Path(server.state.key_file))["inference"]
    body = args.input.read_bytes()
    load_before = os.getloadavg()
    wrk = Wrk(args.input, token, server.state.proxy_pid)
    try:
        report = {
            "machine": machine_summary(),
            "split_accuracy": accuracy(server, args.name, args.old, args.new, body, token, args.keys),
            "overhead_c1": overhead(server, args.name, args.old, body, token, args.rounds),
            "wrk": proxy_runs(server, args.name, args.old, args.new, wrk, args.seconds, args.pairs, args.warmup),
            "load_average": {"before": load_before, "after": os.getloadavg()},
        }
    finally:
        wrk.close()
        splits.remove_split(server, args.name)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
