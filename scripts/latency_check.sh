#!/usr/bin/env bash
# Issue 14's targets in one run, on this machine, with the default settings (no tune): digits and resnet18 224 px
# served against the Flask baseline (wrk), and optimize's ORT int8 / AOTInductor against eager. Run it on an idle
# machine: every table says the CPU other processes used, and flags a row they disturbed.
#   bash scripts/latency_check.sh [OUT_DIR]        (about 15 minutes on 2 cores)
# Writes OUT_DIR/{digits-bench,image-bench,image-optimized}/ and prints the tables. TorchServe is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
sk=$PWD/.venv/bin/servekit
out=$(realpath -m "${1:-latency_check_out}")
work=$(mktemp -d /tmp/servekit-latency-XXXXXX)
mkdir -p "$out"
cd "$work"
trap '"$sk" serve stop >/dev/null 2>&1 || true' EXIT
uptime | tee "$out/load_before.txt"

"$sk" train digits
"$sk" train image --arch resnet18 --image-size 224 --epochs "${IMAGE_EPOCHS:-1}" --out model_store/work/image
"$sk" optimize image --variants eager,onnx_int8,aoti --pick fastest --budget 3 --out "$out/image-optimized"
"$sk" build digits --version 1.0.0
"$sk" build image --version 1.0.0 --variant best
"$sk" serve start --no-proxy --config "$repo/config.properties"
"$sk" register digits --version 1.0.0
"$sk" bench digits --concurrency 1,16 --duration 5s --repeats 3 --generator wrk --baseline flask \
  --out "$out/digits-bench"
"$sk" register image --version 1.0.0
"$sk" bench image --concurrency 16 --duration 5s --repeats 3 --generator wrk --baseline flask \
  --baseline-model model_store/work/image --out "$out/image-bench"
uptime | tee "$out/load_after.txt"

# optimize's onnx_int8 figure against the same file timed alone in a fresh process (target: within 15 %)
python=$(dirname "$sk")/python
"$python" - "$out/image-optimized" <<'PY' | tee "$out/alone.txt"
import json, sys
from pathlib import Path
import torch
from servekit_worker.loading import onnx_session
from servekit.core.timing import percentile, time_calls
folder = Path(sys.argv[1])
report = json.loads((folder / "report.json").read_text())
row = next(r for r in report["results"] if r["name"] == "onnx_int8")
torch.set_num_threads(report["threads"])
run = onnx_session(folder / "variants" / "onnx_int8" / "model.onnx", report["threads"])
inputs = [torch.randn(1, 3, 224, 224) for _ in range(16)]
alone = percentile(time_calls(run, inputs, 3.0, 30), 50)
print(json.dumps({"report_bs1_p50_ms": row["bs1_p50_ms"], "alone_bs1_p50_ms": alone,
                  "difference": abs(alone - row["bs1_p50_ms"]) / row["bs1_p50_ms"]}))
PY
