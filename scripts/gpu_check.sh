#!/usr/bin/env bash
# Issue 15's GPU check, on a GPU host prepared with ../shared/gpu/ (see scripts/gpu_prepare.sh):
#   source .gpu/setup.sh && bash scripts/gpu_check.sh
# Writes $OUT/gpu_check.json (every step's time and exit code, the optimize table, served figures at c=1/16/64 for
# JPEG and PNG bodies, the targets met or not) and the bench PNGs. Budget: 8 minutes on one H100.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .gpu/wrk/wrk ] && ! command -v wrk >/dev/null; then
  # wrk with its own LuaJIT/OpenSSL from the bundle; only wrk sees those libraries.
  mkdir -p /tmp/servekit-bin
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$PWD/.gpu/wrk" "$PWD/.gpu/wrk/wrk" > /tmp/servekit-bin/wrk
  chmod +x /tmp/servekit-bin/wrk
  export PATH=/tmp/servekit-bin:$PATH
fi
export OUT=${OUT:-$PWD/gpu_check_out}
timeout 470 python3 scripts/gpu_check.py
