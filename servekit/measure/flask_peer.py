"""The original design's baseline: a Flask `/predict` app around a trained model, on Flask's own server.

`servekit bench --baseline flask --baseline-model DIR` starts it in a subprocess
(`python -m servekit.measure.flask_peer`) so servekit's throughput can be compared with it on the same machine, the
same model and the same request bodies.
It serves what `servekit train` left in DIR, eager, one request at a time per thread, as a plain Flask app would:
- a digits model (SimpleCNN/SmallCNN): image bytes, or JSON `{"input": 28x28 floats}`, as the digits handler;
- an image model (torchvision, e.g. resnet18 at 224 px): image bytes, through the image handler's own transform.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import torch
from flask import Flask, jsonify, request
from PIL import Image

from servekit.build.formats import load_trained
from servekit_worker.architectures import image_transform


def digits_image(body: bytes) -> torch.Tensor:
    image = Image.open(io.BytesIO(body)).convert("L").resize((28, 28))
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float().div(255).reshape(1, 1, 28, 28)


def image_decoder(trained: dict) -> Callable[[bytes], torch.Tensor]:
    transform = image_transform(**trained.get("preprocess", {}))

    def decode(body: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(body)).convert("RGB")
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return transform(pixels.reshape(image.height, image.width, 3).permute(2, 0, 1)).unsqueeze(0)

    return decode


def bytes_decoder(trained: dict) -> Callable[[bytes], torch.Tensor]:
    """Image bytes -> the model's 1-sample input, as this app decodes them (the LitServe peer decodes the same way)."""
    return image_decoder(trained) if is_image_model(trained) else digits_image


def is_image_model(trained: dict) -> bool:
    return trained["model_class"].startswith("torchvision:")


def create_app(model_dir: Path) -> Flask:
    model, trained = load_trained(model_dir)
    decode, takes_json = bytes_decoder(trained), not is_image_model(trained)
    labels = [str(i) for i in range(10)]
    app = Flask("servekit-flask-baseline")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict():
        try:
            if takes_json and request.is_json:
                pixels = torch.tensor(request.get_json()["input"], dtype=torch.float32).reshape(1, 1, 28, 28)
            else:
                pixels = decode(request.get_data())
        except Exception as exc:  # the baseline answers 400 like the handler does
            return jsonify({"error": str(exc)}), 400
        with torch.inference_mode():
            probabilities = torch.softmax(model(pixels), dim=1)[0]
        index = int(probabilities.argmax())
        return jsonify({"label": labels[index], "index": index, "probability": float(probabilities[index])})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("model_store/work/digits"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    arguments = parser.parse_args()
    create_app(arguments.model_dir).run(host=arguments.host, port=arguments.port, threaded=True)


if __name__ == "__main__":
    main()
