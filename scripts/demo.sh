#!/usr/bin/env bash
# The whole path on one machine: train -> build -> start TorchServe -> register -> predict -> evaluate -> stop.
# TorchServe is stopped on exit, whether the demo succeeds or not.
set -euo pipefail
cd "$(dirname "$0")/.."
servekit=.venv/bin/servekit
workdir=.servekit/demo
trap '"$servekit" serve stop --workdir "$workdir"' EXIT

"$servekit" train digits --out model_store/work/digits
"$servekit" build digits --version 1.0.0 --force
"$servekit" serve start --config config.properties --workdir "$workdir"
"$servekit" register digits --version 1.0.0 --workdir "$workdir"
"$servekit" models --workdir "$workdir"
"$servekit" predict digits model_store/work/digits/heldout/000[0-4]_*.png --workdir "$workdir"
"$servekit" evaluate digits --workdir "$workdir"
