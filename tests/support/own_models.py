"""Models no one here wrote, as a user brings them to `servekit import`: a class in a file of its own that imports a
helper from its folder, and the formats torch writes outside servekit."""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import torch

from servekit.store.heldout import HeldOutSample, write_bodies
from servekit_worker.digits import image_to_tensor
from support import REPO

HELPER = """
from torch import nn


def head(width: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(width * 7 * 7, classes))
"""

MODEL = '''
import torch
from torch import nn

from layers import head


class TinyNet(nn.Module):
    """Digits (1x28x28) in, logits out."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.head = head(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
'''


def write_user_model(folder: Path) -> Path:
    """`folder/src/tinynet.py` (class TinyNet) and the helper module it imports, `folder/src/layers.py`."""
    source = folder / "src"
    source.mkdir(parents=True, exist_ok=True)
    (source / "layers.py").write_text(textwrap.dedent(HELPER))
    (source / "tinynet.py").write_text(textwrap.dedent(MODEL))
    return source / "tinynet.py"


def user_model(file: Path, **kwargs) -> torch.nn.Module:
    """The user's class, imported as the user would (from its own folder), seeded, in eval mode."""
    from servekit_worker.architectures import user_callable

    torch.manual_seed(0)
    return user_callable("tinynet:TinyNet", file.parent)(**kwargs).eval()


def export_formats(model: torch.nn.Module, example: torch.Tensor, folder: Path) -> dict[str, Path]:
    """The model as TorchScript, torch.export (dynamic batch) and ONNX (dynamic batch) files, written with torch
    alone, as a user outside servekit writes them; and the .pt2 and .onnx with the batch fixed at 1."""
    folder.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    two = torch.cat([example, example])
    files = {name: folder / name for name in ("model.ts", "model.pt2", "model.onnx", "fixed.pt2", "fixed.onnx")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, two).save(str(files["model.ts"]))
        torch.export.save(torch.export.export(model, (two,), dynamic_shapes=({0: batch},)), str(files["model.pt2"]))
        torch.export.save(torch.export.export(model, (example,)), str(files["fixed.pt2"]))
        torch.onnx.export(model, (two,), str(files["model.onnx"]), dynamo=True, dynamic_shapes=({0: batch},),
                          external_data=False, verbose=False)  # fmt: skip
        torch.onnx.export(model, (example,), str(files["fixed.onnx"]), dynamo=True, external_data=False, verbose=False)
    return files


def pixel_bodies(samples: list[HeldOutSample], folder: Path) -> Path:
    """The samples as the README handler's JSON bodies, {"pixels": [784 values]}, in a labelled folder."""
    bodies = {
        f"{i:04d}.json": json.dumps({"pixels": image_to_tensor(s.path.read_bytes(), 10**6).flatten().tolist()}).encode()
        for i, s in enumerate(samples)
    }
    write_bodies(bodies, [s.label for s in samples], folder)
    return folder


def labelled_subset(samples: list[HeldOutSample], folder: Path) -> Path:
    """The samples copied as a labelled folder (index.csv)."""
    write_bodies({s.path.name: s.path.read_bytes() for s in samples}, [s.label for s in samples], folder)
    return folder


def readme_example() -> str:
    """The Python block of the README's "Your own handler" section, as it is written there."""
    section = (REPO / "README.md").read_text().split("### Your own handler\n", 1)[1].split("\n### ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]
