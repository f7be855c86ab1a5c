#!/usr/bin/env bash
# maxBatchDelay against the traffic-split proxy: for each delay given (ms), a fresh server with the digits defaults
# otherwise, 60 s of warm-up, then 6 alternated pairs of 5 s wrk runs at 16 clients, straight to TorchServe and
# through nginx (the throughput the proxy loses), and one client's latency and time in TorchServe's queue.
#   bash scripts/batch_delay_ab.sh [DELAY_MS ...]     (default: 1 2; about 3 minutes per delay on 2 cores)
# Needs wrk and a trained digits folder (servekit train digits). Run it on an idle machine. Servers are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
sk=$PWD/.venv/bin/servekit
py=$PWD/.venv/bin/python
trained=$PWD/model_store/work/digits
bodies=("$trained"/heldout/*.png)
body=${bodies[0]}
work=$(mktemp -d /tmp/servekit-delay-XXXXXX)
trap '"$sk" serve stop --workdir "$work/ts" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
cat > "$work/post.lua" <<EOF
local f = io.open("$body", "rb")
wrk.body = f:read("*all"); f:close()
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("KEY")
wrk.headers["Content-Type"] = "image/png"
EOF
port() { "$py" -c "from servekit.serve.torchserve import free_port; print(free_port())"; }
state() { "$py" -c "import json, sys; print(json.load(open('$work/ts/' + sys.argv[1]))$2)" "$1"; }
rps() { wrk -t2 -c"$1" -d"${3:-5}"s -s "$work/post.lua" "$2" | awk '/Requests\/sec/ {print $2}'; }
queue_ms() {  # one client for 10 s: wrk's p50 and TorchServe's mean queue time per request
  local before after
  before=$(curl -s "$metrics/metrics")
  local p50
  p50=$(wrk -t1 -c1 -d10s --latency -s "$work/post.lua" "$1" | awk '$1=="50%" {print $2}')
  after=$(curl -s "$metrics/metrics")
  "$py" - "$before" "$after" "$p50" <<'EOF'
import re, sys
def read(text, name):
    return float(re.search(rf"^{name}{{[^}}]*}} ([0-9.eE+]+)$", text, re.M).group(1))
def delta(name):
    return read(sys.argv[2], name) - read(sys.argv[1], name)
requests = delta("ts_inference_requests_total")
print(f"  c=1: wrk p50 {sys.argv[3]}, TorchServe's queue {delta('ts_queue_latency_microseconds') / requests / 1000:.2f} ms "
      f"per request ({requests:.0f} requests)")
EOF
}
uptime
for delay in "${@:-1 2}"; do
  for d in $delay; do
    rm -rf "$work/store" "$work/ts"
    "$sk" build digits --version 1.0.0 --from "$trained" --store "$work/store" --max-batch-delay "$d" >/dev/null
    "$sk" serve start --store "$work/store" --workdir "$work/ts" --inference-port "$(port)" \
      --management-port "$(port)" --metrics-port "$(port)" --grpc-inference-port "$(port)" \
      --grpc-management-port "$(port)" --proxy-port "$(port)" >/dev/null
    "$sk" register digits --version 1.0.0 --workdir "$work/ts" >/dev/null
    KEY=$(state key_file.json "['inference']['key']")
    export KEY
    metrics=$(state server.json "['metrics_url']")
    direct=$(state server.json "['inference_url']")/predictions/digits/1.0.0
    proxied=$(state server.json "['proxy_url']")/predictions/digits/1.0.0
    rps 16 "$proxied" 30 >/dev/null
    rps 16 "$direct" 30 >/dev/null
    echo "maxBatchDelay $d ms (load average $(cut -d' ' -f1 /proc/loadavg))"
    losses=()
    for i in 1 2 3 4 5 6; do
      if ((i % 2)); then a=$(rps 16 "$direct"); b=$(rps 16 "$proxied"); else b=$(rps 16 "$proxied"); a=$(rps 16 "$direct"); fi
      loss=$("$py" -c "print(f'{100 * (1 - $b / $a):.1f}')")
      losses+=("$loss")
      echo "  pair $i: direct $a req/s, proxied $b req/s, lost $loss %"
    done
    "$py" -c "import statistics, sys; print(f'  c=16: median loss {statistics.median(map(float, sys.argv[1:])):.1f} %')" "${losses[@]}"
    queue_ms "$direct"
    "$sk" serve stop --workdir "$work/ts" >/dev/null
  done
done
