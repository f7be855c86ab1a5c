"""The GPU check of issue 15, in one run: train, optimize, build, serve and bench resnet18 (224 px, JPEG and PNG
bodies, c=1/16/64) and digits on the GPU, run the gpu-marked and handler tests there, write one JSON report.

Run on a GPU host prepared with ../shared/gpu/ (scripts/gpu_prepare.sh here, then on the host
`source .gpu/setup.sh && bash scripts/gpu_check.sh`). Every step runs as the servekit CLI a user would type, in a
temp folder; a failing step is recorded and the next ones still run, so one run tells everything. TorchServe is
stopped by PID at the end, whatever happened.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LEVELS = "1,16,64"
HALF_VARIANTS = ("fp16", "bf16", "cuda_graphs")
GPU_TESTS = (
    "tests/unit/test_gpu_cuda.py",
    "tests/unit/test_gpu_path.py",
    "tests/unit/test_devices.py",
    "tests/server/test_gpu_serving.py",
)
TARGETS = {  # issue 15, one H100 or H200, resnet18 224 px JPEG bodies
    "c64_req_per_s": 5000,
    "c64_p99_ms": 50,
    "efficiency": 0.8,
    "fp16_speedup_bs64": 1.5,
    "fp16_accuracy_drop_points": 0.5,
    "c1_p50_ms": 5,
}


class Check:
    def __init__(self, work: Path, out: Path, budget_s: float):
        self.work, self.out = work, out
        self.deadline = time.monotonic() + budget_s
        self.report: dict = {"steps": [], "targets": TARGETS}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, command: list[str], limit_s: float, as_json: bool = False, cwd: Path | None = None):
        """One CLI step: its seconds, exit code and output tail go into the report; JSON output is returned."""
        limit = max(5.0, min(limit_s, self.left()))
        started = time.monotonic()
        try:
            done = subprocess.run(command, cwd=cwd or self.work, capture_output=True, text=True, timeout=limit)
            rc, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as exc:
            rc, stdout, stderr = "timeout", str(exc.stdout or ""), str(exc.stderr or "")
        step = {"step": name, "rc": rc, "seconds": round(time.monotonic() - started, 1), "command": " ".join(command)}
        if rc != 0 or name == "pytest":
            step["tail"] = (stdout[-1500:] + "\n" + stderr[-2500:]).strip()
        self.report["steps"].append(step)
        print(f"[{step['seconds']:6.1f} s] {name}: rc={rc}", flush=True)
        if rc != 0:
            print(step.get("tail", "")[-1200:], flush=True)
        if as_json and rc == 0:
            try:
                return json.loads(stdout)
            except ValueError:
                step["tail"] = stdout[-1500:]
        return None if as_json else rc == 0

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=1, default=str))


def keep_tail(source: Path, target: Path, lines: int) -> None:
    if source.is_file():
        target.write_text("\n".join(source.read_text(errors="replace").splitlines()[-lines:]))


def nvidia_smi(*arguments: str) -> str:
    """nvidia-smi's answer ('' where there is none: a dry run on a machine without GPU)."""
    if shutil.which("nvidia-smi") is None:
        return ""
    return subprocess.run(["nvidia-smi", *arguments], capture_output=True, text=True).stdout.strip()


def environment() -> dict:
    import torch

    smi = nvidia_smi("--query-gpu=name,memory.total,driver_version", "--format=csv,noheader")
    return {
        "gpu": smi,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "wrk": shutil.which("wrk"),
    }


def image_folders(held_out: Path, work: Path, size: int = 256) -> dict[str, Path]:
    """The trained image model's held-out digits as RGB SIZExSIZE JPEG (quality 90) and PNG bodies."""
    from PIL import Image

    from servekit.store.heldout import read_held_out, write_bodies

    samples = read_held_out(held_out)
    folders = {}
    for kind, suffix in (("JPEG", "jpg"), ("PNG", "png")):
        bodies = {}
        for i, sample in enumerate(samples):
            image = Image.open(sample.path).convert("RGB").resize((size, size), Image.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, kind, **({"quality": 90} if kind == "JPEG" else {}))
            bodies[f"{i:04d}_{sample.label}.{suffix}"] = buffer.getvalue()
        folders[kind.lower()] = work / f"heldout-{suffix}"
        write_bodies(bodies, [s.label for s in samples], folders[kind.lower()])
    return folders


class GpuSampler:
    """nvidia-smi utilization every 0.5 s while a bench runs (how busy the served path keeps the GPU)."""

    def __init__(self):
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        while not self.stop.wait(0.5):
            text = nvidia_smi("--query-gpu=utilization.gpu", "--format=csv,noheader,nounits").splitlines()
            if text and text[0].strip().isdigit():
                self.samples.append(int(text[0]))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(2)

    def summary(self) -> dict:
        busy = sorted(self.samples)
        return {"samples": len(busy), "median_pct": busy[len(busy) // 2] if busy else None, "max_pct": max(busy or [0])}


def bench_image(check: Check, folder: Path, key: str, levels: str) -> None:
    """`servekit bench image` with wrk on one folder of bodies, the GPU's utilization sampled meanwhile."""
    with GpuSampler() as sampler:
        result = check.run(key, ["servekit", "bench", "image", "--held-out", str(folder), "--concurrency", levels,
                                 "--duration", "8s", "--repeats", "1", "--warmup", "5s", "--generator", "wrk",
                                 "--out", key, "--json"],
                           120, as_json=True)  # fmt: skip
    check.report[key] = {**bench_summary(result), "gpu_utilization": sampler.summary()}
    if (check.work / key / "bench.png").is_file():
        shutil.copy2(check.work / key / "bench.png", check.out / f"{key}.png")
    check.save()


def bench_summary(report: dict | None) -> dict:
    if not report:
        return {}
    levels = {}
    for level in report.get("levels", []):
        served = level.get("served") or {}
        levels[f"c{served.get('concurrency')}"] = {
            "req_per_s": round(served.get("throughput_per_s", 0), 1),
            "p50_ms": round(served.get("p50_ms", 0), 2),
            "p99_ms": round(served.get("p99_ms", 0), 2),
            "errors": served.get("errors"),
            "generator": served.get("generator"),
            "efficiency": level.get("efficiency"),
            "cpu": level.get("cpu"),
        }
    return {"in_process": report.get("in_process"), "levels": levels, "archive": report.get("archive")}


def optimize_summary(report: dict | None) -> dict:
    if not report:
        return {}
    rows = {
        r["name"]: {
            key: r.get(key)
            for key in ("status", "bs1_p50_ms", "bs64_p50_ms", "throughput_per_s", "accuracy", "agreement", "reason")
        }
        for r in report.get("results", [])
    }
    eager, best = rows.get("eager", {}), rows.get(report.get("best"), {})

    def speedup(row: dict) -> float | None:
        return (
            round(eager["bs64_p50_ms"] / row["bs64_p50_ms"], 2)
            if eager.get("bs64_p50_ms") and row.get("bs64_p50_ms")
            else None
        )

    def drop(row: dict) -> float | None:
        return round((eager["accuracy"] - row["accuracy"]) * 100, 2) if row.get("accuracy") is not None else None

    return {
        "best": report.get("best"),
        "variants": rows,
        "speedup_bs64": {name: speedup(row) for name, row in rows.items()},
        # the half-precision variant the gate picked (cuda_graphs is fp16 replayed as CUDA graphs)
        "best_half": report.get("best") in HALF_VARIANTS,
        "best_speedup_bs64": speedup(best),
        "best_drop_points": drop(best),
    }


def verdict(report: dict) -> dict:
    jpeg = report.get("bench_image_jpeg", {}).get("levels", {})
    c64, c1 = jpeg.get("c64", {}), jpeg.get("c1", {})
    optimized = report.get("optimize", {})
    checks = {
        "c64_req_per_s": (c64.get("req_per_s"), lambda v: v >= TARGETS["c64_req_per_s"] and c64.get("errors") == 0),
        "c64_p99_ms": (c64.get("p99_ms"), lambda v: v <= TARGETS["c64_p99_ms"]),
        "efficiency": (c64.get("efficiency"), lambda v: v >= TARGETS["efficiency"]),
        "fp16_speedup_bs64": (
            optimized.get("best_speedup_bs64") if optimized.get("best_half") else None,
            lambda v: v >= TARGETS["fp16_speedup_bs64"],
        ),
        "fp16_accuracy_drop_points": (
            optimized.get("best_drop_points") if optimized.get("best_half") else None,
            lambda v: v <= TARGETS["fp16_accuracy_drop_points"],
        ),
        "c1_p50_ms": (c1.get("p50_ms"), lambda v: v <= TARGETS["c1_p50_ms"]),
    }
    return {key: {"measured": value, "met": None if value is None else bool(test(value))} for key, (value, test) in
            checks.items()}  # fmt: skip


def main() -> int:
    out = Path(os.environ.get("OUT") or REPO / "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="servekit-gpu-check-"))
    check = Check(work, out, float(os.environ.get("GPU_CHECK_BUDGET_S", 450)))
    check.report["environment"] = environment()
    check.report["work"] = str(work)
    print(json.dumps(check.report["environment"]), flush=True)
    sk = ["servekit"]
    epochs = os.environ.get("GPU_CHECK_EPOCHS", "3")
    workers = os.environ.get("GPU_CHECK_WORKERS", "4")
    size = os.environ.get("GPU_CHECK_IMAGE_SIZE", "224")
    device = os.environ.get("GPU_CHECK_DEVICE", "cuda")  # cpu: a dry run of this script on a machine without GPU
    check.run("train image", [*sk, "train", "image", "--arch", "resnet18", "--image-size", size, "--epochs", epochs,
                              "--device", "auto"], 120)  # fmt: skip
    quick = os.environ.get("GPU_CHECK_QUICK") == "1"  # image only, JPEG bodies, then 8 workers; no digits, no tests
    models = "image" if quick else "image,digits"
    if not quick:
        check.run("train digits", [*sk, "train", "digits", "--device", "auto"], 60)
    try:
        folders = image_folders(work / "model_store/work/image/heldout", work)
    except Exception as exc:  # without the trained image model nothing below can be served
        check.report["steps"].append({"step": "image bodies", "rc": f"{type(exc).__name__}: {exc}"})
        check.save()
        return 1
    variants = os.environ.get("GPU_CHECK_VARIANTS", "eager,fp16,bf16,cuda_graphs")
    optimized = check.run("optimize image", [*sk, "optimize", "image", "--device", device, "--variants", variants,
                                             "--max-accuracy-drop", "0.5", "--pick", "fastest", "--budget", "1",
                                             "--json"], 150, as_json=True)  # fmt: skip
    check.report["optimize"] = optimize_summary(optimized)
    check.save()
    check.run("config", [*sk, "config", "--gpus", "auto", "--workers-per-gpu", workers, "--batch-size", "64",
                         "--max-batch-delay", "1", "--models", models, "--out", "cfg"], 30)  # fmt: skip
    variant = ["--variant", "best"] if optimized else []
    check.run("build image", [*sk, "build", "image", "--version", "1.0.0", *variant, "--model-config",
                              "cfg/models/image/model-config.yaml"], 60)  # fmt: skip
    if not quick:
        check.run("build digits", [*sk, "build", "digits", "--version", "1.0.0", "--model-config",
                                   "cfg/models/digits/model-config.yaml"], 60)  # fmt: skip
    try:
        check.run("serve start", [*sk, "serve", "start", "--config", "cfg/config.properties", "--no-proxy"], 60)
        check.run("register image", [*sk, "register", "image", "--version", "1.0.0", "--verbose"], 120)
        check.report["evaluate_image_jpeg"] = check.run("evaluate image jpeg", [*sk, "evaluate", "image", "--data",
                                                        str(folders["jpeg"]), "--json"], 60, as_json=True)  # fmt: skip
        for kind in ("jpeg",) if quick else ("jpeg", "png"):
            bench_image(check, folders[kind], f"bench_image_{kind}", LEVELS)
        if quick:  # the same archive with twice the workers: does the served path scale past the first four?
            check.run("scale image", [*sk, "scale", "image", "--min-workers", "8", "--max-workers", "8"], 90)
            bench_image(check, folders["jpeg"], "bench_image_jpeg_8_workers", "16,64")
        else:
            check.run("register digits", [*sk, "register", "digits", "--version", "1.0.0", "--verbose"], 90)
            check.report["evaluate_digits"] = check.run("evaluate digits", [*sk, "evaluate", "digits", "--json"], 60,
                                                        as_json=True)  # fmt: skip
            digits = check.run("bench digits", [*sk, "bench", "digits", "--concurrency", LEVELS, "--duration", "5s",
                                                "--repeats", "1", "--warmup", "5s", "--generator", "wrk", "--json"],
                               60, as_json=True)  # fmt: skip
            check.report["bench_digits"] = bench_summary(digits)
        check.report["models"] = check.run("models", [*sk, "models", "--json"], 20, as_json=True)
    finally:
        check.run("serve stop", [*sk, "serve", "stop"], 60)
        keep_tail(work / ".servekit/logs/model_log.log", out / "model_log_tail.txt", 300)
        if (work / "model_store/work/image-optimized/report.md").is_file():
            shutil.copy2(work / "model_store/work/image-optimized/report.md", out / "optimize_report.md")
    check.save()
    if not quick:
        tests = os.environ.get("GPU_CHECK_TESTS", " ".join(GPU_TESTS)).split()
        check.run("pytest", [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-m", "gpu or not server",
                             *tests], 150, cwd=REPO)  # fmt: skip
    check.report["verdict"] = verdict(check.report)
    check.save()
    print(json.dumps(check.report["verdict"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
