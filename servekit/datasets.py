"""Data that ships inside installed packages (no downloads): scikit-learn's 8x8 digits, upscaled to 28x28."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

IMAGE_SIZE = 28
HELD_OUT_INDEX = "index.csv"


@dataclass
class Split:
    """Images are Nx1x28x28 float32 in [0, 1] (white digit on black), quantized to 8 bits like a PNG."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def digits_split(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """A stratified, seeded split of scikit-learn's digits, each image upscaled from 8x8 to 28x28."""
    if not 0.2 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0.2, 1), got {test_fraction}")
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = torch.nn.functional.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")
    images = (images.clamp(0, 1) * 255).round() / 255  # exactly what a PNG of it decodes to
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return Split(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


def to_png(image: torch.Tensor) -> bytes:
    """A 1x28x28 (or 28x28) tensor in [0, 1] -> 8-bit grayscale PNG bytes."""
    pixels = (image.reshape(IMAGE_SIZE, IMAGE_SIZE).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_held_out(images: torch.Tensor, labels: torch.Tensor, folder: Path) -> Path:
    """Writes each image as a PNG plus `index.csv` (file,label); returns the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / HELD_OUT_INDEX
    with index_path.open("w", newline="") as index:
        writer = csv.writer(index)
        writer.writerow(["file", "label"])
        for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            name = f"{i:04d}_{label}.png"
            (folder / name).write_bytes(to_png(image))
            writer.writerow([name, label])
    return index_path


def read_held_out(folder: Path) -> list[tuple[Path, str]]:
    """(PNG path, label) pairs from a folder written by `write_held_out`."""
    index_path = folder / HELD_OUT_INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} not found: run `servekit train digits` to write the held-out set")
    with index_path.open(newline="") as index:
        return [(folder / row["file"], row["label"]) for row in csv.DictReader(index)]
