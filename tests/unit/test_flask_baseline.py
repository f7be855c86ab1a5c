"""The Flask baseline serves an image model (resnet18) as well as digits, with the image handler's transform."""

from __future__ import annotations

import io
import json

import torch
from PIL import Image

from servekit.measure.flask_peer import create_app
from servekit.store.workspace import FORMAT_FILES, HANDLER_FILE
from servekit_worker.architectures import build_model


def test_flask_baseline_answers_an_image_model_and_refuses_junk_with_400(tmp_path):
    handler = {
        "model_class": "torchvision:resnet18",
        "model_kwargs": {"num_classes": 10},
        "preprocess": {"resize": 32, "crop": 32},
        "example_input": {"shape": [3, 32, 32], "dtype": "float32"},
    }
    (tmp_path / HANDLER_FILE).write_text(json.dumps(handler))
    torch.save(
        build_model(handler["model_class"], handler["model_kwargs"]).state_dict(), tmp_path / FORMAT_FILES["state_dict"]
    )
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buffer, format="PNG")
    client = create_app(tmp_path).test_client()
    answer = client.post("/predict", data=buffer.getvalue(), content_type="image/png")
    assert answer.status_code == 200 and answer.json["label"] in [str(i) for i in range(10)]
    assert 0 < answer.json["probability"] <= 1
    refused = client.post("/predict", data=b"not an image", content_type="image/png")
    assert refused.status_code == 400 and refused.json["error"]
