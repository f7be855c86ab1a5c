# Sourced by the benchmark scripts (peers_table.sh, resnet_peers.sh, path_floor.sh) as
#   source "$(dirname "$0")/run_in_temp.sh" OUT_DIR NAME
# It sets sk and python (the repository's .venv), config (its config.properties) and out (OUT_DIR, relative to the
# repository), and moves into a fresh /tmp/servekit-NAME-XXXXXX that goes on exit, with the TorchServe (and Triton)
# started there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
sk=$PWD/.venv/bin/servekit
python=$PWD/.venv/bin/python
config=$PWD/config.properties
out=$(realpath -m "$1")
work=$(mktemp -d "/tmp/servekit-$2-XXXXXX")
mkdir -p "$out"
cd "$work"
trap '"$sk" serve stop >/dev/null 2>&1 || true; "$sk" serve triton --stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
