#!/usr/bin/env bash
# Issue 30's floor of the served path: what one request costs TorchServe itself, servekit's handler around a model
# that does nothing, and the digits model, straight to TorchServe with wrk, the cases alternated round by round:
#   torchserve-bare   a handler function answering b"ok" (TorchServe's own path: HTTP, queue, batch window, worker)
#   servekit-noop     servekit's digits handler (decode, checks, answer) around a model that returns zeros
#   digits-default    the default digits archive (SimpleCNN, eager)
#   digits-optimized  the archive `optimize --pick fastest` + `build --variant best` make
# All four: batches of 8 within 1 ms, 2 workers (servekit's defaults), the same 28x28 PNG bodies.
#   bash scripts/path_floor.sh [OUT_DIR]        (about 5 minutes on 2 cores; needs wrk; run it on an idle machine)
# Prints (and writes OUT_DIR/floor.md, floor.json): c=1 p50 and c=16 req/s with the server's CPU per request.
source "$(dirname "$0")/run_in_temp.sh" "${1:-path_floor_out}" floor

"$sk" train digits
"$sk" build digits --version 1.0.0
"$sk" optimize digits --variants eager,onnx,onnx_int8 --pick fastest --json > /dev/null
"$sk" build digits --version 2.0.0 --variant best
cat > noop.py <<'PY'
import torch


class Noop(torch.nn.Module):
    """Ten zero logits per sample: the handler's path without a model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 10)
PY
"$sk" import noop --model noop.py:Noop --handler digits --example model_store/golden/digits-1.0.0/0000_7.png
"$sk" build noop --version 1.0.0 --batch-size 8
mkdir bare
cat > bare/bare.py <<'PY'
def handle(data, context):
    return None if data is None else [b"ok"] * len(data)
PY
printf 'batchSize: 8\nmaxBatchDelay: 1\nminWorkers: 2\nmaxWorkers: 2\n' > bare/model-config.yaml
"$(dirname "$python")/torch-model-archiver" --model-name bare --version 1.0 --handler bare/bare.py \
  --config-file bare/model-config.yaml --export-path model_store --force

"$sk" serve start --no-proxy --config "$config"
for version in 1.0.0 2.0.0; do "$sk" register digits --version "$version"; done
"$sk" register noop --version 1.0.0
uptime | tee "$out/load_before.txt"
"$python" - "$out" <<'PY'
import json, sys
from pathlib import Path
from servekit import Server
from servekit.measure.loadgen import measure_load, merged_runs

out = Path(sys.argv[1])
server = Server.connect(Path(".servekit"))
server.client.register("bare.mar", initial_workers=2)
url = server.client.endpoints.inference_url
body = [(Path("model_store/golden/digits-1.0.0/0000_7.png").read_bytes(), "image/png")]
cases = {
    "torchserve-bare": f"{url}/predictions/bare",
    "servekit-noop": f"{url}/predictions/noop/1.0.0",
    "digits-default": f"{url}/predictions/digits/1.0.0",
    "digits-optimized": f"{url}/predictions/digits/2.0.0",
}
duration, rounds = 6, 3
figures = {}
for concurrency in (1, 16):
    runs = {case: [] for case in cases}
    for case, case_url in cases.items():  # warm-up: TorchServe's JIT and each worker
        measure_load(case_url, {}, body, concurrency, 3, None, None, "wrk", server.client.keys)
    for number in range(rounds):
        for case in list(cases) if number % 2 == 0 else reversed(list(cases)):
            load = (cases[case], {}, body, concurrency, duration, server.state.pid, None, "wrk")
            runs[case].append(measure_load(*load, keys=server.client.keys))
    for case, case_runs in runs.items():
        run = merged_runs(case_runs)
        cores = run.cpu.measured_cores.get("server", 0.0)
        figures.setdefault(case, {})[concurrency] = {
            "p50_ms": run.result.p50_ms, "p99_ms": run.result.p99_ms, "req_s": run.throughput.value,
            "req_s_rounds": run.throughput.repeats, "server_cores": cores,
            "server_cpu_ms_per_request": 1000 * cores / run.throughput.value if run.throughput.value else None,
            "background_cores": run.cpu.background_cores, "errors": run.result.errors,
        }
(out / "floor.json").write_text(json.dumps(figures, indent=2))
lines = ["| case | c=1 p50 ms | c=1 req/s | c=16 req/s (rounds) | c=16 p99 ms | server CPU ms / request at c=16 |",
         "| --- | --- | --- | --- | --- | --- |"]
for case, by_level in figures.items():
    one, many = by_level[1], by_level[16]
    rounds_text = ", ".join(f"{value:.0f}" for value in many["req_s_rounds"])
    lines.append(f"| {case} | {one['p50_ms']:.2f} | {one['req_s']:.0f} | {many['req_s']:.0f} ({rounds_text}) "
                 f"| {many['p99_ms']:.1f} | {many['server_cpu_ms_per_request']:.3f} |")
(out / "floor.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
uptime | tee "$out/load_after.txt"
