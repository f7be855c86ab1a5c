#!/usr/bin/env bash
# Issue 30's side-by-side table for digits: servekit's default archive straight to TorchServe, against each peer of
# `servekit bench --baseline` (Flask, LitServe, TorchServe as its MNIST example documents it) at 1 and 16 clients,
# alternated within each run, with wrk. Run it on an idle machine (needs `pip install -e '.[peers]'` and wrk):
#   bash scripts/peers_table.sh [OUT_DIR]        (about 6 minutes on 2 cores)
# Writes OUT_DIR/<peer>/bench.{json,md,png} and OUT_DIR/peers.md, and prints that table. TorchServe is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
sk=$PWD/.venv/bin/servekit
python=$PWD/.venv/bin/python
out=$(realpath -m "${1:-peers_table_out}")
work=$(mktemp -d /tmp/servekit-peers-XXXXXX)
mkdir -p "$out"
config=$PWD/config.properties
cd "$work"
trap '"$sk" serve stop >/dev/null 2>&1 || true' EXIT
uptime | tee "$out/load_before.txt"

"$sk" train digits
"$sk" build digits --version 1.0.0
"$sk" serve start --no-proxy --config "$config"
"$sk" register digits --version 1.0.0
for peer in flask litserve torchserve; do
  "$sk" bench digits --concurrency 1,16 --duration "${DURATION:-8s}" --repeats "${REPEATS:-2}" --generator wrk \
    --baseline "$peer" --out "$out/$peer"
done
uptime | tee "$out/load_after.txt"

# One row per server: servekit's figures from each run are that run's own (it was measured beside that peer).
"$python" - "$out" <<'PY' | tee "$out/peers.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| server | c=1 req/s | c=1 p50 ms | c=16 req/s | c=16 p99 ms | c=16 x servekit |")
print("| --- | --- | --- | --- | --- | --- |")
for peer in ("flask", "litserve", "torchserve"):
    report = json.loads((out / peer / "bench.json").read_text())
    one, many = (next(lv for lv in report["levels"] if lv["served"]["concurrency"] == c) for c in (1, 16))
    for label, key in ((f"servekit (run with {peer})", "served"), (peer, "baseline")):
        a, b = one[key], many[key]
        share = b["throughput_per_s"] / many["served"]["throughput_per_s"]
        print(f"| {label} | {a['throughput_per_s']:.0f} | {a['p50_ms']:.2f} | {b['throughput_per_s']:.0f} "
              f"| {b['p99_ms']:.1f} | {share:.2f} |")
PY
