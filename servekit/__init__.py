"""servekit: from a trained PyTorch model to a versioned, measured TorchServe deployment."""

__version__ = "0.1.0"
