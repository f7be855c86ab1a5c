"""TorchServe's entry point for torchvision image classifiers (servekit_worker.image_classifier says what it
accepts)."""

from servekit_worker import image_classifier
from servekit_worker.torchserve import TorchServeHandler


class ImageClassifierHandler(TorchServeHandler, image_classifier.ImageClassifierHandler):
    """Images in, the label and top-k probabilities out."""
