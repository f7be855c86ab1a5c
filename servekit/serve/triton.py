"""Triton Inference Server running a repository of `servekit.build.triton`: started, recorded and stopped by PID.

`start_triton` runs the `tritonserver` binary of the nvidia-pytriton wheel (`pip install servekit[triton]`) on
loopback addresses; `stop_triton` stops it and its backend stubs by PID; `version_figures` reads its metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from servekit.core.errors import ServerError, UsageError
from servekit.core.processes import psutil, stop_process_tree
from servekit.serve.client import prometheus_samples
from servekit.serve.metrics import VersionFigures

STATE_FILE = "triton.json"
# Triton's cumulative per-(model, version) counters, as servekit's figures of a TorchServe version name them.
TRITON_COUNTERS = {"nv_inference_request_success": "requests", "nv_inference_request_duration_us": "latency_us",
                   "nv_inference_queue_duration_us": "queue_us"}  # fmt: skip


@dataclass
class TritonState:
    pid: int
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: str
    workdir: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def save(self) -> None:
        (Path(self.workdir) / STATE_FILE).write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, workdir: Path) -> TritonState:
        path = Path(workdir) / STATE_FILE
        if not path.is_file():
            raise UsageError(f"no Triton recorded in {workdir}: start one first")
        return cls(**json.loads(path.read_text()))


def version_figures(state: TritonState, name: str, number: int) -> VersionFigures:
    """What Triton counted for model `name` version `number` since it started: successful requests, their time in
    the server (arrival to answer) and in its queue."""
    from servekit.core.transport import Session

    reply = Session().get(f"http://127.0.0.1:{state.metrics_port}/metrics", timeout=5)
    if reply.status_code != 200:
        raise ServerError(f"Triton's metrics answered {reply.status_code}")
    figures = VersionFigures()
    for metric, labels, value in prometheus_samples(reply.text):
        field = TRITON_COUNTERS.get(metric)
        if field and labels.get("model") == name and labels.get("version") == str(number):
            setattr(figures, field, getattr(figures, field) + value)
    return figures


def triton_install() -> Path:
    """The tritonserver of the nvidia-pytriton wheel (servekit[triton]), found without importing pytriton (its
    package imports tritonclient's gRPC protos, which clash with kserve's in one process)."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("Triton is not installed here: pip install 'servekit[triton]' (nvidia-pytriton)")
    return Path(spec.submodule_search_locations[0]).resolve() / "tritonserver"


def backend_directory(workdir: Path) -> Path:
    """Triton's Python backend with the stub of this Python version, as tritonserver's --backend-directory."""
    install = triton_install()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = install / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UsageError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    backends = workdir / "backends"
    shutil.rmtree(backends, ignore_errors=True)
    shutil.copytree(install / "backends" / "python", backends / "python")
    shutil.copy2(stub, backends / "python" / stub.name)
    return backends


def start_triton(repository: Path, workdir: Path, ports: dict[str, int], timeout_s: float = 120.0) -> TritonState:
    """tritonserver on 127.0.0.1 (HTTP, gRPC, metrics) with `repository`, ready when this returns; its log is
    workdir/tritonserver.log. A model that fails to load stops it, with the log's error in the message."""
    from servekit.core.transport import Session, TransportError

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    install = triton_install()
    environment = {**os.environ, "LD_LIBRARY_PATH": str(install.parent.parent / "nvidia_pytriton.libs")}
    command = [
        str(install / "bin" / "tritonserver"),
        f"--model-repository={repository.resolve()}",
        f"--backend-directory={backend_directory(workdir)}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        f"--http-port={ports['http']}",
        f"--grpc-port={ports['grpc']}",
        f"--metrics-port={ports['metrics']}",
        "--disable-auto-complete-config",
        "--exit-timeout-secs=2",
        "--log-verbose=0",
    ]
    log = workdir / "tritonserver.log"
    with log.open("ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=workdir, env=environment,
                                   start_new_session=True)  # fmt: skip
    state = TritonState(process.pid, ports["http"], ports["grpc"], ports["metrics"], str(repository.resolve()),
                        str(workdir))  # fmt: skip
    state.save()
    deadline, session = time.monotonic() + timeout_s, Session()
    while time.monotonic() < deadline:
        if process.poll() is not None:
            errors = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("E")]
            raise ServerError(
                f"tritonserver exited ({process.returncode}): {errors[-1] if errors else 'see ' + str(log)}"
            )
        try:
            if session.get(f"{state.url}/v2/health/ready", timeout=1).status_code == 200:
                return state
        except TransportError:
            pass
        time.sleep(0.25)
    stop_triton(workdir)
    raise ServerError(f"tritonserver was not ready within {timeout_s:.0f} s: see {log}")


def stop_triton(workdir: Path) -> bool:
    """Stops the tritonserver recorded in `workdir` and its backend stubs; False when none was running."""
    try:
        state = TritonState.load(workdir)
    except UsageError:
        return False
    try:
        process = psutil.Process(state.pid)
    except psutil.NoSuchProcess:
        return False
    stop_process_tree(process, 10)
    return True
