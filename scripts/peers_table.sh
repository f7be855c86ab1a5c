#!/usr/bin/env bash
# Issue 30's side-by-side table for digits, wrk, each row's servekit and peer figures from one `servekit bench` run
# (one round each per level, the order reversed every round):
#   straight to TorchServe: the default archive (1.0.0) against every peer of `servekit bench --baseline` (Flask,
#   LitServe, TorchServe as its MNIST example documents it), and the archive `optimize --pick fastest` + `build
#   --variant best` make (2.0.0) against LitServe;
#   through servekit's proxy (nginx): both archives against LitServe;
#   on Triton (`export triton` with its defaults, `serve triton`, `bench --runtime triton`): both against LitServe.
# Run it on an idle machine (needs `pip install -e '.[peers]'` and wrk):
#   bash scripts/peers_table.sh [OUT_DIR]        (about 16 minutes on 2 cores; ROUTES="straight triton" etc.)
# Writes OUT_DIR/<route>-<version>-<peer>/bench.{json,md,png}, OUT_DIR/optimize/ and OUT_DIR/peers.md, and prints
# that table. TorchServe and Triton are stopped on exit.
source "$(dirname "$0")/run_in_temp.sh" "${1:-peers_table_out}" peers
uptime | tee "$out/load_before.txt"

"$sk" train digits
"$sk" build digits --version 1.0.0
"$sk" optimize digits --variants eager,onnx,onnx_int8 --pick fastest --out "$out/optimize" --json > /dev/null
"$sk" build digits --version 2.0.0 --variant best

bench() {  # ROUTE VERSION PEER
  "$sk" bench digits --version "$2" --concurrency 1,16 --duration "${DURATION:-8s}" --repeats "${REPEATS:-2}" \
    --generator wrk --baseline "$3" --out "$out/$1-$2-$3"
}
for route in ${ROUTES:-straight proxy triton}; do
  if [ "$route" = triton ]; then
    "$sk" export triton digits --version 1.0.0 --version 2.0.0 --out repository
    "$sk" serve triton --repository repository
    for version in 1.0.0 2.0.0; do
      "$sk" bench digits --runtime triton --version "$version" --concurrency 1,16 --duration "${DURATION:-8s}" \
        --repeats "${REPEATS:-2}" --generator wrk --baseline litserve --out "$out/triton-$version-litserve"
    done
    "$sk" serve triton --stop
    continue
  fi
  if [ "$route" = straight ]; then "$sk" serve start --no-proxy --config "$config"; else "$sk" serve start --config "$config"; fi
  "$sk" register digits --version 1.0.0
  "$sk" register digits --version 2.0.0  # beside the default (1.0.0); idle while the other is benched
  if [ "$route" = straight ]; then
    for peer in flask litserve torchserve; do bench "$route" 1.0.0 "$peer"; done
  else
    bench "$route" 1.0.0 litserve
  fi
  bench "$route" 2.0.0 litserve
  "$sk" serve stop
done
uptime | tee "$out/load_after.txt"

# One row per bench run: servekit's figures beside the peer's from the same run.
"$python" - "$out" <<'PY' | tee "$out/peers.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| route | servekit archive | peer | c=1 p50 ms (peer) | c=1 p50 / peer | c=16 req/s (peer) | c=16 x peer "
      "| c=16 p99 ms (peer) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for folder in sorted(out.glob("*-*-*/"), key=lambda f: f.stat().st_mtime):
    route, version, peer = folder.name.split("-")
    report = json.loads((folder / "bench.json").read_text())
    one, many = (next(lv for lv in report["levels"] if lv["served"]["concurrency"] == c) for c in (1, 16))
    archive = "default" if version == "1.0.0" else f"optimized ({report['archive']})"
    s1, p1, s16, p16 = one["served"], one["baseline"], many["served"], many["baseline"]
    print(f"| {route} | {archive} | {peer} | {s1['p50_ms']:.2f} ({p1['p50_ms']:.2f}) | {s1['p50_ms'] / p1['p50_ms']:.2f} "
          f"| {s16['throughput_per_s']:.0f} ({p16['throughput_per_s']:.0f}) "
          f"| {s16['throughput_per_s'] / p16['throughput_per_s']:.2f} | {s16['p99_ms']:.1f} ({p16['p99_ms']:.1f}) |")
PY
