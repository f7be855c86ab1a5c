"""The original design's baseline: a Flask `/predict` app around the same SimpleCNN, on Flask's own server.

`servekit bench --baseline flask` starts it in a subprocess (`python -m servekit.baseline`) so servekit's
throughput can be compared with it on the same machine, the same model and the same request bodies.
It accepts what the digits handler accepts: image bytes, or JSON `{"input": 28x28 floats}`.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch
from flask import Flask, jsonify, request
from PIL import Image

from servekit.formats import load_trained


def create_app(model_dir: Path) -> Flask:
    model, _ = load_trained(model_dir)
    labels = [str(i) for i in range(10)]
    app = Flask("servekit-flask-baseline")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict():
        try:
            if request.is_json:
                pixels = torch.tensor(request.get_json()["input"], dtype=torch.float32).reshape(1, 1, 28, 28)
            else:
                image = Image.open(io.BytesIO(request.get_data())).convert("L").resize((28, 28))
                pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float().div(255)
                pixels = pixels.reshape(1, 1, 28, 28)
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
