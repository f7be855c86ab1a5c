"""The servers `servekit bench --baseline` runs beside servekit, on the same trained folder and the same image bytes:

- flask: the original design's Flask `/predict` app (servekit.measure.flask_peer), eager, one request per thread;
- litserve: LitServe with batching as its docs suggest (batches of 8 within 1 ms, 5 ms for an image model; 2
  workers, each on its share of the cores), asked in its convention: the image base64 in JSON, decoded as Flask does;
- torchserve: a TorchServe of its own on TorchServe's defaults (one worker per core, batch size 1, no token, as
  its examples start it), serving the model as its examples document it: a digits model through an `ImageClassifier`
  subclass (examples/image_classifier/mnist), a torchvision model TorchScripted through the built-in
  `image_classifier` handler (examples/image_classifier/resnet_18).

Each runs in its own session on free loopback ports from a temporary folder; it is a context manager that waits until
the peer answers and, on exit (also after a failure or Ctrl-C), stops its whole process tree by PID. `peer(bodies)`
says how to ask it. LitServe and TorchServe's `ImageClassifier` (which imports captum) come with
`pip install 'servekit[peers]'`; none of them is needed to serve.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from servekit.core.errors import ServerError, UsageError
from servekit.core.processes import psutil, wait_until_exited
from servekit.core.transport import Session, TransportError
from servekit.serve.torchserve import free_port
from servekit.store.workspace import HANDLER_FILE

# Python servers have no JIT to warm: a short warm-up only opens their connections.
BASELINE_WARMUP_S = 2.0
# LitServe's batching as its docs suggest: batches of 8, a window of 1 ms for a small model, 5 ms for an image model.
LITSERVE_BATCH = 8
LITSERVE_TIMEOUT_S = {"digits": 0.001, "image": 0.005}
LITSERVE_WORKERS = 2


@dataclass
class Peer:
    """What each level is also run against, with the same bodies: a peer server, or a running Triton."""

    label: str  # "flask" | "litserve" | "torchserve" | "triton", the column names of the report
    url: str  # its inference route for this model
    pid: int  # the process whose tree's CPU is the peer's
    bodies: list[tuple[bytes, str]]
    warmup_s: float  # at most this much of the run's warm-up


def trained_settings(model_dir: Path) -> dict:
    """The handler settings `servekit train` left in `model_dir` (model class, preprocessing)."""
    path = Path(model_dir) / HANDLER_FILE
    if not path.is_file():
        raise UsageError(f"{path} not found: --baseline-model takes a folder written by `servekit train`")
    return json.loads(path.read_text())


def model_kind(trained: dict) -> str:
    """'image' for a torchvision model, 'digits' for servekit's own digit classifiers; others are refused."""
    model_class = trained["model_class"]
    if model_class.startswith("torchvision:"):
        return "image"
    if model_class in ("SimpleCNN", "SmallCNN"):
        return "digits"
    raise UsageError(f"the peers serve digits models and torchvision image models, not {model_class}")


def require(module: str, peer: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"the {peer} peer needs {module}: pip install 'servekit[peers]'")


class PeerServer:
    """A server in its own session, started from a temporary folder, ready once `ready()` says so; on exit its whole
    process tree is stopped by PID, then anything left in its process group is killed, then the folder goes."""

    label = ""
    warmup_s = BASELINE_WARMUP_S
    start_timeout_s = 60.0

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.folder = Path(tempfile.mkdtemp(prefix=f"servekit-{self.label}-"))
        self.log = self.folder / "server.log"
        self.process: subprocess.Popen | None = None
        self.session = Session()

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        """True once the server answers its health route."""
        return self.session.get(f"{self.url}/health", timeout=1).ok

    def prepare(self) -> None:
        """What the folder needs before the server starts (an archive, a config)."""

    def pids(self) -> list[int]:
        """The server's process and every process it spawned, as they are now."""
        if self.process is None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root.pid, *(child.pid for child in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def __enter__(self):
        try:
            self.prepare()
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(self.command(), cwd=self.folder, env=self.environment(), stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            self.wait_until_ready()
        except BaseException:  # whatever went wrong, including Ctrl-C, leave nothing running
            self.__exit__()
            raise
        return self

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"the {self.label} peer exited with {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(TransportError):
                if self.ready():
                    return
            time.sleep(0.2)
        raise ServerError(f"the {self.label} peer was not ready within {self.start_timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-800:] if self.log.is_file() else "(no log)"

    def __exit__(self, *exc_info) -> None:
        if self.process is not None:
            stop_session(self.process, 10)
        shutil.rmtree(self.folder, ignore_errors=True)


def stop_session(process: subprocess.Popen, timeout_s: float) -> None:
    """Stops a server's process tree by PID: its descendants first, so that their parents (TorchServe's launcher
    waits on its Java) reap them, then the process itself; SIGKILL for whatever outlives `timeout_s`, and for
    anything left in its session's process group (what a forking server lost track of)."""
    try:
        root = psutil.Process(process.pid)
        generations = [root.children(recursive=True), [root]]
    except psutil.NoSuchProcess:
        generations = []
    for generation in generations:
        for member in generation:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.terminate()
        for member in wait_until_exited(generation, timeout_s):
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        wait_until_exited(generation, 5)
        reaped_by_parents(generation, 0.5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def reaped_by_parents(processes: list[psutil.Process], timeout_s: float) -> None:
    """Waits up to `timeout_s` until the exited `processes` are gone, not zombies: a parent still running reaps its
    own (TorchServe's launcher, its Java); one stopped first would leave them to init, which may reap them late."""
    deadline = time.monotonic() + timeout_s
    while any(psutil.pid_exists(member.pid) for member in processes) and time.monotonic() < deadline:
        time.sleep(0.02)


class FlaskBaseline(PeerServer):
    """The Flask app of `servekit.measure.flask_peer` on Flask's threaded server."""

    label = "flask"

    def __init__(self, model_dir: Path, port: int):
        self.model_dir = Path(model_dir).resolve()
        super().__init__(port)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "servekit.measure.flask_peer",
            "--model-dir",
            str(self.model_dir),
            "--port",
            str(self.port),
        ]

    def peer(self, bodies: list[tuple[bytes, str]]) -> Peer:
        return Peer(self.label, f"{self.url}/predict", self.process.pid, bodies, self.warmup_s)


class LitServePeer(PeerServer):
    """LitServe serving the trained folder with its batching (`python -m servekit.measure.peers litserve ...`)."""

    label = "litserve"

    def __init__(self, model_dir: Path, port: int):
        require("litserve", self.label)
        self.model_dir = Path(model_dir).resolve()
        self.kind = model_kind(trained_settings(self.model_dir))
        super().__init__(port)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "servekit.measure.peers", "litserve", str(self.model_dir), str(self.port)]

    def peer(self, bodies: list[tuple[bytes, str]]) -> Peer:
        return Peer(self.label, f"{self.url}/predict", self.process.pid, [litserve_body(b) for b, _ in bodies],
                    self.warmup_s)  # fmt: skip


def litserve_body(image: bytes) -> tuple[bytes, str]:
    """LitServe's convention: a JSON request, the image base64 in it."""
    return json.dumps({"image": base64.b64encode(image).decode()}).encode(), "application/json"


def lit_classifier_api() -> type:
    """The LitAPI of the LitServe peer: the Flask baseline's decoding, LitServe's own batching (its default `batch`
    stacks the samples, its `unbatch` splits the outputs), the Flask baseline's answer."""
    import litserve as ls
    import torch

    class LitClassifierAPI(ls.LitAPI):
        def __init__(self, model_dir: str, threads: int, **kwargs):
            super().__init__(**kwargs)
            self.model_dir, self.threads = model_dir, threads

        def setup(self, device):
            from servekit.build.formats import load_trained
            from servekit.measure.flask_peer import bytes_decoder

            torch.set_num_threads(self.threads)
            self.model, trained = load_trained(Path(self.model_dir))
            self.decode = bytes_decoder(trained)

        def decode_request(self, request):
            return self.decode(base64.b64decode(request["image"]))[0]

        def predict(self, batch):
            with torch.inference_mode():
                return torch.softmax(self.model(batch), dim=1)

        def encode_response(self, probabilities):
            index = int(probabilities.argmax())
            return {"label": str(index), "index": index, "probability": float(probabilities[index])}

    LitClassifierAPI.__module__, LitClassifierAPI.__qualname__ = __name__, "LitClassifierAPI"
    return LitClassifierAPI


def __getattr__(name: str):
    """LitClassifierAPI, built on first use: litserve (an optional extra that imports torch) loads only in the
    LitServe peer's processes, whose workers find the class here when they unpickle the API."""
    if name == "LitClassifierAPI":
        globals()[name] = lit_classifier_api()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve_litserve(model_dir: Path, port: int) -> None:
    """Runs the LitServe peer on 127.0.0.1:`port` until it is stopped."""
    import litserve as ls

    kind = model_kind(trained_settings(model_dir))
    threads = max(1, (os.cpu_count() or 1) // LITSERVE_WORKERS)
    api = __getattr__("LitClassifierAPI")(str(model_dir), threads, max_batch_size=LITSERVE_BATCH,
                                          batch_timeout=LITSERVE_TIMEOUT_S[kind])  # fmt: skip
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=LITSERVE_WORKERS)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


# TorchServe as its examples document it -----------------------------------------------------------------------
MNIST_HANDLER = '''"""The MNIST example's handler (pytorch/serve examples/image_classifier/mnist/mnist_handler.py)
for this model: an ImageClassifier whose transform is the one the model was trained with, answering the class."""

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class DigitClassifier(ImageClassifier):
    image_processing = transforms.Compose(
        [transforms.Grayscale(), transforms.Resize((28, 28)), transforms.ToTensor()]
    )

    def postprocess(self, data):
        return data.argmax(1).tolist()
'''


def model_file(model_class: type) -> str:
    """The model's class in a file of its own, as the MNIST example's mnist.py holds its Net: TorchServe builds it
    without arguments, so its defaults must be what was trained."""
    return (
        f'"""{model_class.__name__}, as the trained model was built."""\n\nimport torch\nfrom torch import nn\n\n\n'
        + (inspect.getsource(model_class))
    )


class TorchServePeer(PeerServer):
    """A TorchServe of its own on its defaults (`torchserve --start --foreground`), serving one archive built with
    torch-model-archiver as TorchServe's examples build it."""

    label = "torchserve"
    warmup_s = float("inf")  # Java: its JIT needs the whole warm-up, as servekit's TorchServe gets it
    start_timeout_s = 120.0
    model_name = "peer"

    def __init__(self, model_dir: Path, port: int):
        self.model_dir = Path(model_dir).resolve()
        self.trained = trained_settings(self.model_dir)
        self.kind = model_kind(self.trained)
        if self.kind == "digits":
            require("captum", self.label)  # TorchServe 0.12's VisionHandler imports captum.attr at its top
        self.management_port = free_port()
        super().__init__(port)

    def prepare(self) -> None:
        """The archive in a model store, TorchServe's settings (loopback ports, no token, as its examples start it)."""
        store, files = self.folder / "model_store", self.folder / "files"
        for folder in (store, files, self.folder / "tmp", self.folder / "logs"):
            folder.mkdir()
        archive = [str(Path(sys.executable).with_name("torch-model-archiver")), "--model-name", self.model_name,
                   "--version", "1.0", "--export-path", str(store)]  # fmt: skip
        if self.kind == "digits":
            archive += self.mnist_example_files(files)
        else:
            archive += self.resnet_example_files(files)
        done = subprocess.run(archive, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise ServerError(f"torch-model-archiver failed: {(done.stderr or done.stdout)[-800:]}")
        properties = {
            "inference_address": self.url,
            "management_address": f"http://127.0.0.1:{self.management_port}",
            "metrics_address": f"http://127.0.0.1:{free_port()}",
            "grpc_inference_address": "127.0.0.1",
            "grpc_inference_port": str(free_port()),
            "grpc_management_address": "127.0.0.1",
            "grpc_management_port": str(free_port()),
        }
        (self.folder / "config.properties").write_text("".join(f"{k}={v}\n" for k, v in properties.items()))

    def mnist_example_files(self, files: Path) -> list[str]:
        """examples/image_classifier/mnist: the model class in a file, its state_dict, the ImageClassifier subclass."""
        from servekit_worker import architectures

        (files / "model.py").write_text(model_file(getattr(architectures, self.trained["model_class"])))
        (files / "mnist_handler.py").write_text(MNIST_HANDLER)
        return ["--model-file", str(files / "model.py"), "--serialized-file", str(self.model_dir / "model.pt"),
                "--handler", str(files / "mnist_handler.py")]  # fmt: skip

    def resnet_example_files(self, files: Path) -> list[str]:
        """examples/image_classifier/resnet_18, TorchScript: the scripted model and the built-in handler."""
        import torch

        from servekit.build.formats import load_trained

        model, _ = load_trained(self.model_dir)
        torch.jit.save(torch.jit.script(model), files / "model.pt")
        return ["--serialized-file", str(files / "model.pt"), "--handler", "image_classifier"]

    def command(self) -> list[str]:
        torchserve = Path(sys.executable).with_name("torchserve")
        return [str(torchserve), "--start", "--foreground", "--model-store", "model_store", "--ts-config",
                "config.properties", "--models", f"{self.model_name}={self.model_name}.mar",
                "--disable-token-auth"]  # fmt: skip

    def environment(self) -> dict[str, str]:
        """Its own temp folder (TorchServe keeps its PID file there: two would refuse each other) and logs."""
        folder = str(self.folder)
        return {**os.environ, "TEMP": f"{folder}/tmp", "TMPDIR": f"{folder}/tmp", "LOG_LOCATION": f"{folder}/logs",
                "METRICS_LOCATION": f"{folder}/logs"}  # fmt: skip

    def ready(self) -> bool:
        """True once every worker of the model is READY (TorchServe answers /ping before its workers load)."""
        reply = self.session.get(f"http://127.0.0.1:{self.management_port}/models/{self.model_name}", timeout=2)
        workers = reply.json()[0]["workers"] if reply.ok else []
        return bool(workers) and all(worker["status"] == "READY" for worker in workers)

    def log_tail(self) -> str:
        logs = self.folder / "logs" / "model_log.log"
        return super().log_tail() + (logs.read_text(errors="replace")[-800:] if logs.is_file() else "")

    def peer(self, bodies: list[tuple[bytes, str]]) -> Peer:
        return Peer(self.label, f"{self.url}/predictions/{self.model_name}", self.process.pid, bodies, self.warmup_s)


STARTED_PEERS = {"flask": FlaskBaseline, "litserve": LitServePeer, "torchserve": TorchServePeer}  # bench starts these


def main(arguments: list[str]) -> None:
    if arguments[:1] != ["litserve"] or len(arguments) != 3:
        raise SystemExit("usage: python -m servekit.measure.peers litserve MODEL_DIR PORT")
    serve_litserve(Path(arguments[1]), int(arguments[2]))


if __name__ == "__main__":
    # Run under its own name, so LitServe's spawned workers find LitClassifierAPI in servekit.measure.peers.
    from servekit.measure.peers import main as peers_main

    peers_main(sys.argv[1:])
