"""Where servekit keeps things: the model store, the server's working folder, and every path convention.

A `Workspace` answers "where is X of model NAME" for every command and workflow. Paths only: no torch, no server
(the handle on a running one is `servekit.serve.handle.Server`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from servekit_worker.loading import FORMAT_FILES

DEFAULT_STORE = Path("model_store")
DEFAULT_WORKDIR = Path(".servekit")
DEFAULT_TRITON_WORKDIR = Path(".servekit-triton")  # where `servekit serve triton` records its Triton

# The files of a trained folder (`servekit train --out DIR`), which `build` packs and `optimize` reads; each
# serialized format's file (in a trained folder, a variant folder and an archive) is the worker's FORMAT_FILES.
WEIGHTS_FILE = FORMAT_FILES["state_dict"]
LABELS_FILE = "labels.json"
HANDLER_FILE = "handler.json"
METRICS_FILE = "metrics.json"
VOCAB_FILE = "vocab.json"
HELD_OUT_DIR = "heldout"
SERVING_FILE = "serving.json"  # written by `servekit tune`, read by `servekit build`
MODEL_CODE_DIR = "model_code"  # an imported class's own code (servekit import), in the folder and the archive
HANDLER_CODE_DIR = "handler_code"  # an imported model's own handler file


def archive_file_name(name: str, version: str) -> str:
    return f"{name}-{version}.mar"


@dataclass(frozen=True)
class Workspace:
    """The model store (archives, catalog.json, golden samples, trained folders under work/) and a server folder."""

    store: Path = DEFAULT_STORE
    workdir: Path = DEFAULT_WORKDIR

    @property
    def work(self) -> Path:
        return self.store / "work"

    def trained(self, name: str) -> Path:
        """Where `servekit train NAME` writes and `build NAME` reads by default."""
        return self.work / name

    def held_out(self, name: str) -> Path:
        return self.trained(name) / HELD_OUT_DIR

    def optimized(self, name: str) -> Path:
        return self.work / f"{name}-optimized"

    def bench_reports(self, name: str) -> Path:
        return self.work / f"{name}-bench"

    def archive(self, name: str, version: str) -> Path:
        return self.store / archive_file_name(name, version)

    def golden(self, name: str, version: str) -> Path:
        return self.store / "golden" / f"{name}-{version}"
