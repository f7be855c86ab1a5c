"""A labelled held-out folder: one request body per file and `index.csv` (file,label).

`servekit train` writes one, archives keep a few as golden samples, and rollout, bench and evaluate read them.
Light on purpose (no torch), so the commands that talk to a server start fast.
"""

from __future__ import annotations

import csv
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from servekit.core.errors import UsageError

HELD_OUT_INDEX = "index.csv"


def write_bodies(bodies: dict[str, bytes], labels: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / HELD_OUT_INDEX
    with index_path.open("w", newline="") as index:
        writer = csv.writer(index)
        writer.writerow(["file", "label"])
        for (name, body), label in zip(bodies.items(), labels, strict=True):
            (folder / name).write_bytes(body)
            writer.writerow([name, label])
    return index_path


@dataclass(frozen=True)
class HeldOutSample:
    path: Path
    label: str

    @property
    def content_type(self) -> str:
        return (
            "text/plain"
            if self.path.suffix == ".txt"
            else mimetypes.guess_type(self.path.name)[0] or "application/octet-stream"
        )


def read_held_out(folder: Path) -> list[HeldOutSample]:
    """The samples of a folder written by `servekit train`."""
    index_path = folder / HELD_OUT_INDEX
    if not index_path.is_file():
        raise UsageError(f"{index_path} not found: run `servekit train` to write a held-out set")
    with index_path.open(newline="") as index:
        return [HeldOutSample(folder / row["file"], row["label"]) for row in csv.DictReader(index)]
