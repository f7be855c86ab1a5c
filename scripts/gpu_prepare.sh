#!/usr/bin/env bash
# Run HERE (the development machine) before a device run: builds .gpu/ (Java + TorchServe for the offline GPU
# host, ../shared/gpu/make-bundle.sh) unless it is there, and adds wrk with its libraries, so scripts/gpu_check.sh
# benches with the same C load generator as on the CPU machine. Then: device run, carry [".gpu"], command
# `source .gpu/setup.sh && bash scripts/gpu_check.sh`.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
[ -f .gpu/setup.sh ] || ../shared/gpu/make-bundle.sh
command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk"; exit 1; }
mkdir -p .gpu/wrk
cp "$(command -v wrk)" .gpu/wrk/wrk
# wrk's own libraries (LuaJIT, OpenSSL): the GPU host's python must keep its own, so only wrk's wrapper sees these.
for lib in $(ldd "$(command -v wrk)" | awk '/luajit|libssl|libcrypto/ {print $3}'); do cp -L "$lib" .gpu/wrk/; done
du -sh .gpu
