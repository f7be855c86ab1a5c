#!/usr/bin/env bash
# Issue 30's resnet18 comparison on the CPU: resnet18 at 224 px (random weights, 10 classes), 256 px JPEG bodies,
# servekit's eager default archive and the archive `optimize --pick fastest` + `build --variant best` make, each
# benched against LitServe serving the eager model (batches of 8 within 5 ms, 2 workers), alternated per level, wrk.
# Run it on an idle machine (needs `pip install -e '.[peers]'` and wrk):
#   bash scripts/resnet_peers.sh [OUT_DIR]        (about 12 minutes on 2 cores; IMAGE_SIZE=64 for a quick check)
# RUNTIME=triton serves both archives on Triton (`export triton`, `serve triton`, `bench --runtime triton`) instead.
# Writes OUT_DIR/{eager,optimized}/bench.{json,md,png}, OUT_DIR/optimize/ and OUT_DIR/resnet.md. TorchServe (or
# Triton) is stopped on exit.
source "$(dirname "$0")/run_in_temp.sh" "${1:-resnet_peers_out}" resnet
size=${IMAGE_SIZE:-224}
uptime | tee "$out/load_before.txt"

"$sk" train image --arch resnet18 --image-size "$size" --epochs 0 --out model_store/work/image
# 256 px JPEG bodies (the image handler resizes to 256 and crops 224) with the held-out labels
"$python" - model_store/work/image/heldout jpeg "$size" <<'PY'
import io, sys
from pathlib import Path
from PIL import Image
from servekit.store.heldout import read_held_out, write_bodies
source, out, size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
side = 256 if size >= 224 else size
samples = read_held_out(source)[:64]
bodies = {}
for sample in samples:
    image = Image.open(sample.path).convert("RGB").resize((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    bodies[sample.path.stem + ".jpg"] = buffer.getvalue()
write_bodies(bodies, [s.label for s in samples], out)
PY
"$sk" optimize image --variants eager,onnx,onnx_int8 --pick fastest --out "$out/optimize" --json > /dev/null
"$sk" build image --version 1.0.0
"$sk" build image --version 1.1.0 --variant best --json > "$out/optimized_build.json"
if [ "${RUNTIME:-torchserve}" = triton ]; then  # both archives exported to one Triton, its defaults
  "$sk" export triton image --version 1.0.0 --version 1.1.0 --out repository
  "$sk" serve triton --repository repository
  runtime=(--runtime triton)
else
  "$sk" serve start --no-proxy --config "$config"
  "$sk" register image --version 1.0.0
  "$sk" register image --version 1.1.0
  runtime=()
fi
for version in 1.0.0 1.1.0; do
  kind=$([ "$version" = 1.0.0 ] && echo eager || echo optimized)
  "$sk" bench image "${runtime[@]}" --version "$version" --concurrency 1,16 --duration "${DURATION:-10s}" \
    --repeats "${REPEATS:-2}" \
    --warmup 5s --generator wrk --held-out jpeg --baseline litserve --baseline-model model_store/work/image \
    --out "$out/$kind"
done
uptime | tee "$out/load_after.txt"

"$python" - "$out" <<'PY' | tee "$out/resnet.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
optimized = json.loads((out / "optimize" / "report.json").read_text())
best = optimized["best"]
# each variant's batch throughput in process (optimize's timing, all cores): what the issue holds the served path to
variant_rate = {kind: next(r["throughput_per_s"] for r in optimized["results"] if r["name"] == variant)
                for kind, variant in (("eager", "eager"), ("optimized", best))}
built = json.loads((out / "optimized_build.json").read_text())
print(f"optimized archive: variant {best}, batch size {built['config']['batchSize']}")
print()
print("| archive | c=1 p50 ms | LitServe c=1 p50 ms | p50 ratio | c=16 req/s | LitServe c=16 req/s | x LitServe "
      "| c=16 p99 ms | LitServe c=16 p99 ms | served / its variant in optimize (img/s) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for kind in ("eager", "optimized"):
    report = json.loads((out / kind / "bench.json").read_text())
    one, many = (next(lv for lv in report["levels"] if lv["served"]["concurrency"] == c) for c in (1, 16))
    print(f"| {kind} | {one['served']['p50_ms']:.1f} | {one['baseline']['p50_ms']:.1f} "
          f"| {one['served']['p50_ms'] / one['baseline']['p50_ms']:.2f} | {many['served']['throughput_per_s']:.1f} "
          f"| {many['baseline']['throughput_per_s']:.1f} | {many['ratio_over_baseline']:.2f} "
          f"| {many['served']['p99_ms']:.0f} | {many['baseline']['p99_ms']:.0f} "
          f"| {many['served']['throughput_per_s'] / variant_rate[kind]:.2f} ({variant_rate[kind]:.1f}) |")
PY
