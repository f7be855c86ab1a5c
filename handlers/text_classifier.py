"""TorchServe's entry point for the Transformer text classifier (servekit_worker.text_classifier says what it
accepts)."""

from servekit_worker import text_classifier
from servekit_worker.torchserve import TorchServeHandler


class TextClassifierHandler(TorchServeHandler, text_classifier.TextClassifierHandler):
    """Texts in, the label and top-k probabilities out."""
