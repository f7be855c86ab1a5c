"""TorchServe's entry point for the SimpleCNN digit classifier (servekit_worker.digits says what it accepts)."""

from servekit_worker import digits
from servekit_worker.torchserve import TorchServeHandler


class DigitsHandler(TorchServeHandler, digits.DigitsHandler):
    """Digit images or 28x28 pixel arrays in, the digit's label and top-3 probabilities out."""
