"""TorchServe's entry point for models that take one tensor (servekit_worker.tensor_handler says what it accepts)."""

from servekit_worker import tensor_handler
from servekit_worker.torchserve import TorchServeHandler


class TensorHandler(TorchServeHandler, tensor_handler.TensorHandler):
    """Tensors of handler.input_shape and handler.input_dtype in, raw model outputs out."""
