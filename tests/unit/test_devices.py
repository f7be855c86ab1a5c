"""Device selection (--device auto|cpu|cuda) and training on the chosen device."""

from __future__ import annotations

import json

import pytest
import torch

from servekit.build.train import train_digits
from servekit.core.devices import resolve_device
from servekit.core.errors import UsageError


def test_auto_picks_the_gpu_only_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="sees no GPU"):
        resolve_device("cuda")
    with pytest.raises(UsageError, match="choose one of auto, cpu, cuda"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0)


@pytest.mark.gpu
def test_digits_train_on_the_gpu_and_save_cpu_weights(tmp_path):
    result = train_digits(tmp_path / "digits", epochs=3, device=resolve_device("cuda"))
    assert result.accuracy > 0.9
    weights = torch.load(tmp_path / "digits" / "model.pt", weights_only=True)
    assert all(tensor.device.type == "cpu" for tensor in weights.values())
    assert json.loads((tmp_path / "digits" / "metrics.json").read_text())["held_out_accuracy"] == result.accuracy
